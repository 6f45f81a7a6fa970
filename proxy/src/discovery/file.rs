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
    #[error("cannot read resources file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("resources file {path} is not valid crossgate.discovery.v1.Resources: {source}")]
    Parse { path: PathBuf, source: serde_yaml_ng::Error },
    #[error("resources file {path} was refused, {source}")]
    Invalid { path: PathBuf, source: InvalidResources },
    #[error("cannot watch resources file {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
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
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.clone(), source })?;
        if self.last_applied.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let resources = parse(&text).map_err(|source| FileError::Parse { path: path.clone(), source })?;
        self.store.apply(&resources).map_err(|source| FileError::Invalid { path: path.clone(), source })?;
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
        .map_err(|source| FileError::Watch { path: self.path.clone(), source })?;
        watcher
            .watch(&directory, RecursiveMode::NonRecursive)
            .map_err(|source| FileError::Watch { path: self.path.clone(), source })?;
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
