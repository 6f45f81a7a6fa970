//! The process around each binary: logging that can neither panic nor block, and signals.
//!
//! tracing-subscriber's own stderr writer reports a failed write with `eprintln!`, which panics when stderr's
//! reader has gone (issue #11: the task that logged died, so the file watcher stopped and SIGTERM was ignored),
//! and blocks the thread that logs while the reader is slow. Here events are formatted where they happen and
//! queued to one writer thread; a full queue drops the line (the next line written says how many were lost)
//! and a failed write is ignored.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting for the writer thread; beyond this, new lines are dropped.
const QUEUE_LINES: usize = 4096;
/// How long the exit waits for queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// Installs the process's subscriber: `RUST_LOG`'s filter (default `info`), written to stderr by a thread of
/// its own. Keep the guard until the end of `main` (see [`Logging::exit`]).
pub fn init_logging() -> Logging {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = Lines { queue: queue.clone(), dropped: Arc::clone(&dropped) };
    // Without a writer thread lines go nowhere, which is still better than no process.
    let _ = std::thread::Builder::new().name("crossgate-log".into()).spawn(move || write_lines(&lines, &dropped));
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(writer)
        .log_internal_errors(false)
        .init();
    Logging { queue }
}

/// The end of logging: see [`Logging::exit`].
#[derive(Debug)]
pub struct Logging {
    queue: SyncSender<Message>,
}

impl Logging {
    /// Writes the lines still queued, then `main`'s error if any, and gives the exit code. Never panics: a
    /// closed stderr loses the message, not the exit code.
    pub fn exit(self, program: &str, result: anyhow::Result<()>) -> ExitCode {
        let (flushed, done) = mpsc::channel();
        if self.queue.try_send(Message::Flush(flushed)).is_ok() {
            let _ = done.recv_timeout(FLUSH_WAIT);
        }
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                let _ = writeln!(io::stderr(), "{program}: {error:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn write_lines(lines: &Receiver<Message>, dropped: &AtomicU64) {
    let mut stderr = io::stderr();
    for message in lines {
        match message {
            Message::Line(line) => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = writeln!(stderr, "crossgate: {lost} log lines dropped (stderr was not keeping up)");
                }
                let _ = stderr.write_all(&line);
            }
            Message::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// What the subscriber writes each event through.
struct Lines {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter { lines: self, line: Vec::new() }
    }
}

/// One event: collected by the subscriber's writes, queued when dropped.
struct LineWriter<'a> {
    lines: &'a Lines,
    line: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() && self.lines.queue.try_send(Message::Line(std::mem::take(&mut self.line))).is_err() {
            self.lines.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: drain, then exit.
    Drain,
    /// SIGINT: exit now.
    Now,
}

/// The process's signal handlers. From [`Signals::install`] on, SIGHUP no longer kills the process (its
/// default): it is ignored, and logged the first time.
#[derive(Debug)]
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    hangup_logged: bool,
}

impl Signals {
    /// Must be called inside a Tokio runtime, and as early as possible: before it, SIGHUP kills.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            hangup_logged: false,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn stop(&mut self) -> Stop {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return Stop::Drain,
                _ = self.interrupt.recv() => return Stop::Now,
                _ = self.hangup.recv() => {
                    if !std::mem::replace(&mut self.hangup_logged, true) {
                        tracing::info!("SIGHUP ignored: it neither stops nor reloads (configuration changes are followed as they come)");
                    }
                }
            }
        }
    }
}
