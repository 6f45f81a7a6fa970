//! The static resources file: the YAML (or JSON) form of `crossgate.discovery.v1.Resources`, reloaded when
//! it changes (see `crossgate_files`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossgate_files::FileWatch;
use crossgate_proto::Resources;

use super::ConfigStore;
use crate::drain::{Drain, Phase};
use crate::route::InvalidResources;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    // The causes are part of each message (not `source`), so that a log line carries the whole story once.
    #[error("cannot read resources file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("resources file {path} is not valid crossgate.discovery.v1.Resources: {error}")]
    Parse { path: PathBuf, error: serde_yaml_ng::Error },
    #[error("resources file {path} was refused, {error}")]
    Invalid { path: PathBuf, error: InvalidResources },
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
    last_applied: Option<String>,
}

impl ResourcesFile {
    pub fn new(path: &Path, store: Arc<ConfigStore>) -> Self {
        ResourcesFile { path: path.to_owned(), store, last_applied: None }
    }

    /// Reads, validates and applies the file if its content changed. Returns whether it was applied.
    pub fn reload(&mut self) -> Result<bool, FileError> {
        let path = &self.path;
        let text = std::fs::read_to_string(path).map_err(|error| FileError::Read { path: path.clone(), error })?;
        if self.last_applied.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let resources = parse(&text).map_err(|error| FileError::Parse { path: path.clone(), error })?;
        self.store.apply(&resources).map_err(|error| FileError::Invalid { path: path.clone(), error })?;
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
