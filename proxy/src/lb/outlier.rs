//! Outlier detection for TCP, as Envoy does it for Istio's `outlierDetection` (consecutive errors only;
//! Istio disables success-rate ejection).
//!
//! A TCP proxy sees only locally-originated results: a connect success, failure, timeout, or a reset. Unless
//! `splitExternalLocalOriginErrors` is set, Envoy maps a failure to HTTP 503 and a timeout to 504, so each one
//! counts towards both `consecutive5xxErrors` and `consecutiveGatewayErrors`; a success resets both. With the split,
//! they count towards `consecutiveLocalOriginFailures` only (and the 5xx counters never move on TCP).
//!
//! Ejection is inline, when a counter reaches its threshold, and is refused when it would take the ejected share
//! of the cluster above `maxEjectionPercent` (except that one host may always be ejected). The `n`-th consecutive
//! ejection lasts `min(baseEjectionTime × n, max_ejection_time)`. Every `interval` a sweep un-ejects the hosts
//! whose time is up, and lowers the multiplier `n` of each host that has been back for at least one interval.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;

use envoy_types::pb::google::protobuf::UInt32Value;

use super::error::{LbConfigError, duration, invalid};

/// How a connection attempt to a host ended, as the data plane reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    ConnectSuccess,
    /// Refused or unreachable.
    ConnectFailure,
    ConnectTimeout,
}

/// Istio's `outlierDetection`, with Envoy's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierSettings {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Envoy's `max_ejection_time` (Istio never sets it): 300 s, or the base time if that is longer.
    pub max_ejection_time: Duration,
    /// Envoy ejects a host only while the ejected hosts, it included, stay within this share of the cluster (so
    /// with the default 10%, a cluster of fewer than 10 hosts ejects none)...
    pub max_ejection_percent: u32,
    /// ...unless this lets one host out whatever the share (`always_eject_one_host`; Istio never sets it).
    pub always_eject_one_host: bool,
    /// `None`: this counter does not eject.
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    /// Set when `splitExternalLocalOriginErrors` is: TCP failures then count here instead.
    pub consecutive_local_origin: Option<u32>,
}

impl Default for OutlierSettings {
    /// Envoy's defaults, which is what `outlierDetection: {}` gives.
    fn default() -> Self {
        OutlierSettings {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            always_eject_one_host: false,
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
        }
    }
}

impl OutlierSettings {
    /// Envoy's reading of `outlier_detection` (`DetectorConfig`): each consecutive-error counter ejects when both
    /// its threshold and its enforcing percentage are above zero; Envoy's defaults fill what is unset (5 and 100%
    /// for 5xx, 5 and 0% for gateway failures, 5 and 100% for local-origin failures when they are split).
    pub fn from_envoy(od: &OutlierDetection) -> Result<Self, LbConfigError> {
        let defaults = OutlierSettings::default();
        let interval = duration(od.interval.as_ref(), "outlier_detection.interval", defaults.interval)?;
        let base_ejection_time = duration(
            od.base_ejection_time.as_ref(),
            "outlier_detection.base_ejection_time",
            defaults.base_ejection_time,
        )?;
        if interval.is_zero() || base_ejection_time.is_zero() {
            return Err(invalid("outlier_detection", "interval and base_ejection_time must be more than 0"));
        }
        let max_ejection_time = duration(
            od.max_ejection_time.as_ref(),
            "outlier_detection.max_ejection_time",
            defaults.max_ejection_time.max(base_ejection_time),
        )?;
        let max_ejection_percent = od.max_ejection_percent.map_or(defaults.max_ejection_percent, |p| p.value);
        if max_ejection_percent > 100 {
            return Err(invalid("outlier_detection.max_ejection_percent", "must be within 0..=100"));
        }
        let counter = |threshold: Option<&UInt32Value>, enforcing: Option<&UInt32Value>, default_enforcing: u32| {
            let threshold = threshold.map_or(5, |v| v.value);
            let enforcing = enforcing.map_or(default_enforcing, |v| v.value);
            (threshold > 0 && enforcing > 0).then_some(threshold)
        };
        Ok(OutlierSettings {
            interval,
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent,
            always_eject_one_host: od.always_eject_one_host.is_some_and(|v| v.value),
            consecutive_5xx: counter(od.consecutive_5xx.as_ref(), od.enforcing_consecutive_5xx.as_ref(), 100),
            consecutive_gateway: counter(
                od.consecutive_gateway_failure.as_ref(),
                od.enforcing_consecutive_gateway_failure.as_ref(),
                0,
            ),
            consecutive_local_origin: if od.split_external_local_origin_errors {
                counter(
                    od.consecutive_local_origin_failure.as_ref(),
                    od.enforcing_consecutive_local_origin_failure.as_ref(),
                    100,
                )
            } else {
                None
            },
        })
    }

    /// How long the `n`-th consecutive ejection lasts.
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        (self.base_ejection_time * multiplier).min(self.max_ejection_time)
    }
}

/// One host's outlier state. Lives in [`HostState`](super::HostState) so that it survives config rebuilds.
#[derive(Debug, Default)]
pub(super) struct HostOutlier {
    ejected: AtomicBool,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Touched only when ejecting and sweeping, both rare.
    record: Mutex<EjectionRecord>,
}

#[derive(Debug, Default)]
struct EjectionRecord {
    ejected_at: Option<Instant>,
    unejected_at: Option<Instant>,
    /// Envoy's `eject_time_backoff`: the multiplier of the base ejection time.
    multiplier: u32,
}

impl HostOutlier {
    pub(super) fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    pub(super) fn multiplier(&self) -> u32 {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).multiplier
    }

    fn reset_counters(&self) {
        for counter in [&self.consecutive_5xx, &self.consecutive_gateway, &self.consecutive_local] {
            // Skip the store when already 0: a success is the common case and needs no cache-line write.
            if counter.load(Ordering::Relaxed) != 0 {
                counter.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Adds one failure to `counter`; true exactly when it reaches `threshold` (Envoy compares with `==`, so one
/// streak triggers once) — the counter then restarts, so a refused ejection can be retried after another streak.
fn count_failure(counter: &AtomicU32, threshold: Option<u32>) -> bool {
    let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
    let reached = threshold == Some(count);
    if reached {
        counter.store(0, Ordering::Relaxed);
    }
    reached
}

impl OutlierSettings {
    /// Counts one outcome for `host`; true when a consecutive-error threshold was just reached.
    pub(super) fn record(&self, host: &HostOutlier, outcome: Outcome) -> bool {
        match (outcome, self.consecutive_local_origin) {
            (Outcome::ConnectSuccess, _) => {
                host.reset_counters();
                false
            }
            (_, Some(threshold)) => count_failure(&host.consecutive_local, Some(threshold)),
            // Evaluate both: each counter keeps its own streak.
            (_, None) => {
                let gateway = count_failure(&host.consecutive_gateway, self.consecutive_gateway);
                count_failure(&host.consecutive_5xx, self.consecutive_5xx) | gateway
            }
        }
    }

    /// Ejects `host` unless it already is or the cap forbids it (`already_ejected` of `cluster_size` hosts are out).
    pub(super) fn eject(&self, host: &HostOutlier, already_ejected: usize, cluster_size: usize, now: Instant) -> bool {
        if host.is_ejected() {
            return false;
        }
        // Envoy's DetectorImpl::ejectHost (since envoyproxy/envoy#27909): the share after this ejection.
        let share = 100 * (already_ejected + 1) as u64;
        let allowed = share <= u64::from(self.max_ejection_percent) * cluster_size as u64
            || (self.always_eject_one_host && already_ejected == 0);
        if !allowed {
            return false;
        }
        let mut record = host.record.lock().unwrap_or_else(|e| e.into_inner());
        record.ejected_at = Some(now);
        // Envoy stops growing the multiplier once base × multiplier reaches the cap.
        if self.base_ejection_time * record.multiplier < self.max_ejection_time {
            record.multiplier += 1;
        }
        host.ejected.store(true, Ordering::Relaxed);
        true
    }

    /// The `interval` sweep for one host; true when it was un-ejected.
    pub(super) fn sweep(&self, host: &HostOutlier, now: Instant) -> bool {
        let mut record = host.record.lock().unwrap_or_else(|e| e.into_inner());
        if !host.is_ejected() {
            let back_for = record.unejected_at.map(|at| now.saturating_duration_since(at));
            if back_for.is_some_and(|d| d >= self.interval) && record.multiplier > 0 {
                record.multiplier -= 1;
            }
            return false;
        }
        let ejected_at = record.ejected_at.unwrap_or(now);
        if now.saturating_duration_since(ejected_at) < self.ejection_time(record.multiplier) {
            return false;
        }
        host.ejected.store(false, Ordering::Relaxed);
        // Envoy resets the counters so that a few new errors cannot re-eject at once.
        host.reset_counters();
        record.unejected_at = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DestinationRule's `outlierDetection`, as istiod writes it into the cluster.
    fn envoy(yaml: &str) -> OutlierDetection {
        crate::lb::tests::envoy_cluster(&format!("outlierDetection: {yaml}")).outlier_detection.unwrap()
    }

    #[test]
    fn istio_mapping_and_envoy_defaults() {
        let d = OutlierSettings::from_envoy(&envoy("{}")).unwrap();
        assert_eq!(d, OutlierSettings::default());
        let s = OutlierSettings::from_envoy(&envoy(
            "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 600s, maxEjectionPercent: 50}",
        ))
        .unwrap();
        assert_eq!(s.consecutive_5xx, None);
        assert_eq!(s.consecutive_gateway, Some(2));
        assert_eq!(s.max_ejection_time, Duration::from_secs(600), "the cap is at least the base time");
        assert_eq!(s.max_ejection_percent, 50);
        let split = OutlierSettings::from_envoy(&envoy("{splitExternalLocalOriginErrors: true}")).unwrap();
        assert_eq!(split.consecutive_local_origin, Some(5));
        let split = OutlierSettings::from_envoy(&envoy(
            "{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3}",
        ))
        .unwrap();
        assert_eq!(split.consecutive_local_origin, Some(3));
        let too_many =
            OutlierDetection { max_ejection_percent: Some(UInt32Value { value: 101 }), ..Default::default() };
        assert!(OutlierSettings::from_envoy(&too_many).is_err());
        let never = OutlierDetection { interval: Some(Default::default()), ..Default::default() };
        assert!(OutlierSettings::from_envoy(&never).is_err());
    }

    #[test]
    fn thresholds_count_consecutive_failures_only() {
        let s = OutlierSettings { consecutive_5xx: Some(3), ..Default::default() };
        let host = HostOutlier::default();
        assert!(!s.record(&host, Outcome::ConnectFailure));
        assert!(!s.record(&host, Outcome::ConnectTimeout));
        assert!(!s.record(&host, Outcome::ConnectSuccess), "a success resets the streak");
        assert!(!s.record(&host, Outcome::ConnectFailure));
        assert!(!s.record(&host, Outcome::ConnectTimeout));
        assert!(s.record(&host, Outcome::ConnectTimeout));
    }

    #[test]
    fn gateway_errors_trigger_below_5xx_threshold() {
        let s = OutlierSettings { consecutive_gateway: Some(2), ..Default::default() };
        let host = HostOutlier::default();
        assert!(!s.record(&host, Outcome::ConnectFailure));
        assert!(s.record(&host, Outcome::ConnectFailure));
    }

    #[test]
    fn split_local_origin_uses_its_own_threshold() {
        let s = OutlierSettings { consecutive_5xx: Some(1), consecutive_local_origin: Some(2), ..Default::default() };
        let host = HostOutlier::default();
        assert!(!s.record(&host, Outcome::ConnectFailure), "5xx counters do not see local-origin errors");
        assert!(s.record(&host, Outcome::ConnectFailure));
    }

    #[test]
    fn ejection_time_grows_then_caps() {
        let s = OutlierSettings {
            base_ejection_time: Duration::from_secs(100),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 100,
            ..Default::default()
        };
        let table = [(1, 100), (2, 200), (3, 300), (4, 300)];
        for (multiplier, seconds) in table {
            assert_eq!(s.ejection_time(multiplier), Duration::from_secs(seconds));
        }
        // The multiplier itself stops at 3 (100 × 3 reaches the cap).
        let host = HostOutlier::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            host.ejected.store(false, Ordering::Relaxed);
            assert!(s.eject(&host, 0, 1, t0));
        }
        assert_eq!(host.multiplier(), 3);
    }

    #[test]
    fn max_ejection_percent_counts_the_host_to_eject_as_envoy_does() {
        let s = OutlierSettings { max_ejection_percent: 10, ..Default::default() };
        let now = Instant::now();
        // 3 hosts, 10%: one ejection would be 33%, so none.
        assert!(!s.eject(&HostOutlier::default(), 0, 3, now));
        // 10 hosts: one; 20 hosts: two.
        assert!(s.eject(&HostOutlier::default(), 0, 10, now));
        assert!(!s.eject(&HostOutlier::default(), 1, 10, now));
        assert!(s.eject(&HostOutlier::default(), 1, 20, now));
        assert!(!s.eject(&HostOutlier::default(), 2, 20, now));
        // always_eject_one_host lets the first one out, and only it.
        let one = OutlierSettings { always_eject_one_host: true, ..s };
        assert!(one.eject(&HostOutlier::default(), 0, 3, now));
        assert!(!one.eject(&HostOutlier::default(), 1, 3, now));
    }
}
