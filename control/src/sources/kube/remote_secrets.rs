//! Istio remote secrets (ISTIO-SEMANTICS.md §6), read as `istioctl create-remote-secret` writes them: Secrets in the
//! system namespace labelled `istio/multiCluster=true`, whose `data` maps cluster IDs to kubeconfigs. Each cluster
//! named there gets a [`ClusterWatcher`]; a changed kubeconfig restarts it, a removed key or secret stops it and takes
//! the cluster out of the mesh.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use metrics::{Counter, counter};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::{ClusterWatcher, KubeOptions, SyncStatuses};
use crate::model::MeshModel;

const MULTICLUSTER_SELECTOR: &str = "istio/multiCluster=true";

#[derive(Debug, thiserror::Error)]
enum KubeconfigProblem {
    #[error("the kubeconfig is not UTF-8 text")]
    NotUtf8,
    #[error("the kubeconfig is invalid: {0}")]
    Invalid(#[source] KubeconfigError),
    #[error("no client can be built from the kubeconfig: {0}")]
    Client(#[source] kube::Error),
}

async fn client_for(kubeconfig: &[u8]) -> Result<Client, KubeconfigProblem> {
    let text = std::str::from_utf8(kubeconfig).map_err(|_| KubeconfigProblem::NotUtf8)?;
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(KubeconfigProblem::Invalid)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(KubeconfigProblem::Invalid)?;
    Client::try_from(config).map_err(KubeconfigProblem::Client)
}

struct Remote {
    /// `namespace/name` of the secret that registered the cluster.
    secret: String,
    kubeconfig: Vec<u8>,
    /// None when no kubeconfig of this cluster has worked yet.
    watcher: Option<ClusterWatcher>,
}

/// The remote clusters, by cluster ID, as the secrets say.
pub(super) struct RemoteClusters {
    local_id: String,
    options: KubeOptions,
    updates: watch::Sender<MeshModel>,
    statuses: watch::Sender<SyncStatuses>,
    clusters: BTreeMap<String, Remote>,
    /// The (secret, key) pairs left out by the last reconcile: each is reported once, not on every change.
    ignored: BTreeSet<(String, String)>,
    errors: Counter,
    /// Told once the first listing of the secrets has been acted on (every cluster it names is being watched).
    listed: Option<oneshot::Sender<()>>,
}

impl RemoteClusters {
    pub fn new(
        local_id: String,
        options: KubeOptions,
        updates: watch::Sender<MeshModel>,
        statuses: watch::Sender<SyncStatuses>,
        listed: oneshot::Sender<()>,
    ) -> Self {
        let errors =
            counter!("crossgate_control_watch_errors_total", "cluster" => local_id.clone(), "resource" => "secrets");
        Self {
            local_id,
            options,
            updates,
            statuses,
            clusters: BTreeMap::new(),
            ignored: BTreeSet::new(),
            errors,
            listed: Some(listed),
        }
    }

    /// Watches the secrets through `local` and follows them, forever. A failing watch changes nothing: the
    /// clusters keep running on what was last listed.
    pub async fn run(&mut self, local: Client) {
        let api: Api<Secret> = Api::namespaced(local, &self.options.system_namespace);
        let config = watcher::Config::default().labels(MULTICLUSTER_SELECTOR);
        let mut writer = Writer::default();
        let store = writer.as_reader();
        let mut listed = false;
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    listed |= matches!(event, Event::InitDone);
                    if listed && matches!(event, Event::InitDone | Event::Apply(_) | Event::Delete(_)) {
                        self.reconcile(&store.state()).await;
                        if let Some(told) = self.listed.take() {
                            let _ = told.send(());
                        }
                    }
                }
                Err(e) => {
                    warn!("cluster {}: watching remote secrets: {e}", self.local_id);
                    self.errors.increment(1);
                }
            }
        }
    }

    /// Stops every remote watcher (at shutdown: the clusters stay in the mesh).
    pub async fn stop(&mut self) {
        for remote in std::mem::take(&mut self.clusters).into_values() {
            if let Some(watcher) = remote.watcher {
                watcher.stop().await;
            }
        }
    }

    async fn reconcile(&mut self, secrets: &[Arc<Secret>]) {
        let mut secrets: Vec<(String, &Secret)> =
            secrets.iter().map(|s| (format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()), &**s)).collect();
        // Oldest first: of two secrets naming one cluster, the first one registered keeps it.
        secrets.sort_by(|(a_name, a), (b_name, b)| {
            (&a.metadata.creation_timestamp, a_name).cmp(&(&b.metadata.creation_timestamp, b_name))
        });
        let kubeconfig = |secret: &str, id: &str| {
            let (_, s) = secrets.iter().find(|(name, _)| name == secret)?;
            s.data.as_ref()?.get(id).map(|bytes| bytes.0.as_slice())
        };
        // cluster ID -> (secret, kubeconfig). The clusters' current secrets come first, so they keep them.
        let mut desired: BTreeMap<String, (String, &[u8])> = BTreeMap::new();
        for (id, remote) in &self.clusters {
            if let Some(bytes) = kubeconfig(&remote.secret, id) {
                desired.insert(id.clone(), (remote.secret.clone(), bytes));
            }
        }
        let mut ignored = BTreeSet::new();
        for (name, secret) in &secrets {
            for (id, bytes) in secret.data.iter().flatten() {
                if *id == self.local_id {
                    ignored.insert((name.clone(), id.clone()));
                    continue;
                }
                match desired.entry(id.clone()) {
                    Entry::Vacant(slot) => {
                        slot.insert((name.clone(), &bytes.0));
                    }
                    Entry::Occupied(owner) if owner.get().0 != *name => {
                        ignored.insert((name.clone(), id.clone()));
                    }
                    Entry::Occupied(_) => {}
                }
            }
        }
        for (secret, id) in ignored.difference(&self.ignored) {
            if *id == self.local_id {
                info!("remote secret {secret}: key {id} is the local cluster's ID, ignored");
            } else {
                let owner = desired.get(id).map_or("", |(owner, _)| owner.as_str());
                warn!("remote secret {secret}: cluster {id} is already registered by secret {owner}, ignored");
            }
        }
        self.ignored = ignored;

        let gone: Vec<String> = self.clusters.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
        for id in gone {
            if let Some(watcher) = self.clusters.remove(&id).and_then(|r| r.watcher) {
                watcher.stop().await;
            }
            self.updates.send_if_modified(|mesh| mesh.clusters.remove(&id).is_some());
            info!("cluster {id} removed: no remote secret names it any more");
        }
        for (id, (secret, bytes)) in desired {
            let previous = match self.clusters.remove(&id) {
                Some(remote) if remote.kubeconfig == bytes => {
                    self.clusters.insert(id, Remote { secret, ..remote });
                    continue;
                }
                previous => previous.and_then(|r| r.watcher),
            };
            // The old watcher runs until a new one can replace it; its model stays in the mesh meanwhile.
            let watcher = match client_for(bytes).await {
                Ok(client) => {
                    if let Some(old) = previous {
                        old.stop().await;
                    }
                    info!("cluster {id}: watching, from remote secret {secret}");
                    Some(ClusterWatcher::spawn(client, &id, &self.options, self.updates.clone(), self.statuses.clone()))
                }
                Err(e) => {
                    warn!("remote secret {secret}, cluster {id}: {e}; fix the secret's kubeconfig");
                    previous
                }
            };
            self.clusters.insert(id, Remote { secret, kubeconfig: bytes.to_vec(), watcher });
        }
    }
}
