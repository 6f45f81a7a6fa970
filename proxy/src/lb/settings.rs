//! The load-balancing part of an Envoy cluster, read as Envoy reads it (`lb_policy`, `lb_config`,
//! `common_lb_config.healthy_panic_threshold`, `outlier_detection`).
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{LbConfig, LbPolicy};

use super::error::{LbConfigError, invalid};
use super::outlier::OutlierSettings;
use super::policy::{PolicyParams, PolicyRef, least_request, maglev, random, ring_hash, round_robin};

/// Envoy's `healthy_panic_threshold` when the cluster leaves it unset.
pub const ENVOY_DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// Everything [`ClusterLb`](super::ClusterLb) needs to know about one cluster's balancing.
#[derive(Debug, Clone, PartialEq)]
pub struct LbSettings {
    /// The pick algorithm within a locality (or priority).
    pub policy: PolicyRef,
    /// `None`: no outlier detection, so no ejection.
    pub outlier: Option<OutlierSettings>,
    /// Envoy's healthy panic threshold in percent; 0 disables panic.
    pub panic_threshold: u32,
}

impl Default for LbSettings {
    fn default() -> Self {
        LbSettings { policy: PolicyRef::default(), outlier: None, panic_threshold: ENVOY_DEFAULT_PANIC_THRESHOLD }
    }
}

impl LbSettings {
    /// Reads an Envoy cluster's balancing fields.
    pub fn from_envoy(cluster: &Cluster) -> Result<Self, LbConfigError> {
        let mut params = PolicyParams::default();
        let name = match LbPolicy::try_from(cluster.lb_policy) {
            Ok(LbPolicy::LeastRequest) => least_request::NAME,
            Ok(LbPolicy::RoundRobin) => round_robin::NAME,
            Ok(LbPolicy::Random) => random::NAME,
            Ok(LbPolicy::RingHash) => {
                if let Some(LbConfig::RingHashLbConfig(ring)) = &cluster.lb_config
                    && let Some(size) = ring.minimum_ring_size
                {
                    params.ring_size = size.value;
                }
                ring_hash::NAME
            }
            Ok(LbPolicy::Maglev) => {
                if let Some(LbConfig::MaglevLbConfig(table)) = &cluster.lb_config
                    && let Some(size) = table.table_size
                {
                    params.table_size = size.value;
                }
                maglev::NAME
            }
            _ => return Err(LbConfigError::UnsupportedPolicy(cluster.lb_policy)),
        };
        let outlier = cluster.outlier_detection.as_ref().map(OutlierSettings::from_envoy).transpose()?;
        let panic_threshold = match cluster.common_lb_config.as_ref().and_then(|c| c.healthy_panic_threshold.as_ref()) {
            None => ENVOY_DEFAULT_PANIC_THRESHOLD,
            Some(p) if (0.0..=100.0).contains(&p.value) => p.value as u32,
            Some(p) => {
                return Err(invalid(
                    "common_lb_config.healthy_panic_threshold",
                    format!("{} is not a percentage", p.value),
                ));
            }
        };
        Ok(LbSettings { policy: PolicyRef::by_name(name, params)?, outlier, panic_threshold })
    }

    /// Replaces the pick algorithm by its registry name (see [`super::policy`]): for experiments with a policy
    /// that Istio's API cannot name.
    pub fn with_policy(mut self, name: &str) -> Result<Self, LbConfigError> {
        self.policy = PolicyRef::by_name(name, self.policy.params())?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::tests::envoy_cluster;

    #[test]
    fn policies_map_as_envoy_reads_them() {
        for (yaml, name) in [
            ("{}", "LEAST_REQUEST"),
            ("loadBalancer: {simple: ROUND_ROBIN}", "ROUND_ROBIN"),
            ("loadBalancer: {simple: RANDOM}", "RANDOM"),
            ("loadBalancer: {simple: LEAST_CONN}", "LEAST_REQUEST"),
            ("loadBalancer: {consistentHash: {useSourceIp: true}}", "RING_HASH"),
        ] {
            assert_eq!(LbSettings::from_envoy(&envoy_cluster(yaml)).unwrap().policy.name(), name, "{yaml}");
        }
        let maglev = LbSettings::from_envoy(&envoy_cluster(
            "loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 251}}}",
        ))
        .unwrap();
        assert_eq!((maglev.policy.name(), maglev.policy.params().table_size), ("MAGLEV", 251));
        let mut cluster = envoy_cluster("{}");
        cluster.lb_policy = LbPolicy::ClusterProvided as i32;
        assert_eq!(LbSettings::from_envoy(&cluster), Err(LbConfigError::UnsupportedPolicy(6)));
    }

    #[test]
    fn outlier_detection_sets_panic_threshold_from_min_health_percent() {
        assert_eq!(LbSettings::from_envoy(&envoy_cluster("{}")).unwrap().panic_threshold, 50);
        let od = LbSettings::from_envoy(&envoy_cluster("outlierDetection: {}")).unwrap();
        assert_eq!(od.panic_threshold, 0);
        assert!(od.outlier.is_some());
        let od = LbSettings::from_envoy(&envoy_cluster("outlierDetection: {minHealthPercent: 30}")).unwrap();
        assert_eq!(od.panic_threshold, 30);
    }

    #[test]
    fn policy_can_be_named_for_experiments() {
        let settings = LbSettings::default().with_policy("RANDOM").unwrap();
        assert_eq!(settings.policy.name(), "RANDOM");
        assert!(matches!(LbSettings::default().with_policy("NOPE"), Err(LbConfigError::UnknownPolicy(_))));
    }
}
