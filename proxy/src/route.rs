//! The route table: which filter chain an SNI matches, and the cluster that chain sends it to. The table of
//! routes is rebuilt only when the listener's filter chains change; each cluster sits in a cell of its own that
//! is swapped when that cluster or its assignment changes. So an endpoint change costs the rebuild of its one
//! cluster, whatever the size of the mesh, and a lookup is a map probe and one atomic load.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
pub use crossgate_istio::sni::{ISTIO_MTLS_ALPNS, KeyError, SniKey, is_istio_alpn};

use crate::cluster::{Cluster, ClusterDefaults};
use crate::config::non_zero;
use crate::metrics::Telemetry;
use crate::resources::{ChainSpec, EnvoyState};

/// The slot of one cluster a filter chain names; empty while the configuration has no such cluster (Envoy's
/// tcp_proxy then closes the connection).
#[derive(Debug, Default)]
pub struct ClusterCell(ArcSwapOption<Cluster>);

impl ClusterCell {
    pub fn load(&self) -> Option<Arc<Cluster>> {
        self.0.load_full()
    }
}

/// What a filter chain adds to its cluster: the ALPNs it matches and the tunnel's time limits.
#[derive(Debug)]
pub struct Route {
    chain: Arc<ChainSpec>,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    cell: Arc<ClusterCell>,
}

impl Route {
    /// Whether the filter chain matches a client offering `offered` (Envoy's `application_protocols`).
    pub fn accepts_alpn<'a>(&self, mut offered: impl Iterator<Item = &'a [u8]>) -> bool {
        let wanted = &self.chain.alpns;
        wanted.is_empty() || offered.any(|alpn| wanted.iter().any(|w| w.as_bytes() == alpn))
    }

    /// The cluster the chain sends to, as configured now.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cell.load()
    }

    fn new(chain: &Arc<ChainSpec>, cell: Arc<ClusterCell>, defaults: &ClusterDefaults) -> Route {
        Route {
            chain: Arc::clone(chain),
            // An explicit 0s disables the timeout; unset falls back to the gateway default.
            idle_timeout: chain.idle_timeout.map_or(defaults.idle_timeout, non_zero),
            max_connection_duration: chain.max_connection_duration.map_or(defaults.max_connection_duration, non_zero),
            cell,
        }
    }
}

/// Whether a new table rebuilds the clusters it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clusters {
    /// Only the chains changed: every cluster still named keeps its cell, shared with the previous table.
    Keep,
    /// The whole configuration was replaced: every cluster is built anew (carrying its hosts' state).
    Rebuild,
}

/// SNI -> route -> cluster.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: HashMap<Box<str>, Arc<Route>>,
    /// Every cluster a chain names, by name.
    cells: HashMap<Arc<str>, Arc<ClusterCell>>,
}

impl RouteTable {
    /// The table for the chains of `state`. A chain unchanged since `previous` keeps its route; a cluster named
    /// before keeps its cell (`Clusters::Keep`) or is rebuilt in a new one; a cluster named for the first time
    /// is built.
    pub fn new(
        previous: &RouteTable,
        state: &EnvoyState,
        clusters: Clusters,
        defaults: &ClusterDefaults,
        telemetry: &Arc<Telemetry>,
    ) -> RouteTable {
        let mut table = RouteTable { routes: HashMap::with_capacity(state.chains.len()), cells: HashMap::new() };
        for chain in state.chains.iter() {
            let name = chain.cluster.as_str();
            let cell = match table.cells.get(name) {
                Some(cell) => Arc::clone(cell),
                None => {
                    let kept = previous.cells.get_key_value(name);
                    let cell = match (kept, clusters) {
                        (Some((_, cell)), Clusters::Keep) => Arc::clone(cell),
                        _ => {
                            let cell = Arc::new(ClusterCell::default());
                            let previous = kept.and_then(|(_, cell)| cell.load());
                            cell.0.store(build(name, state, previous.as_deref(), defaults, telemetry).map(Arc::new));
                            cell
                        }
                    };
                    let key = kept.map_or_else(|| Arc::from(name), |(key, _)| Arc::clone(key));
                    table.cells.insert(key, Arc::clone(&cell));
                    cell
                }
            };
            let reused = chain.server_names.first().and_then(|sni| previous.routes.get(sni.as_str()));
            let route = match reused {
                Some(old) if *old.chain == **chain && Arc::ptr_eq(&old.cell, &cell) => Arc::clone(old),
                _ => Arc::new(Route::new(chain, cell, defaults)),
            };
            for sni in &chain.server_names {
                table.routes.entry(Box::from(sni.as_str())).or_insert_with(|| Arc::clone(&route));
            }
        }
        table
    }

    /// Rebuilds cluster `name` from `state`, if a chain names it; returns its host count before and after.
    pub fn update(
        &self,
        name: &str,
        state: &EnvoyState,
        defaults: &ClusterDefaults,
        telemetry: &Arc<Telemetry>,
    ) -> Option<(usize, usize)> {
        let cell = self.cells.get(name)?;
        let previous = cell.load();
        let next = build(name, state, previous.as_deref(), defaults, telemetry).map(Arc::new);
        let hosts = |cluster: &Option<Arc<Cluster>>| cluster.as_ref().map_or(0, |c| c.hosts().len());
        let counts = (hosts(&previous), hosts(&next));
        cell.0.store(next);
        Some(counts)
    }

    /// The route an SNI matches; SNI is matched case-insensitively, as DNS names are.
    pub fn get(&self, sni: &str) -> Option<&Arc<Route>> {
        match self.routes.get(sni) {
            Some(route) => Some(route),
            None if sni.bytes().any(|b| b.is_ascii_uppercase()) => self.routes.get(sni.to_ascii_lowercase().as_str()),
            None => None,
        }
    }

    /// The cluster an SNI reaches now.
    pub fn cluster(&self, sni: &str) -> Option<Arc<Cluster>> {
        self.get(sni)?.cluster()
    }

    /// Server names routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn endpoint_count(&self) -> usize {
        self.cells.values().filter_map(|cell| cell.load()).map(|c| c.hosts().len()).sum()
    }

    /// Every cluster a chain names and the configuration has, in no order.
    pub fn iter(&self) -> impl Iterator<Item = Arc<Cluster>> + '_ {
        self.cells.values().filter_map(|cell| cell.load())
    }

    /// The same, in name order (for dumps).
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        let mut clusters: Vec<_> = self.iter().collect();
        clusters.sort_by(|a, b| a.name().cmp(b.name()));
        clusters
    }
}

/// Cluster `name` as `state` has it, if it has it.
fn build(
    name: &str,
    state: &EnvoyState,
    previous: Option<&Cluster>,
    defaults: &ClusterDefaults,
    telemetry: &Arc<Telemetry>,
) -> Option<Cluster> {
    let spec = state.clusters.get(name)?;
    let assignment = state.assignments.get(name).map(|a| &**a);
    Some(Cluster::build(name, spec, assignment, previous, defaults, telemetry))
}
