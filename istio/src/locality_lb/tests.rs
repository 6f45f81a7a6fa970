use super::*;
use crate::labels::{REGION_LABEL, ZONE_LABEL};

/// An endpoint's locality and augmented labels, owned.
struct Owned {
    locality: Locality,
    labels: BTreeMap<String, String>,
    weight: u32,
}

fn endpoint(locality: &str, labels: &[(&str, &str)]) -> Owned {
    let locality: Locality = locality.parse().unwrap();
    let mut labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    locality.augment(&mut labels);
    Owned { locality, labels, weight: 1 }
}

fn borrowed(endpoints: &[Owned]) -> Vec<LbEndpoint<'_>> {
    endpoints.iter().map(|e| LbEndpoint { locality: &e.locality, labels: &e.labels, weight: e.weight }).collect()
}

fn gateway(locality: &str, labels: &[(&str, &str)]) -> GatewayIdentity {
    GatewayIdentity::new(
        locality.parse().unwrap(),
        labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    )
}

fn arrange(endpoints: &[Owned], gateway: &GatewayIdentity, settings: &LocalitySettings, od: bool) -> Arrangement {
    Arrangement::new(&borrowed(endpoints), gateway, settings, od)
}

fn priorities(endpoints: &[Owned], gateway: &GatewayIdentity, settings: &LocalitySettings) -> Vec<Option<u32>> {
    arrange(endpoints, gateway, settings, true).priority_of(endpoints.len())
}

fn failover_priority(keys: &[&str]) -> LocalitySettings {
    LocalitySettings { failover_priority: keys.iter().map(|k| (*k).to_owned()).collect(), ..Default::default() }
}

#[test]
fn default_failover_orders_subzone_zone_region_other() {
    let eps = [
        endpoint("r1/z1/s1", &[]),
        endpoint("r1/z1/s2", &[]),
        endpoint("r1/z2/s1", &[]),
        endpoint("r2/z1/s1", &[]),
        endpoint("r2/z3", &[]),
    ];
    let gw = gateway("r1/z1/s1", &[]);
    let expected = vec![Some(0), Some(1), Some(2), Some(3), Some(3)];
    assert_eq!(priorities(&eps, &gw, &LocalitySettings::default()), expected);
    // Without outlier detection, or with locality lb off, everything stays at priority 0.
    let flat = arrange(&eps, &gw, &LocalitySettings::default(), false);
    assert_eq!(flat.priority_of(5), vec![Some(0); 5]);
    assert_eq!(flat.groups.len(), 5, "still one group per locality");
    let off = LocalitySettings { enabled: false, ..Default::default() };
    assert_eq!(priorities(&eps, &gw, &off), vec![Some(0); 5]);
    let arrangement = arrange(&eps, &gw, &LocalitySettings::default(), true);
    assert!(!arrangement.locality_weighted, "default failover does not set LocalityWeightedLbConfig");
}

#[test]
fn failover_rule_demotes_other_regions_and_compacts() {
    // Istio's "Locality failover" task: from us-east to us-west... here r1 → r3.
    let eps = [endpoint("r1/z1", &[]), endpoint("r2/z1", &[]), endpoint("r3/z1", &[])];
    let locality =
        LocalitySettings { failover: vec![Failover { from: "r1".into(), to: "r3".into() }], ..Default::default() };
    // Raw 0 (same zone; the empty subzones match), 4, 3 → compacted 0, 2, 1.
    assert_eq!(priorities(&eps, &gateway("r1/z1", &[]), &locality), vec![Some(0), Some(2), Some(1)]);
    assert!(arrange(&eps, &gateway("r1/z1", &[]), &locality, true).locality_weighted);
}

#[test]
fn failover_priority_labels() {
    let eps = [
        endpoint("r1/z1", &[("app-tier", "a")]),
        endpoint("r1/z2", &[("app-tier", "a")]),
        endpoint("r2/z1", &[("app-tier", "a")]),
        endpoint("r1/z1", &[("app-tier", "b")]),
    ];
    let gw = gateway("r1/z1", &[("app-tier", "a")]);
    let keys = failover_priority(&[REGION_LABEL, ZONE_LABEL]);
    // Region+zone 0, region only 1, neither 2.
    assert_eq!(priorities(&eps, &gw, &keys), vec![Some(0), Some(1), Some(2), Some(0)]);
    // key=value replaces the gateway's own value: raw 2, 2, 2 (tier a ≠ b), 0 → compacted.
    let keys = failover_priority(&["app-tier=b", REGION_LABEL]);
    assert_eq!(priorities(&eps, &gw, &keys), vec![Some(1), Some(1), Some(1), Some(0)]);
}

#[test]
fn failover_priority_composes_with_failover() {
    let eps = [
        endpoint("r1/z1", &[("tier", "a")]),
        endpoint("r2/z1", &[("tier", "a")]),
        endpoint("r3/z1", &[("tier", "a")]),
        endpoint("r1/z1", &[("tier", "b")]),
    ];
    let locality = LocalitySettings {
        failover: vec![Failover { from: "r1".into(), to: "r3".into() }],
        failover_priority: vec!["tier".into()],
        ..Default::default()
    };
    // Raw: 0·5+0, 0·5+4, 0·5+3, 1·5+0 → 0, 4, 3, 5 → compacted 0, 2, 1, 3.
    let gw = gateway("r1/z1", &[("tier", "a")]);
    assert_eq!(priorities(&eps, &gw, &locality), vec![Some(0), Some(2), Some(1), Some(3)]);
}

#[test]
fn network_first_key_both_istio_behaviours() {
    // [network, region, zone], Istio 1.31's PR #60829 against 1.30.
    let n = |net: &str, locality: &str| endpoint(locality, &[(NETWORK_LABEL, net)]);
    let eps = [
        n("net1", "r1/z1"), // N+R+Z
        n("net1", "r1/z2"), // N+R
        n("net1", "r2/z1"), // N
        n("net2", "r1/z1"), // R+Z
        n("net2", "r1/z2"), // R
        n("net2", "r2/z2"), // none
    ];
    let keys = failover_priority(&[NETWORK_LABEL, REGION_LABEL, ZONE_LABEL]);
    let mut gw = gateway("r1/z1", &[(NETWORK_LABEL, "net1")]);
    assert_eq!(priorities(&eps, &gw, &keys), (0..6).map(Some).collect::<Vec<_>>(), "1.31");
    gw.network_failover = NetworkFailover::Istio130;
    assert_eq!(priorities(&eps, &gw, &keys), vec![Some(0), Some(1), Some(2), Some(3), Some(3), Some(3)], "1.30");
}

#[test]
fn failover_priority_needs_gateway_labels() {
    let eps = [endpoint("", &[("k", "a")]), endpoint("", &[("k", "b")])];
    let s = failover_priority(&["k"]);
    assert_eq!(priorities(&eps, &gateway("", &[]), &s), vec![Some(0), Some(0)]);
    assert_eq!(priorities(&eps, &gateway("", &[("k", "b")]), &s), vec![Some(1), Some(0)]);
}

#[test]
fn distribute_weights_follow_istio() {
    let rule = |from: &str, to: &[(&str, u32)]| Distribute {
        from: from.into(),
        to: to.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    };
    // Istio's "Locality weighted distribution" task: helloworld v1..v4 in four localities.
    let eps = [
        endpoint("region1/zone1", &[]),
        endpoint("region1/zone2", &[]),
        endpoint("region2/zone3", &[]),
        endpoint("region3/zone4", &[]),
    ];
    let locality = LocalitySettings {
        distribute: vec![rule(
            "region1/zone1/*",
            &[("region1/zone1/*", 70), ("region1/zone2/*", 20), ("region3/zone4/*", 10)],
        )],
        ..Default::default()
    };
    let arrangement = arrange(&eps, &gateway("region1/zone1", &[]), &locality, true);
    assert!(arrangement.groups.iter().all(|g| g.priority == 0), "distribute never creates priorities");
    assert!(arrangement.locality_weighted);
    let weights: Vec<(String, u32, usize)> =
        arrangement.groups.iter().map(|g| (g.locality.to_string(), g.weight, g.members.len())).collect();
    let expected =
        [("region1/zone1/", 70, 1), ("region1/zone2/", 20, 1), ("region2/zone3/", 1, 0), ("region3/zone4/", 10, 1)];
    assert_eq!(
        weights,
        expected.map(|(l, w, n)| (l.to_owned(), w, n)),
        "region2/zone3 is matched by no `to`: no endpoints"
    );
    // A gateway no `from` matches keeps every locality at its own weight.
    let arrangement = arrange(&eps, &gateway("region2/zone3", &[]), &locality, true);
    assert!(arrangement.groups.iter().all(|g| g.members.len() == 1 && g.weight == 1));

    // A wildcard `to` splits its weight by the localities' own weights, rounding up: 20 · (1, 2, 1) / 4.
    let eps = [
        endpoint("r1/z1", &[]),
        endpoint("r1/z2", &[]),
        endpoint("r1/z2", &[]),
        endpoint("r1/z3", &[]),
        endpoint("r2/z1", &[]),
    ];
    let locality =
        LocalitySettings { distribute: vec![rule("r2", &[("r1/*", 20), ("r2/*", 80)])], ..Default::default() };
    let arrangement = arrange(&eps, &gateway("r2/z1", &[]), &locality, false);
    let weights: Vec<u32> = arrangement.groups.iter().map(|g| g.weight).collect();
    assert_eq!(weights, vec![5, 10, 5, 80]);
}

#[test]
fn locality_setting_is_validated_like_istio() {
    let parse = |yaml: &str| LocalitySettings::from_proto(&serde_yaml_ng::from_str(yaml).unwrap());
    let ok = parse("{distribute: [{from: 'r1/*', to: {'r1/*': 80, 'r2/*': 20}}]}").unwrap();
    assert_eq!(ok.distribute[0].to, vec![("r1/*".to_owned(), 80), ("r2/*".to_owned(), 20)]);
    for bad in [
        "{distribute: [{from: 'r1/*', to: {'r1/*': 80}}]}",
        "{failover: [{from: r1, to: r1}]}",
        "{failover: [{from: r1, to: 'r2/z'}]}",
        "{failover: [{from: r1, to: r2}], distribute: [{from: r1, to: {r1: 100}}]}",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    assert!(!parse("{enabled: false}").unwrap().enabled);
    assert!(LocalitySettings::default().enabled);
}
