//! RANDOM: a weighted random host.

use super::{Draw, HostSet, Policy, PolicyParams};

pub const NAME: &str = "RANDOM";

#[derive(Debug)]
pub struct Random;

pub fn build(_: &PolicyParams, _: &HostSet<'_>) -> Box<dyn Policy> {
    Box::new(Random)
}

impl Policy for Random {
    fn pick(&self, set: &HostSet<'_>, draw: &mut Draw<'_>) -> usize {
        set.random(draw.rng)
    }
}
