//! What `/debug/gateways` shows of each Envoy gateway.

use std::collections::BTreeMap;

use crossgate_istio::node::GatewayNode;
use serde::Serialize;

use super::{AdsServer, Kind};

/// One connected gateway.
#[derive(Debug, Clone, Serialize)]
pub struct AdsGatewayStatus {
    /// `delta` or `state-of-the-world` ADS.
    pub protocol: &'static str,
    pub node: NodeStatus,
    pub connected_at_unix: u64,
    /// The mesh version its resources were last computed from (0: none yet, the mesh is not whole).
    pub mesh_version: u64,
    /// Type URL -> resource name -> version, as last ACKed (what a NACK refused is in `last_nack`).
    pub acked: BTreeMap<String, BTreeMap<String, String>>,
    pub pushes: u64,
    /// Resources sent, removals included: what a reconnecting gateway was sent again shows here.
    pub pushed_resources: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<NackStatus>,
}

impl AdsServer {
    /// Every connected gateway as [`AdsServer::gateways`] shows it, but with `acked` holding only the version
    /// of `name` of `kind` (if ACKed): a read cheap enough to poll at mesh scale, where the full copy holds
    /// every resource of every gateway. Read-only; for benchmarks and tests that wait for an ACK.
    pub fn gateways_holding(&self, kind: Kind, name: &str) -> Vec<AdsGatewayStatus> {
        let type_url = kind.type_url();
        let gateways = self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner());
        gateways
            .values()
            .map(|status| {
                let held = status.acked.get(&type_url).and_then(|held| held.get(name));
                let acked = held.map(|version| (name.to_owned(), version.clone())).into_iter().collect();
                AdsGatewayStatus {
                    protocol: status.protocol,
                    node: status.node.clone(),
                    connected_at_unix: status.connected_at_unix,
                    mesh_version: status.mesh_version,
                    acked: BTreeMap::from([(type_url.clone(), acked)]),
                    pushes: status.pushes,
                    pushed_resources: status.pushed_resources,
                    acks: status.acks,
                    nacks: status.nacks,
                    last_nack: status.last_nack.clone(),
                }
            })
            .collect()
    }
}

impl AdsGatewayStatus {
    /// Applies changes of what the gateway holds of one type (a `None` version: no longer held).
    pub(super) fn apply(&mut self, type_url: &str, changes: impl IntoIterator<Item = (String, Option<String>)>) {
        for (name, version) in changes {
            match version {
                Some(version) => match self.acked.get_mut(type_url) {
                    Some(held) => {
                        held.insert(name, version);
                    }
                    None => {
                        self.acked.insert(type_url.to_owned(), BTreeMap::from([(name, version)]));
                    }
                },
                None => {
                    if let Some(held) = self.acked.get_mut(type_url) {
                        held.remove(&name);
                    }
                }
            }
        }
    }
}

/// The gateway's identity, as its Envoy node tells it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub cluster_id: String,
    pub network: String,
    pub requested_network_view: Vec<String>,
    pub locality: String,
    pub labels: BTreeMap<String, String>,
}

impl From<&GatewayNode> for NodeStatus {
    fn from(node: &GatewayNode) -> Self {
        NodeStatus {
            id: node.id.clone(),
            cluster_id: node.cluster_id.clone(),
            network: node.network.clone(),
            requested_network_view: node.requested_network_view.clone(),
            // `region/zone/subzone` without trailing empty parts; empty when unknown.
            locality: node.locality.to_string().trim_end_matches('/').to_owned(),
            labels: node.labels.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NackStatus {
    pub type_url: String,
    pub nonce: String,
    /// Envoy's error message.
    pub message: String,
    /// What the refused response carried: name -> version (`null`: a removal). The gateway keeps its last
    /// good version of these; the refused versions are not sent again, the next change of these resources is.
    pub refused: BTreeMap<String, Option<String>>,
}
