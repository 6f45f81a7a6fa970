//! How a cluster's hosts are arranged for balancing, as its assignment says (EDS): priorities, and within each the
//! localities with their weights. Istio computes the arrangement per gateway (`crossgate_istio::locality_lb`);
//! the gateway takes it verbatim, as Envoy does.

use super::endpoint::Locality;

/// The hosts of a cluster by priority, then locality. Draining hosts are left out (Envoy's
/// `exclude_host_in_eds_status_draining`).
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub priorities: Vec<Vec<Group>>,
    /// Envoy's `locality_weighted_lb_config`: choose a locality by weight before the host.
    pub locality_weighted: bool,
    /// The assignment's `policy.overprovisioning_factor`, in percent (Envoy's default 140).
    pub overprovisioning_factor: u32,
}

/// The hosts of one locality within one priority.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub locality: Locality,
    /// `load_balancing_weight`; with locality-weighted lb a locality without one gets no traffic.
    pub weight: u64,
    /// Indices into the cluster's hosts.
    pub members: Vec<usize>,
}

impl Topology {
    /// Hosts that take part in balancing (Envoy's cluster membership).
    pub fn member_count(&self) -> usize {
        self.priorities.iter().flatten().map(|g| g.members.len()).sum()
    }

    /// Each host's priority, `None` when it takes no part (draining).
    pub fn priority_of(&self, hosts: usize) -> Vec<Option<usize>> {
        let mut out = vec![None; hosts];
        for (p, groups) in self.priorities.iter().enumerate() {
            for i in groups.iter().flat_map(|g| &g.members) {
                out[*i] = Some(p);
            }
        }
        out
    }
}
