//! Each cluster's sync status: in a shared map (for readiness and the debug endpoint) and as the
//! `crossgate_control_cluster_synced` gauge, with `crossgate_control_watch_errors_total` per resource.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::sync::Arc;

use metrics::{Counter, Gauge, counter, gauge};
use serde::Serialize;
use tokio::sync::watch;
use tracing::warn;

/// One cluster's watchers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// The resources (`services`, `pods`...) whose watcher has not completed a list since it started, failed or
    /// began a relist. Their last listed state is still in use meanwhile.
    pub pending: BTreeSet<&'static str>,
    /// Each resource's last watch error, kept after it recovers, for the debug endpoint.
    pub last_errors: BTreeMap<&'static str, String>,
}

impl SyncStatus {
    /// Every watcher has listed and none is failing or relisting.
    pub fn synced(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Every watched cluster's status, by cluster ID.
pub type SyncStatuses = BTreeMap<String, SyncStatus>;

/// One cluster's entry in the shared map and its gauge.
#[derive(Clone)]
pub(super) struct ClusterStatus {
    cluster: Arc<str>,
    statuses: watch::Sender<SyncStatuses>,
    synced: Gauge,
}

impl ClusterStatus {
    /// Registers the cluster with every resource in `resources` pending.
    pub fn new(cluster: &str, resources: &[&'static str], statuses: watch::Sender<SyncStatuses>) -> Self {
        let status = Self {
            cluster: cluster.into(),
            statuses,
            synced: gauge!("crossgate_control_cluster_synced", "cluster" => cluster.to_owned()),
        };
        status.update(|s| {
            s.pending.extend(resources);
            true
        });
        status
    }

    pub fn resource(&self, resource: &'static str) -> ResourceStatus {
        let errors = counter!(
            "crossgate_control_watch_errors_total", "cluster" => self.cluster.to_string(), "resource" => resource
        );
        ResourceStatus { cluster: self.clone(), resource, errors }
    }

    /// Drops the cluster's entry (its watchers are gone). The gauge keeps its last value.
    pub fn remove(&self) {
        self.statuses.send_if_modified(|all| all.remove(&*self.cluster).is_some());
    }

    /// Waits until the cluster has been synced once.
    pub async fn wait_synced(&self) {
        let mut rx = self.statuses.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|all| all.get(&*self.cluster).is_some_and(SyncStatus::synced)).await;
    }

    fn update(&self, change: impl FnOnce(&mut SyncStatus) -> bool) {
        self.statuses.send_if_modified(|all| {
            let status = all.entry(self.cluster.to_string()).or_default();
            let changed = change(status);
            self.synced.set(if status.synced() { 1.0 } else { 0.0 });
            changed
        });
    }
}

/// One watcher's view of its cluster's status.
pub(super) struct ResourceStatus {
    cluster: ClusterStatus,
    resource: &'static str,
    errors: Counter,
}

impl ResourceStatus {
    /// A (re)list completed: this resource is in sync.
    pub fn listed(&self) {
        self.cluster.update(|s| s.pending.remove(self.resource));
    }

    /// A (re)list started, or the last one failed: this resource is behind until the next list completes.
    pub fn relisting(&self) {
        self.cluster.update(|s| s.pending.insert(self.resource));
    }

    /// Logs, counts and records an error; `resync` when the watcher must list again to be in sync.
    pub fn error(&self, error: &dyn Display, resync: bool) {
        warn!("cluster {}: watching {}: {error}", self.cluster.cluster, self.resource);
        self.errors.increment(1);
        let message = error.to_string();
        self.cluster.update(|s| {
            let inserted = resync && s.pending.insert(self.resource);
            let previous = s.last_errors.insert(self.resource, message);
            inserted || previous.as_ref() != s.last_errors.get(self.resource)
        });
    }
}
