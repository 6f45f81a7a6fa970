//! LEAST_REQUEST: power of two choices. Two weighted random draws; the host with fewer open connections wins
//! (the first on a tie). Istio's default for gateway clusters.

use super::{Draw, HostSet, Policy, PolicyParams};

pub const NAME: &str = "LEAST_REQUEST";

#[derive(Debug)]
pub struct LeastRequest;

pub fn build(_: &PolicyParams, _: &HostSet<'_>) -> Box<dyn Policy> {
    Box::new(LeastRequest)
}

impl Policy for LeastRequest {
    fn pick(&self, set: &HostSet<'_>, draw: &mut Draw<'_>) -> usize {
        let first = set.random(draw.rng);
        let second = set.random(draw.rng);
        let active = |i: usize| set.hosts[i].state.active();
        if active(second) < active(first) { second } else { first }
    }
}
