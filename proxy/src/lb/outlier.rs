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

use crossgate_proto::OutlierDetection;

use super::settings::{LbConfigError, duration, invalid};

/// How a connection attempt to a host ended, as the data plane reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    ConnectSuccess,
    /// Refused or unreachable.
    ConnectFailure,
    ConnectTimeout,
    /// Reset by the upstream before any byte came back; counted like a connect failure.
    Reset,
}

/// Istio's `outlierDetection`, with Envoy's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierSettings {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Envoy's `max_ejection_time` (Istio never sets it): 300 s, or the base time if that is longer.
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
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
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
        }
    }
}

impl OutlierSettings {
    /// Istio's `applyOutlierDetection`.
    pub fn from_proto(od: &OutlierDetection) -> Result<Self, LbConfigError> {
        let defaults = OutlierSettings::default();
        let interval = duration(od.interval.as_ref(), "outlierDetection.interval", defaults.interval)?;
        let base_ejection_time =
            duration(od.base_ejection_time.as_ref(), "outlierDetection.baseEjectionTime", defaults.base_ejection_time)?;
        if interval.is_zero() || base_ejection_time.is_zero() {
            return Err(invalid("outlierDetection", "interval and baseEjectionTime must be at least 1ms"));
        }
        let max_ejection_percent = match od.max_ejection_percent {
            0 => defaults.max_ejection_percent,
            p @ 1..=100 => p.unsigned_abs(),
            _ => return Err(invalid("outlierDetection.maxEjectionPercent", "must be within 0..=100")),
        };
        // An explicit 0 sets Envoy's enforcing percentage to 0: the counter no longer ejects.
        let enforced = |v: Option<&pbjson_types::UInt32Value>, default: Option<u32>| match v {
            None => default,
            Some(v) => Some(v.value).filter(|n| *n > 0),
        };
        let split = od.split_external_local_origin_errors;
        Ok(OutlierSettings {
            interval,
            base_ejection_time,
            max_ejection_time: defaults.max_ejection_time.max(base_ejection_time),
            max_ejection_percent,
            consecutive_5xx: enforced(od.consecutive_5xx_errors.as_ref(), defaults.consecutive_5xx),
            consecutive_gateway: enforced(od.consecutive_gateway_errors.as_ref(), None),
            consecutive_local_origin: split
                .then(|| enforced(od.consecutive_local_origin_failures.as_ref(), Some(5)).unwrap_or(5)),
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
        let share = 100 * (already_ejected + 1) as u64;
        let allowed = share <= u64::from(self.max_ejection_percent) * cluster_size as u64 || already_ejected == 0;
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

    fn proto(yaml: &str) -> OutlierDetection {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn istio_mapping_and_envoy_defaults() {
        let d = OutlierSettings::from_proto(&proto("{}")).unwrap();
        assert_eq!(d, OutlierSettings::default());
        let s = OutlierSettings::from_proto(&proto(
            "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 600s, maxEjectionPercent: 50}",
        ))
        .unwrap();
        assert_eq!(s.consecutive_5xx, None);
        assert_eq!(s.consecutive_gateway, Some(2));
        assert_eq!(s.max_ejection_time, Duration::from_secs(600), "the cap is at least the base time");
        assert_eq!(s.max_ejection_percent, 50);
        let split = OutlierSettings::from_proto(&proto("{splitExternalLocalOriginErrors: true}")).unwrap();
        assert_eq!(split.consecutive_local_origin, Some(5));
        let split = OutlierSettings::from_proto(&proto(
            "{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3}",
        ))
        .unwrap();
        assert_eq!(split.consecutive_local_origin, Some(3));
        assert!(OutlierSettings::from_proto(&proto("{maxEjectionPercent: 101}")).is_err());
        assert!(OutlierSettings::from_proto(&proto("{interval: 0s}")).is_err());
    }

    #[test]
    fn thresholds_count_consecutive_failures_only() {
        let s = OutlierSettings { consecutive_5xx: Some(3), ..Default::default() };
        let host = HostOutlier::default();
        assert!(!s.record(&host, Outcome::ConnectFailure));
        assert!(!s.record(&host, Outcome::ConnectTimeout));
        assert!(!s.record(&host, Outcome::ConnectSuccess), "a success resets the streak");
        assert!(!s.record(&host, Outcome::ConnectFailure));
        assert!(!s.record(&host, Outcome::Reset));
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
    fn max_ejection_percent_always_allows_one() {
        let s = OutlierSettings { max_ejection_percent: 10, ..Default::default() };
        let now = Instant::now();
        // 3 hosts, 10%: the first ejection (33%) is allowed anyway, the second is not.
        assert!(s.eject(&HostOutlier::default(), 0, 3, now));
        assert!(!s.eject(&HostOutlier::default(), 1, 3, now));
        // 20 hosts, 10%: two may be out.
        assert!(s.eject(&HostOutlier::default(), 1, 20, now));
        assert!(!s.eject(&HostOutlier::default(), 2, 20, now));
    }
}
