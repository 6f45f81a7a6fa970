//! The bootstrap of a real Envoy gateway fed by crossgate-control, shaped like Istio's
//! (`tools/packaging/common/envoy_bootstrap.json`): the node with Istio's metadata, delta ADS to the control
//! service, the admin on localhost, and the two static listeners of an Istio gateway: `:15021/healthz/ready`
//! and `:15090/stats/prometheus`. Everything else (the 15443 listener, its clusters) comes over ADS.

use std::net::IpAddr;
use std::str::FromStr;

use crossgate_istio::node::GatewayNode;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use serde_json::{Value as Json, json};

/// The control service's gRPC address, `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsAddress {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("xDS address {0:?} is not HOST:PORT (e.g. crossgate-control.istio-system.svc:15010 or 10.0.0.1:15010)")]
pub struct XdsAddressError(String);

impl FromStr for XdsAddress {
    type Err = XdsAddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || XdsAddressError(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(error)?;
        // An IPv6 address is written in brackets, as in a URL.
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(error)?;
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(error());
        }
        Ok(XdsAddress { host: host.to_owned(), port })
    }
}

impl XdsAddress {
    /// An IP is used as is; a name is resolved by Envoy, and again as it changes (a Kubernetes Service).
    fn cluster_type(&self) -> &'static str {
        if self.host.parse::<IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" }
    }
}

/// What a gateway's bootstrap is made of.
#[derive(Debug, Clone)]
pub struct EnvoyBootstrap {
    pub node: GatewayNode,
    pub xds: XdsAddress,
    /// Envoy's admin, on 127.0.0.1 only (Istio's 15000).
    pub admin_port: u16,
    /// `/healthz/ready` (Istio's 15021).
    pub status_port: u16,
    /// `/stats/prometheus` (Istio's 15090).
    pub metrics_port: u16,
}

impl EnvoyBootstrap {
    /// With Istio's ports.
    pub fn new(node: GatewayNode, xds: XdsAddress) -> Self {
        EnvoyBootstrap { node, xds, admin_port: 15000, status_port: 15021, metrics_port: 15090 }
    }

    /// The bootstrap, as JSON (Envoy reads JSON or YAML).
    pub fn to_json(&self) -> Json {
        let ads = json!({ "ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s" });
        json!({
            "node": node_json(&self.node),
            "admin": { "address": socket_address("127.0.0.1", self.admin_port) },
            // As Istio's: Envoy's default `cluster_name` tag takes a cluster's name up to its first dot, which
            // is `outbound_` for every sni-dnat cluster.
            "stats_config": { "use_all_default_tags": false },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "DELTA_GRPC",
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }],
                },
                // Istio's 0s: wait for the first configuration however long it takes; readiness says when.
                "lds_config": ads,
                "cds_config": ads,
            },
            "static_resources": {
                "clusters": [
                    self.xds_cluster(),
                    // Istio routes readiness to pilot-agent, which asks Envoy's admin `/ready`; there is no
                    // agent here, so the route goes to the admin directly.
                    admin_cluster("readiness", self.admin_port),
                    admin_cluster("prometheus_stats", self.admin_port),
                ],
                "listeners": [
                    admin_route_listener(self.status_port, "agent", "/healthz/ready", "readiness", Some("/ready")),
                    admin_route_listener(self.metrics_port, "stats", "/stats/prometheus", "prometheus_stats", None),
                ],
            },
            // Istio's: a limit on downstream connections (also silences Envoy's warning about having none).
            "overload_manager": {
                "resource_monitors": [{
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": i32::MAX,
                    },
                }],
            },
        })
    }

    fn xds_cluster(&self) -> Json {
        json!({
            "name": "xds-grpc",
            "type": self.xds.cluster_type(),
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "load_assignment": load_assignment("xds-grpc", &self.xds.host, self.xds.port),
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": {} },
                },
            },
            // Istio's: a dead control service is noticed even when the stream is idle.
            "upstream_connection_options": { "tcp_keepalive": { "keepalive_time": 300 } },
            "circuit_breakers": {
                "thresholds": [
                    { "priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000,
                      "max_requests": 100000 },
                    { "priority": "HIGH", "max_connections": 100000, "max_pending_requests": 100000,
                      "max_requests": 100000 },
                ],
            },
        })
    }
}

/// `GatewayNode::to_envoy`, written as bootstrap JSON.
fn node_json(node: &GatewayNode) -> Json {
    let envoy = node.to_envoy();
    let mut out = json!({ "id": envoy.id, "cluster": envoy.cluster });
    if let Some(locality) = envoy.locality {
        out["locality"] = json!({ "region": locality.region, "zone": locality.zone, "sub_zone": locality.sub_zone });
    }
    if let Some(metadata) = &envoy.metadata {
        out["metadata"] = struct_json(metadata);
    }
    out
}

fn struct_json(value: &Struct) -> Json {
    Json::Object(value.fields.iter().map(|(key, value)| (key.clone(), value_json(value))).collect())
}

fn value_json(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(value_json).collect()),
    }
}

fn socket_address(address: &str, port: u16) -> Json {
    json!({ "socket_address": { "address": address, "port_value": port } })
}

fn load_assignment(cluster: &str, address: &str, port: u16) -> Json {
    json!({
        "cluster_name": cluster,
        "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(address, port) } }] }],
    })
}

fn admin_cluster(name: &str, admin_port: u16) -> Json {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.250s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": load_assignment(name, "127.0.0.1", admin_port),
    })
}

/// An Istio static listener on `0.0.0.0:port` with one route to the admin. The path matches exactly (Istio
/// matches a prefix, to its agent): nothing else of the admin is reachable through it.
fn admin_route_listener(port: u16, stat_prefix: &str, path: &str, cluster: &str, rewrite: Option<&str>) -> Json {
    let mut route = json!({ "cluster": cluster });
    if let Some(rewrite) = rewrite {
        route["prefix_rewrite"] = json!(rewrite);
    }
    json!({
        "name": format!("0.0.0.0_{port}"),
        "address": socket_address("0.0.0.0", port),
        // Istio's: health checks and scrapes are answered whatever the load.
        "ignore_global_conn_limit": true,
        "bypass_overload_manager": true,
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "codec_type": "AUTO",
                    "stat_prefix": stat_prefix,
                    "route_config": {
                        "virtual_hosts": [{
                            "name": "backend",
                            "domains": ["*"],
                            "routes": [{ "match": { "path": path }, "route": route }],
                        }],
                    },
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                    }],
                },
            }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn xds_addresses_parse_as_host_and_port() {
        let name: XdsAddress = "crossgate-control.istio-system.svc:15010".parse().unwrap();
        assert_eq!(
            (name.host.as_str(), name.port, name.cluster_type()),
            ("crossgate-control.istio-system.svc", 15010, "STRICT_DNS")
        );
        let ip: XdsAddress = "[::1]:15010".parse().unwrap();
        assert_eq!((ip.host.as_str(), ip.cluster_type()), ("::1", "STATIC"));
        for bad in ["15010", "host:", "host:0", ":15010", "http://host:15010"] {
            assert!(bad.parse::<XdsAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_node_carries_istio_metadata() {
        let node = GatewayNode {
            id: "gw".into(),
            cluster_id: "cluster1".into(),
            network: "network1".into(),
            requested_network_view: vec!["network1".into(), "network2".into()],
            locality: "r1/z1/s1".parse().unwrap(),
            labels: BTreeMap::from([("app".into(), "istio-eastwestgateway".into())]),
        };
        let bootstrap = EnvoyBootstrap::new(node, "127.0.0.1:15010".parse().unwrap()).to_json();
        let json = &bootstrap["node"];
        assert_eq!(json["metadata"]["CLUSTER_ID"], "cluster1");
        assert_eq!(json["metadata"]["REQUESTED_NETWORK_VIEW"], "network1,network2");
        assert_eq!(json["metadata"]["LABELS"]["app"], "istio-eastwestgateway");
        assert_eq!(json["locality"]["sub_zone"], "s1");
        assert_eq!(bootstrap["dynamic_resources"]["ads_config"]["api_type"], "DELTA_GRPC");
        assert_eq!(bootstrap["static_resources"]["clusters"][0]["type"], "STATIC");
    }
}
