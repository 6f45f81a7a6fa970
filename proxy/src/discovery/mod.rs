//! Where the gateway's configuration comes from, and the one place it is applied: Envoy's resources, from the
//! xDS client or from the static resources file (built into Envoy's form as istiod would), go through
//! [`ConfigStore`], which reads and validates each resource as Envoy does, keeps the last good version of any
//! it refuses, rebuilds only the clusters that changed off the hot path, and swaps the new route snapshot in with
//! one atomic store.

pub mod file;
pub mod xds;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use tokio::sync::watch;

use crate::cluster::ClusterDefaults;
use crate::metrics::{ConfigMetrics, Telemetry};
use crate::resources::{self, AssignmentSpec, EnvoyState, Invalid};
use crate::route::{Clusters, RouteTable};

/// A resource refused by name, and why: what a NACK carries. Its last good version stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// Changes of one resource type, as one response carries them.
#[derive(Debug, Clone)]
pub struct Update<T> {
    /// Added or changed resources, by name.
    pub resources: Vec<(String, T)>,
    pub removed: Vec<String>,
    /// State of the world: every resource of the type not in `resources` is gone.
    pub complete: bool,
}

impl<T> Default for Update<T> {
    fn default() -> Self {
        Update { resources: Vec::new(), removed: Vec::new(), complete: false }
    }
}

/// What changed in one update, and so what to rebuild.
enum Change {
    /// The listener's chains (the clusters are as they were).
    Chains,
    /// These clusters or their assignments.
    Clusters(HashSet<String>),
    /// Everything (a static file replaced).
    All,
}

/// The configuration in force and what is counted of it.
#[derive(Debug, Default)]
struct Applied {
    envoy: EnvoyState,
    /// Hosts in the routed clusters (kept up to date per change rather than summed over the mesh).
    endpoints: usize,
}

/// The current route snapshot, and how updates reach it.
#[derive(Debug)]
pub struct ConfigStore {
    routes: ArcSwap<RouteTable>,
    defaults: ClusterDefaults,
    /// The port of the listener whose filter chains route (Istio's AUTO_PASSTHROUGH port, 15443).
    listener_port: u16,
    telemetry: Arc<Telemetry>,
    metrics: ConfigMetrics,
    /// The accepted configuration; also serialises updates, so that each starts from the state it replaces.
    state: Mutex<Applied>,
    /// How many times a listener has been accepted: 0 until the first (the gateway is not ready before).
    accepted: watch::Sender<u64>,
}

impl ConfigStore {
    pub fn new(defaults: ClusterDefaults, listener_port: u16, telemetry: Arc<Telemetry>, source: &'static str) -> Self {
        let metrics = telemetry.register(|| ConfigMetrics::new(source));
        ConfigStore {
            routes: ArcSwap::default(),
            defaults,
            listener_port,
            telemetry,
            metrics,
            state: Mutex::default(),
            accepted: watch::Sender::new(0),
        }
    }

    /// The snapshot to route with: one atomic load.
    pub fn routes(&self) -> Guard<Arc<RouteTable>> {
        self.routes.load()
    }

    /// Applies listeners: the one on the routing port supplies the filter chains, the others are ignored.
    pub fn apply_listeners(&self, update: Update<Listener>) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut ours = None;
        for (name, listener) in &update.resources {
            if listener_port(listener) != Some(self.listener_port) {
                continue;
            }
            match resources::read_listener(listener) {
                Ok(read) => ours = Some((name.clone(), read.into_iter().map(Arc::new).collect())),
                Err(e) => rejected.push(Rejected { name: name.clone(), reason: e.to_string() }),
            }
        }
        let mut applied = self.lock();
        let state = &mut applied.envoy;
        state.listener_received |= rejected.is_empty();
        let gone = if update.complete {
            ours.is_none() && rejected.is_empty()
        } else {
            update.removed.contains(&state.listener_name)
        };
        if gone {
            state.chains = Vec::new();
            state.listener_name.clear();
        }
        if let Some((name, chains)) = ours {
            state.listener_name = name;
            state.chains = chains;
        }
        self.publish(&mut applied, Change::Chains, &rejected);
        rejected
    }

    /// Applies clusters one by one: the valid ones take effect, the invalid ones are refused by name and keep
    /// their last good version.
    pub fn apply_clusters(&self, update: Update<Cluster>) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut applied = self.lock();
        let state = &mut applied.envoy;
        let mut changed = HashSet::new();
        let mut present = HashSet::new();
        for (name, cluster) in &update.resources {
            present.insert(name.as_str());
            match resources::read_cluster(cluster) {
                Ok(Some(spec)) => {
                    state.clusters.insert(name.clone(), Arc::new(spec));
                    changed.insert(name.clone());
                }
                // Not a cluster the gateway routes to: if it replaces one that was, that one is gone.
                Ok(None) => {
                    if state.clusters.remove(name).is_some() {
                        changed.insert(name.clone());
                    }
                }
                Err(e) => rejected.push(Rejected { name: name.clone(), reason: e.to_string() }),
            }
        }
        let gone: Vec<String> = if update.complete {
            state.clusters.keys().filter(|name| !present.contains(name.as_str())).cloned().collect()
        } else {
            update.removed.clone()
        };
        for name in gone {
            if state.clusters.remove(&name).is_some() {
                state.assignments.remove(&name);
                changed.insert(name);
            }
        }
        self.publish(&mut applied, Change::Clusters(changed), &rejected);
        rejected
    }

    /// Applies assignments one by one, as Envoy's EDS does.
    pub fn apply_assignments(&self, update: Update<ClusterLoadAssignment>) -> Vec<Rejected> {
        let Update { resources, removed, complete } = update;
        let resources = resources.into_iter().map(|(name, a)| (name, resources::read_assignment(&a))).collect();
        self.apply_read_assignments(Update { resources, removed, complete })
    }

    /// The same, with each assignment already read (or refused).
    pub fn apply_read_assignments(&self, update: Update<Result<AssignmentSpec, Invalid>>) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut applied = self.lock();
        let state = &mut applied.envoy;
        let mut changed = HashSet::new();
        for (name, assignment) in update.resources {
            match assignment {
                Ok(spec) => {
                    state.assignments.insert(name.clone(), Arc::new(spec));
                    changed.insert(name);
                }
                Err(e) => rejected.push(Rejected { name, reason: e.to_string() }),
            }
        }
        for name in &update.removed {
            if state.assignments.remove(name).is_some() {
                changed.insert(name.clone());
            }
        }
        self.publish(&mut applied, Change::Clusters(changed), &rejected);
        rejected
    }

    /// Replaces the whole configuration, or nothing if any resource is refused (a static file is one unit); the
    /// caller counts the refusal.
    pub fn replace(
        &self,
        listener: Listener,
        clusters: Vec<Cluster>,
        assignments: Vec<ClusterLoadAssignment>,
    ) -> Result<(), Vec<Rejected>> {
        let mut next = EnvoyState::default();
        let mut rejected = Vec::new();
        match resources::read_listener(&listener) {
            Ok(chains) => {
                next.chains = chains.into_iter().map(Arc::new).collect();
                next.listener_name = listener.name.clone();
            }
            Err(e) => rejected.push(Rejected { name: listener.name.clone(), reason: e.to_string() }),
        }
        for cluster in &clusters {
            match resources::read_cluster(cluster) {
                Ok(Some(spec)) => {
                    next.clusters.insert(cluster.name.clone(), Arc::new(spec));
                }
                Ok(None) => {}
                Err(e) => rejected.push(Rejected { name: cluster.name.clone(), reason: e.to_string() }),
            }
        }
        for assignment in &assignments {
            match resources::read_assignment(assignment) {
                Ok(spec) => {
                    next.assignments.insert(assignment.cluster_name.clone(), Arc::new(spec));
                }
                Err(e) => rejected.push(Rejected { name: assignment.cluster_name.clone(), reason: e.to_string() }),
            }
        }
        if !rejected.is_empty() {
            return Err(rejected);
        }
        let mut applied = self.lock();
        next.listener_received = true;
        applied.envoy = next;
        self.publish(&mut applied, Change::All, &[]);
        Ok(())
    }

    /// Counts a configuration refused before it reached the store (a file that does not read or parse).
    pub fn record_rejected(&self) {
        self.metrics.rejected.increment(1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Applied> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Brings the route table to `applied`: a new table when the chains change, else only the changed clusters
    /// rebuilt in place.
    fn publish(&self, applied: &mut Applied, change: Change, rejected: &[Rejected]) {
        let state = &applied.envoy;
        let (defaults, telemetry) = (&self.defaults, &self.telemetry);
        match change {
            Change::Chains | Change::All => {
                let clusters = if matches!(change, Change::All) { Clusters::Rebuild } else { Clusters::Keep };
                let table = RouteTable::new(&self.routes.load(), state, clusters, defaults, telemetry);
                applied.endpoints = table.endpoint_count();
                self.routes.store(Arc::new(table));
            }
            Change::Clusters(changed) => {
                let table = self.routes.load();
                for name in &changed {
                    if let Some((before, after)) = table.update(name, state, defaults, telemetry) {
                        applied.endpoints = applied.endpoints - before + after;
                    }
                }
            }
        }
        self.metrics.clusters.set(state.clusters.len() as f64);
        self.metrics.endpoints.set(applied.endpoints as f64);
        if rejected.is_empty() {
            self.metrics.accepted.increment(1);
        } else {
            self.metrics.rejected.increment(1);
        }
        // Envoy's initial fetch: ready once a listener is accepted and every EDS cluster has had its assignment
        // (until then Envoy keeps the cluster warming). Checked until then only: it walks every cluster.
        if !self.is_loaded() {
            let warm = state.clusters.keys().all(|name| state.assignments.contains_key(name));
            if !(state.listener_received && warm) {
                return;
            }
        }
        // Also wakes whoever follows changes.
        self.accepted.send_modify(|accepted| *accepted += 1);
    }

    /// Hosts in the routed clusters, as the `crossgate_config_endpoints` gauge says.
    pub fn applied_endpoints(&self) -> usize {
        self.lock().endpoints
    }

    /// True once the initial configuration is in: a listener, and an assignment for every cluster.
    pub fn is_loaded(&self) -> bool {
        *self.accepted.borrow() > 0
    }

    pub async fn wait_loaded(&self) {
        let _ = self.accepted.subscribe().wait_for(|accepted| *accepted > 0).await;
    }

    /// Marked changed whenever a configuration is applied.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.accepted.subscribe()
    }
}

/// The port a listener binds, if it is a socket address.
fn listener_port(listener: &Listener) -> Option<u16> {
    match listener.address.as_ref()?.address.as_ref()? {
        address::Address::SocketAddress(socket) => match socket.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(port)) => u16::try_from(port).ok(),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossgate_istio::gateway::MeshDefaults;
    use crossgate_istio::locality_lb::GatewayIdentity;
    use crossgate_proto::{Endpoint, Resources};

    fn sni(i: usize) -> String {
        format!("outbound_.8080_._.service-{i}.default.svc.cluster.local")
    }

    fn resources(endpoints: &[&[&str]]) -> Resources {
        let cluster = |(i, addresses): (usize, &&[&str])| crossgate_proto::Cluster {
            name: sni(i),
            endpoints: addresses.iter().map(|a| Endpoint { address: (*a).to_owned(), ..Default::default() }).collect(),
            ..Default::default()
        };
        Resources { clusters: endpoints.iter().enumerate().map(cluster).collect() }
    }

    fn store(endpoints: &[&[&str]]) -> ConfigStore {
        let envoy = file::envoy_resources(&resources(endpoints), &GatewayIdentity::default(), &MeshDefaults::default())
            .unwrap();
        let store = ConfigStore::new(ClusterDefaults::default(), 15443, Arc::default(), "test");
        store.replace(envoy.listener, envoy.clusters, envoy.assignments).unwrap();
        store
    }

    fn assignment(endpoints: &[&[&str]], index: usize) -> (String, ClusterLoadAssignment) {
        let envoy = file::envoy_resources(&resources(endpoints), &GatewayIdentity::default(), &MeshDefaults::default())
            .unwrap();
        (sni(index), envoy.assignments[index].clone())
    }

    #[test]
    fn an_endpoint_change_rebuilds_its_cluster_alone_and_keeps_the_table() {
        let before: &[&[&str]] = &[&["10.0.0.1:80"], &["10.0.1.1:80", "10.0.1.2:80"]];
        let after: &[&[&str]] = &[&["10.0.0.1:80"], &["10.0.1.2:80", "10.0.1.3:80", "10.0.1.4:80"]];
        let store = store(before);
        let table = store.routes().clone();
        let (untouched, changed) = (table.cluster(&sni(0)).unwrap(), table.cluster(&sni(1)).unwrap());
        let kept_host = Arc::clone(&changed.hosts()[1].state);

        let update = Update { resources: vec![assignment(after, 1)], ..Default::default() };
        assert!(store.apply_assignments(update).is_empty());

        let now = store.routes();
        assert!(Arc::ptr_eq(&table, &now), "an assignment does not rebuild the route table");
        assert!(Arc::ptr_eq(&untouched, &now.cluster(&sni(0)).unwrap()), "the other cluster is kept as it was");
        let rebuilt = now.cluster(&sni(1)).unwrap();
        assert!(!Arc::ptr_eq(&changed, &rebuilt));
        let addresses: Vec<String> = rebuilt.hosts().iter().map(|h| h.spec.address.to_string()).collect();
        assert_eq!(addresses, ["10.0.1.2:80", "10.0.1.3:80", "10.0.1.4:80"]);
        assert!(Arc::ptr_eq(&kept_host, &rebuilt.hosts()[0].state), "a host kept keeps its live state");
        assert_eq!(now.endpoint_count(), 4);
        assert_eq!(store.applied_endpoints(), 4, "the count follows the change");

        // The assignment removed: the cluster stays routed, with no endpoint.
        let update = Update { removed: vec![sni(1)], ..Default::default() };
        assert!(store.apply_assignments(update).is_empty());
        assert!(store.routes().cluster(&sni(1)).unwrap().hosts().is_empty());
        assert_eq!(store.applied_endpoints(), 1);
    }

    #[test]
    fn a_cluster_removed_leaves_its_chain_routing_nowhere_until_it_returns() {
        let mesh: &[&[&str]] = &[&["10.0.0.1:80"], &["10.0.1.1:80"]];
        let store = store(mesh);
        let envoy =
            file::envoy_resources(&resources(mesh), &GatewayIdentity::default(), &MeshDefaults::default()).unwrap();
        let update = Update { removed: vec![sni(1)], ..Default::default() };
        assert!(store.apply_clusters(update).is_empty());
        assert!(store.routes().get(&sni(1)).is_some(), "the chain is the listener's");
        assert!(store.routes().cluster(&sni(1)).is_none());

        let update = Update { resources: vec![(sni(1), envoy.clusters[1].clone())], ..Default::default() };
        assert!(store.apply_clusters(update).is_empty());
        assert!(store.routes().cluster(&sni(1)).unwrap().hosts().is_empty(), "back, waiting for its assignment");
        let update = Update { resources: vec![assignment(mesh, 1)], ..Default::default() };
        assert!(store.apply_assignments(update).is_empty());
        assert_eq!(store.routes().cluster(&sni(1)).unwrap().hosts().len(), 1);
    }
}
