use super::*;

const ISSUE_SHAPE: &str = r#"
gateway: { locality: us-east1/us-east1-b, labels: { topology.istio.io/network: network1 } }
traffic_policy:
  loadBalancer:
    simple: ROUND_ROBIN
    localityLbSetting: { enabled: true, failoverPriority: [topology.kubernetes.io/region, topology.kubernetes.io/zone] }
  outlierDetection: { consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 300s, maxEjectionPercent: 100 }
endpoints:
- { name: b1, locality: us-east1/us-east1-b }
- { name: c1, locality: us-east1/us-east1-c }
picks: 20000
steps:
- { name: healthy }
- { name: b1-down, down: [b1] }
"#;

fn scenario(yaml: &str) -> Scenario {
    serde_yaml_ng::from_str(yaml).unwrap()
}

#[test]
fn issue_shape_fails_over_after_one_failure() {
    let report = run(&scenario(ISSUE_SHAPE)).unwrap();
    assert_eq!(report.steps[0].share["b1"], 1.0);
    assert_eq!(report.steps[0].failed, 0);
    assert_eq!(report.steps[1].share["c1"], 1.0);
    assert_eq!(report.steps[1].failed, 1, "consecutive5xxErrors: 1 costs one connection");
    assert_eq!(report.steps[1].failed_steady, 0);
    assert_eq!(report.steps[1].ejected, vec!["b1".to_owned()]);
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["steps"][1]["share"]["c1"], 1.0);
    assert_eq!(json["steps"][0]["name"], "healthy");
}

#[test]
fn deterministic_for_a_seed() {
    let mut s = scenario(ISSUE_SHAPE);
    s.traffic_policy.as_mut().unwrap().load_balancer = None;
    assert_eq!(run(&s).unwrap(), run(&s).unwrap());
}

#[test]
fn without_outlier_detection_failures_never_stop() {
    let mut s = scenario(ISSUE_SHAPE);
    s.traffic_policy.as_mut().unwrap().outlier_detection = None;
    let report = run(&s).unwrap();
    // One priority: round robin halves the traffic, and half of the connections keep failing.
    assert_eq!(report.steps[0].share["b1"], 0.5);
    assert_eq!(report.steps[1].failed_steady, 5000);
}

#[test]
fn unknown_names_are_refused() {
    let mut s = scenario(ISSUE_SHAPE);
    s.steps[1].down = vec!["nope".into()];
    assert!(matches!(run(&s), Err(ScenarioError::UnknownEndpoint { .. })));
    assert!(serde_yaml_ng::from_str::<Scenario>("gateway: {}\nendpoints: []\nsteps: []\nextra: 1\n").is_err());
}

#[test]
fn renders_table_and_svg() {
    let report = run(&scenario(ISSUE_SHAPE)).unwrap();
    let table = table(&report);
    assert!(table.contains("b1-down") && table.contains("100.0%"), "{table}");
    let svg = svg(&report, "a<b");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("a&lt;b"));
}

#[test]
fn every_shipped_scenario_loads_and_runs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scenarios");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let report = run(&load(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for step in &report.steps {
                let sum: f64 = step.share.values().sum();
                assert!((sum - 1.0).abs() < 1e-9 || sum == 0.0, "{}: {}", path.display(), step.name);
            }
            seen += 1;
        }
    }
    assert!(seen >= 4, "expected the shipped scenarios in {}", dir.display());
}
