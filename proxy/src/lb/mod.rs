//! Endpoint picking for one cluster: which host a new connection goes to.
//!
//! A [`ClusterLb`] is built off the hot path whenever the configuration changes and is immutable afterwards;
//! what must outlive a rebuild (open connections per host, for LEAST_REQUEST) lives in [`HostState`],
//! carried over by address from the previous snapshot.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossgate_proto::{TrafficPolicy, load_balancer_settings};
use rand::Rng;

/// `region/zone/subzone`; any part may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl FromStr for Locality {
    type Err = LbConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        let mut next = || parts.next().unwrap_or("").to_owned();
        let locality = Locality { region: next(), zone: next(), subzone: next() };
        if parts.next().is_some() {
            return Err(LbConfigError::Locality(s.to_owned()));
        }
        Ok(locality)
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Terminating: keeps its open connections, takes no new ones.
    Draining,
}

/// One endpoint as configured: where to connect and what the lb may weigh.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    pub locality: Locality,
    /// At least 1.
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    pub health: Health,
}

/// Per-host state that survives configuration reloads.
#[derive(Debug, Default)]
pub struct HostState {
    active: AtomicU64,
}

impl HostState {
    /// Connections currently open to this host.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct Host {
    pub spec: EndpointSpec,
    pub state: Arc<HostState>,
}

/// The pick algorithm (Istio's `loadBalancer.simple`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Power of two choices on open connections; Istio's default for gateway clusters.
    LeastRequest,
    RoundRobin,
    Random,
}

/// The validated load-balancing part of a cluster's traffic policy.
#[derive(Debug, Clone, PartialEq)]
pub struct LbSettings {
    pub algorithm: Algorithm,
}

impl Default for LbSettings {
    fn default() -> Self {
        LbSettings { algorithm: Algorithm::LeastRequest }
    }
}

impl LbSettings {
    pub fn from_policy(policy: Option<&TrafficPolicy>) -> Result<Self, LbConfigError> {
        use load_balancer_settings::{LbPolicy, SimpleLb};
        let lb_policy = policy.and_then(|p| p.load_balancer.as_ref()).and_then(|lb| lb.lb_policy.as_ref());
        let algorithm = match lb_policy {
            None => Algorithm::LeastRequest,
            Some(LbPolicy::Simple(value)) => match SimpleLb::try_from(*value) {
                Ok(SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest) => Algorithm::LeastRequest,
                Ok(SimpleLb::RoundRobin) => Algorithm::RoundRobin,
                Ok(SimpleLb::Random) => Algorithm::Random,
                Ok(SimpleLb::Passthrough) => return Err(LbConfigError::Unsupported("simple: PASSTHROUGH")),
                Err(_) => return Err(LbConfigError::UnknownSimple(*value)),
            },
            Some(LbPolicy::ConsistentHash(_)) => return Err(LbConfigError::Unsupported("consistentHash")),
        };
        Ok(LbSettings { algorithm })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LbConfigError {
    #[error("locality {0:?} has more than three '/'-separated parts (region/zone/subzone)")]
    Locality(String),
    #[error("loadBalancer.simple {0} is not a known SimpleLB value")]
    UnknownSimple(i32),
    #[error("loadBalancer {0} is not supported by an sni-dnat gateway")]
    Unsupported(&'static str),
}

/// What the pick may depend on besides the hosts.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The downstream client's address (for source-IP hashing).
    pub source: IpAddr,
    /// Hosts already tried for this connection (indices into [`ClusterLb::hosts`]); a retry avoids them.
    pub tried: &'a [usize],
}

/// A picked host. Counts as an open connection to it until dropped.
#[derive(Debug)]
pub struct Picked {
    pub index: usize,
    host: Arc<HostState>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.host.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hosts of one cluster and how to choose among them.
#[derive(Debug)]
pub struct ClusterLb {
    hosts: Vec<Host>,
    settings: LbSettings,
    /// Indices of the hosts that may take new connections, with the running sum of their weights.
    eligible: Vec<(usize, u64)>,
    total_weight: u64,
    round_robin: AtomicUsize,
}

/// Random draws before a retry falls back to a scan for an untried host.
const RETRY_DRAWS: usize = 4;

impl ClusterLb {
    /// Builds the lb for `endpoints`, keeping the per-host state of hosts that `previous` already had.
    pub fn new(endpoints: Vec<EndpointSpec>, settings: LbSettings, previous: Option<&ClusterLb>) -> Self {
        let previous_state: HashMap<SocketAddr, &Arc<HostState>> =
            previous.map(|lb| lb.hosts.iter().map(|h| (h.spec.address, &h.state)).collect()).unwrap_or_default();
        let hosts: Vec<Host> = endpoints
            .into_iter()
            .map(|spec| {
                let state = previous_state.get(&spec.address).map(|s| Arc::clone(s)).unwrap_or_default();
                Host { spec, state }
            })
            .collect();
        let mut total_weight = 0;
        let eligible = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.spec.health == Health::Healthy)
            .map(|(index, h)| {
                total_weight += u64::from(h.spec.weight.max(1));
                (index, total_weight)
            })
            .collect();
        ClusterLb { hosts, settings, eligible, total_weight, round_robin: AtomicUsize::new(0) }
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn settings(&self) -> &LbSettings {
        &self.settings
    }

    /// Hosts that may take new connections.
    pub fn healthy_count(&self) -> usize {
        self.eligible.len()
    }

    /// Chooses a host for a new connection, or `None` when no untried healthy host remains.
    pub fn pick(&self, ctx: &PickContext<'_>, rng: &mut impl Rng) -> Option<Picked> {
        if self.total_weight == 0 {
            return None;
        }
        let index = (0..RETRY_DRAWS)
            .map(|_| self.draw(rng))
            .find(|index| !ctx.tried.contains(index))
            .or_else(|| self.eligible.iter().map(|(index, _)| *index).find(|i| !ctx.tried.contains(i)))?;
        let host = Arc::clone(&self.hosts[index].state);
        host.active.fetch_add(1, Ordering::Relaxed);
        Some(Picked { index, host })
    }

    fn draw(&self, rng: &mut impl Rng) -> usize {
        match self.settings.algorithm {
            Algorithm::RoundRobin => {
                let ticket = self.round_robin.fetch_add(1, Ordering::Relaxed) as u64;
                self.host_at(ticket % self.total_weight)
            }
            Algorithm::Random => self.host_at(rng.random_range(0..self.total_weight)),
            Algorithm::LeastRequest => {
                let first = self.host_at(rng.random_range(0..self.total_weight));
                let second = self.host_at(rng.random_range(0..self.total_weight));
                if self.hosts[second].state.active() < self.hosts[first].state.active() { second } else { first }
            }
        }
    }

    /// The host whose weight range holds `point` (0 <= point < total weight).
    fn host_at(&self, point: u64) -> usize {
        let slot = self.eligible.partition_point(|(_, running)| *running <= point);
        self.eligible[slot].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn endpoint(port: u16, weight: u32, health: Health) -> EndpointSpec {
        EndpointSpec {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            locality: Locality::default(),
            weight,
            labels: BTreeMap::new(),
            health,
        }
    }

    fn shares(lb: &ClusterLb, picks: usize) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0; lb.hosts().len()];
        let ctx = PickContext { source: IpAddr::from([127, 0, 0, 1]), tried: &[] };
        for _ in 0..picks {
            counts[lb.pick(&ctx, &mut rng).unwrap().index] += 1;
        }
        counts
    }

    #[test]
    fn locality_parses_partial_forms() {
        let l: Locality = "us-east1/us-east1-b".parse().unwrap();
        assert_eq!((l.region.as_str(), l.zone.as_str(), l.subzone.as_str()), ("us-east1", "us-east1-b", ""));
        assert_eq!("".parse::<Locality>().unwrap(), Locality::default());
        assert!("a/b/c/d".parse::<Locality>().is_err());
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let settings = LbSettings { algorithm: Algorithm::RoundRobin };
        let lb = ClusterLb::new(vec![endpoint(1, 1, Health::Healthy), endpoint(2, 3, Health::Healthy)], settings, None);
        assert_eq!(shares(&lb, 400), vec![100, 300]);
    }

    #[test]
    fn unhealthy_and_draining_hosts_get_nothing() {
        for algorithm in [Algorithm::RoundRobin, Algorithm::Random, Algorithm::LeastRequest] {
            let endpoints = vec![
                endpoint(1, 1, Health::Unhealthy),
                endpoint(2, 1, Health::Healthy),
                endpoint(3, 1, Health::Draining),
            ];
            let lb = ClusterLb::new(endpoints, LbSettings { algorithm }, None);
            assert_eq!(shares(&lb, 100), vec![0, 100, 0], "{algorithm:?}");
        }
    }

    #[test]
    fn least_request_prefers_idle_hosts() {
        let lb = ClusterLb::new(
            vec![endpoint(1, 1, Health::Healthy), endpoint(2, 1, Health::Healthy)],
            LbSettings::default(),
            None,
        );
        let mut rng = SmallRng::seed_from_u64(1);
        let ctx = PickContext { source: IpAddr::from([127, 0, 0, 1]), tried: &[] };
        // Hold every pick open: the two hosts must stay within one connection of each other.
        let held: Vec<Picked> = (0..100).map(|_| lb.pick(&ctx, &mut rng).unwrap()).collect();
        let (a, b) = (lb.hosts()[0].state.active(), lb.hosts()[1].state.active());
        assert_eq!(a + b, 100);
        assert!(a.abs_diff(b) <= 1, "{a} vs {b}");
        drop(held);
        assert_eq!(lb.hosts()[0].state.active() + lb.hosts()[1].state.active(), 0);
    }

    #[test]
    fn retry_avoids_tried_hosts_and_ends() {
        let lb = ClusterLb::new(
            vec![endpoint(1, 1, Health::Healthy), endpoint(2, 100, Health::Healthy)],
            LbSettings::default(),
            None,
        );
        let mut rng = SmallRng::seed_from_u64(3);
        let source = IpAddr::from([127, 0, 0, 1]);
        let picked = lb.pick(&PickContext { source, tried: &[1] }, &mut rng).unwrap();
        assert_eq!(picked.index, 0);
        assert!(lb.pick(&PickContext { source, tried: &[0, 1] }, &mut rng).is_none());
    }

    #[test]
    fn host_state_survives_rebuild() {
        let lb = ClusterLb::new(vec![endpoint(1, 1, Health::Healthy)], LbSettings::default(), None);
        let mut rng = SmallRng::seed_from_u64(3);
        let held = lb.pick(&PickContext { source: IpAddr::from([127, 0, 0, 1]), tried: &[] }, &mut rng).unwrap();
        let rebuilt = ClusterLb::new(
            vec![endpoint(2, 1, Health::Healthy), endpoint(1, 5, Health::Healthy)],
            LbSettings::default(),
            Some(&lb),
        );
        assert_eq!(rebuilt.hosts()[1].state.active(), 1);
        assert_eq!(rebuilt.hosts()[0].state.active(), 0);
        drop(held);
        assert_eq!(rebuilt.hosts()[1].state.active(), 0);
    }

    #[test]
    fn policy_mapping_follows_istio() {
        use crossgate_proto::{
            LoadBalancerSettings,
            load_balancer_settings::{LbPolicy, SimpleLb},
        };
        let policy = |simple: SimpleLb| TrafficPolicy {
            load_balancer: Some(LoadBalancerSettings {
                lb_policy: Some(LbPolicy::Simple(simple as i32)),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(LbSettings::from_policy(None).unwrap().algorithm, Algorithm::LeastRequest);
        assert_eq!(
            LbSettings::from_policy(Some(&policy(SimpleLb::LeastConn))).unwrap().algorithm,
            Algorithm::LeastRequest
        );
        assert_eq!(
            LbSettings::from_policy(Some(&policy(SimpleLb::RoundRobin))).unwrap().algorithm,
            Algorithm::RoundRobin
        );
        assert!(LbSettings::from_policy(Some(&policy(SimpleLb::Passthrough))).is_err());
    }
}
