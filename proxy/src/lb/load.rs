//! Envoy's priority and locality load arithmetic (`LoadBalancerBase::recalculatePerPriorityState`,
//! `recalculatePerPriorityPanic`, `HostSetImpl::effectiveLocalityWeight`), in Envoy's integer percentages.
//!
//! With the overprovisioning factor `F` (the assignment's `policy.overprovisioning_factor`, by default 140%; Istio
//! never sets it):
//!
//! ```text
//! health(P)          = min(100, F · healthy(P) / total(P))          integer percent, host counts (not weights)
//! normalized_total   = min(100, Σ health(P))
//! load(P)            = min(remaining, health(P) · 100 / normalized_total), P = 0, 1, …; rounding leftovers go to
//!                      the first priority with health > 0
//! ```
//!
//! So a priority keeps all traffic while at least 100/1.4 ≈ 71.4% of its hosts are healthy, and 70% at 50%.
//!
//! **Panic.** While `normalized_total < 100`, a priority whose healthy share is below the panic threshold is in
//! panic: it balances over all its hosts, healthy or not. If every priority is in panic, the load is split by
//! host count instead. A threshold of 0 disables panic; then, with nothing healthy, nothing is picked.
//!
//! **Localities** (only with Envoy's locality-weighted lb): within a priority a locality is chosen with the weight
//! `weight · min(1, F · available / total)`, then a host within it.

/// Envoy's default overprovisioning factor, in percent.
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

/// Host counts of one priority, or of one locality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Availability {
    /// Healthy and not ejected.
    pub healthy: u64,
    pub total: u64,
}

impl Availability {
    /// `min(100, F · healthy / total)`, `factor` = F in percent.
    pub fn health(self, factor: u32) -> u32 {
        if self.total == 0 {
            return 0;
        }
        (u64::from(factor) * self.healthy / self.total).min(100) as u32
    }

    fn in_panic(self, threshold: u32) -> bool {
        // Envoy compares a floating percentage with the threshold.
        let healthy_percent = if self.total == 0 { 0.0 } else { 100.0 * self.healthy as f64 / self.total as f64 };
        healthy_percent < f64::from(threshold)
    }
}

/// How traffic is split across priorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityLoad {
    /// Percent per priority; sums to 100, or to 0 when no host may be picked.
    pub load: Vec<u32>,
    /// Whether each priority balances over all its hosts, ignoring health.
    pub panic: Vec<bool>,
}

/// Splits traffic across priorities from their availability (see the module docs).
pub fn priority_load(priorities: &[Availability], panic_threshold: u32, factor: u32) -> PriorityLoad {
    let health: Vec<u32> = priorities.iter().map(|p| p.health(factor)).collect();
    let normalized_total = health.iter().sum::<u32>().min(100);
    let mut load = vec![0; priorities.len()];
    let mut panic = vec![false; priorities.len()];
    let mut remaining = 100;
    for (l, h) in load.iter_mut().zip(&health) {
        // normalized_total is 0 only when every health is: then no priority takes load.
        *l = (h * 100).checked_div(normalized_total).unwrap_or(0).min(remaining);
        remaining -= *l;
    }
    if let Some(first) = health.iter().position(|h| *h > 0) {
        load[first] += remaining;
    }
    // Panic is ignored while the priorities together are fully available.
    if normalized_total < 100 && panic_threshold > 0 {
        for (p, availability) in panic.iter_mut().zip(priorities) {
            *p = availability.in_panic(panic_threshold);
        }
        if !panic.is_empty() && panic.iter().all(|p| *p) {
            load = load_in_total_panic(priorities);
        }
    }
    PriorityLoad { load, panic }
}

/// Every priority in panic: load follows the host counts (Envoy's `recalculateLoadInTotalPanic`).
fn load_in_total_panic(priorities: &[Availability]) -> Vec<u32> {
    let total: u64 = priorities.iter().map(|p| p.total).sum();
    if total == 0 {
        return vec![0; priorities.len()];
    }
    let mut load: Vec<u32> = priorities.iter().map(|p| (100 * p.total / total) as u32).collect();
    let leftover = 100 - load.iter().sum::<u32>();
    if let Some(first) = priorities.iter().position(|p| p.total > 0) {
        load[first] += leftover;
    }
    load
}

/// Scale of [`locality_weight`]: weights are in millionths so that integer arithmetic keeps Envoy's precision.
pub const LOCALITY_SCALE: u64 = 1_000_000;

/// A locality's effective weight: `weight · min(1, F · available / total)`, times [`LOCALITY_SCALE`].
pub fn locality_weight(weight: u64, locality: Availability, factor: u32) -> u64 {
    if locality.total == 0 {
        return 0;
    }
    let availability =
        (LOCALITY_SCALE * u64::from(factor) / 100 * locality.healthy / locality.total).min(LOCALITY_SCALE);
    weight * availability
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u32 = DEFAULT_OVERPROVISIONING_FACTOR;

    fn a(healthy: u64, total: u64) -> Availability {
        Availability { healthy, total }
    }

    #[test]
    fn health_is_overprovisioned_and_capped() {
        // (healthy, total, health%): 140 · healthy / total, capped at 100.
        let table =
            [(10, 10, 100), (8, 10, 100), (5, 7, 100), (7, 10, 98), (5, 10, 70), (1, 10, 14), (0, 10, 0), (0, 0, 0)];
        for (healthy, total, health) in table {
            assert_eq!(a(healthy, total).health(F), health, "{healthy}/{total}");
        }
    }

    #[test]
    fn priority_loads_follow_envoy_docs() {
        /// (priorities, panic threshold, expected load, expected panic)
        type Case<'a> = (&'a [Availability], u32, &'a [u32], &'a [bool]);
        let table: &[Case] = &[
            // Envoy docs: P0 at 50% healthy keeps 70%.
            (&[a(5, 10), a(10, 10)], 0, &[70, 30], &[false, false]),
            // At ≥ 71.4% healthy P0 keeps everything.
            (&[a(5, 7), a(10, 10)], 0, &[100, 0], &[false, false]),
            (&[a(8, 10), a(10, 10)], 0, &[100, 0], &[false, false]),
            (&[a(7, 10), a(10, 10)], 0, &[98, 2], &[false, false]),
            (&[a(0, 10), a(10, 10)], 0, &[0, 100], &[false, false]),
            // Three levels: 28 + 28 + 44.
            (&[a(2, 10), a(2, 10), a(10, 10)], 0, &[28, 28, 44], &[false, false, false]),
            // Envoy docs: P0 20%, P1 20%, P2 50% healthy: normalized total 28 + 28 + 70 > 100 → 28/28/44.
            (&[a(2, 10), a(2, 10), a(5, 10)], 0, &[28, 28, 44], &[false, false, false]),
            // Below 100 in total, loads are scaled up: 14 / 28 → 33/66 plus the leftover 1 to P0.
            (&[a(1, 10), a(2, 10)], 0, &[34, 66], &[false, false]),
            // Panic at 50: fully available in total means no panic even though P0 is at 10%.
            (&[a(1, 10), a(10, 10)], 50, &[14, 86], &[false, false]),
            // One priority at 40%: 56 < 100 and 40% < 50% → total panic, all to P0.
            (&[a(4, 10)], 50, &[100], &[true]),
            // Same with panic disabled: the 56% spreads as 100% over the healthy hosts.
            (&[a(4, 10)], 0, &[100], &[false]),
            // Nothing healthy, panic disabled: nothing may be picked.
            (&[a(0, 4), a(0, 6)], 0, &[0, 0], &[false, false]),
            // Nothing healthy, panic at 50: total panic, by host counts.
            (&[a(0, 4), a(0, 6)], 50, &[40, 60], &[true, true]),
            // Partial panic: 28 + 70 = 98 < 100, so P0 (20% < 50%) is in panic but keeps its health share;
            // P1 at 50% is not. Loads: 2800/98 = 28 (+1 leftover), 7000/98 = 71.
            (&[a(2, 10), a(5, 10)], 50, &[29, 71], &[true, false]),
        ];
        for (priorities, threshold, load, panic) in table {
            let got = priority_load(priorities, *threshold, F);
            assert_eq!(got.load, *load, "{priorities:?} at {threshold}");
            assert_eq!(got.panic, *panic, "{priorities:?} at {threshold}");
        }
    }

    #[test]
    fn locality_weight_is_overprovisioned() {
        assert_eq!(locality_weight(3, a(10, 10), F), 3 * LOCALITY_SCALE);
        assert_eq!(locality_weight(3, a(5, 10), F), 3 * 700_000);
        assert_eq!(locality_weight(3, a(0, 10), F), 0);
        assert_eq!(locality_weight(1, a(3, 4), F), LOCALITY_SCALE);
    }
}
