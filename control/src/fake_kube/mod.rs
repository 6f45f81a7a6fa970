//! A faithful fake Kubernetes API server for testing the kube watchers (see docs/KUBE-FAKE.md).
//!
//! One [`FakeCluster`] per cluster: its own store, one global resourceVersion counter (start them far apart so that
//! cross-wiring shows), a bounded event log with a compaction floor, a request log, and injectable faults. It speaks
//! the API that kube 5's `watcher` drives: paged lists served from one snapshot, watches replayed from an RV then
//! live, the in-stream 410 after compaction, selector transitions, bookmarks, streaming lists, JSON `Status` errors.
//! Serve it over real HTTP ([`FakeCluster::serve`], with a kubeconfig) or in-process ([`FakeCluster::client`], which
//! also works under `#[tokio::test(start_paused = true)]`).
//!
//! Served types: core v1 services, pods, secrets (namespaced), nodes, namespaces (cluster-scoped),
//! discovery.k8s.io/v1 endpointslices and networking.istio.io/v1 destinationrules. Read-only: GET only; tests write
//! through [`FakeCluster::apply`] and [`FakeCluster::delete`].

mod api;
mod http;
mod selectors;
mod store;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinHandle;

use store::Store;

/// One fake cluster. Cheap to clone: clones share the cluster.
#[derive(Clone)]
pub struct FakeCluster {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    store: Mutex<Store>,
}

/// A fault to inject. `kind` is the resource kind, e.g. `"Pod"`, `"EndpointSlice"`, `"DestinationRule"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `times` list requests for `kind` fail with HTTP `code` (500, 429, 503...) and a JSON `Status`.
    ListError { kind: String, code: u16, times: u32 },
    /// Every request for `kind` gets 403 Forbidden (the reader role lacks it) until [`FakeCluster::clear_faults`].
    Forbidden { kind: String },
    /// `kind`'s API is not installed (a CRD absent): its paths 404 and discovery omits it, until cleared.
    ApiAbsent { kind: String },
    /// The next watch of `kind` starts with one line that is not JSON.
    MalformedLine { kind: String },
    /// The next watch of `kind` is cut without the terminating chunk after sending `after_events` lines.
    Disconnect { kind: String, after_events: usize },
}

/// One request as the fake saw it, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Decoded query pairs, in order, without the empty pairs kube's `?&` produces.
    pub query: Vec<(String, String)>,
    /// The HTTP status answered; a watch that ends in an in-stream error still answered 200.
    pub status: u16,
    pub authorization: Option<String>,
}

impl RecordedRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
}

impl FakeCluster {
    /// `first_resource_version` is the store's RV before any write: an empty list reports it, the first write gets
    /// the next one.
    pub fn new(name: &str, first_resource_version: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                store: Mutex::new(Store::new(name, first_resource_version)),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not wedge the other clients of this fake.
        self.shared.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// Creates (ADDED) or replaces (MODIFIED) the object; stamps resourceVersion, uid and creationTimestamp.
    /// Returns the object's resourceVersion. Panics on a kind the fake does not serve.
    pub fn apply<K: kube::Resource + Serialize>(&self, obj: &K) -> u64 {
        self.apply_json(serde_json::to_value(obj).expect("kube resources serialize to JSON"))
    }

    /// [`apply`](Self::apply) for any JSON object with `apiVersion`, `kind` and `metadata.name`; a namespaced kind
    /// without `metadata.namespace` goes to "default".
    pub fn apply_json(&self, obj: Value) -> u64 {
        self.store().apply(obj)
    }

    /// Deletes the object (DELETED carries its last state with a new RV). Returns that RV, or `None` if absent.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<u64> {
        self.store().delete(kind, namespace, name)
    }

    /// Moves the compaction floor to now: a watch from an older RV gets the in-stream 410 Expired, and open continue
    /// tokens expire. Open watches keep streaming, as on the real server.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// Sends a BOOKMARK at the current RV to every open watch that allowed bookmarks.
    pub fn bookmark(&self) {
        self.store().bookmark();
    }

    /// Cuts every open watch, as a dropped connection would: the chunked body ends without its last chunk.
    pub fn drop_watches(&self) {
        self.store().drop_watches();
    }

    /// How many watch streams are open now; wait on it before a write that must arrive over a live watch.
    pub fn open_watches(&self) -> usize {
        self.store().open_watches()
    }

    pub fn fail(&self, fault: Fault) {
        self.store().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.store().faults.clear();
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.store().requests.clone()
    }

    /// A client wired to this fake in-process (no sockets). Call it inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(http::InProcess(self.clone()), "default")
    }

    /// Serves this fake over HTTP on 127.0.0.1 until the returned handle is dropped.
    pub async fn serve(&self) -> io::Result<ServedCluster> {
        let (addr, task) = http::serve(self.clone()).await?;
        Ok(ServedCluster { addr, name: self.shared.name.clone(), task })
    }
}

/// A fake cluster being served over HTTP. Dropping it closes the listener and all connections.
pub struct ServedCluster {
    pub addr: SocketAddr,
    name: String,
    task: JoinHandle<()>,
}

impl ServedCluster {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig shaped like an Istio remote secret's: one cluster, context and user, all called `name`, with a
    /// token user (`fake-token-<name>`, visible in [`RecordedRequest::authorization`]).
    pub fn kubeconfig_yaml(&self, name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {url}\ncontexts:\n\
             - name: {name}\n  context:\n    cluster: {name}\n    user: {name}\ncurrent-context: {name}\nusers:\n\
             - name: {name}\n  user:\n    token: fake-token-{name}\npreferences: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) named after the fake cluster.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(&self.name))
    }
}

impl Drop for ServedCluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `condition` every 10 ms until it holds (true) or `timeout` passes (false). Use it instead of sleeps.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// [`eventually`], panicking with `what` on timeout.
pub async fn assert_eventually(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(eventually(timeout, condition).await, "timed out after {timeout:?} waiting for: {what}");
}
