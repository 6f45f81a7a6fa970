//! RING_HASH (Envoy's ketama-style ring): each host gets points on a 64-bit ring in proportion to its weight, at
//! least `minimumRingSize` in total; a client hashes to the first point at or after its hash. Removing a host
//! moves only the clients that hashed to it.

use super::{Draw, HostSet, Policy, PolicyParams, hash64};

pub const NAME: &str = "RING_HASH";

/// Envoy's maximum ring size.
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct RingHash {
    /// (point, host index), sorted by point.
    ring: Vec<(u64, usize)>,
}

pub fn build(params: &PolicyParams, set: &HostSet<'_>) -> Box<dyn Policy> {
    let total = set.total_weight().max(1);
    // As Envoy: scale so that the lightest host still gets at least one point.
    let lightest = (0..set.members.len()).map(|slot| set.weight(slot)).min().unwrap_or(1).max(1);
    let size = params.ring_size.max(total.div_ceil(lightest)).min(MAX_RING_SIZE);
    let mut ring = Vec::with_capacity(size as usize + set.members.len());
    for (slot, host) in set.members.iter().enumerate() {
        let points = (size * set.weight(slot)).div_ceil(total).max(1);
        let address = set.hosts[*host].spec.address.to_string();
        for n in 0..points {
            ring.push((hash64(format!("{address}_{n}").as_bytes()), *host));
        }
    }
    ring.sort_unstable();
    Box::new(RingHash { ring })
}

impl Policy for RingHash {
    fn pick(&self, _: &HostSet<'_>, draw: &mut Draw<'_>) -> usize {
        let slot = self.ring.partition_point(|(point, _)| *point < draw.source_hash);
        self.ring.get(slot).unwrap_or(&self.ring[0]).1
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{hosts, set_of};
    use super::super::{Draw, HostSet, PolicyParams, hash_ip};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::net::IpAddr;

    #[test]
    fn removing_a_host_moves_few_other_clients() {
        let all = hosts(&[1; 8]);
        let (members, cumulative) = set_of(&all);
        let full = HostSet { hosts: &all, members: &members, cumulative: &cumulative };
        let without: Vec<usize> = (0..7).collect();
        let smaller = HostSet { hosts: &all, members: &without, cumulative: &cumulative[..7] };
        let params = PolicyParams::default();
        let (a, b) = (super::build(&params, &full), super::build(&params, &smaller));
        let mut rng = SmallRng::seed_from_u64(1);
        let mut moved = 0;
        for client in 0..2000u32 {
            let source_hash = hash_ip(IpAddr::from(client.to_be_bytes()));
            let before = a.pick(&full, &mut Draw { rng: &mut rng, source_hash });
            let after = b.pick(&smaller, &mut Draw { rng: &mut rng, source_hash });
            moved += usize::from(before != 7 && before != after);
        }
        // As in Envoy, the other hosts get a few more points each (1024/7 instead of 1024/8): some clients move,
        // but far from the 6/7 a modulo hash would move.
        assert!(moved < 300, "{moved} of 2000 moved");
    }
}
