//! The mesh versions the xDS server serves: every change of the source's model, debounced into numbered
//! versions (see [`crate::ads`] for how each gateway is sent them).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::MeshModel;
use crate::views::{self, ServiceIndex};

/// The version before the source has a mesh worth serving: a gateway that connects then waits (a reconnecting
/// one keeps what it has) rather than being told the mesh is empty.
pub(crate) const UNPRIMED: u64 = 0;

/// One state of the mesh, as pushed: numbered, and stamped with when its first change was seen.
#[derive(Debug)]
pub struct MeshVersion {
    pub mesh: MeshModel,
    pub version: u64,
    /// When the first change folded into this version arrived (for the event-to-ACK latency).
    pub changed_at: Instant,
    /// The service hostnames changed since the previous version (`None`: anything may have; every view is
    /// recomputed). See [`views::changed_hosts`].
    pub changed_hosts: Option<Arc<BTreeSet<String>>>,
    /// Where each service of `mesh` is, for the views that recompute the changed ones alone.
    pub services: ServiceIndex,
}

impl MeshVersion {
    /// A version whose changes are not known: every view is recomputed.
    pub fn whole(mesh: MeshModel, version: u64) -> Self {
        let services = ServiceIndex::new(&mesh);
        MeshVersion { mesh, version, changed_at: Instant::now(), changed_hosts: None, services }
    }

    /// The version after this one: `mesh`, with what changed since this one. Costs in proportion to the
    /// services the sources replaced (and a pointer comparison per service of a cluster that changed).
    pub fn next(&self, mesh: MeshModel, changed_at: Instant) -> Self {
        let changed_hosts = views::changed_hosts(&self.mesh, &mesh).map(Arc::new);
        let services = self.services.next(&self.mesh, &mesh);
        MeshVersion { mesh, version: self.version + 1, changed_at, changed_hosts, services }
    }
}

/// Turns every mesh change into versions at most one per `quiet` period of calm (or per `max_delay` under a
/// steady stream of changes), so that a burst of watch events becomes one push. Version 0, the empty mesh, is
/// never served: version 1 is the mesh at the moment `primed` turns true.
pub fn debounce(
    mut input: watch::Receiver<MeshModel>,
    mut primed: watch::Receiver<bool>,
    quiet: Duration,
    max_delay: Duration,
) -> watch::Receiver<Arc<MeshVersion>> {
    let unprimed = MeshVersion::whole(MeshModel::default(), UNPRIMED);
    let (versions, receiver) = watch::channel(Arc::new(unprimed));
    tokio::spawn(async move {
        if primed.wait_for(|primed| *primed).await.is_err() {
            return;
        }
        let first = input.borrow_and_update().clone();
        let mut previous = Arc::new(MeshVersion::whole(first, 1));
        if versions.send(Arc::clone(&previous)).is_err() {
            return;
        }
        while input.changed().await.is_ok() {
            let changed_at = Instant::now();
            let deadline = tokio::time::Instant::now() + max_delay;
            loop {
                tokio::select! {
                    changed = input.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(quiet) => break,
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let mesh = input.borrow_and_update().clone();
            let next = Arc::new(previous.next(mesh, changed_at));
            if versions.send(Arc::clone(&next)).is_err() {
                return;
            }
            previous = next;
        }
    });
    receiver
}
