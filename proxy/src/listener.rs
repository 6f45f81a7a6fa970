//! The :15443 accept loop and the life of one downstream connection: peek the ClientHello under a deadline
//! and a size cap, route it by SNI and ALPN, connect upstream, tunnel. Every connection that cannot be
//! routed is closed and counted with its reason.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::config::Keepalive;
use crate::discovery::ConfigStore;
use crate::drain::{ConnectionCount, Drain, Phase};
use crate::forward::{self, CopyMode, TunnelCounters, TunnelEnd, TunnelLimits, TunnelOutcome};
use crate::lb::Outcome;
use crate::metrics::{ListenerMetrics, RejectReason};
use crate::route::{RouteCluster, is_istio_alpn};
use crate::tls::hello::{self, HelloError, MAX_HELLO_BYTES, Parse};

/// The first read's buffer; most hellos fit, post-quantum ones grow it once.
const INITIAL_HELLO_BUFFER: usize = 2048;

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    pub routing: Routing,
    pub metrics: ListenerMetrics,
    pub connections: Arc<ConnectionCount>,
    pub drain: Drain,
    pub limits: Limits,
}

/// The gateway-wide limits every listener applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub hello_timeout: Duration,
    pub connect_attempts: usize,
    pub max_downstream_connections: usize,
    pub keepalive: Keepalive,
    pub copy: CopyMode,
}

/// Where a listener sends connections.
#[derive(Debug)]
pub enum Routing {
    /// Istio's AUTO_PASSTHROUGH: by SNI and ALPN to the clusters of the current snapshot.
    Sni(Arc<ConfigStore>),
    /// Every TLS connection to one upstream, whatever its SNI: Istio's `expose-istiod` PASSTHROUGH routes
    /// (`sniHosts: ["*"]`) for istiod's XDS/CA (15012) and webhook (15017) ports.
    Passthrough(Passthrough),
}

#[derive(Debug)]
pub struct Passthrough {
    /// `host:port`, resolved for each connection (a Service name in the cluster's DNS).
    pub upstream: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
    pub connect_failures: Counter,
}

impl Passthrough {
    pub fn new(upstream: &str, listener: &str, connect_timeout: Duration, idle_timeout: Option<Duration>) -> Self {
        let labels = [("listener", listener.to_owned()), ("upstream", upstream.to_owned())];
        Passthrough {
            upstream: upstream.to_owned(),
            connect_timeout,
            idle_timeout,
            request_bytes: metrics::counter!("crossgate_passthrough_received_bytes_total", &labels),
            response_bytes: metrics::counter!("crossgate_passthrough_sent_bytes_total", &labels),
            connect_failures: metrics::counter!("crossgate_passthrough_connect_fail_total", &labels),
        }
    }
}

/// The listen backlog (the kernel caps it at `net.core.somaxconn`): bursts wait there rather than be refused.
const BACKLOG: i32 = 4096;

/// Binds one listening socket per worker to `address`, with SO_REUSEPORT, so that the kernel spreads new
/// connections over the workers and none of them contends on a shared accept queue. Given port 0, the first
/// socket picks the port and the others join it. Each is tuned as tunnel sockets are (see
/// [`forward::tune_socket`]): accepted sockets inherit the options, which saves five syscalls per connection.
pub fn bind_group(address: SocketAddr, workers: usize, keepalive: &Keepalive) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_reusable(address, keepalive)?;
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..workers {
        group.push(bind_reusable(bound, keepalive)?);
    }
    Ok(group)
}

fn bind_reusable(address: SocketAddr, keepalive: &Keepalive) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own bind: a restarted gateway may bind while its predecessor's sockets are in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    forward::tune_socket(SockRef::from(&socket), keepalive)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Accepts until the drain closes the listener.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let closed = shared.drain.reached(Phase::ListenerClosed);
    tokio::pin!(closed);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut closed => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(stream, peer, Arc::clone(&shared)));
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning; the backlog holds the rest.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("listener closed");
}

/// Increments a gauge for as long as it lives.
struct GaugeGuard<'a>(&'a Gauge);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

async fn serve_connection(mut downstream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let (_open, open_now) = shared.connections.open();
    let metrics = &shared.metrics;
    metrics.downstream_cx_total.increment(1);
    let _active = GaugeGuard::new(&metrics.downstream_cx_active);
    let outcome = if open_now > shared.limits.max_downstream_connections {
        Err(RejectReason::DownstreamOverflow)
    } else {
        // Nagle and keepalive were set on the listener, and came with the socket.
        route_and_forward(&mut downstream, peer, &shared).await
    };
    if let Err(reason) = outcome {
        metrics.rejected(reason).increment(1);
        tracing::debug!(%peer, reason = reason.label(), "connection refused");
    }
}

async fn route_and_forward(downstream: &mut TcpStream, peer: SocketAddr, shared: &Shared) -> Result<(), RejectReason> {
    let mut hello_bytes = Vec::with_capacity(INITIAL_HELLO_BUFFER);
    tokio::select! {
        read = timeout(shared.limits.hello_timeout, read_hello(downstream, &mut hello_bytes)) => {
            read.map_err(|_| RejectReason::HelloTimeout)??;
        }
        () = shared.drain.reached(Phase::Terminated) => return Ok(()),
    }
    match &shared.routing {
        Routing::Sni(store) => {
            let cluster = route(&hello_bytes, store)?;
            forward_to(downstream, peer, hello_bytes, &cluster, shared).await
        }
        Routing::Passthrough(passthrough) => pass_through(downstream, hello_bytes, passthrough, shared).await,
    }
}

/// Connects to the passthrough upstream (each resolved address in turn) and tunnels.
async fn pass_through(
    downstream: &mut TcpStream,
    hello_bytes: Vec<u8>,
    passthrough: &Passthrough,
    shared: &Shared,
) -> Result<(), RejectReason> {
    let connect = async {
        let addresses = tokio::net::lookup_host(&passthrough.upstream).await.ok()?;
        for address in addresses.take(shared.limits.connect_attempts) {
            match timeout(passthrough.connect_timeout, forward::connect_to(address, &shared.limits.keepalive)).await {
                Ok(Ok(stream)) => return Some(stream),
                _ => passthrough.connect_failures.increment(1),
            }
        }
        None
    };
    let Some(mut upstream) = connect.await else {
        tracing::debug!(upstream = %passthrough.upstream, "passthrough upstream unreachable");
        return Err(RejectReason::UpstreamConnectFailed);
    };
    if upstream.write_all(&hello_bytes).await.is_err() {
        return Ok(());
    }
    passthrough.request_bytes.increment(hello_bytes.len() as u64);
    drop(hello_bytes);
    let counters = TunnelCounters { request: &passthrough.request_bytes, response: &passthrough.response_bytes };
    let limits = TunnelLimits { idle_timeout: passthrough.idle_timeout, max_duration: None, copy: shared.limits.copy };
    forward::tunnel(downstream, &upstream, counters, limits, &shared.drain).await;
    Ok(())
}

/// Reads until `buf` holds a whole ClientHello (or more: early data may follow it, and is forwarded).
async fn read_hello(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), RejectReason> {
    loop {
        match hello::parse(buf) {
            Ok(Parse::Complete(_)) => return Ok(()),
            Ok(Parse::NeedMore) => {}
            Err(error) => return Err(hello_reject(&error)),
        }
        if buf.len() >= MAX_HELLO_BYTES {
            return Err(RejectReason::HelloTooLarge);
        }
        if buf.len() == buf.capacity() {
            buf.reserve((buf.capacity() * 2).min(MAX_HELLO_BYTES) - buf.len());
        }
        let limit = MAX_HELLO_BYTES - buf.len();
        match (&mut *stream).take(limit as u64).read_buf(buf).await {
            Ok(0) | Err(_) => return Err(RejectReason::ClosedBeforeHello),
            Ok(_) => {}
        }
    }
}

fn hello_reject(error: &HelloError) -> RejectReason {
    match error {
        HelloError::NotTls => RejectReason::NotTls,
        HelloError::NotClientHello => RejectReason::NotClientHello,
        HelloError::TooLarge => RejectReason::HelloTooLarge,
        HelloError::Malformed(_) => RejectReason::MalformedHello,
    }
}

/// The cluster the hello asks for, as Envoy's AUTO_PASSTHROUGH filter chains match: the SNI names a known
/// cluster and the client offers one of Istio's mTLS ALPNs.
fn route(hello_bytes: &[u8], store: &ConfigStore) -> Result<Arc<RouteCluster>, RejectReason> {
    let Ok(Parse::Complete(hello)) = hello::parse(hello_bytes) else {
        return Err(RejectReason::MalformedHello);
    };
    let sni = hello.server_name().ok_or(RejectReason::NoSni)?;
    let routes = store.routes();
    let cluster = routes.get(sni).ok_or(RejectReason::UnknownSni)?;
    if !hello.alpn_protocols().any(is_istio_alpn) {
        return Err(RejectReason::AlpnMismatch);
    }
    Ok(Arc::clone(cluster))
}

/// Holds one slot of a cluster's connection limit.
struct ClusterSlot<'a>(&'a RouteCluster);

impl<'a> ClusterSlot<'a> {
    fn take(cluster: &'a RouteCluster) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let open = cluster.active.fetch_add(1, Ordering::AcqRel);
        let slot = ClusterSlot(cluster);
        (open < cluster.settings.max_connections).then_some(slot)
    }
}

impl Drop for ClusterSlot<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn forward_to(
    downstream: &mut TcpStream,
    peer: SocketAddr,
    hello_bytes: Vec<u8>,
    cluster: &RouteCluster,
    shared: &Shared,
) -> Result<(), RejectReason> {
    let refuse = |reason: RejectReason| {
        cluster.record_refused(reason);
        reason
    };
    let Some(_slot) = ClusterSlot::take(cluster) else {
        cluster.metrics.upstream_cx_overflow.increment(1);
        return Err(refuse(RejectReason::UpstreamOverflow));
    };
    let mut connected = forward::connect(cluster, peer, shared.limits.connect_attempts).await.map_err(refuse)?;
    let endpoint = &cluster.endpoints[connected.endpoint];
    endpoint.metrics.connections_opened.increment(1);
    let _upstream_active = GaugeGuard::new(&cluster.metrics.upstream_cx_active);
    let outcome = match connected.stream.write_all(&hello_bytes).await {
        Ok(()) => {
            endpoint.metrics.received_bytes.increment(hello_bytes.len() as u64);
            drop(hello_bytes);
            let counters =
                TunnelCounters { request: &endpoint.metrics.received_bytes, response: &endpoint.metrics.sent_bytes };
            let limits = TunnelLimits {
                idle_timeout: cluster.settings.idle_timeout,
                max_duration: cluster.settings.max_connection_duration,
                copy: shared.limits.copy,
            };
            forward::tunnel(downstream, &connected.stream, counters, limits, &shared.drain).await
        }
        Err(_) => TunnelOutcome { end: TunnelEnd::UpstreamReset, response_bytes: 0 },
    };
    if outcome.end == TunnelEnd::UpstreamReset && outcome.response_bytes == 0 {
        cluster.lb.report(connected.endpoint, Outcome::Reset, std::time::Instant::now());
    }
    let end = outcome.end;
    match end {
        TunnelEnd::IdleTimeout => cluster.metrics.upstream_cx_idle_timeout.increment(1),
        TunnelEnd::MaxDuration => cluster.metrics.upstream_cx_max_duration_reached.increment(1),
        _ => {}
    }
    endpoint.metrics.connections_closed.increment(1);
    tracing::debug!(%peer, cluster = %cluster.name, upstream = %connected.address, ?end, "tunnel closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port_spreads_connections_and_hands_its_options_to_accepted_sockets() {
        let keepalive = Keepalive { time: Duration::from_secs(123), interval: Duration::from_secs(45), probes: 6 };
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3, &keepalive).unwrap();
        let address = group[0].local_addr().unwrap();
        assert!(group.iter().all(|socket| socket.local_addr().unwrap() == address));

        let clients: Vec<_> = (0..30).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
        let mut accepted_by: Vec<Vec<std::net::TcpStream>> = group.iter().map(|_| Vec::new()).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while accepted_by.iter().map(Vec::len).sum::<usize>() < clients.len() {
            assert!(std::time::Instant::now() < deadline, "not every connection was accepted");
            for (socket, accepted) in group.iter().zip(&mut accepted_by) {
                if let Ok((stream, _)) = socket.accept() {
                    accepted.push(stream);
                }
            }
        }
        assert!(accepted_by.iter().filter(|a| !a.is_empty()).count() > 1, "one socket took every connection");

        let stream = SockRef::from(accepted_by.iter().flatten().next().unwrap());
        assert!(stream.tcp_nodelay().unwrap());
        assert!(stream.keepalive().unwrap());
        assert_eq!(stream.tcp_keepalive_time().unwrap(), keepalive.time);
        assert_eq!(stream.tcp_keepalive_interval().unwrap(), keepalive.interval);
        assert_eq!(stream.tcp_keepalive_retries().unwrap(), keepalive.probes);
    }
}
