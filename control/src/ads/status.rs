//! What `/debug/gateways` shows of each Envoy gateway.

use std::collections::BTreeMap;

use crossgate_istio::node::GatewayNode;
use serde::Serialize;

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
            locality: super::locality_string(&node.locality),
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
