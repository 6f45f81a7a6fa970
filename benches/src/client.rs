//! The load client: a sidecar's outbound side. rustls, Istio's SNI key and ALPNs, and a full handshake on every
//! connection (resumption off: a sidecar opening a new mTLS connection). It speaks the backend's protocol:
//! HTTP/1.1 to nginx, echo and sink to the harness's own. Each phase returns what it moved and every failure
//! it saw; the harness turns that into figures.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossgate_proxy::testing::workload;
use hdrhistogram::Histogram;
use rustls::ClientConfig;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::backend::{BULK_FILE_BYTES, BackendKind, ECHO, RESPONSE_BODY, SINK};

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// The size of one request and of its response to the own backend: a small RPC.
pub const REQUEST_BYTES: usize = 64;
/// Bulk is sent to the own backend in batches of this size, each after its length.
const BULK_BATCH: u64 = 1 << 20;
const BULK_WRITE: usize = 64 * 1024;
/// Loopback source addresses the client spreads its connections over, each with its own ephemeral ports.
const SOURCE_ADDRESSES: u8 = 16;
const GET_SMALL: &[u8] = b"GET /r HTTP/1.1\r\nHost: echo.bench.svc.cluster.local\r\n\r\n";
const GET_BULK: &[u8] = b"GET /bulk HTTP/1.1\r\nHost: echo.bench.svc.cluster.local\r\n\r\n";
/// The name of the thread that paces an open-loop phase (counted as the client's CPU).
const PACER_THREAD: &str = "bench-pacer";

/// What an open-loop phase offered and got.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OpenLoopRun {
    pub offered_per_s: f64,
    pub answered_per_s: f64,
    /// Seconds from the first scheduled request to the last answer: about the phase when the target kept up.
    pub finished_s: f64,
}

impl OpenLoopRun {
    /// Whether the target answered the load as offered, without a backlog at the end.
    pub fn kept_up(&self, phase: Duration) -> bool {
        self.answered_per_s >= 0.95 * self.offered_per_s && self.finished_s <= phase.as_secs_f64() * 1.1 + 0.05
    }
}

/// Successes, failures, and the first failure's reason (what the report shows).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl Tally {
    fn record<T>(&mut self, result: io::Result<T>) -> Option<T> {
        match result {
            Ok(value) => {
                self.ok += 1;
                Some(value)
            }
            Err(error) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| error.to_string());
                None
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Connections to one target with one SNI.
#[derive(Debug, Clone)]
pub struct Load {
    config: Arc<ClientConfig>,
    backend: BackendKind,
    pub target: SocketAddr,
    pub sni: Arc<str>,
    next_source: Arc<AtomicUsize>,
}

impl Load {
    /// Connections with `config` to `target`, speaking `backend`'s protocol.
    pub fn new(config: Arc<ClientConfig>, backend: BackendKind, target: SocketAddr, sni: &str) -> Load {
        Load { config, backend, target, sni: sni.into(), next_source: Arc::new(AtomicUsize::new(0)) }
    }

    /// A TCP connection from the next of 127.0.0.2.. and the TLS handshake over it.
    pub async fn open(&self) -> io::Result<Tls> {
        let index = self.next_source.fetch_add(1, Ordering::Relaxed) % usize::from(SOURCE_ADDRESSES);
        let source = Ipv4Addr::new(127, 0, 0, 2 + index as u8);
        let socket = TcpSocket::new_v4()?;
        // Closing sends a RST instead of a FIN, so the client side never holds a TIME_WAIT socket.
        socket.set_zero_linger()?;
        socket.set_nodelay(true)?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let tcp = socket.connect(self.target).await?;
        workload::connect_over(tcp, &self.sni, Arc::clone(&self.config)).await
    }

    /// A connection checked by one exchange.
    pub async fn open_checked(&self) -> io::Result<Tls> {
        let mut tls = self.open().await?;
        self.exchange(&mut tls, 0, true).await?;
        Ok(tls)
    }

    /// One small request and its response, checked byte for byte.
    async fn exchange(&self, tls: &mut Tls, seq: u64, first: bool) -> io::Result<()> {
        match self.backend {
            BackendKind::Own => round_trip(tls, seq, first).await,
            BackendKind::Nginx => http_get(tls, GET_SMALL, Some(RESPONSE_BODY)).await.map(drop),
        }
    }

    /// Whether a new connection gets its answer within `within`: readiness, and (negated) a refusal.
    pub async fn answers(&self, within: Duration) -> bool {
        matches!(tokio::time::timeout(within, self.open_checked()).await, Ok(Ok(_)))
    }

    /// (a) `concurrency` loops of: connect, handshake, one exchange, close. Returns connections and time.
    pub async fn connections(&self, concurrency: usize, duration: Duration) -> (Tally, Duration) {
        let start = Instant::now();
        let deadline = start + duration;
        let loops = (0..concurrency).map(|_| {
            let load = self.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    tally.record(load.open_checked().await);
                }
                tally
            })
        });
        let tally = join_tallies(loops.collect()).await;
        (tally, start.elapsed())
    }

    /// (b) Closed-loop exchanges over `connections` (from [`Load::hold`]): returns exchanges, their latencies
    /// in nanoseconds, and the time.
    pub async fn request_response(
        &self,
        connections: Vec<Tls>,
        duration: Duration,
    ) -> (Tally, Histogram<u64>, Duration) {
        let start = Instant::now();
        let deadline = start + duration;
        let now_until_deadline = move || async move {
            let now = Instant::now();
            (now < deadline).then_some(now)
        };
        let (tally, latencies) = self.exchange_loops(connections, now_until_deadline, None).await;
        (tally, latencies, start.elapsed())
    }

    /// (e) Open loop: requests scheduled evenly at `rate` per second for `duration`, each taken by whichever
    /// of `connections` is free. A latency counts from the request's scheduled time, so a slow response delays
    /// the requests queued behind it in the figures too (no coordinated omission). Requests still queued at
    /// twice the duration are not sent; their wait so far is recorded. A thread of its own paces
    /// the schedule: tokio's timer ticks in milliseconds, coarser than the gaps between requests.
    pub async fn open_loop(
        &self,
        connections: Vec<Tls>,
        rate: f64,
        duration: Duration,
    ) -> (Tally, Histogram<u64>, OpenLoopRun) {
        let (schedule, queue) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let pacer = std::thread::Builder::new()
            .name(PACER_THREAD.to_owned())
            .spawn(move || {
                let mut next = start;
                while next < start + duration && schedule.send(next).is_ok() {
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
            .expect("a pacer thread");
        let scheduled = move || {
            let queue = Arc::clone(&queue);
            async move { queue.lock().await.recv().await }
        };
        let (tally, latencies) = self.exchange_loops(connections, scheduled, Some(start + 2 * duration)).await;
        let finished = start.elapsed();
        let _ = pacer.join();
        let run = OpenLoopRun {
            offered_per_s: rate,
            answered_per_s: tally.ok as f64 / duration.as_secs_f64(),
            finished_s: finished.as_secs_f64(),
        };
        (tally, latencies, run)
    }

    /// An exchange loop on each of `connections`: `next` gives each exchange's start (now in a closed loop,
    /// the scheduled time in an open one) or ends the loop, and its latency counts from there. After
    /// `give_up`, only the wait is recorded: the target has fallen behind. Returns exchanges and latencies.
    async fn exchange_loops<F, Next>(
        &self,
        connections: Vec<Tls>,
        next: F,
        give_up: Option<Instant>,
    ) -> (Tally, Histogram<u64>)
    where
        F: Fn() -> Next + Clone + Send + 'static,
        Next: Future<Output = Option<Instant>> + Send,
    {
        let loops: Vec<_> = connections
            .into_iter()
            .map(|mut tls| {
                let (next, load) = (next.clone(), self.clone());
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let mut latencies = latency_histogram();
                    let mut seq = 1u64;
                    while let Some(since) = next().await {
                        if give_up.is_none_or(|at| Instant::now() <= at)
                            && tally.record(load.exchange(&mut tls, seq, false).await).is_none()
                        {
                            break;
                        }
                        latencies.saturating_record(since.elapsed().as_nanos() as u64);
                        seq += 1;
                    }
                    (tally, latencies)
                })
            })
            .collect();
        let mut tally = Tally::default();
        let mut latencies = latency_histogram();
        for task in loops {
            let (task_tally, task_latencies) = task.await.expect("exchange loop panicked");
            tally.merge(task_tally);
            latencies.add(task_latencies).expect("same bounds");
        }
        (tally, latencies)
    }

    /// (c) `streams` connections each moving bytes as fast as they can for `duration`: sent to the own backend,
    /// which confirms every byte, or fetched from nginx, each response whole. Returns streams, payload bytes
    /// moved, and the time until the last one arrived.
    pub async fn bulk(&self, streams: usize, duration: Duration) -> (Tally, u64, Duration) {
        let mut tally = Tally::default();
        let mut opened = Vec::with_capacity(streams);
        for _ in 0..streams {
            opened.extend(tally.record(self.open().await));
        }
        let start = Instant::now();
        let deadline = start + duration;
        let movers: Vec<_> = opened
            .into_iter()
            .map(|tls| match self.backend {
                BackendKind::Own => tokio::spawn(send_bulk(tls, deadline)),
                BackendKind::Nginx => tokio::spawn(fetch_bulk(tls, deadline)),
            })
            .collect();
        let mut bytes = 0;
        for mover in movers {
            bytes += tally.record(mover.await.expect("bulk task panicked")).unwrap_or(0);
        }
        (tally, bytes, start.elapsed())
    }

    /// (d) `count` checked connections opened by `concurrency` loops and kept open by the caller.
    pub async fn hold(&self, count: usize, concurrency: usize) -> (Tally, Vec<Tls>) {
        let loops: Vec<_> = (0..concurrency)
            .map(|i| {
                let load = self.clone();
                let share = count / concurrency + usize::from(i < count % concurrency);
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let mut held = Vec::with_capacity(share);
                    for _ in 0..share {
                        held.extend(tally.record(load.open_checked().await));
                    }
                    (tally, held)
                })
            })
            .collect();
        let mut tally = Tally::default();
        let mut held = Vec::with_capacity(count);
        for task in loops {
            let (loop_tally, loop_held) = task.await.expect("opening loop panicked");
            tally.merge(loop_tally);
            held.extend(loop_held);
        }
        (tally, held)
    }
}

/// One request and its response, compared byte for byte. The first carries the mode byte in the same write,
/// so that a new connection costs exactly one exchange after the handshake.
async fn round_trip(tls: &mut Tls, seq: u64, first: bool) -> io::Result<()> {
    let mut message = [ECHO; 1 + REQUEST_BYTES];
    for (i, word) in message[1..].chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&seq.wrapping_mul(31).wrapping_add(i as u64).to_le_bytes());
    }
    tls.write_all(if first { &message } else { &message[1..] }).await?;
    tls.flush().await?;
    let mut response = [0u8; REQUEST_BYTES];
    tls.read_exact(&mut response).await?;
    if response[..] != message[1..] {
        return Err(invalid("the response differs from the request".to_owned()));
    }
    Ok(())
}

async fn send_bulk(mut tls: Tls, deadline: Instant) -> io::Result<u64> {
    static PAYLOAD: [u8; BULK_WRITE] = [0x5a; BULK_WRITE];
    tls.write_all(&[SINK]).await?;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        tls.write_u64(BULK_BATCH).await?;
        for _ in 0..BULK_BATCH / BULK_WRITE as u64 {
            tls.write_all(&PAYLOAD).await?;
        }
        sent += BULK_BATCH;
    }
    tls.write_u64(0).await?;
    tls.flush().await?;
    let confirmed = tls.read_u64().await?;
    if confirmed != sent {
        return Err(invalid(format!("sent {sent} bytes, {confirmed} arrived")));
    }
    Ok(sent)
}

/// Fetches the bulk file over and over until `deadline`.
async fn fetch_bulk(mut tls: Tls, deadline: Instant) -> io::Result<u64> {
    let mut received = 0;
    while Instant::now() < deadline {
        let length = http_get(&mut tls, GET_BULK, None).await?;
        if length != BULK_FILE_BYTES {
            return Err(invalid(format!("a {length}-byte bulk response, {BULK_FILE_BYTES} expected")));
        }
        received += length;
    }
    Ok(received)
}

/// One HTTP/1.1 request and its response (200, with a Content-Length): returns the body's length. A body
/// `expect`ed is compared byte for byte; otherwise it is only counted. TLS protects every byte end to end,
/// so a proxy that changed one would fail the record's check.
async fn http_get(tls: &mut Tls, request: &[u8], expect: Option<&[u8]>) -> io::Result<u64> {
    tls.write_all(request).await?;
    tls.flush().await?;
    let mut head = [0u8; 1024];
    let mut filled = 0;
    let (start, length) = loop {
        match tls.read(&mut head[filled..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
        if let Some(end) = head[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break (end + 4, content_length(&head[..end])?);
        }
        if filled == head.len() {
            return Err(invalid("a response header over 1 KiB".to_owned()));
        }
    };
    let early = (filled - start) as u64;
    if early > length {
        return Err(invalid("more bytes than the response's body".to_owned()));
    }
    match expect {
        Some(expected) => {
            let end = start + expected.len();
            if length != expected.len() as u64 || end > head.len() {
                return Err(invalid(format!("a {length}-byte body, {} expected", expected.len())));
            }
            tls.read_exact(&mut head[filled..end]).await?;
            if head[start..end] != *expected {
                return Err(invalid("the response's body differs".to_owned()));
            }
        }
        None => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = length - early;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                match tls.read(&mut buf[..want]).await? {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => left -= n as u64,
                }
            }
        }
    }
    Ok(length)
}

/// A 200 response header's Content-Length.
fn content_length(head: &[u8]) -> io::Result<u64> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("a response header that is not UTF-8".to_owned()))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(invalid(format!("status {status:?}")));
    }
    lines
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| invalid("no Content-Length".to_owned()))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// 1 ns to 60 s at 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

async fn join_tallies(tasks: Vec<JoinHandle<Tally>>) -> Tally {
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.expect("load loop panicked"));
    }
    tally
}
