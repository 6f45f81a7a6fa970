//! The endpoints of a cluster: each as configured (address, locality, weight, health, workload), and the per-host
//! state that outlives a configuration (open connections, outlier state, the endpoint's Istio series).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub use crossgate_istio::gateway::WorkloadMetadata;
pub use crossgate_istio::labels::Locality;

use super::outlier::HostOutlier;
use crate::metrics::IstioTcpMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Counted in the priority's size but takes traffic only in panic, as Envoy does.
    Unhealthy,
    /// Terminating: keeps its open connections, takes no new ones, and is not counted at all.
    Draining,
}

/// One endpoint as configured: where to connect, what the lb may weigh, and what the metrics say about it. The
/// locality and the workload are shared by the endpoints that have the same (an assignment repeats them).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    pub locality: Arc<Locality>,
    /// At least 1.
    pub weight: u32,
    pub health: Health,
    /// Istio's `istio.workload` metadata: the destination labels of its series.
    pub workload: Arc<WorkloadMetadata>,
}

/// Per-host state that survives configuration reloads: open connections, the outlier detector's view, and the
/// endpoint's Istio series (registered on its first connection, so that series follow traffic, not the mesh).
#[derive(Debug, Default)]
pub struct HostState {
    pub(super) active: AtomicU64,
    /// Made on the first outcome reported to outlier detection: a cluster without it never needs one.
    outlier: OnceLock<Box<HostOutlier>>,
    /// Boxed: most endpoints of a large mesh never carry a connection through one gateway.
    pub(crate) series: OnceLock<Box<IstioTcpMetrics>>,
}

impl HostState {
    /// Connections currently open to this host.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether outlier detection has ejected this host.
    pub fn ejected(&self) -> bool {
        self.outlier.get().is_some_and(|outlier| outlier.is_ejected())
    }

    /// The outlier detector's ejection-time multiplier: how many ejections in a row it remembers.
    pub fn ejection_multiplier(&self) -> u32 {
        self.outlier.get().map_or(0, |outlier| outlier.multiplier())
    }

    /// The outlier detector's view of this host, made when first needed.
    pub(super) fn outlier(&self) -> &HostOutlier {
        self.outlier.get_or_init(Box::default)
    }

    /// The same if it was ever made: a host never reported on has nothing to sweep.
    pub(super) fn outlier_if_any(&self) -> Option<&HostOutlier> {
        self.outlier.get().map(|outlier| &**outlier)
    }
}

#[derive(Debug)]
pub struct Host {
    pub spec: EndpointSpec,
    pub state: Arc<HostState>,
}
