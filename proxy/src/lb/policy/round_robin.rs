//! ROUND_ROBIN: a ticket counter walks the weight ranges, so each host gets exactly its weight's share of every
//! `total weight` consecutive picks.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Draw, HostSet, Policy, PolicyParams};

pub const NAME: &str = "ROUND_ROBIN";

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicU64,
}

pub fn build(_: &PolicyParams, _: &HostSet<'_>) -> Box<dyn Policy> {
    Box::new(RoundRobin::default())
}

impl Policy for RoundRobin {
    fn pick(&self, set: &HostSet<'_>, _: &mut Draw<'_>) -> usize {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        set.at(ticket % set.total_weight())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PolicyParams, tests::counts};

    #[test]
    fn follows_weights_exactly() {
        assert_eq!(counts(super::NAME, PolicyParams::default(), &[1, 3], 400), vec![100, 300]);
    }
}
