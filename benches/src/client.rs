//! The load client: a sidecar's outbound side. rustls with the testing PKI, Istio's SNI key and ALPNs, and a
//! full handshake on every connection (resumption off: a sidecar opening a new mTLS connection). Each phase
//! returns what it moved and every failure it saw; the harness turns that into figures.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossgate_proxy::testing::pki::WorkloadIdentity;
use crossgate_proxy::testing::workload;
use hdrhistogram::Histogram;
use rustls::ClientConfig;
use rustls::client::Resumption;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::backend::{ECHO, SINK};

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// The size of one request and of its response: a small RPC.
pub const REQUEST_BYTES: usize = 64;
/// Bulk is sent in batches of this size, each after its length.
const BULK_BATCH: u64 = 1 << 20;
const BULK_WRITE: usize = 64 * 1024;
/// Loopback source addresses the client spreads its connections over, each with its own ephemeral ports.
const SOURCE_ADDRESSES: u8 = 16;

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
    pub target: SocketAddr,
    pub sni: Arc<str>,
    next_source: Arc<AtomicUsize>,
}

impl Load {
    /// `identity` connects to servers whose certificate names `server_spiffe`, offering `alpn`.
    pub fn new(
        identity: &WorkloadIdentity,
        server_spiffe: &str,
        alpn: &[&[u8]],
        target: SocketAddr,
        sni: &str,
    ) -> Load {
        let mut config = ClientConfig::clone(&identity.client_config(server_spiffe, alpn));
        config.resumption = Resumption::disabled();
        Load { config: Arc::new(config), target, sni: sni.into(), next_source: Arc::new(AtomicUsize::new(0)) }
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

    /// A connection in echo mode, checked by one round trip.
    pub async fn open_echo(&self) -> io::Result<Tls> {
        let mut tls = self.open().await?;
        round_trip(&mut tls, 0, true).await?;
        Ok(tls)
    }

    /// Whether a new connection gets its echo back within `within`: readiness, and (negated) a refusal.
    pub async fn answers(&self, within: Duration) -> bool {
        matches!(tokio::time::timeout(within, self.open_echo()).await, Ok(Ok(_)))
    }

    /// (a) `concurrency` loops of: connect, handshake, one round trip, close. Returns connections and time.
    pub async fn connections(&self, concurrency: usize, duration: Duration) -> (Tally, Duration) {
        let start = Instant::now();
        let deadline = start + duration;
        let loops = (0..concurrency).map(|_| {
            let load = self.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    tally.record(load.open_echo().await);
                }
                tally
            })
        });
        let tally = join_tallies(loops.collect()).await;
        (tally, start.elapsed())
    }

    /// (b) Closed-loop round trips over `connections` kept-alive connections: returns round trips, their
    /// latencies in nanoseconds, and the time.
    pub async fn request_response(&self, connections: usize, duration: Duration) -> (Tally, Histogram<u64>, Duration) {
        let mut tally = Tally::default();
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            opened.extend(tally.record(self.open_echo().await));
        }
        let start = Instant::now();
        let deadline = start + duration;
        let loops: Vec<_> = opened
            .into_iter()
            .map(|mut tls| {
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let mut latencies = latency_histogram();
                    let mut seq = 1u64;
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        if tally.record(round_trip(&mut tls, seq, false).await).is_none() {
                            break;
                        }
                        latencies.saturating_record(sent.elapsed().as_nanos() as u64);
                        seq += 1;
                    }
                    (tally, latencies)
                })
            })
            .collect();
        let mut latencies = latency_histogram();
        for task in loops {
            let (loop_tally, loop_latencies) = task.await.expect("round-trip loop panicked");
            tally.merge(loop_tally);
            latencies.add(loop_latencies).expect("same bounds");
        }
        (tally, latencies, start.elapsed())
    }

    /// (c) `streams` connections each sending as fast as they can for `duration`; the backend confirms every
    /// byte. Returns streams, payload bytes delivered, and the time until the last confirmation.
    pub async fn bulk(&self, streams: usize, duration: Duration) -> (Tally, u64, Duration) {
        let mut tally = Tally::default();
        let mut opened = Vec::with_capacity(streams);
        for _ in 0..streams {
            opened.extend(tally.record(self.open().await));
        }
        let start = Instant::now();
        let deadline = start + duration;
        let senders: Vec<_> = opened.into_iter().map(|tls| tokio::spawn(send_bulk(tls, deadline))).collect();
        let mut bytes = 0;
        for sender in senders {
            bytes += tally.record(sender.await.expect("bulk sender panicked")).unwrap_or(0);
        }
        (tally, bytes, start.elapsed())
    }

    /// (d) `count` echo connections opened by `concurrency` loops and kept open by the caller.
    pub async fn hold(&self, count: usize, concurrency: usize) -> (Tally, Vec<Tls>) {
        let loops: Vec<_> = (0..concurrency)
            .map(|i| {
                let load = self.clone();
                let share = count / concurrency + usize::from(i < count % concurrency);
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let mut held = Vec::with_capacity(share);
                    for _ in 0..share {
                        held.extend(tally.record(load.open_echo().await));
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
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the response differs from the request"));
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
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("sent {sent} bytes, {confirmed} arrived")));
    }
    Ok(sent)
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
