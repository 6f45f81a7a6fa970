//! What the lb is given: endpoints with their locality, weight and health, and the per-host state that outlives a
//! configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crossgate_istio::labels::Locality;

use super::outlier::HostOutlier;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Counted in the priority's size but takes traffic only in panic, as Envoy does.
    Unhealthy,
    /// Terminating: keeps its open connections, takes no new ones, and is not counted at all.
    Draining,
}

/// One endpoint as configured: where to connect and what the lb may weigh.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    pub locality: Locality,
    /// At least 1.
    pub weight: u32,
    pub health: Health,
}

/// Per-host state that survives configuration reloads: open connections and the outlier detector's view.
#[derive(Debug, Default)]
pub struct HostState {
    pub(super) active: AtomicU64,
    pub(super) outlier: HostOutlier,
}

impl HostState {
    /// Connections currently open to this host.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether outlier detection has ejected this host.
    pub fn ejected(&self) -> bool {
        self.outlier.is_ejected()
    }

    /// The outlier detector's ejection-time multiplier: how many ejections in a row it remembers.
    pub fn ejection_multiplier(&self) -> u32 {
        self.outlier.multiplier()
    }
}

#[derive(Debug)]
pub struct Host {
    pub spec: EndpointSpec,
    pub state: Arc<HostState>,
}
