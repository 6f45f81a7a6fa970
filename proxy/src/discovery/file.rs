//! The static resources file: the YAML (or JSON) form of `crossgate.discovery.v1.Resources`, reloaded when
//! it changes (see `crossgate_files`). Each cluster becomes the Envoy resources istiod would send this gateway
//! (`crossgate_istio::gateway`), applied as one unit: a file with any problem is refused whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossgate_files::FileWatch;
use crossgate_istio::gateway::{self, MeshDefaults};
use crossgate_istio::locality_lb::GatewayIdentity;
use crossgate_proto::Resources;

use super::{ConfigStore, Rejected};
use crate::drain::{Drain, Phase};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    // The causes are part of each message (not `source`), so that a log line carries the whole story once.
    #[error("cannot read resources file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("resources file {path} is not valid crossgate.discovery.v1.Resources: {error}")]
    Parse { path: PathBuf, error: serde_yaml_ng::Error },
    #[error("resources file {path} was refused: {}", .problems.join("; "))]
    Invalid { path: PathBuf, problems: Vec<String> },
    #[error("cannot watch resources file {path}: {error}")]
    Watch { path: PathBuf, error: notify::Error },
}

/// Parses resources from YAML or JSON text (JSON is YAML).
pub fn parse(text: &str) -> Result<Resources, serde_yaml_ng::Error> {
    serde_yaml_ng::from_str(text)
}

/// The resources file as applied to a [`ConfigStore`].
#[derive(Debug)]
pub struct ResourcesFile {
    path: PathBuf,
    store: Arc<ConfigStore>,
    /// Whom the priorities are computed for, and the mesh defaults: what istiod would use for this gateway.
    gateway: GatewayIdentity,
    mesh: MeshDefaults,
    last_applied: Option<String>,
}

/// The Envoy resources of `resources` as istiod would build them for `gateway`, or every problem found, each
/// located as `clusters[i] "name": field: problem`.
pub fn envoy_resources(
    resources: &Resources,
    gateway: &GatewayIdentity,
    mesh: &MeshDefaults,
) -> Result<gateway::GatewayResources, Vec<String>> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut built = Vec::with_capacity(resources.clusters.len());
    for (index, cluster) in resources.clusters.iter().enumerate() {
        let location = format!("clusters[{index}] {:?}", cluster.name);
        if !seen.insert(cluster.name.as_str()) {
            problems.push(format!("{location}: name: is defined twice"));
            continue;
        }
        match gateway::build(cluster, gateway, mesh) {
            Ok(cluster) => built.push(cluster),
            Err(errors) => problems.extend(errors.iter().map(|e| format!("{location}: {e}"))),
        }
    }
    if problems.is_empty() { Ok(gateway::GatewayResources::new(built)) } else { Err(problems) }
}

impl ResourcesFile {
    pub fn new(path: &Path, store: Arc<ConfigStore>, gateway: GatewayIdentity, mesh: MeshDefaults) -> Self {
        ResourcesFile { path: path.to_owned(), store, gateway, mesh, last_applied: None }
    }

    /// Reads, validates and applies the file if its content changed. Returns whether it was applied; every
    /// refusal, whatever its cause, is counted.
    pub fn reload(&mut self) -> Result<bool, FileError> {
        self.try_reload().inspect_err(|_| self.store.record_rejected())
    }

    fn try_reload(&mut self) -> Result<bool, FileError> {
        let path = &self.path;
        let text = std::fs::read_to_string(path).map_err(|error| FileError::Read { path: path.clone(), error })?;
        if self.last_applied.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let resources = parse(&text).map_err(|error| FileError::Parse { path: path.clone(), error })?;
        let invalid = |problems| FileError::Invalid { path: path.clone(), problems };
        let envoy = envoy_resources(&resources, &self.gateway, &self.mesh).map_err(invalid)?;
        self.store
            .replace(envoy.listener, envoy.clusters, envoy.assignments)
            .map_err(|rejected| invalid(rejected.iter().map(Rejected::to_string).collect()))?;
        self.last_applied = Some(text);
        Ok(true)
    }

    /// Follows the file until the gateway terminates. Refused versions are logged, and the last good one
    /// keeps serving.
    pub async fn watch(mut self, drain: Drain) -> Result<(), FileError> {
        let watch =
            FileWatch::start(&self.path).map_err(|error| FileError::Watch { path: self.path.clone(), error })?;
        watch.follow("configuration", drain.reached(Phase::Terminated), || self.reload()).await;
        Ok(())
    }
}
