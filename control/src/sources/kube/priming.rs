//! When the Kubernetes source's mesh is complete enough to serve. Before that, a gateway would be handed a
//! partial mesh, and a gateway that reconnects after a control restart would be told to drop the clusters not
//! synced yet. istiod likewise refuses discovery until its caches have synced, waiting for remote clusters at
//! most `PILOT_REMOTE_CLUSTER_TIMEOUT` (ISTIO-SEMANTICS.md §6).

use std::future::Future;
use std::time::Duration;

use metrics::counter;
use tokio::sync::watch;
use tracing::{info, warn};

use super::SyncStatuses;
use crate::model::MeshModel;

/// Sets `primed` once the mesh holds the local cluster's model (waited for without limit: without it there is
/// nothing to serve) and, after `secrets_listed`, the model of every remote cluster then watched, or once
/// `remote_timeout` has passed since the start, whichever comes first.
pub(super) async fn prime(
    local_id: String,
    mut mesh: watch::Receiver<MeshModel>,
    mut statuses: watch::Receiver<SyncStatuses>,
    secrets_listed: impl Future<Output = ()>,
    remote_timeout: Duration,
    primed: watch::Sender<bool>,
) {
    let deadline = tokio::time::Instant::now() + remote_timeout;
    if mesh.wait_for(|model| model.clusters.contains_key(&local_id)).await.is_err() {
        return;
    }
    let remotes = async {
        secrets_listed.await;
        every_cluster_published(&mut mesh, &mut statuses).await
    };
    match tokio::time::timeout_at(deadline, remotes).await {
        Ok(true) => info!("every cluster has synced: serving gateways"),
        Ok(false) => return,
        Err(_) => {
            let model = mesh.borrow();
            let missing: Vec<String> =
                statuses.borrow().keys().filter(|id| !model.clusters.contains_key(*id)).cloned().collect();
            warn!(?missing, ?remote_timeout, "remote clusters not synced in time: serving gateways without them");
            counter!("crossgate_control_remote_sync_timeouts_total").increment(1);
        }
    }
    primed.send_replace(true);
}

/// Waits until every watched cluster has its model in the mesh (a cluster's model is published only once all
/// its watchers have listed). False if either channel closed first.
async fn every_cluster_published(
    mesh: &mut watch::Receiver<MeshModel>,
    statuses: &mut watch::Receiver<SyncStatuses>,
) -> bool {
    loop {
        let done = {
            let model = mesh.borrow_and_update();
            statuses.borrow_and_update().keys().all(|id| model.clusters.contains_key(id))
        };
        if done {
            return true;
        }
        let changed = tokio::select! {
            changed = mesh.changed() => changed,
            changed = statuses.changed() => changed,
        };
        if changed.is_err() {
            return false;
        }
    }
}
