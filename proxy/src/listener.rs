//! The :15443 accept loop and the life of one downstream connection: peek the ClientHello under a deadline
//! and a size cap, route it by SNI and ALPN, connect upstream, tunnel. Every connection that cannot be
//! routed is closed and counted with its reason.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::balance::{Balancer, LoadGuard, Placement};
use crate::cluster::{Cluster, Lease};
use crate::discovery::ConfigStore;
use crate::drain::{ConnectionCount, Drain, Phase};
use crate::forward::{self, CopyMode, Keepalive, TunnelCounters, TunnelEnd, TunnelLimits};
use crate::metrics::{GaugeGuard, ListenerMetrics, RejectReason};
use crate::tls::hello::{self, ClientHello, MAX_HELLO_BYTES, Parse};

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
pub fn bind_group(
    address: SocketAddr,
    workers: usize,
    keepalive: &Keepalive,
) -> io::Result<Vec<std::net::TcpListener>> {
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
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, balancer: Arc<Balancer>, worker: usize) {
    let closed = shared.drain.reached(Phase::ListenerClosed);
    tokio::pin!(closed);
    let mut failures = crossgate_sidedoor::RateLimited::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut closed => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let placement = balancer.place(worker);
                if placement.worker == worker {
                    tokio::spawn(serve_connection(stream, peer, Arc::clone(&shared), placement.load));
                } else {
                    hand_over(stream, peer, Arc::clone(&shared), placement, &balancer);
                }
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning; the backlog holds the rest.
                if let Some(suppressed) = failures.allow() {
                    tracing::warn!(%error, worker, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("listener closed");
}

/// Moves an accepted connection to another worker's runtime: out of this worker's epoll, into that one's.
fn hand_over(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, placement: Placement, balancer: &Balancer) {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => return tracing::warn!(%peer, %error, "cannot hand a connection to another worker"),
    };
    balancer.runtime(placement.worker).spawn(async move {
        match TcpStream::from_std(stream) {
            Ok(stream) => serve_connection(stream, peer, shared, placement.load).await,
            Err(error) => tracing::warn!(%peer, %error, "cannot take a connection from another worker"),
        }
    });
}

/// One downstream connection, from accept to close. Everything before the tunnel (hello, route, connect) runs
/// in a boxed future, freed once the tunnel starts: an open tunnel's task then holds little more than the
/// tunnel itself, which is what tens of thousands of idle tunnels cost.
///
/// A plain function returning an `async move` block, not an `async fn`: an async fn keeps a second copy of its
/// arguments in its state for as long as it runs (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)]
fn serve_connection(
    mut downstream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    load: LoadGuard,
) -> impl Future<Output = ()> {
    async move {
        let _load = load;
        let (_open, open_now) = shared.connections.open();
        let metrics = &shared.metrics;
        metrics.downstream_cx_total.increment(1);
        let _active = GaugeGuard::new(&metrics.downstream_cx_active);
        if open_now > shared.limits.max_downstream_connections {
            return refused(metrics, peer, RejectReason::DownstreamOverflow);
        }
        // Nagle and keepalive were set on the listener, and came with the socket.
        let upstream = match Box::pin(open_upstream(&mut downstream, peer, &shared)).await {
            Ok(Some(upstream)) => upstream,
            Ok(None) => return,
            Err(reason) => return refused(metrics, peer, reason),
        };
        let (counters, limits) = (upstream.counters(), upstream.limits(shared.limits.copy));
        let end = forward::tunnel(&downstream, &upstream.stream, counters, limits, &shared.drain).await;
        upstream.closed(end, peer);
    }
}

fn refused(metrics: &ListenerMetrics, peer: SocketAddr, reason: RejectReason) {
    metrics.rejected(reason).increment(1);
    tracing::debug!(%peer, reason = reason.label(), "connection refused");
}

/// An upstream connection that has been given the ClientHello, ready to carry the tunnel.
struct Upstream<'s> {
    stream: TcpStream,
    route: UpstreamRoute<'s>,
}

enum UpstreamRoute<'s> {
    Cluster { lease: Lease, limits: ChainLimits },
    Passthrough(&'s Passthrough),
}

/// The time limits of the filter chain a connection matched.
#[derive(Debug, Clone, Copy)]
struct ChainLimits {
    idle_timeout: Option<Duration>,
    max_duration: Option<Duration>,
}

impl Upstream<'_> {
    fn counters(&self) -> TunnelCounters<'_> {
        match &self.route {
            UpstreamRoute::Cluster { lease, .. } => lease.counters(),
            UpstreamRoute::Passthrough(passthrough) => {
                TunnelCounters { request: &passthrough.request_bytes, response: &passthrough.response_bytes }
            }
        }
    }

    fn limits(&self, copy: CopyMode) -> TunnelLimits {
        match &self.route {
            UpstreamRoute::Cluster { limits, .. } => {
                TunnelLimits { idle_timeout: limits.idle_timeout, max_duration: limits.max_duration, copy }
            }
            UpstreamRoute::Passthrough(passthrough) => {
                TunnelLimits { idle_timeout: passthrough.idle_timeout, max_duration: None, copy }
            }
        }
    }

    /// The tunnel's end, for the cluster's metrics.
    fn closed(self, end: TunnelEnd, peer: SocketAddr) {
        let UpstreamRoute::Cluster { lease, .. } = self.route else { return };
        let (cluster, upstream) = (lease.cluster().name().to_owned(), lease.address());
        lease.finish(end);
        tracing::debug!(%peer, %cluster, %upstream, ?end, "tunnel closed");
    }
}

/// Reads the ClientHello, routes it, connects upstream and passes the hello on. `None`: nothing to tunnel,
/// and nothing to count as refused (terminated while waiting, or the upstream went away as it was given the
/// hello).
async fn open_upstream<'s>(
    downstream: &mut TcpStream,
    peer: SocketAddr,
    shared: &'s Shared,
) -> Result<Option<Upstream<'s>>, RejectReason> {
    let mut hello_bytes = Vec::with_capacity(INITIAL_HELLO_BUFFER);
    let route_hello = |hello: &ClientHello<'_>| match &shared.routing {
        Routing::Sni(store) => route(hello, store).map(|(cluster, limits)| Destination::Cluster(cluster, limits)),
        Routing::Passthrough(passthrough) => Ok(Destination::Passthrough(passthrough)),
    };
    let destination = tokio::select! {
        read = timeout(shared.limits.hello_timeout, read_hello(downstream, &mut hello_bytes, route_hello)) => {
            read.map_err(|_| RejectReason::HelloTimeout)??
        }
        () = shared.drain.terminated() => return Ok(None),
    };
    match destination {
        Destination::Cluster(cluster, limits) => {
            let opened = cluster.open(peer, shared.limits.connect_attempts, &hello_bytes).await?;
            Ok(opened.map(|(stream, lease)| Upstream { stream, route: UpstreamRoute::Cluster { lease, limits } }))
        }
        Destination::Passthrough(passthrough) => connect_passthrough(passthrough, &hello_bytes, shared).await,
    }
}

/// Where a routed hello goes.
enum Destination<'s> {
    Cluster(Arc<Cluster>, ChainLimits),
    Passthrough(&'s Passthrough),
}

/// Connects to the passthrough upstream (each resolved address in turn) and gives it the hello.
async fn connect_passthrough<'s>(
    passthrough: &'s Passthrough,
    hello_bytes: &[u8],
    shared: &Shared,
) -> Result<Option<Upstream<'s>>, RejectReason> {
    let connect = async {
        let Ok(addresses) = tokio::net::lookup_host(&passthrough.upstream).await else {
            return Err(RejectReason::UpstreamConnectFailed);
        };
        for address in addresses.take(shared.limits.connect_attempts) {
            match timeout(passthrough.connect_timeout, forward::connect_to(address, &shared.limits.keepalive)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(error)) if forward::is_local_fault(&error) => return Err(RejectReason::LocalResources),
                _ => passthrough.connect_failures.increment(1),
            }
        }
        Err(RejectReason::UpstreamConnectFailed)
    };
    let mut stream = connect.await.inspect_err(|reason| {
        tracing::debug!(upstream = %passthrough.upstream, reason = reason.label(), "passthrough upstream not connected");
    })?;
    if stream.write_all(hello_bytes).await.is_err() {
        return Ok(None);
    }
    passthrough.request_bytes.increment(hello_bytes.len() as u64);
    Ok(Some(Upstream { stream, route: UpstreamRoute::Passthrough(passthrough) }))
}

/// Reads until `buf` holds a whole ClientHello (or more: early data may follow it, and is forwarded), and
/// gives the parsed hello to `on_hello`: parsed once, borrowed from `buf`.
async fn read_hello<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    on_hello: impl FnOnce(&ClientHello<'_>) -> Result<T, RejectReason>,
) -> Result<T, RejectReason> {
    loop {
        match hello::parse(buf) {
            Ok(Parse::Complete(hello)) => return on_hello(&hello),
            Ok(Parse::NeedMore) => {}
            Err(error) => {
                tracing::debug!(%error, "not a ClientHello to route");
                return Err(RejectReason::from(&error));
            }
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

/// The cluster the hello asks for, as Envoy's AUTO_PASSTHROUGH filter chains match: the SNI names a known
/// cluster and the client offers one of Istio's mTLS ALPNs.
fn route(hello: &ClientHello<'_>, store: &ConfigStore) -> Result<(Arc<Cluster>, ChainLimits), RejectReason> {
    let sni = hello.server_name().ok_or(RejectReason::NoSni)?;
    let routes = store.routes();
    let route = routes.get(sni).ok_or(RejectReason::UnknownSni)?;
    if !route.accepts_alpn(hello.alpn_protocols()) {
        return Err(RejectReason::AlpnMismatch);
    }
    // A chain whose cluster the configuration lacks routes nowhere, as an unknown name.
    let cluster = route.cluster().ok_or(RejectReason::UnknownSni)?;
    Ok((cluster, ChainLimits { idle_timeout: route.idle_timeout, max_duration: route.max_connection_duration }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::ConnectionBalance;

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

    /// An idle tunnel costs its task's state: the README's memory figure rests on keeping it this small.
    #[tokio::test]
    async fn a_connection_task_stays_under_a_kibibyte() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let passthrough = Passthrough::new("istiod:15012", "test", Duration::from_secs(1), None);
        let shared = Arc::new(Shared {
            routing: Routing::Passthrough(passthrough),
            metrics: ListenerMetrics::new("test"),
            connections: Arc::default(),
            drain: Drain::default(),
            limits: Limits {
                hello_timeout: Duration::from_secs(1),
                connect_attempts: 1,
                max_downstream_connections: 1,
                keepalive: Keepalive { time: Duration::from_secs(1), interval: Duration::from_secs(1), probes: 1 },
                copy: CopyMode::Auto,
            },
        });
        let runtime = tokio::runtime::Handle::current();
        let load = Balancer::new([runtime], ConnectionBalance::Exact).place(0).load;
        let task = serve_connection(stream, "127.0.0.1:1".parse().unwrap(), shared, load);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "a connection's task state grew to {size} bytes");
    }
}
