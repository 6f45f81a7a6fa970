use super::*;
use crate::labels::NETWORK_LABEL;

fn compact(yaml: &str) -> CompactCluster {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn gateway(locality: &str) -> GatewayIdentity {
    GatewayIdentity::new(locality.parse().unwrap(), BTreeMap::from([(NETWORK_LABEL.to_owned(), "n1".to_owned())]))
}

const FAILOVER: &str = "
name: outbound_.5000_._.helloworld.sample.svc.cluster.local
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {failover: [{from: r1, to: r2}]}}
  outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, minHealthPercent: 20}
  connectionPool: {tcp: {maxConnections: 7, connectTimeout: 250ms, idleTimeout: 0s}}
endpoints:
- {address: '10.0.0.1:5000', locality: r1/z1, clusterId: c1, workloadName: hw-v1,
   labels: {app: helloworld, version: v1, security.istio.io/tlsMode: istio}}
- {address: '10.0.0.2:5000', locality: r2/z1, weight: 3, health: DRAINING}
- {address: '10.0.0.3:5000', locality: r3/z1}
";

#[test]
fn a_cluster_becomes_what_istiod_sends() {
    let built = build(&compact(FAILOVER), &gateway("r1/z1"), &MeshDefaults::default()).unwrap();
    let c = &built.cluster;
    assert_eq!(c.name, "outbound_.5000_._.helloworld.sample.svc.cluster.local");
    assert_eq!(c.eds_cluster_config.as_ref().unwrap().service_name, c.name);
    assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::RoundRobin as i32);
    assert_eq!(c.connect_timeout, Some(proto_duration(Duration::from_millis(250))));
    assert_eq!(c.circuit_breakers.as_ref().unwrap().thresholds[0].max_connections.unwrap().value, 7);
    let od = c.outlier_detection.as_ref().unwrap();
    assert_eq!((od.consecutive_5xx.unwrap().value, od.enforcing_consecutive_5xx.unwrap().value), (1, 100));
    assert_eq!(od.enforcing_success_rate.unwrap().value, 0);
    let common = c.common_lb_config.as_ref().unwrap();
    assert_eq!(common.healthy_panic_threshold.as_ref().unwrap().value, 20.0);
    assert!(common.locality_config_specifier.is_some(), "failover sets locality-weighted lb");

    // Priorities for a gateway in r1: r1 0, r2 (the failover target) 1, r3 2.
    let groups: Vec<(String, u32, u32, usize)> = built
        .assignment
        .endpoints
        .iter()
        .map(|g| {
            let l = g.locality.as_ref().unwrap();
            (l.region.clone(), g.priority, g.load_balancing_weight.unwrap().value, g.lb_endpoints.len())
        })
        .collect();
    assert_eq!(groups, [("r1".into(), 0, 1, 1), ("r2".into(), 1, 3, 1), ("r3".into(), 2, 1, 1)]);
    let first = &built.assignment.endpoints[0].lb_endpoints[0];
    let metadata = &first.metadata.as_ref().unwrap().filter_metadata;
    let workload = match &metadata[ISTIO_METADATA].fields[WORKLOAD_KEY].kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(workload, "hw-v1;sample;helloworld;v1;c1");
    assert_eq!(WorkloadMetadata::parse(&workload).canonical_revision, "v1");
    assert!(metadata.contains_key(TRANSPORT_SOCKET_MATCH));
    assert_eq!(built.assignment.endpoints[1].lb_endpoints[0].health_status, core::HealthStatus::Draining as i32);

    let chain = &built.filter_chain;
    let chain_match = chain.filter_chain_match.as_ref().unwrap();
    assert_eq!(chain_match.server_names, std::slice::from_ref(&c.name));
    assert_eq!(chain_match.application_protocols.len(), 5);
    let Some(listener::filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else { panic!() };
    let proxy = tcp_proxy::TcpProxy::decode(any.value.as_slice()).unwrap();
    assert_eq!(proxy.stat_prefix, c.name);
    assert_eq!(proxy.idle_timeout, Some(proto_duration(Duration::ZERO)), "0s disables the idle timeout");
    assert!(proxy.hash_policy.is_empty());
}

#[test]
fn without_outlier_detection_there_is_one_priority_and_the_mesh_defaults() {
    let plain = compact(
        "{name: outbound_.80_._.a.ns.svc.cluster.local, endpoints: [{address: '10.0.0.1:80', locality: r1/z1},
          {address: '10.0.0.2:80', locality: r2/z1}]}",
    );
    let built = build(&plain, &gateway("r1/z1"), &MeshDefaults::default()).unwrap();
    assert!(built.assignment.endpoints.iter().all(|g| g.priority == 0));
    assert_eq!(built.cluster.lb_policy, cluster::cluster::LbPolicy::LeastRequest as i32);
    assert_eq!(built.cluster.connect_timeout, Some(proto_duration(Duration::from_secs(10))));
    assert!(built.cluster.common_lb_config.is_none(), "Envoy's own panic threshold (50%) applies");
    let listener = listener([&built.filter_chain]);
    assert_eq!(listener.name, LISTENER_NAME);
    assert_eq!(listener.filter_chains.len(), 1);
}

#[test]
fn source_ip_hashing_sets_the_tcp_proxy_hash_policy() {
    let hashed = compact(
        "{name: outbound_.80_._.a.ns.svc.cluster.local,
          trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 251}}}}}",
    );
    let built = build(&hashed, &gateway(""), &MeshDefaults::default()).unwrap();
    assert_eq!(built.cluster.lb_policy, cluster::cluster::LbPolicy::Maglev as i32);
    let Some(listener::filter::ConfigType::TypedConfig(any)) = &built.filter_chain.filters[0].config_type else {
        panic!()
    };
    assert_eq!(tcp_proxy::TcpProxy::decode(any.value.as_slice()).unwrap().hash_policy.len(), 1);
}

#[test]
fn every_problem_is_reported_by_field() {
    let bad = compact(
        "{name: outbound_.80_._.A.ns.svc.cluster.local,
          trafficPolicy: {connectionPool: {tcp: {connectTimeout: -1s}}},
          endpoints: [{address: 10.0.0.1}, {address: '10.0.0.2:0'}, {address: '10.0.0.3:80', locality: a/b/c/d}]}",
    );
    let errors = build(&bad, &gateway(""), &MeshDefaults::default()).unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "name",
            "trafficPolicy.connectionPool.tcp.connectTimeout",
            "endpoints[0].address",
            "endpoints[1].address",
            "endpoints[2].locality"
        ]
    );
    let not_outbound = compact("{name: reviews}");
    assert!(
        build(&not_outbound, &gateway(""), &MeshDefaults::default()).unwrap_err()[0].problem.contains("outbound_.")
    );
}
