//! The pick algorithms, behind one seam: a [`Policy`] picks one host of a [`HostSet`] — the hosts of the chosen
//! priority and locality that may take traffic, with their weights. Priorities, localities, health and ejection
//! are dealt with before a policy is asked, so a policy is only the algorithm and runs unchanged in the gateway
//! and in the simulator.
//!
//! # Adding a policy
//!
//! 1. Write `policy/my_policy.rs` with `pub const NAME: &str = "MY_POLICY";`, a type implementing [`Policy`], and
//!    a `pub fn build(params: &PolicyParams, set: &HostSet<'_>) -> Box<dyn Policy>`. `build` runs off the hot path
//!    whenever the set changes (config or ejections): precompute there (tables, rings), keep `pick` allocation-free.
//! 2. Add `mod my_policy;` and one line to [`REGISTRY`].
//! 3. Select it by name: `LbSettings::with_policy("MY_POLICY")`, or `policy: MY_POLICY` in a simulator scenario.

use std::fmt;
use std::net::IpAddr;

use rand::RngCore;

use super::endpoint::Host;
use super::error::{LbConfigError, invalid};

pub mod least_request;
pub mod maglev;
pub mod random;
pub mod ring_hash;
pub mod round_robin;

/// One pick algorithm, prepared for one host set.
pub trait Policy: Send + Sync + fmt::Debug {
    /// Returns the index (into the cluster's hosts) of one member of `set`, which is never empty.
    fn pick(&self, set: &HostSet<'_>, draw: &mut Draw<'_>) -> usize;
}

/// Builds a policy for one host set; called off the hot path.
pub type Build = fn(&PolicyParams, &HostSet<'_>) -> Box<dyn Policy>;

/// A registered policy.
pub struct Entry {
    pub name: &'static str,
    pub build: Build,
    /// Consistent hashing: the priority and the locality are chosen by the source hash too (as Envoy's hash
    /// balancers do), so that a client keeps its host while the sets are stable.
    pub hashes_source: bool,
}

/// Every policy, by the name config selects it with.
pub static REGISTRY: &[Entry] = &[
    Entry { name: least_request::NAME, build: least_request::build, hashes_source: false },
    Entry { name: round_robin::NAME, build: round_robin::build, hashes_source: false },
    Entry { name: random::NAME, build: random::build, hashes_source: false },
    Entry { name: ring_hash::NAME, build: ring_hash::build, hashes_source: true },
    Entry { name: maglev::NAME, build: maglev::build, hashes_source: true },
];

/// Parameters some policies take (Istio's consistent-hash settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyParams {
    /// Ring hash: `ringHash.minimumRingSize` (Envoy's default 1024).
    pub ring_size: u64,
    /// Maglev: `maglev.tableSize`, a prime (Envoy's default 65537).
    pub table_size: u64,
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyParams { ring_size: 1024, table_size: 65537 }
    }
}

impl PolicyParams {
    pub fn validate(&self) -> Result<(), LbConfigError> {
        if self.ring_size > ring_hash::MAX_RING_SIZE {
            return Err(invalid("consistentHash.ringHash.minimumRingSize", "must be at most 8388608"));
        }
        if !maglev::is_prime(self.table_size) || self.table_size > maglev::MAX_TABLE_SIZE {
            return Err(invalid("consistentHash.maglev.tableSize", "must be a prime number up to 5000011"));
        }
        Ok(())
    }
}

/// A policy chosen by name, with its parameters.
#[derive(Clone, Copy)]
pub struct PolicyRef {
    entry: &'static Entry,
    params: PolicyParams,
}

impl PolicyRef {
    pub fn by_name(name: &str, params: PolicyParams) -> Result<Self, LbConfigError> {
        let entry =
            REGISTRY.iter().find(|e| e.name == name).ok_or_else(|| LbConfigError::UnknownPolicy(name.to_owned()))?;
        params.validate()?;
        Ok(PolicyRef { entry, params })
    }

    pub fn name(&self) -> &'static str {
        self.entry.name
    }

    pub fn params(&self) -> PolicyParams {
        self.params
    }

    pub fn hashes_source(&self) -> bool {
        self.entry.hashes_source
    }

    pub fn build(&self, set: &HostSet<'_>) -> Box<dyn Policy> {
        (self.entry.build)(&self.params, set)
    }
}

impl Default for PolicyRef {
    /// Istio's default for gateway clusters.
    fn default() -> Self {
        PolicyRef { entry: &REGISTRY[0], params: PolicyParams::default() }
    }
}

impl PartialEq for PolicyRef {
    fn eq(&self, other: &Self) -> bool {
        self.entry.name == other.entry.name && self.params == other.params
    }
}

impl fmt::Debug for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyRef").field("name", &self.entry.name).field("params", &self.params).finish()
    }
}

/// The candidates of one pick: members of the cluster's hosts with the running sum of their weights.
#[derive(Debug, Clone, Copy)]
pub struct HostSet<'a> {
    pub hosts: &'a [Host],
    /// Indices into `hosts`.
    pub members: &'a [usize],
    /// `cumulative[i]` = sum of the weights of `members[..=i]`.
    pub cumulative: &'a [u64],
}

impl HostSet<'_> {
    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The member whose weight range holds `point` (0 <= point < total weight).
    pub fn at(&self, point: u64) -> usize {
        let slot = self.cumulative.partition_point(|running| *running <= point);
        self.members[slot.min(self.members.len() - 1)]
    }

    pub fn weight(&self, slot: usize) -> u64 {
        self.cumulative[slot] - if slot == 0 { 0 } else { self.cumulative[slot - 1] }
    }

    /// A weighted random member.
    pub fn random(&self, rng: &mut dyn RngCore) -> usize {
        self.at(rng.next_u64() % self.total_weight())
    }
}

/// What a pick may draw on: randomness, and the hash of the client's address.
pub struct Draw<'a> {
    pub rng: &'a mut dyn RngCore,
    pub source_hash: u64,
}

/// A small, stable 64-bit hash (FNV-1a, then a splitmix64 finalizer to spread the bits): stable across builds and
/// processes, so that every gateway replica hashes a client to the same host.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finalizer: derives a further well-spread value from a hash.
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The hash of a client address, without allocating.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash64(&v4.octets()),
        IpAddr::V6(v6) => hash64(&v6.octets()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lb::endpoint::{EndpointSpec, Health, HostState};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::net::SocketAddr;
    use std::sync::Arc;

    pub(crate) fn hosts(weights: &[u32]) -> Vec<Host> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Host {
                spec: EndpointSpec {
                    address: SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 15443)),
                    locality: Arc::default(),
                    weight: *w,
                    health: Health::Healthy,
                    workload: Arc::default(),
                },
                state: Arc::new(HostState::default()),
            })
            .collect()
    }

    pub(crate) fn set_of(hosts: &[Host]) -> (Vec<usize>, Vec<u64>) {
        let members: Vec<usize> = (0..hosts.len()).collect();
        let cumulative = hosts
            .iter()
            .scan(0, |sum, h| {
                *sum += u64::from(h.spec.weight);
                Some(*sum)
            })
            .collect();
        (members, cumulative)
    }

    /// Picks `n` times with distinct source addresses; returns the count per host.
    pub(crate) fn counts(name: &str, params: PolicyParams, weights: &[u32], n: u32) -> Vec<u32> {
        let hosts = hosts(weights);
        let (members, cumulative) = set_of(&hosts);
        let set = HostSet { hosts: &hosts, members: &members, cumulative: &cumulative };
        let policy = PolicyRef::by_name(name, params).unwrap().build(&set);
        let mut rng = SmallRng::seed_from_u64(5);
        let mut counts = vec![0; hosts.len()];
        for i in 0..n {
            let source_hash = hash_ip(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
            counts[policy.pick(&set, &mut Draw { rng: &mut rng, source_hash })] += 1;
        }
        counts
    }

    #[test]
    fn every_policy_honours_weights() {
        let params = PolicyParams { ring_size: 4096, table_size: 65537 };
        for entry in REGISTRY {
            let counts = counts(entry.name, params, &[1, 2, 5], 40_000);
            for (count, weight) in counts.iter().zip([1.0, 2.0, 5.0]) {
                let share = f64::from(*count) / 40_000.0;
                assert!((share - weight / 8.0).abs() < 0.03, "{}: {counts:?}", entry.name);
            }
        }
    }

    #[test]
    fn hash_is_stable() {
        // Pinned: a change would move every client of a consistent-hash cluster.
        assert_eq!(hash64(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_ne!(hash_ip(IpAddr::from([10, 0, 0, 1])), hash_ip(IpAddr::from([10, 0, 0, 2])));
    }
}
