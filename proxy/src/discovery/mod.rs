//! Where the gateway's configuration comes from, and the one place it is applied: every source hands whole
//! [`Resources`] to [`ConfigStore::apply`], which validates and builds a new route snapshot off the hot path
//! and swaps it in with one atomic store, or refuses it and keeps serving the last good one.

pub mod file;
pub mod xds;

use std::sync::Arc;
use std::sync::Mutex;

use arc_swap::{ArcSwap, Guard};
use crossgate_proto::Resources;
use tokio::sync::watch;

use crate::metrics::{ConfigMetrics, Telemetry};
use crate::route::{ClusterDefaults, InvalidResources, RouteTable};

/// The current route snapshot, and how updates reach it.
#[derive(Debug)]
pub struct ConfigStore {
    routes: ArcSwap<RouteTable>,
    defaults: ClusterDefaults,
    telemetry: Arc<Telemetry>,
    metrics: ConfigMetrics,
    /// Serialises builds, so that each starts from the snapshot it replaces.
    build: Mutex<()>,
    /// How many configurations have been accepted: 0 until the first.
    accepted: watch::Sender<u64>,
}

impl ConfigStore {
    pub fn new(defaults: ClusterDefaults, telemetry: Arc<Telemetry>, source: &'static str) -> Self {
        let metrics = telemetry.register(|| ConfigMetrics::new(source));
        ConfigStore {
            routes: ArcSwap::default(),
            defaults,
            telemetry,
            metrics,
            build: Mutex::new(()),
            accepted: watch::Sender::new(0),
        }
    }

    /// The snapshot to route with: one atomic load.
    pub fn routes(&self) -> Guard<Arc<RouteTable>> {
        self.routes.load()
    }

    /// Validates `resources` and, if all is well, makes them the configuration.
    pub fn apply(&self, resources: &Resources) -> Result<(), InvalidResources> {
        let _build = self.build.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = self.routes.load_full();
        let built = self.telemetry.register(|| RouteTable::build(resources, &self.defaults, &previous));
        match built {
            Ok(table) => {
                self.metrics.clusters.set(table.len() as f64);
                self.metrics.endpoints.set(table.endpoint_count() as f64);
                self.routes.store(Arc::new(table));
                self.metrics.accepted.increment(1);
                self.accepted.send_modify(|accepted| *accepted += 1);
                Ok(())
            }
            Err(invalid) => {
                self.metrics.rejected.increment(1);
                Err(invalid)
            }
        }
    }

    /// True once a configuration has been accepted.
    pub fn is_loaded(&self) -> bool {
        *self.accepted.borrow() > 0
    }

    pub async fn wait_loaded(&self) {
        let _ = self.accepted.subscribe().wait_for(|accepted| *accepted > 0).await;
    }

    /// Marked changed whenever a configuration is accepted.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.accepted.subscribe()
    }
}
