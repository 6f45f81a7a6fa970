//! The static resources file: the YAML (or JSON) form of `crossgate.discovery.v1.Resources`, reloaded when
//! it changes. Kubernetes updates a mounted ConfigMap by swapping a symlink in its directory, so the
//! directory is watched, and a slow poll backs the watch up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossgate_proto::Resources;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::ConfigStore;
use crate::drain::{Drain, Phase};
use crate::route::InvalidResources;

/// Events are gathered for this long before reading, so that one editor save is one reload.
const SETTLE: Duration = Duration::from_millis(100);
/// Reads the file this often even without an event.
const POLL: Duration = Duration::from_secs(5);

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
        let (events, mut changes) = mpsc::unbounded_channel();
        let directory = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut watcher = notify::recommended_watcher(move |_event| {
            let _ = events.send(());
        })
        .map_err(|error| FileError::Watch { path: self.path.clone(), error })?;
        watcher
            .watch(&directory, RecursiveMode::NonRecursive)
            .map_err(|error| FileError::Watch { path: self.path.clone(), error })?;
        let mut poll = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = drain.reached(Phase::Terminated) => return Ok(()),
                event = changes.recv() => {
                    if event.is_none() {
                        return Ok(());
                    }
                    tokio::time::sleep(SETTLE).await;
                    while changes.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            match self.reload() {
                Ok(true) => tracing::info!(path = %self.path.display(), "resources reloaded"),
                Ok(false) => {}
                Err(error) => tracing::error!(%error, "keeping the previous configuration"),
            }
        }
    }
}
