//! Who a gateway is, as an Envoy `Node` carries it to istiod (`pilot/pkg/model/context.go` `NodeMetadata`):
//! the node ID, its locality, and the metadata keys istiod reads for an east-west gateway.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::labels::{CLUSTER_LABEL, Locality, NETWORK_LABEL};
use crate::locality_lb::{GatewayIdentity, NetworkFailover};

pub const CLUSTER_ID_KEY: &str = "CLUSTER_ID";
pub const NETWORK_KEY: &str = "NETWORK";
pub const REQUESTED_NETWORK_VIEW_KEY: &str = "REQUESTED_NETWORK_VIEW";
pub const LABELS_KEY: &str = "LABELS";
pub const NAMESPACE_KEY: &str = "NAMESPACE";
/// Istio's gateways run in `istio-system` as `istio-eastwestgateway`; `node.cluster` is `name.namespace`.
pub const DEFAULT_NODE_CLUSTER: &str = "istio-eastwestgateway.istio-system";

/// A gateway's identity, read from or written to an Envoy `Node`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayNode {
    pub id: String,
    /// `CLUSTER_ID`: the Kubernetes cluster the gateway runs in.
    pub cluster_id: String,
    /// `NETWORK`.
    pub network: String,
    /// `REQUESTED_NETWORK_VIEW`: only endpoints on these networks (or on none) are sent; empty means all.
    pub requested_network_view: Vec<String>,
    pub locality: Locality,
    /// `LABELS`: the gateway pod's labels.
    pub labels: BTreeMap<String, String>,
}

impl GatewayNode {
    /// The Envoy node, with Istio's metadata keys (the network view comma-separated, as Istio's `StringList`).
    pub fn to_envoy(&self) -> core::Node {
        let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
        let mut fields = std::collections::HashMap::new();
        fields.insert(CLUSTER_ID_KEY.to_owned(), string(&self.cluster_id));
        if !self.network.is_empty() {
            fields.insert(NETWORK_KEY.to_owned(), string(&self.network));
        }
        if !self.requested_network_view.is_empty() {
            fields.insert(REQUESTED_NETWORK_VIEW_KEY.to_owned(), string(&self.requested_network_view.join(",")));
        }
        if !self.labels.is_empty() {
            let labels = self.labels.iter().map(|(k, v)| (k.clone(), string(v))).collect();
            fields.insert(LABELS_KEY.to_owned(), Value { kind: Some(Kind::StructValue(Struct { fields: labels })) });
        }
        core::Node {
            id: self.id.clone(),
            cluster: DEFAULT_NODE_CLUSTER.to_owned(),
            locality: Some(crate::gateway::envoy_locality(&self.locality)),
            metadata: Some(Struct { fields }),
            user_agent_name: "crossgate".to_owned(),
            ..Default::default()
        }
    }

    /// Reads what istiod reads; a missing `CLUSTER_ID` is refused, since endpoints cannot be filtered without it.
    pub fn from_envoy(node: &core::Node) -> Result<Self, NodeError> {
        let fields = node.metadata.as_ref().map(|m| &m.fields);
        let string = |key: &str| match fields.and_then(|f| f.get(key)).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => s.clone(),
            _ => String::new(),
        };
        let cluster_id = string(CLUSTER_ID_KEY);
        if cluster_id.is_empty() {
            return Err(NodeError::NoClusterId);
        }
        let requested_network_view =
            string(REQUESTED_NETWORK_VIEW_KEY).split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect();
        let labels = match fields.and_then(|f| f.get(LABELS_KEY)).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(labels)) => labels
                .fields
                .iter()
                .filter_map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                    _ => None,
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let locality = node.locality.as_ref().map_or_else(Locality::default, |l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.sub_zone.clone(),
        });
        Ok(GatewayNode {
            id: node.id.clone(),
            cluster_id,
            network: string(NETWORK_KEY),
            requested_network_view,
            locality,
            labels,
        })
    }

    /// Whom priorities are computed for: the locality, and the labels with the network and cluster added as
    /// Istio's `AugmentLabels` adds them to a proxy.
    pub fn identity(&self, network_failover: NetworkFailover) -> GatewayIdentity {
        let mut labels = self.labels.clone();
        if !self.network.is_empty() {
            labels.insert(NETWORK_LABEL.to_owned(), self.network.clone());
        }
        labels.insert(CLUSTER_LABEL.to_owned(), self.cluster_id.clone());
        let mut identity = GatewayIdentity::new(self.locality.clone(), labels);
        identity.network_failover = network_failover;
        identity
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the node has no CLUSTER_ID metadata: set ISTIO_META_CLUSTER_ID on the gateway")]
    NoClusterId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_round_trips_through_envoy_metadata() {
        let node = GatewayNode {
            id: "gw-1".into(),
            cluster_id: "cluster1".into(),
            network: "network1".into(),
            requested_network_view: vec!["network1".into(), "network3".into()],
            locality: "r1/z1/s1".parse().unwrap(),
            labels: BTreeMap::from([("app".into(), "istio-eastwestgateway".into())]),
        };
        let envoy = node.to_envoy();
        assert_eq!(envoy.locality.as_ref().unwrap().sub_zone, "s1");
        assert_eq!(GatewayNode::from_envoy(&envoy).unwrap(), node);
        let identity = node.identity(NetworkFailover::Istio130);
        assert_eq!(identity.labels[NETWORK_LABEL], "network1");
        assert_eq!(identity.labels[CLUSTER_LABEL], "cluster1");
        assert_eq!(identity.labels[crate::labels::ZONE_LABEL], "z1");
        assert_eq!(identity.network_failover, NetworkFailover::Istio130);
        assert_eq!(GatewayNode::from_envoy(&core::Node::default()), Err(NodeError::NoClusterId));
    }
}
