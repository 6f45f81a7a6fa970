//! Istio's side of locality load balancing (`pilot/pkg/networking/core/loadbalancer/loadbalancer.go`,
//! `ApplyLocalityLoadBalancer`): which priority each endpoint gets, and with what weight each locality is
//! balanced, as seen from one gateway. Envoy's side, turning priorities and health into traffic shares, is the
//! gateway's (`proxy/src/lb/load.rs`), fed by what this module computes, over EDS.
//!
//! - `enabled: false`: one priority, no locality weights.
//! - `distribute` (exclusive with failover): the first rule whose `from` matches the gateway's locality sets the
//!   locality weights: each `to` weight is split across the localities it matches in proportion to their own weight
//!   (rounded up); localities no `to` matches keep no endpoints. No priorities, hence no failover.
//! - Otherwise priorities apply only when outlier detection is configured:
//!   - default: 0 same region/zone/subzone, 1 same region/zone, 2 same region, 3 other; with a `failover` rule
//!     `from` the gateway's region, other regions than its `to` drop to 4;
//!   - `failoverPriority` of N labels: 0 if all match the gateway's (or the `key=value` given), else N − j for the
//!     first mismatch at j; with `failover` too, `5 × that + the default priority`. For the network as first key,
//!     see [`NetworkFailover`].
//!
//!   Priorities are then compacted to 0..N. Envoy's locality-weighted lb is on when `failover` or
//!   `failoverPriority` is set, or `distribute`; a locality's weight is the sum of its endpoints' weights.

use std::collections::{BTreeMap, BTreeSet};

use crossgate_proto::LocalityLoadBalancerSetting;

use crate::labels::{Locality, NETWORK_LABEL};
use crate::policy_error::{PolicyError, invalid};

/// How `failoverPriority` treats `topology.istio.io/network` as its first key; the Istio releases differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NetworkFailover {
    /// Istio 1.31 (PR #60829): the network is preferred, not required. Other-network endpoints are still ordered
    /// by the remaining keys, after every same-network endpoint.
    #[default]
    Istio131,
    /// Istio ≤ 1.30: an other-network endpoint gets the lowest priority, whatever its other labels.
    Istio130,
}

impl std::str::FromStr for NetworkFailover {
    type Err = String;

    /// By the Istio release whose behaviour to follow: `1.31` or `1.30`.
    fn from_str(release: &str) -> Result<Self, Self::Err> {
        match release {
            "1.31" => Ok(NetworkFailover::Istio131),
            "1.30" => Ok(NetworkFailover::Istio130),
            other => Err(format!("{other:?} is not an Istio release with its own failover rule (1.30 or 1.31)")),
        }
    }
}

/// Who is balancing: the gateway's own locality and labels, against which priorities are computed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayIdentity {
    pub locality: Locality,
    /// The gateway pod's labels (e.g. `topology.istio.io/network`), with the locality labels added.
    pub labels: BTreeMap<String, String>,
    pub network_failover: NetworkFailover,
}

impl GatewayIdentity {
    pub fn new(locality: Locality, mut labels: BTreeMap<String, String>) -> Self {
        locality.augment(&mut labels);
        GatewayIdentity { locality, labels, network_failover: NetworkFailover::default() }
    }
}

/// Istio's `localityLbSetting`. The default is the mesh default, `{enabled: true}`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalitySettings {
    pub enabled: bool,
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    /// Label keys, or `key=value` entries whose value replaces the gateway's own.
    pub failover_priority: Vec<String>,
}

impl Default for LocalitySettings {
    fn default() -> Self {
        LocalitySettings { enabled: true, distribute: Vec::new(), failover: Vec::new(), failover_priority: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Distribute {
    /// A locality pattern matched against the gateway's locality (`*` and trailing wildcards allowed).
    pub from: String,
    /// Locality pattern and weight (percent), sorted by pattern so that overlapping patterns resolve the same
    /// way on every build (Istio iterates a Go map here, in random order).
    pub to: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    /// Regions.
    pub from: String,
    pub to: String,
}

impl LocalitySettings {
    /// Reads and validates `localityLbSetting` as Istio's validation does.
    pub fn from_proto(setting: &LocalityLoadBalancerSetting) -> Result<Self, PolicyError> {
        if !setting.distribute.is_empty() && !setting.failover.is_empty() {
            return Err(invalid("localityLbSetting", "distribute and failover cannot both be set"));
        }
        let distribute = setting.distribute.iter().map(distribute_from_proto).collect::<Result<_, _>>()?;
        let failover = setting
            .failover
            .iter()
            .map(|f| {
                if f.from == f.to {
                    return Err(invalid("localityLbSetting.failover", "from and to must be different regions"));
                }
                if [&f.from, &f.to].iter().any(|r| r.contains('/') || r.contains('*')) {
                    return Err(invalid("localityLbSetting.failover", "from and to are regions, without '/' or '*'"));
                }
                Ok(Failover { from: f.from.clone(), to: f.to.clone() })
            })
            .collect::<Result<_, _>>()?;
        Ok(LocalitySettings {
            enabled: setting.enabled.as_ref().is_none_or(|e| e.value),
            distribute,
            failover,
            failover_priority: setting.failover_priority.clone(),
        })
    }
}

fn distribute_from_proto(
    d: &crossgate_proto::locality_load_balancer_setting::Distribute,
) -> Result<Distribute, PolicyError> {
    let field = "localityLbSetting.distribute";
    if d.to.is_empty() {
        return Err(invalid(field, "to must not be empty"));
    }
    if d.to.values().any(|w| !(1..=100).contains(w)) {
        return Err(invalid(field, "each weight must be within 1..=100"));
    }
    let total: u32 = d.to.values().sum();
    if total != 100 {
        return Err(invalid(field, format!("weights of from {:?} sum to {total}, not 100", d.from)));
    }
    // The map is ordered (the protos are generated with BTreeMap), so the weights come out sorted.
    Ok(Distribute { from: d.from.clone(), to: d.to.iter().map(|(k, v)| (k.clone(), *v)).collect() })
}

/// What the priorities are computed from, per endpoint.
#[derive(Debug, Clone, Copy)]
pub struct LbEndpoint<'a> {
    pub locality: &'a Locality,
    /// Augmented as Istio does (locality, network and cluster labels included): what `failoverPriority` compares.
    pub labels: &'a BTreeMap<String, String>,
    pub weight: u32,
}

/// The endpoints of one locality at one priority: one `LocalityLbEndpoints` of the assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityGroup {
    pub priority: u32,
    pub locality: Locality,
    /// `load_balancing_weight`, at least 1.
    pub weight: u32,
    /// Indices into the endpoints; empty for a locality that `distribute` sends nothing.
    pub members: Vec<usize>,
}

/// The endpoints of a cluster arranged for one gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrangement {
    /// By priority, then locality.
    pub groups: Vec<LocalityGroup>,
    /// Envoy's `locality_weighted_lb_config`: choose a locality by weight before the host.
    pub locality_weighted: bool,
}

impl Arrangement {
    /// Arranges `endpoints` as Istio does for `gateway`; `outlier_detection` is whether the cluster has it
    /// (failover priorities apply only then).
    pub fn new(
        endpoints: &[LbEndpoint<'_>],
        gateway: &GatewayIdentity,
        settings: &LocalitySettings,
        outlier_detection: bool,
    ) -> Self {
        if settings.enabled && !settings.distribute.is_empty() {
            return distribute(endpoints, gateway, &settings.distribute);
        }
        let failover = settings.enabled && outlier_detection;
        let priority = |e: &LbEndpoint<'_>| if failover { raw_priority(e, gateway, settings) } else { 0 };
        let mut by_priority: BTreeMap<(u32, &Locality), Vec<usize>> = BTreeMap::new();
        for (i, e) in endpoints.iter().enumerate() {
            by_priority.entry((priority(e), e.locality)).or_default().push(i);
        }
        // Compaction: BTreeMap order is by raw priority, so each new raw value opens the next priority.
        let mut groups = Vec::with_capacity(by_priority.len());
        let mut compacted: Option<(u32, u32)> = None;
        for ((raw, locality), members) in by_priority {
            let priority = match compacted {
                Some((last_raw, p)) if last_raw == raw => p,
                Some((_, p)) => p + 1,
                None => 0,
            };
            compacted = Some((raw, priority));
            let weight = natural_weight(endpoints, &members);
            groups.push(LocalityGroup { priority, locality: locality.clone(), weight, members });
        }
        let locality_weighted = failover && (!settings.failover.is_empty() || !settings.failover_priority.is_empty());
        Arrangement { groups, locality_weighted }
    }

    /// Each endpoint's priority (for tests and dumps); `None` when it is sent nowhere.
    pub fn priority_of(&self, endpoints: usize) -> Vec<Option<u32>> {
        let mut out = vec![None; endpoints];
        for group in &self.groups {
            for i in &group.members {
                out[*i] = Some(group.priority);
            }
        }
        out
    }
}

/// A locality's weight as Istio sends it: the sum of its endpoints' weights.
fn natural_weight(endpoints: &[LbEndpoint<'_>], members: &[usize]) -> u32 {
    members.iter().map(|i| endpoints[*i].weight.max(1)).fold(0u32, u32::saturating_add).max(1)
}

/// Istio's `applyLocalityWeights`.
fn distribute(endpoints: &[LbEndpoint<'_>], gateway: &GatewayIdentity, rules: &[Distribute]) -> Arrangement {
    let mut by_locality: BTreeMap<&Locality, Vec<usize>> = BTreeMap::new();
    for (i, e) in endpoints.iter().enumerate() {
        by_locality.entry(e.locality).or_default().push(i);
    }
    let mut groups: Vec<LocalityGroup> = by_locality
        .into_iter()
        .map(|(locality, members)| LocalityGroup {
            priority: 0,
            locality: locality.clone(),
            weight: natural_weight(endpoints, &members),
            members,
        })
        .collect();
    if let Some(rule) = rules.iter().find(|r| gateway.locality.matches(&r.from)) {
        let mut unmatched: BTreeSet<usize> = (0..groups.len()).collect();
        for (pattern, percent) in &rule.to {
            let matched: Vec<usize> =
                unmatched.iter().copied().filter(|g| groups[*g].locality.matches(pattern)).collect();
            let total: u64 = matched.iter().map(|g| u64::from(groups[*g].weight)).sum();
            for g in matched {
                unmatched.remove(&g);
                let weight = (u64::from(groups[g].weight) * u64::from(*percent)).div_ceil(total);
                groups[g].weight = u32::try_from(weight).unwrap_or(u32::MAX).max(1);
            }
        }
        for g in unmatched {
            groups[g].members.clear();
        }
    }
    Arrangement { groups, locality_weighted: true }
}

/// The priority before compaction.
fn raw_priority(e: &LbEndpoint<'_>, gateway: &GatewayIdentity, settings: &LocalitySettings) -> u32 {
    let by_locality = || default_priority(&gateway.locality, e.locality, &settings.failover);
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
fn label_priority(e: &LbEndpoint<'_>, gateway: &GatewayIdentity, entries: &[String]) -> u32 {
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
mod tests;
