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
        let mut watcher = notify::recommended_watcher(move |_event| {
            let _ = events.send(());
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
                Ok(true) => tracing::info!(path = %self.path.display(), "{what} reloaded"),
                Ok(false) => {}
                Err(error) => tracing::error!(%error, "keeping the previous {what}"),
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
        let following = tokio::spawn(watch.follow(
            "config",
            async move {
                let _ = stopped.await;
            },
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(true)
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
        tokio::time::sleep(SETTLE * 3).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 1, "one update, one reload");
        stop.send(()).unwrap();
        following.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
