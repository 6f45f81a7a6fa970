//! A DestinationRule traffic policy as istiod writes it into an sni-dnat cluster and its tcp_proxy
//! (`pilot/pkg/networking/core/cluster_traffic_policy.go`: `applyLoadBalancer`, `applyOutlierDetection`,
//! `applyConnectionPool`; `listener.go` for the tcp_proxy's idle timeout, duration and hash policy).

use std::time::Duration;

use crossgate_proto::load_balancer_settings::{ConsistentHashLb, LbPolicy, SimpleLb, consistent_hash_lb};
use crossgate_proto::{OutlierDetection, TrafficPolicy};
use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf;

use crate::locality_lb::LocalitySettings;
pub use crate::policy_error::PolicyError;
use crate::policy_error::invalid;

/// Envoy's minimum ring size, which Istio keeps when `minimumRingSize` is unset.
pub const DEFAULT_RING_SIZE: u64 = 1024;
/// Envoy's Maglev table size (a prime).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65_537;
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// The cluster and tcp_proxy fields one traffic policy sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterPolicy {
    pub lb_policy: cluster::cluster::LbPolicy,
    pub lb_config: Option<cluster::cluster::LbConfig>,
    /// tcp_proxy `hash_policy: [{source_ip: {}}]`: consistent hashing on the client's address.
    pub hash_source_ip: bool,
    pub outlier_detection: Option<cluster::OutlierDetection>,
    /// `common_lb_config.healthy_panic_threshold`, set (to `minHealthPercent`) whenever outlier detection is.
    pub healthy_panic_threshold: Option<f64>,
    pub locality: LocalitySettings,
    pub connect_timeout: Option<Duration>,
    /// `circuit_breakers.thresholds[0].max_connections`; `None` leaves Istio's default (2^32-1).
    pub max_connections: Option<u32>,
    pub tcp_keepalive: Option<core::TcpKeepalive>,
    /// tcp_proxy `idle_timeout`; `Some(ZERO)` disables it.
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
}

impl ClusterPolicy {
    /// Reads and validates a DestinationRule traffic policy (none: Istio's defaults).
    pub fn new(policy: Option<&TrafficPolicy>) -> Result<Self, PolicyError> {
        let mut out = ClusterPolicy { lb_policy: cluster::cluster::LbPolicy::LeastRequest, ..Default::default() };
        let lb = policy.and_then(|p| p.load_balancer.as_ref());
        match lb.and_then(|lb| lb.lb_policy.as_ref()) {
            None => {}
            Some(LbPolicy::Simple(value)) => out.lb_policy = simple_policy(*value)?,
            Some(LbPolicy::ConsistentHash(hash)) => consistent_hash(hash, &mut out)?,
        }
        if let Some(setting) = lb.and_then(|lb| lb.locality_lb_setting.as_ref()) {
            out.locality = LocalitySettings::from_proto(setting)?;
        }
        if let Some(od) = policy.and_then(|p| p.outlier_detection.as_ref()) {
            out.outlier_detection = Some(outlier_detection(od)?);
            // Istio disables panic by default (minHealthPercent 0) whenever outlier detection is set.
            if !(0..=100).contains(&od.min_health_percent) {
                return Err(invalid("outlierDetection.minHealthPercent", "must be within 0..=100"));
            }
            out.healthy_panic_threshold = Some(f64::from(od.min_health_percent));
        }
        let tcp = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|c| c.tcp.as_ref());
        if let Some(tcp) = tcp {
            let field = "connectionPool.tcp";
            out.connect_timeout = duration(tcp.connect_timeout.as_ref(), "connectionPool.tcp.connectTimeout")?;
            if out.connect_timeout == Some(Duration::ZERO) {
                return Err(invalid("connectionPool.tcp.connectTimeout", "must be more than 0s"));
            }
            out.idle_timeout = duration(tcp.idle_timeout.as_ref(), "connectionPool.tcp.idleTimeout")?;
            out.max_connection_duration =
                duration(tcp.max_connection_duration.as_ref(), "connectionPool.tcp.maxConnectionDuration")?;
            out.max_connections = match tcp.max_connections {
                0 => None,
                n if n < 0 => return Err(invalid(field, format!("maxConnections {n} is negative"))),
                n => Some(n.unsigned_abs()),
            };
            if let Some(k) = &tcp.tcp_keepalive {
                let seconds = |d: Option<Duration>| d.map(|d| protobuf::UInt32Value { value: d.as_secs() as u32 });
                out.tcp_keepalive = Some(core::TcpKeepalive {
                    keepalive_probes: (k.probes > 0).then_some(protobuf::UInt32Value { value: k.probes }),
                    keepalive_time: seconds(duration(k.time.as_ref(), "connectionPool.tcp.tcpKeepalive.time")?),
                    keepalive_interval: seconds(duration(
                        k.interval.as_ref(),
                        "connectionPool.tcp.tcpKeepalive.interval",
                    )?),
                });
            }
        }
        Ok(out)
    }
}

fn simple_policy(value: i32) -> Result<cluster::cluster::LbPolicy, PolicyError> {
    use cluster::cluster::LbPolicy as Envoy;
    Ok(match SimpleLb::try_from(value) {
        Ok(SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest) => Envoy::LeastRequest,
        Ok(SimpleLb::RoundRobin) => Envoy::RoundRobin,
        Ok(SimpleLb::Random) => Envoy::Random,
        Ok(SimpleLb::Passthrough) => {
            return Err(invalid("loadBalancer.simple", "PASSTHROUGH is not supported by an sni-dnat gateway"));
        }
        Err(_) => return Err(invalid("loadBalancer.simple", format!("{value} is not a known SimpleLB value"))),
    })
}

fn consistent_hash(hash: &ConsistentHashLb, out: &mut ClusterPolicy) -> Result<(), PolicyError> {
    use consistent_hash_lb::{HashAlgorithm, HashKey};
    if hash.hash_key != Some(HashKey::UseSourceIp(true)) {
        return Err(invalid("loadBalancer.consistentHash", "only useSourceIp can be hashed by a TCP gateway"));
    }
    out.hash_source_ip = true;
    // Istio falls back to RING_HASH with Envoy's 1024 minimum ring size when no algorithm is named.
    match &hash.hash_algorithm {
        None | Some(HashAlgorithm::RingHash(_)) => {
            let size = match &hash.hash_algorithm {
                Some(HashAlgorithm::RingHash(ring)) if ring.minimum_ring_size > 0 => ring.minimum_ring_size,
                _ => DEFAULT_RING_SIZE,
            };
            if size > MAX_RING_SIZE {
                return Err(invalid("loadBalancer.consistentHash.ringHash.minimumRingSize", "must be at most 8M"));
            }
            out.lb_policy = cluster::cluster::LbPolicy::RingHash;
            out.lb_config = Some(cluster::cluster::LbConfig::RingHashLbConfig(cluster::cluster::RingHashLbConfig {
                minimum_ring_size: Some(protobuf::UInt64Value { value: size }),
                ..Default::default()
            }));
        }
        Some(HashAlgorithm::Maglev(table)) => {
            let size = if table.table_size > 0 { table.table_size } else { DEFAULT_MAGLEV_TABLE_SIZE };
            if size > 5_000_011 || !is_prime(size) {
                return Err(invalid("loadBalancer.consistentHash.maglev.tableSize", "must be a prime up to 5000011"));
            }
            out.lb_policy = cluster::cluster::LbPolicy::Maglev;
            out.lb_config = Some(cluster::cluster::LbConfig::MaglevLbConfig(cluster::cluster::MaglevLbConfig {
                table_size: Some(protobuf::UInt64Value { value: size }),
            }));
        }
    }
    Ok(())
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// Istio's `applyOutlierDetection`: consecutive errors only (success rate disabled), enforcing 100% for each
/// counter set above zero.
fn outlier_detection(od: &OutlierDetection) -> Result<cluster::OutlierDetection, PolicyError> {
    let u32v = |value: u32| Some(protobuf::UInt32Value { value });
    let enforcing = |value: u32| u32v(if value > 0 { 100 } else { 0 });
    let mut out = cluster::OutlierDetection { enforcing_success_rate: u32v(0), ..Default::default() };
    if let Some(v) = &od.consecutive_5xx_errors {
        out.consecutive_5xx = u32v(v.value);
        out.enforcing_consecutive_5xx = enforcing(v.value);
    }
    if let Some(v) = &od.consecutive_gateway_errors {
        out.consecutive_gateway_failure = u32v(v.value);
        out.enforcing_consecutive_gateway_failure = enforcing(v.value);
    }
    let interval = duration(od.interval.as_ref(), "outlierDetection.interval")?;
    let base = duration(od.base_ejection_time.as_ref(), "outlierDetection.baseEjectionTime")?;
    if interval == Some(Duration::ZERO) || base == Some(Duration::ZERO) {
        return Err(invalid("outlierDetection", "interval and baseEjectionTime must be at least 1ms"));
    }
    out.interval = interval.map(proto_duration);
    out.base_ejection_time = base.map(proto_duration);
    match od.max_ejection_percent {
        0 => {}
        p @ 1..=100 => out.max_ejection_percent = u32v(p.unsigned_abs()),
        _ => return Err(invalid("outlierDetection.maxEjectionPercent", "must be within 0..=100")),
    }
    if od.split_external_local_origin_errors {
        out.split_external_local_origin_errors = true;
        if let Some(v) = od.consecutive_local_origin_failures.as_ref().filter(|v| v.value > 0) {
            out.consecutive_local_origin_failure = u32v(v.value);
            out.enforcing_consecutive_local_origin_failure = u32v(100);
        }
        out.enforcing_local_origin_success_rate = u32v(0);
    }
    Ok(out)
}

/// A DestinationRule duration; negative ones are refused by name.
fn duration(value: Option<&crossgate_proto::Duration>, field: &'static str) -> Result<Option<Duration>, PolicyError> {
    value.map(|d| Duration::try_from(*d).map_err(|_| invalid(field, "must not be negative"))).transpose()
}

/// A `std` duration as Envoy's protobuf one.
pub fn proto_duration(d: Duration) -> protobuf::Duration {
    protobuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Envoy's `Percent`.
pub(crate) fn percent(value: f64) -> Percent {
    Percent { value }
}
