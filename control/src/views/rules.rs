//! Which DestinationRule a gateway applies to a service, decided as istiod's
//! `PushContext.destinationRule` does: the rules of the gateway's own namespace first, then the rules the
//! service's namespace exports to it, then the ones the root namespace exports to it; in each, the most
//! specific host wins. Only the rules defined in the gateway's own cluster take part (multi-primary: config
//! is per cluster), which the caller decides by what it passes in. The lookup owns copies of the rules, so that
//! a gateway's view keeps it from one mesh version to the next (the rules seldom change; services often do).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crossgate_proto::TrafficPolicy;

use super::ViewOptions;
use crate::model::{DestinationRuleModel, SubsetModel};

/// The rules of one namespace that share a host, merged as Istio's `mergeDestinationRule` does: in
/// namespace/name order (Istio uses creation time, which the model does not carry), the first top-level
/// policy is kept and later rules only add subsets with new names.
#[derive(Debug)]
pub(crate) struct MergedRule {
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<SubsetModel>,
    /// The union of the merged rules' `exportTo`, with `.` resolved to their namespace; empty = everywhere.
    export_to: BTreeSet<String>,
}

impl MergedRule {
    fn merge(&mut self, rule: &DestinationRuleModel, export_to: &BTreeSet<&str>) {
        if self.traffic_policy.is_none() {
            self.traffic_policy.clone_from(&rule.traffic_policy);
        }
        for subset in &rule.subsets {
            if !self.subsets.iter().any(|s| s.name == subset.name) {
                self.subsets.push(subset.clone());
            }
        }
        self.export_to.extend(export_to.iter().map(|e| (*e).to_owned()));
    }

    fn exported_to(&self, namespace: &str) -> bool {
        exported_to(&self.export_to, namespace)
    }
}

fn exported_to<S: std::borrow::Borrow<str> + Ord>(export_to: &BTreeSet<S>, namespace: &str) -> bool {
    export_to.is_empty() || export_to.contains("*") || export_to.contains(namespace)
}

/// One of istiod's rule indexes: rules merged by resolved host.
#[derive(Debug, Default)]
struct HostIndex {
    rules: BTreeMap<String, MergedRule>,
}

impl HostIndex {
    fn insert(&mut self, host: String, rule: &DestinationRuleModel, export_to: &BTreeSet<&str>) {
        self.rules
            .entry(host)
            .or_insert_with(|| MergedRule { traffic_policy: None, subsets: Vec::new(), export_to: BTreeSet::new() })
            .merge(rule, export_to);
    }

    /// `MostSpecificHostMatch`: the exact host, else the longest wildcard (`*.ns.svc.cluster.local`, `*.local`,
    /// `*`) whose suffix the host ends with.
    fn most_specific(&self, host: &str) -> Option<&MergedRule> {
        self.rules.get(host).or_else(|| {
            self.rules
                .iter()
                .filter(|(pattern, _)| pattern.strip_prefix('*').is_some_and(|suffix| host.ends_with(suffix)))
                .max_by_key(|(pattern, _)| pattern.len())
                .map(|(_, rule)| rule)
        })
    }
}

/// The DestinationRules one gateway sees, indexed for lookups by service.
#[derive(Debug, Default)]
pub(crate) struct RuleLookup {
    gateway_namespace: String,
    root_namespace: String,
    /// What a proxy of the gateway's namespace looks at first: that namespace's rules visible in it, or,
    /// when the gateway runs in the root namespace, only the root namespace's private rules (so that catch-all
    /// rules there do not hide the services' own rules).
    local: HostIndex,
    /// Rules exported beyond their namespace, by namespace.
    exported: BTreeMap<String, HostIndex>,
}

impl RuleLookup {
    pub fn new(rules: &[DestinationRuleModel], options: &ViewOptions) -> Self {
        let gateway_namespace = options.gateway_namespace.as_str();
        let root_namespace = options.root_namespace.as_str();
        let mut lookup = RuleLookup {
            gateway_namespace: gateway_namespace.to_owned(),
            root_namespace: root_namespace.to_owned(),
            local: HostIndex::default(),
            exported: BTreeMap::new(),
        };
        let mut sorted: Vec<&DestinationRuleModel> = rules.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for rule in sorted {
            let namespace = rule.namespace.as_str();
            let host = resolve_host(&rule.host, namespace, &options.domain_suffix);
            let export_to: BTreeSet<&str> =
                rule.export_to.iter().map(|e| if e == "." { namespace } else { e.as_str() }).collect();
            let private = export_to.len() == 1 && export_to.contains(namespace);
            let local = if gateway_namespace == root_namespace {
                namespace == root_namespace && private
            } else {
                namespace == gateway_namespace && exported_to(&export_to, namespace)
            };
            if local {
                lookup.local.insert(host.clone(), rule, &export_to);
            }
            if !private {
                lookup.exported.entry(namespace.to_owned()).or_default().insert(host, rule, &export_to);
            }
        }
        lookup
    }

    /// The rule for a service, if any. As in Istio, when the most specific rule of a namespace is not
    /// exported to the gateway, a less specific one of that namespace is not tried.
    pub fn lookup(&self, host: &str, service_namespace: &str) -> Option<&MergedRule> {
        self.local.most_specific(host).or_else(|| {
            [service_namespace, self.root_namespace.as_str()].into_iter().find_map(|namespace| {
                let rule = self.exported.get(namespace)?.most_specific(host)?;
                rule.exported_to(&self.gateway_namespace).then_some(rule)
            })
        })
    }
}

/// `ResolveShortnameToFQDN`: a host without a dot is a Service name in the rule's namespace.
fn resolve_host(host: &str, namespace: &str, domain: &str) -> String {
    if host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// Istio's `MergeTrafficPolicy`: each of the subset's top-level fields, when set, replaces the rule's.
pub(crate) fn merge_policy(rule: Option<&TrafficPolicy>, subset: Option<&TrafficPolicy>) -> Option<TrafficPolicy> {
    let Some(subset) = subset else { return rule.cloned() };
    let rule = rule.cloned().unwrap_or_default();
    Some(TrafficPolicy {
        load_balancer: subset.load_balancer.clone().or(rule.load_balancer),
        connection_pool: subset.connection_pool.or(rule.connection_pool),
        outlier_detection: subset.outlier_detection.or(rule.outlier_detection),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(namespace: &str, name: &str, host: &str, export_to: &[&str]) -> DestinationRuleModel {
        DestinationRuleModel {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            host: host.to_owned(),
            traffic_policy: None,
            subsets: vec![SubsetModel { name: name.to_owned(), ..Default::default() }],
            export_to: export_to.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    /// The name of the (first) rule the gateway applies to `host` of namespace `service_namespace`.
    fn applied(rules: &[DestinationRuleModel], options: &ViewOptions, host: &str, namespace: &str) -> Option<String> {
        RuleLookup::new(rules, options).lookup(host, namespace).map(|rule| rule.subsets[0].name.clone())
    }

    const REVIEWS: &str = "reviews.default.svc.cluster.local";

    #[test]
    fn host_matching_resolves_short_names_and_prefers_the_most_specific() {
        let options = ViewOptions::default();
        // (rules, the one applied to reviews.default)
        let table: Vec<(Vec<DestinationRuleModel>, Option<&str>)> = vec![
            (vec![rule("default", "short", "reviews", &[])], Some("short")),
            // A short name is relative to the rule's namespace.
            (vec![rule("other", "short", "reviews", &[])], None),
            (vec![rule("default", "fqdn", REVIEWS, &[])], Some("fqdn")),
            // Only dot-less names are expanded: `reviews.default` names no Service.
            (vec![rule("default", "partial", "reviews.default", &[])], None),
            (vec![rule("default", "mismatch", "ratings.default.svc.cluster.local", &[])], None),
            (vec![rule("default", "ns", "*.default.svc.cluster.local", &[])], Some("ns")),
            (vec![rule("default", "local", "*.local", &[])], Some("local")),
            (vec![rule("default", "all", "*", &[])], Some("all")),
            (
                vec![
                    rule("default", "a-all", "*", &[]),
                    rule("default", "b-exact", REVIEWS, &[]),
                    rule("default", "c-ns", "*.default.svc.cluster.local", &[]),
                ],
                Some("b-exact"),
            ),
            (
                vec![
                    rule("default", "a-local", "*.local", &[]),
                    rule("default", "b-ns", "*.default.svc.cluster.local", &[]),
                ],
                Some("b-ns"),
            ),
            // The service's namespace before the root namespace, even for a less specific host.
            (
                vec![rule("istio-system", "root-exact", REVIEWS, &[]), rule("default", "svc-wild", "*.local", &[])],
                Some("svc-wild"),
            ),
            (vec![rule("istio-system", "root", "*.local", &[])], Some("root")),
            // Rules of a third namespace do not apply to the gateway.
            (vec![rule("other", "third", REVIEWS, &[])], None),
        ];
        for (rules, expected) in table {
            let names: Vec<_> = rules.iter().map(|r| r.name.clone()).collect();
            assert_eq!(applied(&rules, &options, REVIEWS, "default").as_deref(), expected, "{names:?}");
        }
    }

    #[test]
    fn export_to_decides_visibility_from_the_gateway_namespace() {
        let root = ViewOptions::default();
        let own_namespace = ViewOptions { gateway_namespace: "gateways".to_owned(), ..ViewOptions::default() };
        // (rule namespace, exportTo, gateway options, applied)
        let table: [(&str, &[&str], &ViewOptions, bool); 14] = [
            ("default", &[], &root, true),
            ("default", &["*"], &root, true),
            ("default", &["."], &root, false),
            ("default", &["istio-system"], &root, true),
            ("default", &["istio-system", "other"], &root, true),
            ("default", &["other"], &root, false),
            ("default", &["default"], &root, false),
            ("istio-system", &["."], &root, true),
            ("istio-system", &["other"], &root, false),
            ("gateways", &["."], &own_namespace, true),
            ("gateways", &["other"], &own_namespace, false),
            ("default", &["gateways"], &own_namespace, true),
            ("default", &["."], &own_namespace, false),
            ("istio-system", &["*"], &own_namespace, true),
        ];
        for (namespace, export_to, options, expected) in table {
            let rules = [rule(namespace, "dr", REVIEWS, export_to)];
            assert_eq!(applied(&rules, options, REVIEWS, "default").is_some(), expected, "{namespace} {export_to:?}");
        }
    }

    #[test]
    fn an_unexported_most_specific_rule_hides_the_less_specific_one_of_its_namespace() {
        let rules = [rule("default", "exact", REVIEWS, &["other"]), rule("default", "wild", "*.local", &[])];
        assert_eq!(applied(&rules, &ViewOptions::default(), REVIEWS, "default"), None);
        // The root namespace is still consulted after it.
        let rules = [rules[0].clone(), rule("istio-system", "root", "*.local", &[])];
        assert_eq!(applied(&rules, &ViewOptions::default(), REVIEWS, "default").as_deref(), Some("root"));
    }

    #[test]
    fn rules_for_one_host_merge_in_name_order() {
        let policy = |max_connections| TrafficPolicy {
            connection_pool: Some(crossgate_proto::ConnectionPoolSettings {
                tcp: Some(crossgate_proto::connection_pool_settings::TcpSettings {
                    max_connections,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let subset = |name: &str| SubsetModel { name: name.to_owned(), ..Default::default() };
        let mut a = rule("default", "a", REVIEWS, &[]);
        a.subsets = vec![subset("v1")];
        let mut b = rule("default", "b", "reviews", &[]);
        b.traffic_policy = Some(policy(2));
        b.subsets = vec![subset("v1"), subset("v2")];
        let mut c = rule("default", "c", REVIEWS, &[]);
        c.traffic_policy = Some(policy(3));
        let rules = [c, a, b];
        let options = ViewOptions::default();
        let lookup = RuleLookup::new(&rules, &options);
        let merged = lookup.lookup(REVIEWS, "default").unwrap();
        assert_eq!(merged.traffic_policy, Some(policy(2)));
        let names: Vec<_> = merged.subsets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["v1", "v2", "c"]);
    }

    #[test]
    fn subset_policy_overrides_field_by_field() {
        use crossgate_proto::{LoadBalancerSettings, OutlierDetection, load_balancer_settings::LbPolicy};
        let lb = |simple| LoadBalancerSettings { lb_policy: Some(LbPolicy::Simple(simple)), ..Default::default() };
        let outlier = OutlierDetection { max_ejection_percent: 50, ..Default::default() };
        let top = TrafficPolicy { load_balancer: Some(lb(2)), outlier_detection: Some(outlier), ..Default::default() };
        let subset = TrafficPolicy { load_balancer: Some(lb(4)), ..Default::default() };
        let merged = merge_policy(Some(&top), Some(&subset)).unwrap();
        assert_eq!(merged.load_balancer, Some(lb(4)));
        assert_eq!(merged.outlier_detection, Some(outlier));
        assert_eq!(merged.connection_pool, None);
        assert_eq!(merge_policy(Some(&top), None), Some(top.clone()));
        assert_eq!(merge_policy(None, Some(&subset)), Some(subset));
        assert_eq!(merge_policy(None, None), None);
    }
}
