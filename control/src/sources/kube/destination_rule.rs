//! Istio `networking.istio.io/v1` DestinationRules -> [`DestinationRuleModel`]. The policies are read into
//! [`TrafficPolicy`] through its proto3 JSON form, which refuses unknown fields, while real DRs carry many the gateway
//! has no use for (`tls`, `portLevelSettings`, `connectionPool.http`...): those are pruned first, against the proto's
//! shape below, and reported once per DR version.

use std::collections::{BTreeMap, HashMap};

use crossgate_proto::TrafficPolicy;
use kube::ResourceExt;
use kube::api::DynamicObject;
use serde::Deserialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::model::{DestinationRuleModel, SubsetModel};

/// The JSON shape of one proto message: its fields (camelCase, as Istio writes them) and what each holds.
type Fields = &'static [(&'static str, Shape)];

enum Shape {
    /// A scalar, a well-known type (duration, wrapper), a map or a list of scalars: taken as is.
    Leaf,
    /// A message, or a list of messages.
    Message(Fields),
}

use Shape::{Leaf, Message};

const FROM_TO: Fields = &[("from", Leaf), ("to", Leaf)];
const TRAFFIC_POLICY: Fields = &[
    (
        "loadBalancer",
        Message(&[
            ("simple", Leaf),
            (
                "consistentHash",
                Message(&[
                    ("useSourceIp", Leaf),
                    ("ringHash", Message(&[("minimumRingSize", Leaf)])),
                    ("maglev", Message(&[("tableSize", Leaf)])),
                ]),
            ),
            (
                "localityLbSetting",
                Message(&[
                    ("distribute", Message(FROM_TO)),
                    ("failover", Message(FROM_TO)),
                    ("failoverPriority", Leaf),
                    ("enabled", Leaf),
                ]),
            ),
        ]),
    ),
    (
        "connectionPool",
        Message(&[(
            "tcp",
            Message(&[
                ("maxConnections", Leaf),
                ("connectTimeout", Leaf),
                ("tcpKeepalive", Message(&[("probes", Leaf), ("time", Leaf), ("interval", Leaf)])),
                ("maxConnectionDuration", Leaf),
                ("idleTimeout", Leaf),
            ]),
        )]),
    ),
    (
        "outlierDetection",
        Message(&[
            ("interval", Leaf),
            ("baseEjectionTime", Leaf),
            ("maxEjectionPercent", Leaf),
            ("minHealthPercent", Leaf),
            ("consecutiveGatewayErrors", Leaf),
            ("consecutive5xxErrors", Leaf),
            ("splitExternalLocalOriginErrors", Leaf),
            ("consecutiveLocalOriginFailures", Leaf),
        ]),
    ),
];

/// Removes the fields `fields` does not know from `value`, recording their paths under `path`.
fn prune(value: &mut Value, fields: Fields, path: &str, ignored: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                prune(item, fields, &format!("{path}[{i}]"), ignored);
            }
        }
        Value::Object(object) => {
            object.retain(|key, child| match fields.iter().find(|(name, _)| name == key) {
                Some((_, Message(sub))) => {
                    prune(child, sub, &format!("{path}.{key}"), ignored);
                    true
                }
                Some((_, Leaf)) => true,
                None => {
                    ignored.push(format!("{path}.{key}"));
                    false
                }
            });
        }
        // Not an object: left for the deserializer to refuse.
        _ => {}
    }
}

fn read_policy(value: Option<Value>, path: &str, ignored: &mut Vec<String>) -> Result<Option<TrafficPolicy>, String> {
    let Some(mut value) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    prune(&mut value, TRAFFIC_POLICY, path, ignored);
    serde_json::from_value(value).map(Some).map_err(|e| format!("{path}: {e}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    host: String,
    #[serde(default)]
    export_to: Vec<String>,
    #[serde(default)]
    subsets: Vec<Subset>,
    traffic_policy: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Subset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<Value>,
}

/// The model of one DR and the paths of the fields it ignored.
fn translate(namespace: &str, name: &str, spec: &Value) -> Result<(DestinationRuleModel, Vec<String>), String> {
    let spec: Spec = serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    let mut ignored = Vec::new();
    let traffic_policy = read_policy(spec.traffic_policy, "trafficPolicy", &mut ignored)?;
    let subsets = spec
        .subsets
        .into_iter()
        .map(|s| {
            let path = format!("subsets[{}].trafficPolicy", s.name);
            Ok(SubsetModel {
                traffic_policy: read_policy(s.traffic_policy, &path, &mut ignored)?,
                name: s.name,
                labels: s.labels,
            })
        })
        .collect::<Result<_, String>>()?;
    let model = DestinationRuleModel {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        host: spec.host,
        traffic_policy,
        subsets,
        export_to: spec.export_to,
    };
    Ok((model, ignored))
}

/// Each DR's last translation, by (namespace, name), with the spec it came from: a DR is translated, and its
/// problems logged, once per change rather than on every rebuild of the cluster.
#[derive(Default)]
pub(super) struct DestinationRuleCache {
    entries: HashMap<(String, String), (Value, Option<DestinationRuleModel>)>,
}

impl DestinationRuleCache {
    /// The models of `rules`, sorted by namespace and name; a DR that cannot be read is left out.
    pub fn translate(&mut self, rules: &[std::sync::Arc<DynamicObject>]) -> Vec<DestinationRuleModel> {
        let mut previous = std::mem::take(&mut self.entries);
        for rule in rules {
            let key = (rule.namespace().unwrap_or_default(), rule.name_any());
            let spec = rule.data.get("spec").cloned().unwrap_or(Value::Null);
            let entry = match previous.remove(&key) {
                Some(entry) if entry.0 == spec => entry,
                _ => {
                    let (namespace, name) = &key;
                    let model = match translate(namespace, name, &spec) {
                        Ok((model, ignored)) => {
                            if !ignored.is_empty() {
                                info!(
                                    "DestinationRule {namespace}/{name}: fields the gateway does not use were ignored: {}",
                                    ignored.join(", ")
                                );
                            }
                            Some(model)
                        }
                        Err(e) => {
                            warn!("DestinationRule {namespace}/{name} skipped, fix it to have it applied: {e}");
                            None
                        }
                    };
                    (spec, model)
                }
            };
            self.entries.insert(key, entry);
        }
        let mut models: Vec<DestinationRuleModel> = self.entries.values().filter_map(|(_, m)| m.clone()).collect();
        models.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        models
    }
}

#[cfg(test)]
mod tests {
    use crossgate_proto::load_balancer_settings::consistent_hash_lb::{HashAlgorithm, HashKey, MagLev, RingHash};
    use crossgate_proto::load_balancer_settings::{ConsistentHashLb, LbPolicy, SimpleLb};
    use serde_json::json;

    use super::*;

    /// Every field of the proto, serialized the way pbjson writes it, passes the allowlist untouched.
    #[test]
    fn the_allowlist_covers_the_whole_proto() {
        let full = json!({
            "loadBalancer": {
                "consistentHash": {"useSourceIp": true, "ringHash": {"minimumRingSize": "1024"}},
                "localityLbSetting": {
                    "distribute": [{"from": "r1/*", "to": {"r1/*": 80, "r2/*": 20}}],
                    "failover": [{"from": "r1", "to": "r2"}],
                    "failoverPriority": ["topology.istio.io/network"],
                    "enabled": true,
                },
            },
            "connectionPool": {"tcp": {
                "maxConnections": 10, "connectTimeout": "1s", "maxConnectionDuration": "1h", "idleTimeout": "5m",
                "tcpKeepalive": {"probes": 3, "time": "7200s", "interval": "75s"},
            }},
            "outlierDetection": {
                "interval": "10s", "baseEjectionTime": "30s", "maxEjectionPercent": 50, "minHealthPercent": 20,
                "consecutiveGatewayErrors": 3, "consecutive5xxErrors": 5, "splitExternalLocalOriginErrors": true,
                "consecutiveLocalOriginFailures": 2,
            },
        });
        let mut ignored = Vec::new();
        let policy = read_policy(Some(full.clone()), "trafficPolicy", &mut ignored).unwrap().unwrap();
        assert!(ignored.is_empty(), "{ignored:?}");
        // And what the proto serializes (every field set) is what the allowlist knows.
        let mut written = serde_json::to_value(&policy).unwrap();
        prune(&mut written, TRAFFIC_POLICY, "", &mut ignored);
        assert!(ignored.is_empty(), "{ignored:?}");
        let lb = policy.load_balancer.unwrap();
        let Some(LbPolicy::ConsistentHash(ConsistentHashLb { hash_key, hash_algorithm })) = lb.lb_policy else {
            panic!("consistent hash expected")
        };
        assert_eq!(hash_key, Some(HashKey::UseSourceIp(true)));
        assert_eq!(hash_algorithm, Some(HashAlgorithm::RingHash(RingHash { minimum_ring_size: 1024 })));

        let maglev = json!({"loadBalancer": {"consistentHash": {"maglev": {"tableSize": "65537"}}}});
        let policy = read_policy(Some(maglev), "trafficPolicy", &mut ignored).unwrap().unwrap();
        let Some(LbPolicy::ConsistentHash(hash)) = policy.load_balancer.unwrap().lb_policy else { panic!() };
        assert_eq!(hash.hash_algorithm, Some(HashAlgorithm::Maglev(MagLev { table_size: 65537 })));
        assert!(ignored.is_empty(), "{ignored:?}");
    }

    #[test]
    fn istio_fields_the_proto_lacks_are_pruned_and_reported() {
        let spec = json!({
            "host": "reviews",
            "exportTo": ["."],
            "workloadSelector": {"matchLabels": {"app": "gw"}},
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN", "warmupDurationSecs": "60s"},
                "connectionPool": {"tcp": {"maxConnections": 100}, "http": {"http2MaxRequests": 1000}},
                "tls": {"mode": "ISTIO_MUTUAL"},
                "portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"simple": "RANDOM"}}],
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {
                    "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user", "useSourceIp": true}},
                }},
            ],
        });
        let (model, ignored) = translate("bookinfo", "reviews", &spec).unwrap();
        assert_eq!(
            ignored,
            [
                "trafficPolicy.connectionPool.http",
                "trafficPolicy.loadBalancer.warmupDurationSecs",
                "trafficPolicy.portLevelSettings",
                "trafficPolicy.tls",
                "subsets[v2].trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            ]
        );
        assert_eq!((model.host.as_str(), model.export_to.as_slice()), ("reviews", [".".to_owned()].as_slice()));
        let lb = model.traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap();
        assert_eq!(lb.lb_policy, Some(LbPolicy::Simple(SimpleLb::RoundRobin as i32)));
        assert_eq!(model.traffic_policy.unwrap().connection_pool.unwrap().tcp.unwrap().max_connections, 100);
        assert_eq!(model.subsets.len(), 2);
        assert_eq!((model.subsets[0].labels["version"].as_str(), &model.subsets[0].traffic_policy), ("v1", &None));
        assert!(model.subsets[1].traffic_policy.is_some());
    }

    #[test]
    fn unreadable_rules_are_errors_naming_the_field() {
        let bad_value = json!({"host": "h", "trafficPolicy": {"outlierDetection": {"interval": "often"}}});
        let err = translate("ns", "dr", &bad_value).unwrap_err();
        assert!(err.starts_with("trafficPolicy: "), "{err}");
        let bad_subset = json!({"host": "h", "subsets": [{"name": "v1", "trafficPolicy": {"loadBalancer": "x"}}]});
        assert!(translate("ns", "dr", &bad_subset).unwrap_err().starts_with("subsets[v1].trafficPolicy: "));
        assert!(translate("ns", "dr", &json!({"subsets": []})).unwrap_err().starts_with("spec: "));
    }
}
