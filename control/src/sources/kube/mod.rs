//! The Kubernetes source: one [`ClusterWatcher`] per cluster (the local one, and one per cluster named in an Istio
//! remote secret), each publishing its [`ClusterModel`](crate::model::ClusterModel) into the shared
//! [`MeshModel`] with Istio's per-endpoint rules applied (ISTIO-SEMANTICS.md §2, §4, §6).
//!
//! During an API-server outage a cluster keeps its last model; its [`SyncStatus`] (and the
//! `crossgate_control_cluster_synced` gauge) shows it.

mod cluster;
mod destination_rule;
mod priming;
mod remote_secrets;
mod status;
#[cfg(test)]
mod tests;
mod translate;

use std::future::Future;
use std::time::Duration;

use kube::Client;
use tokio::sync::{oneshot, watch};

pub use cluster::ClusterWatcher;
pub use status::{SyncStatus, SyncStatuses};

use crate::model::MeshModel;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// Istio's system namespace: its network label is the cluster's network, and remote secrets live there.
    pub system_namespace: String,
    /// The cluster domain of service hostnames, `<name>.<namespace>.svc.<domain_suffix>`.
    pub domain_suffix: String,
    /// Watch the local cluster's remote secrets and the clusters they name.
    pub remote_secrets: bool,
    /// How long a cluster's model waits after a change for more before it is rebuilt.
    pub debounce: Duration,
    /// How often an absent DestinationRule API is looked for again.
    pub destination_rule_recheck: Duration,
    /// How long gateways wait, at start, for the remote clusters to sync before they are served without the
    /// ones that have not (Istio's `PILOT_REMOTE_CLUSTER_TIMEOUT`).
    pub remote_sync_timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            system_namespace: "istio-system".to_owned(),
            domain_suffix: "cluster.local".to_owned(),
            remote_secrets: true,
            debounce: Duration::from_millis(100),
            destination_rule_recheck: Duration::from_secs(30),
            remote_sync_timeout: Duration::from_secs(30),
        }
    }
}

/// Watches the local cluster (through `local`, the control service's own kubeconfig or in-cluster config) and,
/// with `options.remote_secrets`, every remote cluster its secrets name, until `shutdown` completes; then stops
/// every watcher. Clusters' models go into `updates`, their sync status into `status`; `primed` turns true once
/// the mesh may be served (see [`priming`]). Never fails: every error is retried, logged and counted.
pub async fn run_kube_sources(
    local: Client,
    local_cluster_id: String,
    options: KubeOptions,
    updates: watch::Sender<MeshModel>,
    status: watch::Sender<SyncStatuses>,
    primed: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let local_watcher =
        ClusterWatcher::spawn(local.clone(), &local_cluster_id, &options, updates.clone(), status.clone());
    let (secrets_listed, listed) = oneshot::channel();
    let priming = tokio::spawn(priming::prime(
        local_cluster_id.clone(),
        updates.subscribe(),
        status.subscribe(),
        async {
            let _ = listed.await;
        },
        options.remote_sync_timeout,
        primed,
    ));
    if options.remote_secrets {
        let mut remotes =
            remote_secrets::RemoteClusters::new(local_cluster_id, options, updates, status, secrets_listed);
        tokio::select! {
            () = remotes.run(local) => {}
            () = shutdown => {}
        }
        remotes.stop().await;
    } else {
        let _ = secrets_listed.send(());
        shutdown.await;
    }
    priming.abort();
    local_watcher.stop().await;
}
