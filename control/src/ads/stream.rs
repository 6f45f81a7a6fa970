//! One gateway's ADS stream: its resources, rebuilt at each mesh version, and one [`TypeState`] per type,
//! driven by its requests. A change is pushed clusters first, then their assignments, then the listener.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use crossgate_istio::node::GatewayNode;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::Shared;
use super::resources::{Kind, ResourceBuilder};
use super::status::{AdsGatewayStatus, NackStatus};
use super::subscription::{Answer, Outcome, TypeState};
use super::wire::Wire;
use crate::server::{MeshVersion, UNPRIMED};
use crate::views;

pub(super) struct Session<W: Wire> {
    shared: Arc<Shared>,
    id: u64,
    node: GatewayNode,
    builder: ResourceBuilder,
    types: [TypeState; 3],
    /// What the gateway's view keeps between mesh versions so that a change recomputes only what it touches.
    view: views::GatewayView,
    /// False until the mesh is primed: nothing is pushed before.
    primed: bool,
    mesh_version: u64,
    changed_at: Instant,
    nonces: u64,
    wire: PhantomData<W>,
}

impl<W: Wire> Session<W> {
    pub(super) fn open(shared: Arc<Shared>, node: GatewayNode) -> Self {
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let identity = node.identity(shared.options.network_failover);
        let status = AdsGatewayStatus {
            protocol: W::PROTOCOL,
            node: (&node).into(),
            connected_at_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            mesh_version: UNPRIMED,
            acked: Default::default(),
            pushes: 0,
            pushed_resources: 0,
            acks: 0,
            nacks: 0,
            last_nack: None,
        };
        shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).insert(id, status);
        shared.metrics.connected(W::MODE).increment(1.0);
        tracing::info!(
            node = %node.id, cluster = %node.cluster_id, network = %node.network, protocol = W::PROTOCOL,
            "Envoy gateway connected"
        );
        Session {
            builder: ResourceBuilder::new(identity, shared.options.clone()),
            shared,
            id,
            node,
            types: Kind::ALL.map(|_| TypeState::new(W::MODE)),
            view: views::GatewayView::default(),
            primed: false,
            mesh_version: UNPRIMED,
            changed_at: Instant::now(),
            nonces: 0,
            wire: PhantomData,
        }
    }

    pub(super) async fn serve(
        mut self,
        first: W::Request,
        mut requests: Streaming<W::Request>,
        responses: mpsc::Sender<Result<W::Response, Status>>,
    ) {
        let mut mesh = self.shared.mesh.clone();
        // The guard of `borrow_and_update` is dropped at the end of each statement, before any await.
        let snapshot = Arc::clone(&mesh.borrow_and_update());
        self.refresh(&snapshot);
        self.receive(&first);
        loop {
            for response in self.pushes() {
                if responses.send(Ok(response)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = mesh.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = Arc::clone(&mesh.borrow_and_update());
                    self.refresh(&snapshot);
                }
                request = requests.message() => match request {
                    Ok(Some(request)) => self.receive(&request),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %self.node.id, %status, "Envoy gateway stream failed");
                        break;
                    }
                },
            }
        }
        tracing::info!(node = %self.node.id, "Envoy gateway disconnected");
    }

    /// Rebuilds the gateway's resources at a new mesh version, and tells each type which names may differ.
    fn refresh(&mut self, snapshot: &MeshVersion) {
        if snapshot.version == UNPRIMED {
            return;
        }
        let (invalid, mesh) = (&self.shared.invalid, &snapshot.mesh);
        // The next version, with its changed services known: only those are recomputed, and only their
        // clusters are compared with what the gateway holds.
        match &snapshot.changed_hosts {
            Some(hosts) if self.primed && snapshot.version == self.mesh_version + 1 => {
                let changed = self.view.update(mesh, &snapshot.services, &self.node, &self.shared.view, hosts);
                self.builder.update(&changed, invalid);
                for kind in [Kind::Cluster, Kind::Endpoint] {
                    self.types[kind.index()].mark_changed(changed.keys());
                }
                // One resource: looking at it is as cheap as knowing whether it changed.
                self.types[Kind::Listener.index()].mark_all();
            }
            _ => {
                let view = self.view.rebuild(mesh, &self.node, &self.shared.view);
                self.builder.resources(&view, invalid);
                self.types.iter_mut().for_each(TypeState::mark_all);
            }
        }
        self.primed = true;
        self.mesh_version = snapshot.version;
        self.changed_at = snapshot.changed_at;
        self.update_status(|status| status.mesh_version = snapshot.version);
    }

    fn receive(&mut self, request: &W::Request) {
        let type_url = W::type_url(request);
        let Some(kind) = Kind::from_type_url(type_url) else {
            tracing::debug!(node = %self.node.id, type_url, "request for a type this service does not serve");
            return;
        };
        if let Some(outcome) = W::apply(request, &mut self.types[kind.index()]) {
            self.answered(kind, outcome);
        }
    }

    /// Records the answer in the gateway's status: the response's names alone, not all it holds.
    fn answered(&mut self, kind: Kind, Outcome { nonce, answer, delivered, requested, changed_at }: Outcome) {
        let metrics = &self.shared.metrics;
        let type_url = kind.type_url();
        match answer {
            Answer::Ack => {
                metrics.acks[kind.index()].increment(1);
                metrics.ack_seconds.record(changed_at.elapsed().as_secs_f64());
                self.update_status(|status| {
                    status.acks += 1;
                    status.apply(&type_url, requested.into_iter().chain(delivered));
                });
            }
            Answer::Nack { message } => {
                metrics.nacks[kind.index()].increment(1);
                tracing::warn!(
                    node = %self.node.id, r#type = kind.short(), %nonce, %message,
                    "Envoy gateway refused a response; it keeps its last good version of what it refused, \
                     and is not sent those versions again"
                );
                let refused = delivered.into_iter().collect();
                self.update_status(|status| {
                    status.nacks += 1;
                    status.apply(&type_url, requested);
                    status.last_nack = Some(NackStatus { type_url, nonce, message, refused });
                });
            }
        }
    }

    /// The responses due now, in push order.
    fn pushes(&mut self) -> Vec<W::Response> {
        if !self.primed {
            return Vec::new();
        }
        let resources = self.builder.current();
        let (mut out, mut pushed_resources) = (Vec::new(), 0);
        for kind in Kind::ALL {
            let nonces = &mut self.nonces;
            let mesh_version = self.mesh_version;
            let nonce = || {
                *nonces += 1;
                format!("{mesh_version}-{nonces}")
            };
            let Some(push) = self.types[kind.index()].next_push(resources.of(kind), nonce, self.changed_at) else {
                continue;
            };
            if kind == Kind::Cluster {
                // A replaced cluster warms again until it gets its assignment: send the assignment again.
                self.types[Kind::Endpoint.index()].forget(&push.updated);
            }
            let count = push.resources.len() + push.removed.len();
            pushed_resources += count as u64;
            let response = W::response(kind.type_url(), push, self.mesh_version);
            let metrics = &self.shared.metrics;
            metrics.pushes[kind.index()].increment(1);
            metrics.push_resources.record(count as f64);
            metrics.push_bytes.record(response.encoded_len() as f64);
            out.push(response);
        }
        if !out.is_empty() {
            let pushed = out.len() as u64;
            self.update_status(|status| {
                status.pushes += pushed;
                status.pushed_resources += pushed_resources;
            });
        }
        out
    }

    fn update_status(&self, update: impl FnOnce(&mut AdsGatewayStatus)) {
        if let Some(status) = self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.id) {
            update(status);
        }
    }
}

impl<W: Wire> Drop for Session<W> {
    fn drop(&mut self) {
        self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        self.shared.metrics.connected(W::MODE).decrement(1.0);
    }
}
