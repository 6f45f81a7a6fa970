//! The YAML form of the resources is the proto3 JSON mapping: the shapes documented in the README load.

use crossgate_proto::{Resources, load_balancer_settings};

#[test]
fn issue_shape_loads() {
    let yaml = r#"
clusters:
- name: outbound_.5000_._.helloworld.sample.svc.cluster.local
  endpoints:
  - address: 127.0.0.1:19443
    locality: us-east1/us-east1-b
    weight: 1
"#;
    let resources: Resources = serde_yaml_ng::from_str(yaml).unwrap();
    let cluster = &resources.clusters[0];
    assert_eq!(cluster.name, "outbound_.5000_._.helloworld.sample.svc.cluster.local");
    assert_eq!(cluster.endpoints[0].address, "127.0.0.1:19443");
    assert_eq!(cluster.endpoints[0].locality, "us-east1/us-east1-b");
    assert_eq!(cluster.endpoints[0].weight, 1);
}

#[test]
fn traffic_policy_uses_istio_field_names() {
    let yaml = r#"
clusters:
- name: outbound_.5000_.v1_.helloworld.sample.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting: { enabled: true, failoverPriority: [topology.kubernetes.io/region] }
    connectionPool: { tcp: { maxConnections: 100, connectTimeout: 2s, idleTimeout: 0s } }
    outlierDetection: { consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 300s, maxEjectionPercent: 100 }
"#;
    let resources: Resources = serde_yaml_ng::from_str(yaml).unwrap();
    let policy = resources.clusters[0].traffic_policy.as_ref().unwrap();
    let lb = policy.load_balancer.as_ref().unwrap();
    assert_eq!(
        lb.lb_policy,
        Some(load_balancer_settings::LbPolicy::Simple(load_balancer_settings::SimpleLb::RoundRobin as i32))
    );
    let locality = lb.locality_lb_setting.as_ref().unwrap();
    assert_eq!(locality.enabled.map(|v| v.value), Some(true));
    let outlier = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx_errors.map(|v| v.value), Some(1));
    assert_eq!(outlier.base_ejection_time.as_ref().unwrap().seconds, 300);
    let tcp = policy.connection_pool.as_ref().unwrap().tcp.as_ref().unwrap();
    assert_eq!(tcp.connect_timeout.as_ref().unwrap().seconds, 2);
}

#[test]
fn unknown_field_is_refused_by_name() {
    let yaml = "clusters:\n- name: x\n  endpoint: []\n";
    let err = serde_yaml_ng::from_str::<Resources>(yaml).unwrap_err().to_string();
    assert!(err.contains("endpoint"), "{err}");
}
