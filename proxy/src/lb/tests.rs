//! Whole-cluster tests: Envoy's documented shares, ejection timing, and seeded property checks.

use super::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use std::collections::BTreeMap;
use std::time::Duration;

fn endpoint(port: u16, locality: &str) -> EndpointSpec {
    EndpointSpec {
        // Port 0 is not an endpoint's: offset them all.
        address: SocketAddr::from(([127, 0, 0, 1], 10_000 + port)),
        locality: Arc::new(locality.parse().unwrap()),
        weight: 1,
        health: Health::Healthy,
        workload: Arc::default(),
    }
}

fn with_health(mut e: EndpointSpec, health: Health, weight: u32) -> EndpointSpec {
    e.health = health;
    e.weight = weight;
    e
}

/// A DestinationRule traffic policy (YAML), and a registered pick policy that may replace its algorithm.
#[derive(Debug, Clone)]
struct Rule {
    yaml: String,
    policy: Option<&'static str>,
}

impl Rule {
    fn with_policy(mut self, name: &'static str) -> Result<Rule, LbConfigError> {
        LbSettings::default().with_policy(name)?;
        self.policy = Some(name);
        Ok(self)
    }
}

fn settings(yaml: &str) -> Rule {
    Rule { yaml: yaml.to_owned(), policy: None }
}

/// The Envoy cluster istiod builds for a DestinationRule traffic policy (YAML).
pub(crate) fn envoy_cluster(yaml: &str) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    let compact = compact(&[], &settings(yaml));
    crossgate_istio::gateway::build(&compact, &gateway(""), &Default::default()).unwrap().cluster
}

fn compact(endpoints: &[EndpointSpec], rule: &Rule) -> crossgate_proto::Cluster {
    let traffic_policy = (!rule.yaml.trim().is_empty()).then(|| serde_yaml_ng::from_str(&rule.yaml).unwrap());
    crossgate_proto::Cluster {
        name: "outbound_.80_._.test.default.svc.cluster.local".to_owned(),
        traffic_policy,
        endpoints: endpoints
            .iter()
            .map(|e| crossgate_proto::Endpoint {
                address: e.address.to_string(),
                locality: e.locality.to_string(),
                weight: e.weight,
                health: match e.health {
                    Health::Healthy => crossgate_proto::endpoint::Health::Healthy,
                    Health::Unhealthy => crossgate_proto::endpoint::Health::Unhealthy,
                    Health::Draining => crossgate_proto::endpoint::Health::Draining,
                } as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn gateway(locality: &str) -> crossgate_istio::locality_lb::GatewayIdentity {
    crossgate_istio::locality_lb::GatewayIdentity::new(locality.parse().unwrap(), BTreeMap::new())
}

/// The lb a gateway at `locality` holds for these endpoints under `rule`: through istiod's resources, as
/// configuration reaches it.
fn rebuild(endpoints: Vec<EndpointSpec>, rule: Rule, locality: &str, previous: Option<&ClusterLb>) -> ClusterLb {
    crate::resources::compact_lb(&compact(&endpoints, &rule), &gateway(locality), rule.policy, previous).unwrap()
}

fn build(endpoints: Vec<EndpointSpec>, rule: Rule, locality: &str) -> ClusterLb {
    rebuild(endpoints, rule, locality, None)
}

const SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn counts(lb: &ClusterLb, picks: usize, seed: u64) -> Vec<usize> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut counts = vec![0; lb.hosts().len()];
    for _ in 0..picks {
        counts[lb.pick(&PickContext { source: SOURCE, tried: &[] }, &mut rng).unwrap().index] += 1;
    }
    counts
}

/// Fails `times` consecutive connects to `index`.
fn fail(lb: &ClusterLb, index: usize, times: u32, now: Instant) {
    for _ in 0..times {
        lb.report(index, Outcome::ConnectFailure, now);
    }
}

/// Outlier detection that ejects on the first failure, for long, with no cap.
const EJECT_AT_ONCE: &str =
    "outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 300s, maxEjectionPercent: 100}";

#[test]
fn round_robin_follows_weights_exactly() {
    let endpoints = vec![endpoint(1, ""), with_health(endpoint(2, ""), Health::Healthy, 3)];
    let lb = build(endpoints, settings("loadBalancer: {simple: ROUND_ROBIN}"), "");
    assert_eq!(counts(&lb, 400, 1), vec![100, 300]);
}

#[test]
fn unhealthy_and_draining_hosts_get_nothing() {
    for policy in ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "RING_HASH", "MAGLEV"] {
        let endpoints = vec![
            with_health(endpoint(1, ""), Health::Unhealthy, 1),
            endpoint(2, ""),
            with_health(endpoint(3, ""), Health::Draining, 1),
        ];
        let lb = build(endpoints, settings("").with_policy(policy).unwrap(), "");
        assert_eq!(counts(&lb, 100, 1), vec![0, 100, 0], "{policy}");
        assert_eq!(lb.healthy_count(), 1);
    }
}

#[test]
fn least_request_prefers_idle_hosts() {
    let lb = build(vec![endpoint(1, ""), endpoint(2, "")], settings(""), "");
    let mut rng = SmallRng::seed_from_u64(1);
    let ctx = PickContext { source: SOURCE, tried: &[] };
    // Hold every pick open: the two hosts stay close (both draws land on the same host half of the time, so
    // not within one; a random pick would drift by ~sqrt(n)).
    let held: Vec<Picked> = (0..1000).map(|_| lb.pick(&ctx, &mut rng).unwrap()).collect();
    let (a, b) = (lb.hosts()[0].state.active(), lb.hosts()[1].state.active());
    assert_eq!(a + b, 1000);
    assert!(a.abs_diff(b) <= 6, "{a} vs {b}");
    drop(held);
    assert_eq!(lb.hosts()[0].state.active() + lb.hosts()[1].state.active(), 0);
}

#[test]
fn retry_avoids_tried_hosts_and_ends() {
    let endpoints = vec![endpoint(1, ""), with_health(endpoint(2, ""), Health::Healthy, 100)];
    let lb = build(endpoints, settings(""), "");
    let mut rng = SmallRng::seed_from_u64(3);
    let picked = lb.pick(&PickContext { source: SOURCE, tried: &[1] }, &mut rng).unwrap();
    assert_eq!(picked.index, 0);
    assert!(lb.pick(&PickContext { source: SOURCE, tried: &[0, 1] }, &mut rng).is_none());
}

#[test]
fn host_state_survives_rebuild() {
    let od = settings(EJECT_AT_ONCE);
    let lb = build(vec![endpoint(1, ""), endpoint(3, "")], od.clone(), "");
    let mut rng = SmallRng::seed_from_u64(3);
    let held = lb.pick(&PickContext { source: SOURCE, tried: &[1] }, &mut rng).unwrap();
    let rebuilt = rebuild(vec![endpoint(2, ""), endpoint(1, ""), endpoint(3, "")], od, "", Some(&lb));
    assert_eq!(rebuilt.hosts()[1].state.active(), 1);
    assert_eq!(rebuilt.hosts()[0].state.active(), 0);
    drop(held);
    assert_eq!(rebuilt.hosts()[1].state.active(), 0);
    // An ejection reported to the old snapshot (a connection picked before the rebuild) reaches the new one.
    fail(&lb, 1, 1, Instant::now());
    assert!(rebuilt.hosts()[2].state.ejected());
    assert_eq!(rebuilt.healthy_count(), 2);
    assert_eq!(counts(&rebuilt, 100, 1)[2], 0);
}

/// Ten hosts in the gateway's zone (priority 0) and ten in another zone (priority 1); the share of traffic that
/// stays in priority 0 with `down` of its hosts ejected.
fn p0_share(down: usize, outlier: &str) -> f64 {
    let endpoints: Vec<EndpointSpec> = (0..20).map(|i| endpoint(i, if i < 10 { "r/a" } else { "r/b" })).collect();
    let lb = build(endpoints, settings(outlier), "r/a");
    let now = Instant::now();
    for i in 0..down {
        fail(&lb, i, 1, now);
    }
    let counts = counts(&lb, 20_000, 9);
    counts[..10].iter().sum::<usize>() as f64 / 20_000.0
}

#[test]
fn priority_shares_follow_envoy() {
    // (P0 hosts ejected of 10, share kept by P0): health = min(100, 1.4 · healthy%).
    for (down, expected) in [(0, 1.0), (2, 1.0), (3, 0.98), (5, 0.70), (8, 0.28), (10, 0.0)] {
        let share = p0_share(down, EJECT_AT_ONCE);
        assert!((share - expected).abs() < 0.015, "{down} down: {share} vs {expected}");
    }
}

#[test]
fn failover_needs_outlier_detection() {
    let endpoints: Vec<EndpointSpec> = (0..4).map(|i| endpoint(i, if i < 2 { "r/a" } else { "r/b" })).collect();
    let lb = build(endpoints.clone(), settings("loadBalancer: {simple: ROUND_ROBIN}"), "r/a");
    assert_eq!(counts(&lb, 400, 1), vec![100; 4], "without outlierDetection: one priority");
    let lb = build(
        endpoints.clone(),
        settings(&format!("{{loadBalancer: {{simple: ROUND_ROBIN}}, {}}}", &EJECT_AT_ONCE)),
        "r/a",
    );
    assert_eq!(counts(&lb, 400, 1), vec![200, 200, 0, 0]);
    let off = "{loadBalancer: {localityLbSetting: {enabled: false}, simple: ROUND_ROBIN}, outlierDetection: {}}";
    assert_eq!(counts(&build(endpoints, settings(off), "r/a"), 400, 1), vec![100; 4], "enabled: false");
}

#[test]
fn panic_threshold() {
    let endpoints: Vec<EndpointSpec> = (0..4).map(|i| endpoint(i, "")).collect();
    let now = Instant::now();
    // minHealthPercent 50, 3 of 4 ejected (25% < 50%): panic, all four hosts share the traffic.
    let lb = build(endpoints.clone(), settings(&EJECT_AT_ONCE.replace('}', ", minHealthPercent: 50}")), "");
    (0..3).for_each(|i| fail(&lb, i, 1, now));
    let counts_panic = counts(&lb, 8000, 2);
    assert!(counts_panic.iter().all(|c| (1700..2300).contains(c)), "{counts_panic:?}");
    // minHealthPercent 0 (Istio's default): no panic, the last host takes everything ...
    let lb = build(endpoints.clone(), settings(EJECT_AT_ONCE), "");
    (0..3).for_each(|i| fail(&lb, i, 1, now));
    assert_eq!(counts(&lb, 100, 2), vec![0, 0, 0, 100]);
    // ... and once it is ejected too, nothing is picked.
    fail(&lb, 3, 1, now);
    let mut rng = SmallRng::seed_from_u64(1);
    assert!(lb.pick(&PickContext { source: SOURCE, tried: &[] }, &mut rng).is_none());
    // Without outlierDetection, Envoy's default 50% applies: 1 of 4 healthy is panic.
    let endpoints: Vec<EndpointSpec> = (0..4)
        .map(|i| with_health(endpoint(i, ""), if i == 0 { Health::Healthy } else { Health::Unhealthy }, 1))
        .collect();
    let lb = build(endpoints, settings("loadBalancer: {simple: ROUND_ROBIN}"), "");
    assert_eq!(counts(&lb, 400, 1), vec![100; 4]);
}

#[test]
fn max_ejection_percent_caps_ejections() {
    let endpoints: Vec<EndpointSpec> = (0..5).map(|i| endpoint(i, "")).collect();
    let now = Instant::now();
    // Default 10% of 5 hosts: one ejection would be 20%, so Envoy ejects none...
    let lb = build(endpoints.clone(), settings("outlierDetection: {consecutive5xxErrors: 1}"), "");
    (0..5).for_each(|i| fail(&lb, i, 1, now));
    assert_eq!(lb.hosts().iter().filter(|h| h.state.ejected()).count(), 0);
    // ...unless always_eject_one_host (Istio never sets it) lets one out.
    let mut cluster = envoy_cluster("outlierDetection: {consecutive5xxErrors: 1}");
    cluster.outlier_detection.as_mut().unwrap().always_eject_one_host =
        Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
    let settings_one = LbSettings::from_envoy(&cluster).unwrap();
    let lb = ClusterLb::new(
        endpoints.clone(),
        build(endpoints.clone(), settings(""), "").topology().clone(),
        settings_one,
        None,
        "c",
    );
    (0..5).for_each(|i| fail(&lb, i, 1, now));
    assert_eq!(lb.hosts().iter().filter(|h| h.state.ejected()).count(), 1);
    // 40%: two.
    let lb = build(endpoints, settings("outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 40}"), "");
    (0..5).for_each(|i| fail(&lb, i, 1, now));
    assert_eq!(lb.hosts().iter().filter(|h| h.state.ejected()).count(), 2);
}

#[test]
fn a_cluster_without_outlier_detection_never_asks_for_a_sweep() {
    let lb = build(vec![endpoint(1, "")], settings(""), "");
    assert_eq!(lb.tick(Instant::now()), None);
}

#[test]
fn ejection_lasts_base_times_multiplier_then_decays() {
    let od =
        "outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 10s, maxEjectionPercent: 100}";
    let lb = build(vec![endpoint(1, ""), endpoint(2, "")], settings(od), "");
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    assert_eq!(lb.tick(at(0)), Some(at(1_000)), "sweeps every second from here");
    assert_eq!(lb.tick(at(400)), Some(at(1_000)), "not due yet");
    // Ticks every 100 ms from `from`; returns when host 0 comes back, in ms.
    let back_at = |from: u64| {
        (from..).step_by(100).find(|ms| {
            lb.tick(at(*ms));
            !lb.hosts()[0].state.ejected()
        })
    };
    fail(&lb, 0, 1, at(500));
    assert!(!lb.hosts()[0].state.ejected(), "one failure is below the threshold");
    fail(&lb, 0, 1, at(500));
    assert!(lb.hosts()[0].state.ejected());
    // 10 s, seen at the first sweep after 10.5 s.
    assert_eq!(back_at(600), Some(11_000));
    // Ejected again at once: the multiplier is 2, so 20 s.
    fail(&lb, 0, 2, at(11_000));
    assert_eq!(back_at(11_100), Some(31_000));
    assert_eq!(lb.hosts()[0].state.ejection_multiplier(), 2);
    // Healthy for one interval per step: the multiplier decays back to 0.
    for ms in (31_100..34_000).step_by(100) {
        lb.tick(at(ms));
    }
    assert_eq!(lb.hosts()[0].state.ejection_multiplier(), 0);
}

#[test]
fn success_resets_the_streak() {
    let lb = build(
        vec![endpoint(1, ""), endpoint(2, "")],
        settings("outlierDetection: {consecutive5xxErrors: 3, maxEjectionPercent: 100}"),
        "",
    );
    let now = Instant::now();
    fail(&lb, 0, 2, now);
    lb.report(0, Outcome::ConnectSuccess, now);
    fail(&lb, 0, 2, now);
    assert!(!lb.hosts()[0].state.ejected());
    lb.report(0, Outcome::ConnectTimeout, now);
    assert!(lb.hosts()[0].state.ejected());
}

#[test]
fn distribute_shares_follow_weights() {
    // Istio's task: 70% zone1, 20% zone2, 10% region3/zone4; region2/zone3 gets nothing.
    let yaml = r#"
loadBalancer:
  simple: ROUND_ROBIN
  localityLbSetting:
    distribute:
    - from: region1/zone1/*
      to: {"region1/zone1/*": 70, "region1/zone2/*": 20, "region3/zone4/*": 10}
outlierDetection: {}
"#;
    let endpoints = ["region1/zone1", "region1/zone2", "region2/zone3", "region3/zone4"];
    let lb = build(endpoints.iter().zip(1..).map(|(l, i)| endpoint(i, l)).collect(), settings(yaml), "region1/zone1");
    // istiod sends region2/zone3's locality without its endpoints: the gateway never holds that host.
    let held: Vec<String> = lb.hosts().iter().map(|h| h.spec.locality.to_string()).collect();
    assert_eq!(held, ["region1/zone1/", "region1/zone2/", "region3/zone4/"]);
    let counts = counts(&lb, 20_000, 4);
    for (count, expected) in counts.iter().zip([0.7, 0.2, 0.1]) {
        assert!((*count as f64 / 20_000.0 - expected).abs() < 0.015, "{counts:?}");
    }
}

#[test]
fn failover_priority_with_locality_weights() {
    // The seed's DestinationRule: failoverPriority region then zone. b1, b2 in the gateway's zone; c1 in another.
    let yaml = r#"
loadBalancer:
  simple: ROUND_ROBIN
  localityLbSetting: { enabled: true, failoverPriority: [topology.kubernetes.io/region, topology.kubernetes.io/zone] }
outlierDetection: { consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 300s, maxEjectionPercent: 100 }
"#;
    let endpoints = vec![
        endpoint(1, "us-east1/us-east1-b"),
        endpoint(2, "us-east1/us-east1-b"),
        endpoint(3, "us-east1/us-east1-c"),
    ];
    let lb = build(endpoints, settings(yaml), "us-east1/us-east1-b");
    assert_eq!(counts(&lb, 300, 1), vec![150, 150, 0]);
    // One of two down: 50% healthy → P0 keeps 70%, all of it on b2.
    fail(&lb, 0, 1, Instant::now());
    let counts = counts(&lb, 20_000, 1);
    assert_eq!(counts[0], 0);
    assert!((counts[1] as f64 / 20_000.0 - 0.7).abs() < 0.015, "{counts:?}");
}

#[test]
fn consistent_hash_is_sticky_per_source() {
    for policy in ["RING_HASH", "MAGLEV"] {
        let lb = build((0..10).map(|i| endpoint(i, "")).collect(), settings("").with_policy(policy).unwrap(), "");
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seen = std::collections::BTreeSet::new();
        for client in 0..50u32 {
            let ctx = PickContext { source: IpAddr::from(client.to_be_bytes()), tried: &[] };
            let first = lb.pick(&ctx, &mut rng).unwrap().index;
            assert!((0..5).all(|_| lb.pick(&ctx, &mut rng).unwrap().index == first), "{policy}");
            seen.insert(first);
        }
        assert!(seen.len() > 5, "{policy}: clients spread over hosts: {seen:?}");
    }
}

/// Seeded property checks over random clusters: localities, weights, health, policies, panic thresholds,
/// failover modes and ejections.
#[test]
fn property_no_ejected_pick_outside_panic() {
    let mut rng = SmallRng::seed_from_u64(2024);
    let policies = ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "RING_HASH", "MAGLEV"];
    let locality_settings = [
        "",
        "localityLbSetting: {failoverPriority: [topology.kubernetes.io/region, topology.kubernetes.io/zone]}, ",
        "localityLbSetting: {failover: [{from: r0, to: r2}]}, ",
        "localityLbSetting: {enabled: false}, ",
    ];
    for case in 0..150 {
        let n = rng.random_range(1..30);
        let endpoints: Vec<EndpointSpec> = (0..n)
            .map(|i| {
                let locality = format!("r{}/z{}", rng.random_range(0..3), rng.random_range(0..3));
                let health = if rng.random_ratio(1, 8) { Health::Unhealthy } else { Health::Healthy };
                with_health(endpoint(i, &locality), health, rng.random_range(1..5))
            })
            .collect();
        let min_health = [0, 50][rng.random_range(0..2)];
        let yaml = format!(
            "{{loadBalancer: {{{}simple: ROUND_ROBIN}}, outlierDetection: {{consecutive5xxErrors: 1, maxEjectionPercent: {}, minHealthPercent: {min_health}}}}}",
            locality_settings[rng.random_range(0..locality_settings.len())],
            rng.random_range(1..=100),
        );
        let settings = settings(&yaml).with_policy(policies[rng.random_range(0..policies.len())]).unwrap();
        let lb = build(endpoints, settings, "r0/z0");
        let now = Instant::now();
        for i in 0..n as usize {
            if rng.random_ratio(1, 2) {
                fail(&lb, i, 1, now);
            }
        }
        let view = lb.current_view();
        let mut counts = vec![0usize; n as usize];
        let mut picks = 0;
        for _ in 0..500 {
            let source = IpAddr::from(rng.random::<[u8; 4]>());
            let Some(picked) = lb.pick(&PickContext { source, tried: &[] }, &mut rng) else {
                assert!(!view.routable(), "case {case}: {yaml}");
                continue;
            };
            let host = &lb.hosts()[picked.index];
            let unavailable = host.state.ejected() || host.spec.health != Health::Healthy;
            assert!(!unavailable || view.any_panic(), "case {case}: picked unavailable host {picked:?} ({yaml})");
            counts[picked.index] += 1;
            picks += 1;
        }
        if picks > 0 {
            let sum: f64 = counts.iter().map(|c| *c as f64 / picks as f64).sum();
            assert!((sum - 1.0).abs() < 1e-9);
        }
        if min_health == 0 && lb.healthy_count() > 0 {
            assert!(view.routable(), "case {case}: a healthy host must be reachable without panic");
        }
    }
}

#[test]
fn property_priority_loads_sum_to_100() {
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..2000 {
        let priorities: Vec<load::Availability> = (0..rng.random_range(1..6))
            .map(|_| {
                let total = rng.random_range(1..20);
                load::Availability { healthy: rng.random_range(0..=total), total }
            })
            .collect();
        let threshold = [0, 50, 100][rng.random_range(0..3)];
        let load = load::priority_load(&priorities, threshold, load::DEFAULT_OVERPROVISIONING_FACTOR);
        let sum: u32 = load.load.iter().sum();
        let any_health = priorities.iter().any(|p| p.health(load::DEFAULT_OVERPROVISIONING_FACTOR) > 0);
        assert!(sum == 100 || (sum == 0 && !any_health && threshold == 0), "{priorities:?} {threshold}: {load:?}");
    }
}

#[test]
fn cluster_lb_is_shareable_across_tasks() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ClusterLb>();
    shareable::<Picked>();
}
