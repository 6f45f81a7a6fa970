//! Following a configuration file as it changes: the gateway's resources file and the control service's mesh
//! file. Kubernetes updates a mounted ConfigMap by swapping a symlink in its directory, so the directory is
//! watched rather than the file, and a slow poll backs the watch up where events are missed.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Events are gathered for this long before reading, so that one editor save is one reload.
pub const SETTLE: Duration = Duration::from_millis(100);
/// The file is read this often even without an event.
pub const POLL: Duration = Duration::from_secs(5);

/// A watch on a file's directory, started before the file's first read so that no change in between is
/// missed.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    _watcher: RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
}

impl FileWatch {
    pub fn start(path: &Path) -> Result<FileWatch, notify::Error> {
        let (events, changes) = mpsc::unbounded_channel();
        let directory = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        // Only writes, creations, removals and renames: reading the file (ours included) fires access events
        // on the directory, and reacting to those would re-read the file forever.
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_))) {
                let _ = events.send(());
            }
        })?;
        watcher.watch(&directory, RecursiveMode::NonRecursive)?;
        Ok(FileWatch { path: path.to_owned(), _watcher: watcher, changes })
    }

    /// Calls `reload` whenever the file may have changed, until `shutdown` completes. `reload` says whether it
    /// took a new version; a version it refuses is logged, and whatever the caller holds keeps serving. `what`
    /// names the file in logs ("resources", "mesh").
    pub async fn follow<E: Display>(
        mut self,
        what: &str,
        shutdown: impl Future<Output = ()>,
        mut reload: impl FnMut() -> Result<bool, E>,
    ) {
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + POLL, POLL);
        tokio::pin!(shutdown);
        // A refusal is logged once, not at every poll while the file stays as it is.
        let mut last_error = None;
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                event = self.changes.recv() => {
                    if event.is_none() {
                        return;
                    }
                    tokio::time::sleep(SETTLE).await;
                    while self.changes.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            match reload() {
                Ok(true) => {
                    last_error = None;
                    tracing::info!(path = %self.path.display(), "{what} reloaded");
                }
                Ok(false) => {}
                Err(error) => {
                    let message = error.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::error!(error = %message, "keeping the previous {what}");
                        last_error = Some(message);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_rename_over_the_file_triggers_one_reload() {
        let dir = std::env::temp_dir().join(format!("crossgate-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        std::fs::write(&path, "a").unwrap();
        let watch = FileWatch::start(&path).unwrap();
        let reloads = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counted = Arc::clone(&reloads);
        let read = path.clone();
        let following = tokio::spawn(watch.follow(
            "config",
            async move {
                let _ = stopped.await;
            },
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                // Reading the file, as every caller does, must not look like a change.
                std::fs::read_to_string(&read).map(|_| true).map_err(|e| e.to_string())
            },
        ));
        // A ConfigMap-style update: a new file renamed over the old one.
        std::fs::write(dir.join("staging"), "b").unwrap();
        std::fs::rename(dir.join("staging"), &path).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while reloads.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no reload");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(SETTLE * 10).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 1, "one update, one reload, and the reload's own read is no change");
        stop.send(()).unwrap();
        following.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
