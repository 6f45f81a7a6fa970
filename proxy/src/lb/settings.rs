//! The validated load-balancing part of a DestinationRule traffic policy, read with Istio's defaults.

use std::time::Duration;

use crossgate_proto::load_balancer_settings::{ConsistentHashLb, LbPolicy, SimpleLb, consistent_hash_lb};
use crossgate_proto::{LocalityLoadBalancerSetting, TrafficPolicy};

use super::outlier::OutlierSettings;
use super::policy::{PolicyParams, PolicyRef, least_request, maglev, random, ring_hash, round_robin};

/// Envoy's `healthy_panic_threshold` when Istio leaves it unset (no outlierDetection).
pub const ENVOY_DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// Everything [`ClusterLb`](super::ClusterLb) needs to know about one cluster's traffic policy.
#[derive(Debug, Clone, PartialEq)]
pub struct LbSettings {
    /// The pick algorithm within a locality (or priority).
    pub policy: PolicyRef,
    pub locality: LocalitySettings,
    /// `None`: no outlierDetection, so no ejection and (as in Istio) no failover priorities.
    pub outlier: Option<OutlierSettings>,
    /// Envoy's healthy panic threshold in percent; 0 disables panic.
    pub panic_threshold: u32,
}

impl Default for LbSettings {
    fn default() -> Self {
        LbSettings {
            policy: PolicyRef::default(),
            locality: LocalitySettings::default(),
            outlier: None,
            panic_threshold: ENVOY_DEFAULT_PANIC_THRESHOLD,
        }
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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LbConfigError {
    #[error("locality {0:?} has more than three '/'-separated parts (region/zone/subzone)")]
    Locality(String),
    #[error("loadBalancer.simple {0} is not a known SimpleLB value")]
    UnknownSimple(i32),
    #[error("loadBalancer {0} is not supported by an sni-dnat gateway")]
    Unsupported(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown lb policy {0:?}; known: LEAST_REQUEST, ROUND_ROBIN, RANDOM, RING_HASH, MAGLEV")]
    UnknownPolicy(String),
}

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> LbConfigError {
    LbConfigError::Invalid { field, reason: reason.into() }
}

impl LbSettings {
    /// Reads a DestinationRule traffic policy as Istio maps it to Envoy (`cluster_traffic_policy.go`).
    pub fn from_policy(policy: Option<&TrafficPolicy>) -> Result<Self, LbConfigError> {
        let lb = policy.and_then(|p| p.load_balancer.as_ref());
        let (name, params) = match lb.and_then(|lb| lb.lb_policy.as_ref()) {
            None => (least_request::NAME, PolicyParams::default()),
            Some(LbPolicy::Simple(value)) => (simple_policy(*value)?, PolicyParams::default()),
            Some(LbPolicy::ConsistentHash(hash)) => consistent_hash_policy(hash)?,
        };
        let outlier = policy.and_then(|p| p.outlier_detection.as_ref()).map(OutlierSettings::from_proto).transpose()?;
        // Istio sets the panic threshold from minHealthPercent (default 0: panic off) whenever outlierDetection is set.
        let panic_threshold = match policy.and_then(|p| p.outlier_detection.as_ref()) {
            Some(od) => u32::try_from(od.min_health_percent)
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| invalid("outlierDetection.minHealthPercent", "must be within 0..=100"))?,
            None => ENVOY_DEFAULT_PANIC_THRESHOLD,
        };
        let locality = lb
            .and_then(|lb| lb.locality_lb_setting.as_ref())
            .map(LocalitySettings::from_proto)
            .transpose()?
            .unwrap_or_default();
        Ok(LbSettings { policy: PolicyRef::by_name(name, params)?, locality, outlier, panic_threshold })
    }

    /// Replaces the pick algorithm by its registry name (see [`super::policy`]): for experiments with a policy
    /// that Istio's API cannot name.
    pub fn with_policy(mut self, name: &str) -> Result<Self, LbConfigError> {
        self.policy = PolicyRef::by_name(name, self.policy.params())?;
        Ok(self)
    }

    /// Whether priorities (failover) apply: Istio applies them only when outlier detection is configured.
    pub fn failover_enabled(&self) -> bool {
        self.outlier.is_some()
    }
}

fn simple_policy(value: i32) -> Result<&'static str, LbConfigError> {
    Ok(match SimpleLb::try_from(value) {
        Ok(SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest) => least_request::NAME,
        Ok(SimpleLb::RoundRobin) => round_robin::NAME,
        Ok(SimpleLb::Random) => random::NAME,
        Ok(SimpleLb::Passthrough) => return Err(LbConfigError::Unsupported("simple: PASSTHROUGH")),
        Err(_) => return Err(LbConfigError::UnknownSimple(value)),
    })
}

fn consistent_hash_policy(hash: &ConsistentHashLb) -> Result<(&'static str, PolicyParams), LbConfigError> {
    use consistent_hash_lb::{HashAlgorithm, HashKey};
    if hash.hash_key != Some(HashKey::UseSourceIp(true)) {
        return Err(LbConfigError::Unsupported("consistentHash without useSourceIp: true"));
    }
    let mut params = PolicyParams::default();
    // Istio falls back to RING_HASH with Envoy's 1024 minimum ring size when no algorithm is named.
    let name = match &hash.hash_algorithm {
        None => ring_hash::NAME,
        Some(HashAlgorithm::RingHash(ring)) => {
            if ring.minimum_ring_size > 0 {
                params.ring_size = ring.minimum_ring_size;
            }
            ring_hash::NAME
        }
        Some(HashAlgorithm::Maglev(table)) => {
            if table.table_size > 0 {
                params.table_size = table.table_size;
            }
            maglev::NAME
        }
    };
    params.validate()?;
    Ok((name, params))
}

impl LocalitySettings {
    /// Reads and validates `localityLbSetting` as Istio's validation does.
    pub fn from_proto(setting: &LocalityLoadBalancerSetting) -> Result<Self, LbConfigError> {
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
) -> Result<Distribute, LbConfigError> {
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

/// A protobuf duration as a `std` one; negative durations are refused by name.
pub(super) fn duration(
    value: Option<&crossgate_proto::Duration>,
    field: &'static str,
    default: Duration,
) -> Result<Duration, LbConfigError> {
    let Some(d) = value else { return Ok(default) };
    Duration::try_from(*d).map_err(|_| invalid(field, "must not be negative"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossgate_proto::LoadBalancerSettings;

    fn policy(yaml: &str) -> TrafficPolicy {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn simple_names_map_as_in_istio() {
        let with = |simple: SimpleLb| TrafficPolicy {
            load_balancer: Some(LoadBalancerSettings {
                lb_policy: Some(LbPolicy::Simple(simple as i32)),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(LbSettings::from_policy(None).unwrap().policy.name(), "LEAST_REQUEST");
        for (simple, name) in [
            (SimpleLb::LeastConn, "LEAST_REQUEST"),
            (SimpleLb::Unspecified, "LEAST_REQUEST"),
            (SimpleLb::RoundRobin, "ROUND_ROBIN"),
            (SimpleLb::Random, "RANDOM"),
        ] {
            assert_eq!(LbSettings::from_policy(Some(&with(simple))).unwrap().policy.name(), name);
        }
        assert!(LbSettings::from_policy(Some(&with(SimpleLb::Passthrough))).is_err());
    }

    #[test]
    fn consistent_hash_needs_source_ip_and_defaults_to_ring_hash() {
        let settings = LbSettings::from_policy(Some(&policy("loadBalancer: {consistentHash: {useSourceIp: true}}")));
        assert_eq!(settings.unwrap().policy.name(), "RING_HASH");
        let maglev = policy("loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 251}}}");
        let settings = LbSettings::from_policy(Some(&maglev)).unwrap();
        assert_eq!((settings.policy.name(), settings.policy.params().table_size), ("MAGLEV", 251));
        let not_prime = policy("loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 100}}}");
        assert!(LbSettings::from_policy(Some(&not_prime)).is_err());
        assert!(LbSettings::from_policy(Some(&policy("loadBalancer: {consistentHash: {}}"))).is_err());
    }

    #[test]
    fn outlier_detection_sets_panic_threshold_from_min_health_percent() {
        assert_eq!(LbSettings::from_policy(None).unwrap().panic_threshold, 50);
        let od = LbSettings::from_policy(Some(&policy("outlierDetection: {}"))).unwrap();
        assert_eq!(od.panic_threshold, 0);
        assert!(od.failover_enabled());
        let od = LbSettings::from_policy(Some(&policy("outlierDetection: {minHealthPercent: 30}"))).unwrap();
        assert_eq!(od.panic_threshold, 30);
        assert!(LbSettings::from_policy(Some(&policy("outlierDetection: {minHealthPercent: 130}"))).is_err());
    }

    #[test]
    fn locality_setting_is_validated_like_istio() {
        let ok =
            policy("loadBalancer: {localityLbSetting: {distribute: [{from: 'r1/*', to: {'r1/*': 80, 'r2/*': 20}}]}}");
        let settings = LbSettings::from_policy(Some(&ok)).unwrap();
        assert_eq!(settings.locality.distribute[0].to, vec![("r1/*".to_owned(), 80), ("r2/*".to_owned(), 20)]);
        for bad in [
            "loadBalancer: {localityLbSetting: {distribute: [{from: 'r1/*', to: {'r1/*': 80}}]}}",
            "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r1}]}}",
            "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: 'r2/z'}]}}",
            "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r2}], distribute: [{from: r1, to: {r1: 100}}]}}",
        ] {
            assert!(LbSettings::from_policy(Some(&policy(bad))).is_err(), "{bad}");
        }
        let off = policy("loadBalancer: {localityLbSetting: {enabled: false}}");
        assert!(!LbSettings::from_policy(Some(&off)).unwrap().locality.enabled);
        assert!(LbSettings::default().locality.enabled);
    }

    #[test]
    fn policy_can_be_named_for_experiments() {
        let settings = LbSettings::default().with_policy("RANDOM").unwrap();
        assert_eq!(settings.policy.name(), "RANDOM");
        assert!(matches!(LbSettings::default().with_policy("NOPE"), Err(LbConfigError::UnknownPolicy(_))));
    }
}
