//! For the chaos tests: a binary run as a child process under a descriptor limit, with its CPU time and its
//! log lines counted, and the clients that press on its side doors.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How much of the log is kept for assertions; lines past it are only counted.
const KEPT_LOG: usize = 64 * 1024;
/// Linux's USER_HZ, the unit of /proc/PID/stat's CPU times, on every architecture it runs on.
const TICKS_PER_SECOND: u64 = 100;

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct LimitedChild {
    child: Child,
    lines: Arc<AtomicU64>,
    log: Arc<Mutex<String>>,
    readers: [JoinHandle<()>; 2],
}

impl LimitedChild {
    /// Runs `program` with `args` and RLIMIT_NOFILE set to `max_files` (through the shell's `ulimit`), its
    /// stdout and stderr read and counted line by line.
    pub fn spawn(program: &str, args: &[String], max_files: u32) -> LimitedChild {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n "$0" && exec "$@""#)
            .arg(max_files.to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the child");
        let (lines, log) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(String::new())));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = [count_lines(stdout, &lines, &log), count_lines(stderr, &lines, &log)];
        LimitedChild { child, lines, log, readers }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Lines written to stdout and stderr so far.
    pub fn log_lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// The first 64 KiB of stdout and stderr, as they came.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Closes the read ends of the child's stdout and stderr: its next writes there fail (EPIPE).
    pub async fn close_output(&mut self) {
        for reader in &mut self.readers {
            reader.abort();
            let _ = reader.await;
        }
    }

    /// User and system CPU time the child has used.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("read /proc/PID/stat");
        // After the command name, which is in parentheses and may hold spaces: utime and stime are the 12th
        // and 13th fields.
        let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
    }

    /// Sends `signal` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").args(["-s", signal, &self.pid().to_string()]).status();
        assert!(status.is_ok_and(|status| status.success()), "kill -s {signal}");
    }

    /// Its exit status if it exits within `within`.
    pub async fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait()).await.ok().map(|status| status.expect("wait"))
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// Reads `output` line by line: counts every line in `lines`, and keeps the first 64 KiB in `log`.
fn count_lines(
    output: impl AsyncRead + Unpin + Send + 'static,
    lines: &Arc<AtomicU64>,
    log: &Arc<Mutex<String>>,
) -> JoinHandle<()> {
    let (lines, log) = (Arc::clone(lines), Arc::clone(log));
    tokio::spawn(async move {
        let mut reader = BufReader::new(output).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.fetch_add(1, Ordering::Relaxed);
            let mut log = log.lock().expect("log lock");
            if log.len() < KEPT_LOG {
                log.push_str(&line);
                log.push('\n');
            }
        }
    })
}

/// A loopback address free a moment ago, for a child whose ports must be known before it starts.
pub fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("bound")
}

/// Opens up to `count` connections to `address` and holds them, sending nothing: the ones that connected
/// within a second each.
pub async fn hold_idle(address: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address)).await {
            held.push(stream);
        }
    }
    held
}

/// `GET path` over HTTP/1.1 with `Connection: close`: the status code and body, or the failure, within 5 s.
pub async fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
