//! One cluster's watchers: a reflector per resource type, and a task that rebuilds the cluster's model from their
//! stores after each burst of changes and publishes it into the mesh. Each watcher records what a change touched
//! (a Service, an EndpointSlice, a pod; anything, for a relist, the system namespace or a node), so that only the
//! touched Services are built again.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::reflector::{Lookup, Store, store::Writer};
use kube::runtime::watcher::{DefaultBackoff, Event};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::info;

use super::KubeOptions;
use super::destination_rule::DestinationRuleCache;
use super::status::{ClusterStatus, ResourceStatus, SyncStatuses};
use super::translate::{Built, Context, Stores, Touched, service_of};
use crate::model::MeshModel;

const SERVICES: &str = "services";
const ENDPOINT_SLICES: &str = "endpointslices";
const PODS: &str = "pods";
const NODES: &str = "nodes";
const NAMESPACES: &str = "namespaces";
const DESTINATION_RULES: &str = "destinationrules";
const RESOURCES: [&str; 6] = [SERVICES, ENDPOINT_SLICES, PODS, NODES, NAMESPACES, DESTINATION_RULES];

/// The watchers and the publisher of one cluster. Dropping it aborts them; [`stop`](Self::stop) also waits for
/// them and clears the cluster's sync status. Neither removes the cluster from the mesh: its last model stays until
/// the owner decides otherwise.
pub struct ClusterWatcher {
    status: ClusterStatus,
    tasks: JoinSet<()>,
}

impl ClusterWatcher {
    /// Starts watching the cluster behind `client` as cluster `id`; its model is published into `updates` once every
    /// watcher has listed, then after every change, and its status kept in `statuses[id]`.
    pub fn spawn(
        client: Client,
        id: &str,
        options: &KubeOptions,
        updates: watch::Sender<MeshModel>,
        statuses: watch::Sender<SyncStatuses>,
    ) -> Self {
        let status = ClusterStatus::new(id, &RESOURCES, statuses);
        let mut spawner = Spawner {
            tasks: JoinSet::new(),
            status: status.clone(),
            changed: Arc::new(Notify::new()),
            touched: Arc::default(),
        };
        let all = watcher::Config::default();
        let destination_rules = spawner.reflector(
            Api::all_with(client.clone(), &destination_rule_resource()),
            all.clone(),
            DESTINATION_RULES,
            Trim { trim: trim_destination_rule, touch: |_, touched| touched.destination_rules = true },
            destination_rule_resource(),
        );
        let stores = Stores {
            services: spawner.reflect(
                Api::all(client.clone()),
                all.clone(),
                SERVICES,
                Trim { trim: trim_service, touch: touch_service },
            ),
            slices: spawner.reflect(
                Api::all(client.clone()),
                all.clone(),
                ENDPOINT_SLICES,
                Trim { trim: trim_slice, touch: touch_slice },
            ),
            // Failed pods serve nothing: the server leaves them out, and an endpoint whose pod is absent is skipped.
            pods: spawner.reflect(
                Api::all(client.clone()),
                all.clone().fields("status.phase!=Failed"),
                PODS,
                Trim { trim: trim_pod, touch: touch_pod },
            ),
            // Only the system namespace matters: its network label is the cluster's network.
            namespaces: spawner.reflect(
                Api::all(client.clone()),
                all.clone().fields(&format!("metadata.name={}", options.system_namespace)),
                NAMESPACES,
                Trim { trim: trim_namespace, touch: touch_all },
            ),
            // A node's labels are the locality of the pods on it that have none of their own; they seldom change.
            nodes: spawner.reflect(Api::all(client), all, NODES, Trim { trim: trim_node, touch: touch_all }),
            destination_rules: destination_rules.writer.as_reader(),
        };
        spawner.tasks.spawn(reflect_destination_rules(destination_rules, options.destination_rule_recheck));
        let publisher = Publisher {
            id: id.to_owned(),
            system_namespace: options.system_namespace.clone(),
            domain_suffix: options.domain_suffix.clone(),
            debounce: options.debounce,
            stores,
            status: status.clone(),
            changed: spawner.changed,
            touched: spawner.touched,
            updates,
        };
        spawner.tasks.spawn(publisher.run());
        Self { status, tasks: spawner.tasks }
    }

    /// Aborts the watchers, waits until they are gone (so nothing is published after this returns) and clears the
    /// cluster's sync status.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
        self.status.remove();
    }
}

struct Spawner {
    tasks: JoinSet<()>,
    status: ClusterStatus,
    /// Signalled by every watcher on a change that may alter the model.
    changed: Arc<Notify>,
    /// What those changes touched.
    touched: Arc<Mutex<Touched>>,
}

impl Spawner {
    /// A watcher of `K` into a new store, not started.
    fn reflector<K>(
        &self,
        api: Api<K>,
        config: watcher::Config,
        resource: &'static str,
        trim: Trim<K>,
        dyntype: K::DynamicType,
    ) -> Reflect<K>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + Hash + Clone,
    {
        Reflect {
            api,
            config,
            writer: Writer::new(dyntype.clone()),
            dyntype,
            trim,
            status: self.status.resource(resource),
            changed: self.changed.clone(),
            touched: self.touched.clone(),
        }
    }

    /// Starts watching `K`; returns its store.
    fn reflect<K>(&mut self, api: Api<K>, config: watcher::Config, resource: &'static str, trim: Trim<K>) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + PartialEq + Send + Sync + 'static,
        K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    {
        let reflect = self.reflector(api, config, resource, trim, K::DynamicType::default());
        let store = reflect.writer.as_reader();
        self.tasks.spawn(reflect.run());
        store
    }
}

/// One resource type's watcher feeding its store.
struct Reflect<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    dyntype: K::DynamicType,
    trim: Trim<K>,
    status: ResourceStatus,
    changed: Arc<Notify>,
    touched: Arc<Mutex<Touched>>,
}

/// What a watcher does with each object of its type.
struct Trim<K> {
    /// Drops what the model never reads, to keep the stores small and to ignore changes to those parts.
    trim: fn(&mut K),
    /// Records what a change of the object touches (its version before the change, then after).
    touch: fn(&K, &mut Touched),
}

impl<K> Reflect<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + PartialEq + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    /// kube's watcher resumes a cut watch from its last resourceVersion and relists after a 410 on its own; this
    /// adds one thing: once a watch cannot even be restarted (the API server is unreachable), the watcher is
    /// started afresh, so that the status stays "pending" until a complete list proves it is in sync again.
    async fn run(mut self) {
        let mut restarts = DefaultBackoff::default();
        loop {
            let stream = watcher(self.api.clone(), self.config.clone()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => self.apply(event.modify(self.trim.trim)),
                    Err(e) => {
                        let restart = matches!(e, watcher::Error::WatchStartFailed(_));
                        // A failed watch read (WatchFailed) or a non-410 in-stream error keeps the watch going.
                        let resync = match &e {
                            watcher::Error::WatchFailed(_) => false,
                            watcher::Error::WatchError(status) => status.code == 410,
                            _ => true,
                        };
                        self.status.error(&e, resync);
                        if restart {
                            break;
                        }
                    }
                }
            }
            tokio::time::sleep(restarts.next().unwrap_or(Duration::from_secs(30))).await;
        }
    }

    fn apply(&mut self, event: Event<K>) {
        let (relevant, before) = match &event {
            Event::Apply(obj) => {
                let before = self.writer.as_reader().get(&obj.to_object_ref(self.dyntype.clone()));
                (before.as_deref() != Some(obj), before)
            }
            Event::Delete(_) | Event::InitDone => (true, None),
            Event::Init => {
                self.status.relisting();
                (false, None)
            }
            Event::InitApply(_) => (false, None),
        };
        self.writer.apply_watcher_event(&event);
        if matches!(event, Event::InitDone) {
            self.status.listed();
        }
        if relevant {
            // Recorded once the store holds the change, and before the publisher is woken: a build that takes
            // this record reads the store as changed.
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            match &event {
                Event::Apply(obj) | Event::Delete(obj) => {
                    before.iter().for_each(|before| (self.trim.touch)(before, &mut touched));
                    (self.trim.touch)(obj, &mut touched);
                }
                _ => touched.all = true,
            }
            drop(touched);
            self.changed.notify_one();
        }
    }
}

/// The DestinationRule API is a CRD that may be absent (Istio not installed yet): until it answers, the cluster
/// syncs without DRs and the API is checked again every `recheck`.
async fn reflect_destination_rules(reflect: Reflect<DynamicObject>, recheck: Duration) {
    let mut backoff = DefaultBackoff::default();
    let mut reported = false;
    loop {
        match reflect.api.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            // 403: the reader role lacks DRs; better to serve without them than not at all.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => {
                if !reported {
                    info!("DestinationRules unavailable ({}), continuing without them: {}", s.code, s.message);
                    reported = true;
                }
                reflect.status.listed();
                tokio::time::sleep(recheck).await;
            }
            Err(e) => {
                reflect.status.error(&e, true);
                tokio::time::sleep(backoff.next().unwrap_or(recheck)).await;
            }
        }
    }
    reflect.run().await;
}

fn destination_rule_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "DestinationRule"),
        DESTINATION_RULES,
    )
}

/// Rebuilds the touched parts of the cluster's model after changes, at most once per `debounce`, and publishes it
/// when it differs.
struct Publisher {
    id: String,
    system_namespace: String,
    domain_suffix: String,
    debounce: Duration,
    stores: Stores,
    status: ClusterStatus,
    changed: Arc<Notify>,
    touched: Arc<Mutex<Touched>>,
    updates: watch::Sender<MeshModel>,
}

impl Publisher {
    async fn run(self) {
        // A partial first model (services without their endpoints) would look like an outage to the gateways.
        self.status.wait_synced().await;
        let ctx = Context {
            cluster_id: &self.id,
            system_namespace: &self.system_namespace,
            domain_suffix: &self.domain_suffix,
        };
        let mut rules = DestinationRuleCache::default();
        let mut built: Option<Built> = None;
        loop {
            let touched = std::mem::take(&mut *self.touched.lock().unwrap_or_else(|e| e.into_inner()));
            // Only the Services a change touched are built again; the others keep their `Arc`s, so that the
            // debounce compares the rebuilt ones alone.
            if let Some(model) = self.stores.update(&ctx, &mut rules, &mut built, touched) {
                self.updates.send_if_modified(|mesh| {
                    mesh.clusters.insert(self.id.clone(), model);
                    true
                });
            }
            self.changed.notified().await;
            tokio::time::sleep(self.debounce).await;
        }
    }
}

fn key<K: Resource>(object: &K) -> (String, String) {
    (object.meta().namespace.clone().unwrap_or_default(), object.meta().name.clone().unwrap_or_default())
}

fn touch_service(svc: &Service, touched: &mut Touched) {
    touched.services.insert(key(svc));
}

fn touch_slice(slice: &EndpointSlice, touched: &mut Touched) {
    touched.services.extend(service_of(slice));
    touched.slices.insert(key(slice));
}

fn touch_pod(pod: &Pod, touched: &mut Touched) {
    touched.pods.insert(key(pod));
}

fn touch_all<K>(_: &K, touched: &mut Touched) {
    touched.all = true;
}

fn trim_meta(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        ..ObjectMeta::default()
    };
}

fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata);
    svc.status = None;
}

fn trim_slice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata);
}

fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata);
    let node_name = pod.spec.as_mut().and_then(|s| s.node_name.take());
    pod.spec = Some(PodSpec { node_name, ..PodSpec::default() });
    pod.status = None;
}

fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata);
    (node.spec, node.status) = (None, None);
}

fn trim_namespace(ns: &mut Namespace) {
    trim_meta(&mut ns.metadata);
    (ns.spec, ns.status) = (None, None);
}

fn trim_destination_rule(rule: &mut DynamicObject) {
    trim_meta(&mut rule.metadata);
    if let Some(data) = rule.data.as_object_mut() {
        data.retain(|key, _| key == "spec");
    }
}
