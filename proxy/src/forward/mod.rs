//! The sockets of a tunnel (options, upstream connect) and its two-way copy, honouring half-close, propagating
//! resets, and counting bytes as they move.

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use metrics::Counter;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until};

mod copy;

pub use copy::CopyMode;
use copy::{Chunk, Mover};

use crate::drain::Drain;

/// TCP keepalive on the tunnel's sockets: probes after `time` idle, every `interval`, `probes` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Duration,
    pub interval: Duration,
    pub probes: u32,
}

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

/// Whether a connect error is the gateway's own fault (out of descriptors, memory, socket buffers or local
/// ports), which says nothing about the endpoint.
pub fn is_local_fault(error: &io::Error) -> bool {
    use nix::errno::Errno;
    let local = [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM, Errno::EADDRNOTAVAIL];
    error.raw_os_error().is_some_and(|code| local.contains(&Errno::from_raw(code)))
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

/// Copies both ways until both sides have closed their write half, an error resets the tunnel, or a
/// limit or termination ends it. A reset on one side is passed on to the other as a reset.
///
/// One hand-written poll loop over both directions, one timer and the drain, rather than a future per
/// direction: an idle tunnel is mostly this function's state, so keeping it small is what keeps tens of
/// thousands of idle tunnels cheap (see the README's memory figure).
///
/// Not an `async fn`, which would keep a second copy of its arguments in its state (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)]
pub fn tunnel<'a>(
    downstream: &'a TcpStream,
    upstream: &'a TcpStream,
    counters: TunnelCounters<'a>,
    limits: TunnelLimits,
    drain: &'a Drain,
) -> impl Future<Output = TunnelEnd> + 'a {
    async move {
        let start = Instant::now();
        let mut last_activity = start;
        let max_end = limits.max_duration.map(|max| start + max);
        let deadline = |last_activity: Instant| {
            let idle_end = limits.idle_timeout.map(|idle| last_activity + idle);
            idle_end.into_iter().chain(max_end).min()
        };
        // Without limits the timer is never polled, so never registered.
        let timer = sleep_until(deadline(start).unwrap_or(start));
        tokio::pin!(timer);
        let terminated = drain.terminated();
        tokio::pin!(terminated);
        let mut request = Pump::new(downstream, upstream, limits.copy);
        let mut response = Pump::new(upstream, downstream, limits.copy);
        let end = std::future::poll_fn(|cx| {
            let moved_before = (request.moved, response.moved);
            let request_state = request.poll_pump(cx);
            let response_state = response.poll_pump(cx);
            let (request_moved, response_moved) = (request.moved - moved_before.0, response.moved - moved_before.1);
            if request_moved + response_moved > 0 {
                counters.request.increment(request_moved);
                counters.response.increment(response_moved);
                last_activity = Instant::now();
            }
            match (request_state, response_state) {
                (Poll::Ready(Err(MoveError::Read)), _) | (_, Poll::Ready(Err(MoveError::Write))) => {
                    return Poll::Ready(TunnelEnd::DownstreamReset);
                }
                (Poll::Ready(Err(MoveError::Write)), _) | (_, Poll::Ready(Err(MoveError::Read))) => {
                    return Poll::Ready(TunnelEnd::UpstreamReset);
                }
                _ if request.done && response.done => return Poll::Ready(TunnelEnd::Complete),
                _ => {}
            }
            if terminated.as_mut().poll(cx).is_ready() {
                return Poll::Ready(TunnelEnd::Terminated);
            }
            // The timer is not moved on every chunk: when it fires early, it is set again from the last activity.
            while let Some(due) = deadline(last_activity) {
                if timer.as_mut().poll(cx).is_pending() {
                    break;
                }
                let now = Instant::now();
                if max_end.is_some_and(|end| now >= end) {
                    return Poll::Ready(TunnelEnd::MaxDuration);
                }
                if now >= due {
                    return Poll::Ready(TunnelEnd::IdleTimeout);
                }
                timer.as_mut().reset(due);
            }
            Poll::Pending
        })
        .await;
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
        end
    }
}

/// Which side of a direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoveError {
    Read,
    Write,
}

/// One direction of a tunnel: reads a chunk from `from`, writes it all to `to`, and so on until EOF, which
/// it passes on as a FIN (half-close).
struct Pump<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    mover: Mover,
    /// Read and not yet all written.
    chunk: Option<Chunk>,
    /// EOF was passed on.
    done: bool,
    /// Bytes written to `to` so far.
    moved: u64,
}

impl<'a> Pump<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, copy: CopyMode) -> Self {
        Pump { from, to, mover: Mover::new(copy), chunk: None, done: false, moved: 0 }
    }

    /// Moves what is ready, counting it in `moved`. Pending when waiting for either socket (tokio's
    /// cooperative budget also yields here, so a bulk direction cannot starve the other tunnels).
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), MoveError>> {
        while !self.done {
            if let Some(chunk) = &mut self.chunk {
                ready!(self.to.poll_write_ready(cx)).map_err(|_| MoveError::Write)?;
                match chunk.write(self.to) {
                    Ok(true) => {
                        self.moved += chunk.len() as u64;
                        if let Some(written) = self.chunk.take() {
                            written.release();
                        }
                    }
                    Ok(false) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(Err(MoveError::Write)),
                }
                continue;
            }
            ready!(self.from.poll_read_ready(cx)).map_err(|_| MoveError::Read)?;
            match self.mover.read(self.from) {
                Ok(Some(chunk)) => self.chunk = Some(chunk),
                Ok(None) => {
                    // The peer may already be gone; the other direction reports that.
                    let _ = SockRef::from(self.to).shutdown(std::net::Shutdown::Write);
                    self.done = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Err(MoveError::Read)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn the_gateways_own_shortages_are_told_from_an_endpoints_refusal() {
        use nix::errno::Errno;
        for code in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM, Errno::EADDRNOTAVAIL] {
            assert!(is_local_fault(&io::Error::from_raw_os_error(code as i32)), "{code}");
        }
        // A real refusal: nothing listens on a port just released.
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let keepalive = Keepalive { time: Duration::from_secs(1), interval: Duration::from_secs(1), probes: 1 };
        let refused = connect_to(port, &keepalive).await.unwrap_err();
        assert!(!is_local_fault(&refused), "{refused}");
        assert!(!is_local_fault(&io::Error::from_raw_os_error(Errno::ETIMEDOUT as i32)));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    /// Sends `payload` and half-closes, while reading all that comes back.
    async fn send_and_receive(mut stream: TcpStream, payload: Vec<u8>) -> Vec<u8> {
        let (mut reader, mut writer) = stream.split();
        let mut received = Vec::new();
        let (written, read) = tokio::join!(
            async {
                writer.write_all(&payload).await?;
                writer.shutdown().await
            },
            reader.read_to_end(&mut received)
        );
        written.unwrap();
        read.unwrap();
        received
    }

    #[tokio::test]
    async fn every_copy_mode_carries_every_byte_both_ways_and_passes_half_close_on() {
        for mode in [CopyMode::Auto, CopyMode::Splice, CopyMode::Buffer] {
            // client -> (client, downstream) -> tunnel -> (upstream, server) -> server, and back.
            let ((client, downstream), (upstream, server)) = (pair().await, pair().await);
            // Sizes that make Auto switch: small writes, then bulk, each way.
            let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let response: Vec<u8> = (0..1_500_000u32).map(|i| (i % 241) as u8).collect();
            let client_side = tokio::spawn(send_and_receive(client, request.clone()));
            let server_side = tokio::spawn(send_and_receive(server, response.clone()));
            let (sent, received) = (Counter::noop(), Counter::noop());
            let counters = TunnelCounters { request: &sent, response: &received };
            let limits = TunnelLimits { idle_timeout: Some(Duration::from_secs(30)), max_duration: None, copy: mode };
            let outcome = tunnel(&downstream, &upstream, counters, limits, &Drain::default()).await;
            assert_eq!(outcome, TunnelEnd::Complete);
            assert!(server_side.await.unwrap() == request, "{mode:?}: request bytes changed");
            assert!(client_side.await.unwrap() == response, "{mode:?}: response bytes changed");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_one_timer_ends_idle_tunnels_and_long_ones() {
        let ((mut client, downstream), (upstream, _server)) = (pair().await, pair().await);
        let noop = Counter::noop();
        let counters = TunnelCounters { request: &noop, response: &noop };
        let drain = Drain::default();
        let idle =
            TunnelLimits { idle_timeout: Some(Duration::from_secs(10)), max_duration: None, copy: CopyMode::Auto };
        // Activity at 6 s moves the idle end to 16 s.
        let started = Instant::now();
        let (end, ()) = tokio::join!(tunnel(&downstream, &upstream, counters, idle, &drain), async {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"ping").await.unwrap();
        });
        assert_eq!(end, TunnelEnd::IdleTimeout);
        assert!(started.elapsed() >= Duration::from_secs(16), "ended at {:?}", started.elapsed());

        let long = TunnelLimits { max_duration: Some(Duration::from_secs(5)), ..idle };
        let started = Instant::now();
        assert_eq!(tunnel(&downstream, &upstream, counters, long, &drain).await, TunnelEnd::MaxDuration);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
