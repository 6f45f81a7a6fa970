//! Upstream connect (timeouts, retry on another endpoint) and the two-way copy of a tunnel, honouring
//! half-close, propagating resets, and counting bytes as they move.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep, sleep_until, timeout};

mod copy;

pub use copy::CopyMode;
use copy::{MoveError, Mover};

use crate::config::Keepalive;
use crate::drain::{Drain, Phase};
use crate::lb::{Outcome, PickContext};
use crate::metrics::RejectReason;
use crate::route::RouteCluster;

/// Sets the options both sides of a tunnel get: no Nagle delay (TLS records are already framed) and
/// keepalive probes so that dead peers are noticed. Set on a listener, they are inherited by every socket it
/// accepts.
pub fn tune_socket(socket: SockRef<'_>, keepalive: &Keepalive) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new().with_time(keepalive.time).with_interval(keepalive.interval).with_retries(keepalive.probes),
    )
}

/// Why a connection that matched a cluster ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their write half.
    Complete,
    DownstreamReset,
    UpstreamReset,
    IdleTimeout,
    MaxDuration,
    /// Closed by the end of the termination grace.
    Terminated,
}

/// An upstream connection and the host it goes to.
pub struct Connected {
    pub stream: TcpStream,
    pub endpoint: usize,
    pub address: SocketAddr,
    /// Holds the host's open-connection count (LEAST_REQUEST) until the tunnel ends.
    _picked: crate::lb::Picked,
}

/// Picks endpoints and connects, trying up to `attempts` different endpoints; each failure is counted.
pub async fn connect(cluster: &RouteCluster, source: SocketAddr, attempts: usize) -> Result<Connected, RejectReason> {
    let mut tried = Vec::new();
    for _ in 0..attempts {
        let ctx = PickContext { source: source.ip(), tried: &tried };
        let Some(picked) = cluster.lb.pick(&ctx, &mut rand::rng()) else { break };
        let host = &cluster.lb.hosts()[picked.index];
        let address = host.spec.address;
        cluster.metrics.upstream_cx_total.increment(1);
        let outcome = timeout(cluster.settings.connect_timeout, connect_to(address, &cluster.settings.keepalive)).await;
        let now = std::time::Instant::now();
        match outcome {
            Ok(Ok(stream)) => {
                cluster.lb.report(picked.index, Outcome::ConnectSuccess, now);
                return Ok(Connected { stream, endpoint: picked.index, address, _picked: picked });
            }
            Ok(Err(error)) => {
                cluster.lb.report(picked.index, Outcome::ConnectFailure, now);
                cluster.metrics.upstream_cx_connect_fail.increment(1);
                tracing::debug!(cluster = %cluster.name, %address, %error, "upstream connect failed");
            }
            Err(_) => {
                cluster.lb.report(picked.index, Outcome::ConnectTimeout, now);
                cluster.metrics.upstream_cx_connect_timeout.increment(1);
                tracing::debug!(cluster = %cluster.name, %address, "upstream connect timed out");
            }
        }
        tried.push(picked.index);
    }
    if tried.is_empty() {
        cluster.metrics.upstream_cx_none_healthy.increment(1);
        Err(RejectReason::NoHealthyUpstream)
    } else {
        Err(RejectReason::UpstreamConnectFailed)
    }
}

pub async fn connect_to(address: SocketAddr, keepalive: &Keepalive) -> io::Result<TcpStream> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    tune_socket(SockRef::from(&socket), keepalive)?;
    socket.connect(address).await
}

/// The byte counters of one tunnel, live while it is open.
#[derive(Debug, Clone, Copy)]
pub struct TunnelCounters<'a> {
    /// Client to server (Istio's received bytes).
    pub request: &'a Counter,
    /// Server to client (Istio's sent bytes).
    pub response: &'a Counter,
}

/// Limits on one tunnel's life, and how it moves bytes.
#[derive(Debug, Clone, Copy)]
pub struct TunnelLimits {
    pub idle_timeout: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub copy: CopyMode,
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelOutcome {
    pub end: TunnelEnd,
    /// Bytes the upstream sent back: a reset before any is an upstream failure for outlier detection.
    pub response_bytes: u64,
}

/// Copies both ways until both sides have closed their write half, an error resets the tunnel, or a
/// limit or termination ends it. A reset on one side is passed on to the other as a reset.
pub async fn tunnel(
    downstream: &TcpStream,
    upstream: &TcpStream,
    counters: TunnelCounters<'_>,
    limits: TunnelLimits,
    drain: &Drain,
) -> TunnelOutcome {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (request_bytes, response_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let direction =
        |from, to, counter, moved| Direction { from, to, counter, moved, start, last_activity: &last_activity };
    let request = direction(downstream, upstream, counters.request, &request_bytes).pump(limits.copy);
    let response = direction(upstream, downstream, counters.response, &response_bytes).pump(limits.copy);
    tokio::pin!(request, response);
    let (mut request_done, mut response_done) = (false, false);
    let idle = sleep(limits.idle_timeout.unwrap_or(Duration::MAX / 4));
    tokio::pin!(idle);
    let max_duration = sleep_until(start + limits.max_duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(max_duration);
    let terminated = drain.reached(Phase::Terminated);
    tokio::pin!(terminated);
    let end = loop {
        tokio::select! {
            result = &mut request, if !request_done => match result {
                Ok(()) => request_done = true,
                Err(MoveError::Read) => break TunnelEnd::DownstreamReset,
                Err(MoveError::Write) => break TunnelEnd::UpstreamReset,
            },
            result = &mut response, if !response_done => match result {
                Ok(()) => response_done = true,
                Err(MoveError::Read) => break TunnelEnd::UpstreamReset,
                Err(MoveError::Write) => break TunnelEnd::DownstreamReset,
            },
            () = &mut idle, if limits.idle_timeout.is_some() => {
                let idle_timeout = limits.idle_timeout.unwrap_or_default();
                let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if last.elapsed() >= idle_timeout {
                    break TunnelEnd::IdleTimeout;
                }
                idle.as_mut().reset(last + idle_timeout);
            }
            () = &mut max_duration, if limits.max_duration.is_some() => break TunnelEnd::MaxDuration,
            () = &mut terminated => break TunnelEnd::Terminated,
        }
        if request_done && response_done {
            break TunnelEnd::Complete;
        }
    };
    // A reset seen on one side becomes a reset on the other (SO_LINGER 0 sends RST on close), as Envoy's
    // tcp_proxy does; every other end closes normally.
    match end {
        TunnelEnd::DownstreamReset => {
            let _ = upstream.set_zero_linger();
        }
        TunnelEnd::UpstreamReset => {
            let _ = downstream.set_zero_linger();
        }
        _ => {}
    }
    TunnelOutcome { end, response_bytes: response_bytes.load(Ordering::Relaxed) }
}

/// One direction of a tunnel and its accounting.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    counter: &'a Counter,
    moved: &'a AtomicU64,
    start: Instant,
    last_activity: &'a AtomicU64,
}

impl Direction<'_> {
    /// Moves bytes until EOF, then passes the EOF on as a FIN (half-close).
    async fn pump(self, copy: CopyMode) -> Result<(), MoveError> {
        let mut mover = Mover::new(copy);
        loop {
            let n = mover.move_chunk(self.from, self.to).await?;
            if n == 0 {
                break;
            }
            self.counter.increment(n as u64);
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
            self.last_activity.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        // The peer may already be gone; the other direction reports that.
        let _ = SockRef::from(self.to).shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}
