//! Endpoint picking for one cluster: which host a new connection goes to, as Envoy does it for an Istio
//! east-west gateway cluster.
//!
//! A pick goes priority → locality → host:
//!
//! 1. [`topology`]: the priorities and locality weights the assignment (EDS) gives, computed for this gateway by
//!    its control plane (Istio's rules: `crossgate_istio::locality_lb`).
//! 2. [`load`]: Envoy's arithmetic turns the priorities' health into traffic shares (overprovisioning factor,
//!    panic threshold) and, with locality-weighted lb, localities into weights.
//! 3. [`policy`]: the algorithm (LEAST_REQUEST, ROUND_ROBIN, RANDOM, RING_HASH, MAGLEV, or a new one) picks a host.
//! 4. [`outlier`]: connection outcomes reported back eject hosts; an ejected host counts as unhealthy in step 2.
//!
//! A [`ClusterLb`] is built off the hot path whenever the configuration changes. What must outlive a rebuild —
//! open connections and outlier state per host, the ejection sweep schedule — is carried over by address from the
//! previous one. The health-dependent part (a `View`: loads and host sets) is recomputed only when an ejection
//! changes; a pick reads it with one atomic load and allocates nothing.
//!
//! The gateway's duties: [`ClusterLb::pick`] per connection attempt, [`ClusterLb::report`] with the outcome of each
//! attempt, and [`ClusterLb::tick`] about once a second so that ejections end on idle clusters too.

mod endpoint;
mod error;
pub mod load;
pub mod outlier;
pub mod policy;
mod settings;
pub mod topology;
mod view;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use rand::Rng;

pub use endpoint::{EndpointSpec, Health, Host, HostState, Locality};
pub use error::LbConfigError;
pub use outlier::{Outcome, OutlierSettings};
pub use policy::{PolicyParams, PolicyRef};
pub use settings::LbSettings;
pub use topology::{Group, Topology};

use policy::{Draw, hash_ip};
use view::View;

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

/// Cluster-wide state carried across rebuilds.
#[derive(Debug, Default)]
struct Shared {
    /// Bumped whenever a host is ejected or un-ejected, so that every live snapshot knows to refresh its view.
    epoch: AtomicU64,
    /// Serialises ejections and sweeps (rare), so the max-ejection cap is checked against a stable count.
    ejections: Mutex<Sweep>,
}

#[derive(Debug, Default)]
struct Sweep {
    /// When the next `interval` sweep is due; set by the first tick.
    next: Option<Instant>,
}

/// Metric handles, created once per cluster and carried across rebuilds.
#[derive(Clone)]
struct Metrics {
    ejections_active: metrics::Gauge,
    ejections_total: metrics::Counter,
}

impl Metrics {
    fn new(cluster: &str) -> Self {
        Metrics {
            ejections_active: metrics::gauge!("crossgate_outlier_ejections_active", "cluster" => cluster.to_owned()),
            ejections_total: metrics::counter!("crossgate_outlier_ejections_total", "cluster" => cluster.to_owned()),
        }
    }
}

/// The hosts of one cluster and how to choose among them.
pub struct ClusterLb {
    hosts: Vec<Host>,
    settings: LbSettings,
    topology: Topology,
    /// Hosts taking part in balancing: the base of `maxEjectionPercent`.
    members: usize,
    shared: Arc<Shared>,
    view: ArcSwap<View>,
    /// With outlier detection only.
    metrics: Option<Metrics>,
}

/// Random draws before a retry falls back to a scan for an untried host.
const RETRY_DRAWS: usize = 4;
/// When a sweep finds the ejection lock taken, how soon it is tried again.
const CONTENDED_SWEEP_RETRY: Duration = Duration::from_millis(10);

impl ClusterLb {
    /// Builds the lb of cluster `cluster` (the metrics label) for `endpoints` arranged as `topology` says (indices
    /// into `endpoints`), keeping the per-host state of hosts that `previous` already had.
    pub fn new(
        endpoints: Vec<EndpointSpec>,
        topology: Topology,
        settings: LbSettings,
        previous: Option<&ClusterLb>,
        cluster: &str,
    ) -> Self {
        let previous_hosts: HashMap<SocketAddr, &Host> =
            previous.map(|lb| lb.hosts.iter().map(|h| (h.spec.address, h)).collect()).unwrap_or_default();
        let hosts: Vec<Host> = endpoints
            .into_iter()
            .map(|spec| {
                // A new workload at a known address is a new host: its series carry other labels.
                let state = match previous_hosts.get(&spec.address) {
                    Some(old) if old.spec.workload == spec.workload => Arc::clone(&old.state),
                    _ => Arc::default(),
                };
                Host { spec, state }
            })
            .collect();
        let shared = previous.map(|p| Arc::clone(&p.shared)).unwrap_or_default();
        let epoch = shared.epoch.load(Ordering::Acquire);
        let view = View::new(&hosts, &topology, &settings.policy, settings.panic_threshold, epoch);
        // Only a cluster with outlier detection ejects.
        let metrics = settings
            .outlier
            .as_ref()
            .map(|_| previous.and_then(|p| p.metrics.clone()).unwrap_or_else(|| Metrics::new(cluster)));
        let lb = ClusterLb {
            members: topology.member_count(),
            hosts,
            settings,
            topology,
            shared,
            view: ArcSwap::from_pointee(view),
            metrics,
        };
        if let Some(metrics) = &lb.metrics {
            metrics.ejections_active.set(lb.ejected_count() as f64);
        }
        lb
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn settings(&self) -> &LbSettings {
        &self.settings
    }

    /// The priorities and localities the hosts were arranged in.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Hosts that may take new connections: healthy and not ejected.
    pub fn healthy_count(&self) -> usize {
        self.current_view().healthy
    }

    /// Chooses a host for a new connection, or `None` when none may take it (Envoy's "no healthy upstream") or
    /// every candidate is in `ctx.tried`.
    pub fn pick(&self, ctx: &PickContext<'_>, rng: &mut impl Rng) -> Option<Picked> {
        let view = self.current_view();
        let hashes = self.settings.policy.hashes_source();
        let source_hash = if hashes { hash_ip(ctx.source) } else { 0 };
        let mut draw = Draw { rng, source_hash };
        let index = (0..RETRY_DRAWS)
            .map_while(|_| {
                let point = if hashes { source_hash } else { draw.rng.next_u64() };
                view.pick(&self.hosts, point, &mut draw)
            })
            .find(|index| !ctx.tried.contains(index))
            .or_else(|| view.first_untried(ctx.tried))?;
        let host = Arc::clone(&self.hosts[index].state);
        host.active.fetch_add(1, Ordering::Relaxed);
        Some(Picked { index, host })
    }

    /// Records how a connection attempt to `hosts()[index]` ended, for outlier detection (a no-op without it).
    pub fn report(&self, index: usize, outcome: Outcome, now: Instant) {
        let (Some(od), Some(host)) = (&self.settings.outlier, self.hosts.get(index)) else { return };
        if od.record(host.state.outlier(), outcome) {
            let _serial = self.shared.ejections.lock().unwrap_or_else(|e| e.into_inner());
            if od.eject(host.state.outlier(), self.ejected_count(), self.members, now) {
                if let Some(metrics) = &self.metrics {
                    metrics.ejections_total.increment(1);
                }
                self.ejections_changed();
            }
        }
        self.tick(now);
    }

    /// Runs the outlier detector's `interval` sweep when it is due: un-ejects hosts whose time is up and decays
    /// the multipliers. Cheap when not due. Returns when the next sweep is due, or None without outlier
    /// detection: the gateway sleeps until then.
    pub fn tick(&self, now: Instant) -> Option<Instant> {
        let od = self.settings.outlier.as_ref()?;
        // A contended lock means another thread is ejecting or sweeping right now.
        let Ok(mut sweep) = self.shared.ejections.try_lock() else { return Some(now + CONTENDED_SWEEP_RETRY) };
        match sweep.next {
            Some(due) if now >= due => {}
            Some(due) => return Some(due),
            None => {
                sweep.next = Some(now + od.interval);
                return sweep.next;
            }
        }
        sweep.next = Some(now + od.interval);
        let next = sweep.next;
        let mut changed = false;
        for host in &self.hosts {
            if let Some(outlier) = host.state.outlier_if_any() {
                changed |= od.sweep(outlier, now);
            }
        }
        if changed {
            self.ejections_changed();
        }
        next
    }

    fn ejected_count(&self) -> usize {
        self.hosts.iter().filter(|h| h.state.ejected()).count()
    }

    /// After an ejection or un-ejection: tell every snapshot, and recompute this one's view now.
    fn ejections_changed(&self) {
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(metrics) = &self.metrics {
            metrics.ejections_active.set(self.ejected_count() as f64);
        }
        self.refresh();
    }

    fn refresh(&self) {
        // Read the epoch first: a change racing with the rebuild then leaves a stale epoch, refreshed again later.
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let view = View::new(&self.hosts, &self.topology, &self.settings.policy, self.settings.panic_threshold, epoch);
        self.view.store(Arc::new(view));
    }

    /// The view, refreshed first if another snapshot of this cluster changed an ejection.
    fn current_view(&self) -> Guard<Arc<View>> {
        let view = self.view.load();
        if view.epoch == self.shared.epoch.load(Ordering::Acquire) {
            return view;
        }
        drop(view);
        self.refresh();
        self.view.load()
    }
}

impl fmt::Debug for ClusterLb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLb")
            .field("hosts", &self.hosts)
            .field("settings", &self.settings)
            .field("view", &self.view.load())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
