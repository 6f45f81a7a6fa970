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
    /// Type URL -> resource name -> version, as last ACKed.
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
}
