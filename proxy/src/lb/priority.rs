//! Istio's side of locality load balancing: which priority each endpoint gets and with what weight each locality
//! is balanced (`pilot/pkg/networking/core/loadbalancer/loadbalancer.go`). Envoy's side, turning priorities and
//! health into traffic shares, is in [`super::load`].
//!
//! - `enabled: false`: one priority, no locality weights.
//! - `distribute` (exclusive with failover): the first rule whose `from` matches the gateway's locality sets the
//!   locality weights: each `to` weight is split across the localities it matches in proportion to their own weight
//!   (rounded up); localities no `to` matches get no traffic at all. No priorities, hence no failover.
//! - Otherwise priorities apply only when outlier detection is configured:
//!   - default: 0 same region/zone/subzone, 1 same region/zone, 2 same region, 3 other; with a `failover` rule
//!     `from` the gateway's region, other regions than its `to` drop to 4;
//!   - `failoverPriority` of N labels: 0 if all match the gateway's (or the `key=value` given), else N − j for the
//!     first mismatch at j; with `failover` too, `5 × that + the default priority`. For the network as first key,
//!     see [`NetworkFailover`].
//!
//!   Priorities are then compacted to 0..N. Envoy's locality-weighted lb is on when `failover` or
//!   `failoverPriority` is set; a locality's weight is the sum of its endpoints' weights.

use std::collections::{BTreeMap, BTreeSet};

use super::endpoint::{EndpointSpec, GatewayIdentity, Health, Locality, NETWORK_LABEL, NetworkFailover};
use super::settings::{Distribute, Failover, LbSettings, LocalitySettings};

/// The endpoints of a cluster arranged by priority, then locality. Draining endpoints are left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub priorities: Vec<Vec<Group>>,
    /// Envoy's `LocalityWeightedLbConfig`: choose a locality by weight before the host.
    pub locality_weighted: bool,
}

/// The endpoints of one locality within one priority.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub locality: Locality,
    pub weight: u64,
    /// Indices into the cluster's endpoints.
    pub members: Vec<usize>,
}

impl Topology {
    /// Arranges `endpoints` (whose labels already carry the locality labels) as Istio does for `gateway`.
    pub fn new(endpoints: &[EndpointSpec], gateway: &GatewayIdentity, settings: &LbSettings) -> Self {
        let locality = &settings.locality;
        if locality.enabled && !locality.distribute.is_empty() {
            return distribute(endpoints, gateway, &locality.distribute);
        }
        let failover = locality.enabled && settings.failover_enabled();
        let priority = |e: &EndpointSpec| if failover { raw_priority(e, gateway, locality) } else { 0 };
        let mut groups: BTreeMap<(u32, &Locality), Vec<usize>> = BTreeMap::new();
        for (i, e) in endpoints.iter().enumerate().filter(|(_, e)| e.health != Health::Draining) {
            groups.entry((priority(e), &e.locality)).or_default().push(i);
        }
        // Compaction: BTreeMap order is by raw priority, so each new raw value opens the next priority.
        let mut priorities: Vec<Vec<Group>> = Vec::new();
        let mut last_raw = None;
        for ((raw, locality), members) in groups {
            if last_raw != Some(raw) {
                priorities.push(Vec::new());
                last_raw = Some(raw);
            }
            let weight = natural_weight(endpoints, &members);
            priorities.last_mut().into_iter().for_each(|p| {
                p.push(Group { locality: locality.clone(), weight, members: members.clone() });
            });
        }
        let locality_weighted = failover && (!locality.failover.is_empty() || !locality.failover_priority.is_empty());
        Topology { priorities, locality_weighted }
    }

    /// Hosts that take part in balancing (Envoy's cluster membership).
    pub fn member_count(&self) -> usize {
        self.priorities.iter().flatten().map(|g| g.members.len()).sum()
    }

    /// Each endpoint's priority, `None` when it takes no part (draining, or not matched by `distribute`).
    pub fn priority_of(&self, endpoints: usize) -> Vec<Option<usize>> {
        let mut out = vec![None; endpoints];
        for (p, groups) in self.priorities.iter().enumerate() {
            for i in groups.iter().flat_map(|g| &g.members) {
                out[*i] = Some(p);
            }
        }
        out
    }
}

/// A locality's weight as Istio sends it: the sum of its endpoints' weights.
fn natural_weight(endpoints: &[EndpointSpec], members: &[usize]) -> u64 {
    members.iter().map(|i| u64::from(endpoints[*i].weight.max(1))).sum()
}

/// Istio's `applyLocalityWeights`.
fn distribute(endpoints: &[EndpointSpec], gateway: &GatewayIdentity, rules: &[Distribute]) -> Topology {
    let mut by_locality: BTreeMap<&Locality, Vec<usize>> = BTreeMap::new();
    for (i, e) in endpoints.iter().enumerate().filter(|(_, e)| e.health != Health::Draining) {
        by_locality.entry(&e.locality).or_default().push(i);
    }
    let mut weights: BTreeMap<&Locality, u64> =
        by_locality.iter().map(|(l, members)| (*l, natural_weight(endpoints, members))).collect();
    if let Some(rule) = rules.iter().find(|r| gateway.locality.matches(&r.from)) {
        let mut unmatched: BTreeSet<&Locality> = weights.keys().copied().collect();
        let mut assigned = BTreeMap::new();
        for (pattern, percent) in &rule.to {
            let matched: Vec<&Locality> = unmatched.iter().copied().filter(|l| l.matches(pattern)).collect();
            let total: u64 = matched.iter().map(|l| weights[l]).sum();
            for l in matched {
                unmatched.remove(l);
                assigned.insert(l, (weights[l] * u64::from(*percent)).div_ceil(total));
            }
        }
        weights = assigned;
    }
    let groups = weights
        .into_iter()
        .map(|(locality, weight)| Group { locality: locality.clone(), weight, members: by_locality[locality].clone() })
        .collect();
    Topology { priorities: vec![groups], locality_weighted: true }
}

/// The priority before compaction.
fn raw_priority(e: &EndpointSpec, gateway: &GatewayIdentity, settings: &LocalitySettings) -> u32 {
    let by_locality = || default_priority(&gateway.locality, &e.locality, &settings.failover);
    if settings.failover_priority.is_empty() {
        return by_locality();
    }
    let by_labels = label_priority(e, gateway, &settings.failover_priority);
    // Five default levels (0..=4) fit under each label level.
    if settings.failover.is_empty() { by_labels } else { by_labels * 5 + by_locality() }
}

/// Istio's `util.LbPriority` plus the `failover` regions rule.
fn default_priority(gateway: &Locality, endpoint: &Locality, failover: &[Failover]) -> u32 {
    if gateway.region != endpoint.region {
        let rule = failover.iter().find(|f| f.from == gateway.region);
        return if rule.is_some_and(|f| f.to != endpoint.region) { 4 } else { 3 };
    }
    if gateway.zone != endpoint.zone {
        return 2;
    }
    u32::from(gateway.subzone != endpoint.subzone)
}

/// Istio's `applyFailoverPriorityPerLocality`. Missing labels compare as "" (Go's map zero value).
fn label_priority(e: &EndpointSpec, gateway: &GatewayIdentity, entries: &[String]) -> u32 {
    if gateway.labels.is_empty() {
        return 0;
    }
    let n = entries.len() as u32;
    let matches = |entry: &String| {
        let (key, wanted) = split_entry(entry);
        let wanted = wanted.unwrap_or_else(|| gateway.labels.get(key).map_or("", String::as_str));
        e.labels.get(key).map_or("", String::as_str) == wanted
    };
    let Some(first_mismatch) = entries.iter().position(|entry| !matches(entry)) else { return 0 };
    let network_preferred = gateway.network_failover == NetworkFailover::Istio131
        && first_mismatch == 0
        && split_entry(&entries[0]).0 == NETWORK_LABEL;
    if !network_preferred {
        return n - first_mismatch as u32;
    }
    // 1.31: score the other keys as if the network matched, then rank after every same-network endpoint.
    let rest = &entries[1..];
    n + rest.iter().position(|entry| !matches(entry)).map_or(0, |j| (n - 1) - j as u32)
}

/// `key` or `key=value`, split as Istio does (more than one `=` means no override).
fn split_entry(entry: &str) -> (&str, Option<&str>) {
    let mut parts = entry.split('=');
    let key = parts.next().unwrap_or("");
    match (parts.next(), parts.next()) {
        (Some(value), None) => (key, Some(value)),
        _ => (key, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::endpoint::{REGION_LABEL, ZONE_LABEL};
    use crate::lb::outlier::OutlierSettings;
    use std::net::SocketAddr;

    fn endpoint(i: u16, locality: &str, labels: &[(&str, &str)]) -> EndpointSpec {
        let locality: Locality = locality.parse().unwrap();
        let mut labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        locality.augment(&mut labels);
        EndpointSpec {
            address: SocketAddr::from(([10, 0, 0, 1], i)),
            locality,
            weight: 1,
            labels,
            health: Health::Healthy,
        }
    }

    fn gateway(locality: &str, labels: &[(&str, &str)]) -> GatewayIdentity {
        GatewayIdentity::new(
            locality.parse().unwrap(),
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        )
    }

    fn settings(locality: LocalitySettings, outlier: bool) -> LbSettings {
        LbSettings { locality, outlier: outlier.then(OutlierSettings::default), ..Default::default() }
    }

    fn priorities(endpoints: &[EndpointSpec], gateway: &GatewayIdentity, settings: &LbSettings) -> Vec<Option<usize>> {
        Topology::new(endpoints, gateway, settings).priority_of(endpoints.len())
    }

    fn failover_priority(keys: &[&str]) -> LocalitySettings {
        LocalitySettings { failover_priority: keys.iter().map(|k| (*k).to_owned()).collect(), ..Default::default() }
    }

    #[test]
    fn default_failover_orders_subzone_zone_region_other() {
        let eps = [
            endpoint(1, "r1/z1/s1", &[]),
            endpoint(2, "r1/z1/s2", &[]),
            endpoint(3, "r1/z2/s1", &[]),
            endpoint(4, "r2/z1/s1", &[]),
            endpoint(5, "r2/z3", &[]),
        ];
        let gw = gateway("r1/z1/s1", &[]);
        let expected = vec![Some(0), Some(1), Some(2), Some(3), Some(3)];
        assert_eq!(priorities(&eps, &gw, &settings(LocalitySettings::default(), true)), expected);
        // Without outlier detection, or with locality lb off, everything stays at priority 0.
        assert_eq!(priorities(&eps, &gw, &settings(LocalitySettings::default(), false)), vec![Some(0); 5]);
        let off = LocalitySettings { enabled: false, ..Default::default() };
        assert_eq!(priorities(&eps, &gw, &settings(off, true)), vec![Some(0); 5]);
        let topology = Topology::new(&eps, &gw, &settings(LocalitySettings::default(), true));
        assert!(!topology.locality_weighted, "default failover does not set LocalityWeightedLbConfig");
    }

    #[test]
    fn failover_rule_demotes_other_regions_and_compacts() {
        // Istio's "Locality failover" task: from us-east to us-west... here r1 → r3.
        let eps = [endpoint(1, "r1/z1", &[]), endpoint(2, "r2/z1", &[]), endpoint(3, "r3/z1", &[])];
        let locality =
            LocalitySettings { failover: vec![Failover { from: "r1".into(), to: "r3".into() }], ..Default::default() };
        let settings = settings(locality, true);
        // Raw 0 (same zone; the empty subzones match), 4, 3 → compacted 0, 2, 1.
        assert_eq!(priorities(&eps, &gateway("r1/z1", &[]), &settings), vec![Some(0), Some(2), Some(1)]);
        assert!(Topology::new(&eps, &gateway("r1/z1", &[]), &settings).locality_weighted);
    }

    #[test]
    fn failover_priority_labels() {
        let eps = [
            endpoint(1, "r1/z1", &[("app-tier", "a")]),
            endpoint(2, "r1/z2", &[("app-tier", "a")]),
            endpoint(3, "r2/z1", &[("app-tier", "a")]),
            endpoint(4, "r1/z1", &[("app-tier", "b")]),
        ];
        let gw = gateway("r1/z1", &[("app-tier", "a")]);
        let keys = failover_priority(&[REGION_LABEL, ZONE_LABEL]);
        // Region+zone 0, region only 1, neither 2.
        assert_eq!(priorities(&eps, &gw, &settings(keys, true)), vec![Some(0), Some(1), Some(2), Some(0)]);
        // key=value replaces the gateway's own value: raw 2, 2, 2 (tier a ≠ b), 0 → compacted.
        let keys = failover_priority(&["app-tier=b", REGION_LABEL]);
        assert_eq!(priorities(&eps, &gw, &settings(keys, true)), vec![Some(1), Some(1), Some(1), Some(0)]);
    }

    #[test]
    fn failover_priority_composes_with_failover() {
        let eps = [
            endpoint(1, "r1/z1", &[("tier", "a")]),
            endpoint(2, "r2/z1", &[("tier", "a")]),
            endpoint(3, "r3/z1", &[("tier", "a")]),
            endpoint(4, "r1/z1", &[("tier", "b")]),
        ];
        let locality = LocalitySettings {
            failover: vec![Failover { from: "r1".into(), to: "r3".into() }],
            failover_priority: vec!["tier".into()],
            ..Default::default()
        };
        // Raw: 0·5+0, 0·5+4, 0·5+3, 1·5+0 → 0, 4, 3, 5 → compacted 0, 2, 1, 3.
        let gw = gateway("r1/z1", &[("tier", "a")]);
        assert_eq!(priorities(&eps, &gw, &settings(locality, true)), vec![Some(0), Some(2), Some(1), Some(3)]);
    }

    #[test]
    fn network_first_key_both_istio_behaviours() {
        // ISTIO-SEMANTICS §4: [network, region, zone].
        let n = |net: &str, locality: &str, i| endpoint(i, locality, &[(NETWORK_LABEL, net)]);
        let eps = [
            n("net1", "r1/z1", 1), // N+R+Z
            n("net1", "r1/z2", 2), // N+R
            n("net1", "r2/z1", 3), // N
            n("net2", "r1/z1", 4), // R+Z
            n("net2", "r1/z2", 5), // R
            n("net2", "r2/z2", 6), // none
        ];
        let keys = failover_priority(&[NETWORK_LABEL, REGION_LABEL, ZONE_LABEL]);
        let mut gw = gateway("r1/z1", &[(NETWORK_LABEL, "net1")]);
        let s = settings(keys, true);
        assert_eq!(priorities(&eps, &gw, &s), (0..6).map(Some).collect::<Vec<_>>(), "1.31");
        gw.network_failover = NetworkFailover::Istio130;
        assert_eq!(priorities(&eps, &gw, &s), vec![Some(0), Some(1), Some(2), Some(3), Some(3), Some(3)], "1.30");
    }

    #[test]
    fn failover_priority_needs_gateway_labels() {
        let eps = [endpoint(1, "", &[("k", "a")]), endpoint(2, "", &[("k", "b")])];
        let s = settings(failover_priority(&["k"]), true);
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
            endpoint(1, "region1/zone1", &[]),
            endpoint(2, "region1/zone2", &[]),
            endpoint(3, "region2/zone3", &[]),
            endpoint(4, "region3/zone4", &[]),
        ];
        let locality = LocalitySettings {
            distribute: vec![rule(
                "region1/zone1/*",
                &[("region1/zone1/*", 70), ("region1/zone2/*", 20), ("region3/zone4/*", 10)],
            )],
            ..Default::default()
        };
        let topology = Topology::new(&eps, &gateway("region1/zone1", &[]), &settings(locality.clone(), true));
        assert_eq!(topology.priorities.len(), 1, "distribute never creates priorities, even with outlier detection");
        assert!(topology.locality_weighted);
        let weights: Vec<(String, u64)> =
            topology.priorities[0].iter().map(|g| (g.locality.to_string(), g.weight)).collect();
        let expected = [("region1/zone1/", 70), ("region1/zone2/", 20), ("region3/zone4/", 10)];
        assert_eq!(weights, expected.map(|(l, w)| (l.to_owned(), w)));
        assert_eq!(topology.member_count(), 3, "region2/zone3 is matched by no `to`: it gets zero endpoints");
        // A gateway no `from` matches keeps every locality at its own weight.
        let topology = Topology::new(&eps, &gateway("region2/zone3", &[]), &settings(locality, true));
        assert_eq!(topology.member_count(), 4);

        // A wildcard `to` splits its weight by the localities' own weights, rounding up: 20 · (1, 2, 1) / 4.
        let eps = [
            endpoint(1, "r1/z1", &[]),
            endpoint(2, "r1/z2", &[]),
            endpoint(3, "r1/z2", &[]),
            endpoint(4, "r1/z3", &[]),
            endpoint(5, "r2/z1", &[]),
        ];
        let locality =
            LocalitySettings { distribute: vec![rule("r2", &[("r1/*", 20), ("r2/*", 80)])], ..Default::default() };
        let topology = Topology::new(&eps, &gateway("r2/z1", &[]), &settings(locality, false));
        let weights: Vec<u64> = topology.priorities[0].iter().map(|g| g.weight).collect();
        assert_eq!(weights, vec![5, 10, 5, 80]);
    }

    #[test]
    fn draining_endpoints_take_no_part() {
        let mut eps = vec![endpoint(1, "r1/z1", &[]), endpoint(2, "r1/z1", &[])];
        eps[1].health = Health::Draining;
        let topology = Topology::new(&eps, &gateway("r1/z1", &[]), &LbSettings::default());
        assert_eq!(topology.priority_of(2), vec![Some(0), None]);
    }
}
