//! Bounded listening: a connection cap per listener, and an accept loop that pauses on errors instead of
//! spinning.
//!
//! When the process is out of descriptors, `accept` fails with EMFILE while the connection stays in the
//! backlog, so the socket stays readable and a loop that retries at once burns a core and logs each failure
//! (issue #11: ~220,000 lines a second). Here every failure pauses the loop, from 5 ms doubling to 1 s, and
//! each kind of trouble is logged at most once per interval, with the count of the lines left out.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The pause after a first failed accept; each failure in a row doubles it, up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one line per listener and kind of trouble in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// As tokio's own `TcpListener::bind`.
const BACKLOG: i32 = 1024;

/// Binds `address` with SO_REUSEADDR and SO_REUSEPORT, so that a new process can bind beside one that is
/// draining (an in-place restart), and returns it non-blocking, for tokio.
pub fn bind_shared(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The connections a listener admits: up to `max_connections` at once; the others are closed as soon as
/// they are accepted, and counted in `crossgate_connections_over_limit_total{listener}`.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    name: &'static str,
    max_connections: usize,
    open: Arc<AtomicUsize>,
    over_limit: metrics::Counter,
    /// The pause the next failure starts.
    pause: Duration,
    paused: Option<Pin<Box<Sleep>>>,
    failures: RateLimited,
    refusals: RateLimited,
}

impl Incoming {
    /// `name` labels the metric and the log lines. The counter is registered with the recorder in scope, so a
    /// caller with a local recorder builds this inside it.
    pub fn new(listener: TcpListener, name: &'static str, max_connections: usize) -> Incoming {
        Incoming {
            listener,
            name,
            max_connections,
            open: Arc::default(),
            over_limit: metrics::counter!("crossgate_connections_over_limit_total", "listener" => name),
            pause: FIRST_PAUSE,
            paused: None,
            failures: RateLimited::default(),
            refusals: RateLimited::default(),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection within the cap.
    pub async fn accept(&mut self) -> Connection {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Connection> {
        loop {
            if let Some(paused) = &mut self.paused {
                ready!(paused.as_mut().poll(cx));
                self.paused = None;
            }
            // tokio's accept spends the task's cooperative budget, so a flood over the cap still yields.
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    self.pause = FIRST_PAUSE;
                    if let Some(connection) = self.admit(stream) {
                        return Poll::Ready(connection);
                    }
                }
                // Every failure pauses, not only EMFILE, ENFILE, ENOBUFS and ENOMEM: a failure that repeats is
                // a spin whatever its kind, and one that does not costs a few milliseconds.
                Err(error) => {
                    let pause = self.pause;
                    self.pause = (pause * 2).min(MAX_PAUSE);
                    if let Some(suppressed) = self.failures.allow() {
                        tracing::warn!(listener = self.name, %error, ?pause, suppressed, "accept failed; pausing");
                    }
                    self.paused = Some(Box::pin(tokio::time::sleep(pause)));
                }
            }
        }
    }

    /// A slot for `stream`, or `None` and the stream closed (dropped) when the listener is full.
    fn admit(&mut self, stream: TcpStream) -> Option<Connection> {
        if self.open.fetch_add(1, Ordering::AcqRel) < self.max_connections {
            return Some(Connection { stream, _slot: Slot(Arc::clone(&self.open)) });
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.over_limit.increment(1);
        if let Some(suppressed) = self.refusals.allow() {
            tracing::warn!(
                listener = self.name,
                max = self.max_connections,
                suppressed,
                "connection over the limit closed"
            );
        }
        None
    }
}

/// For tonic's `serve_with_incoming`: never ends, never fails (failures are paused on, as above).
impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_accept(cx).map(|connection| Some(Ok(connection)))
    }
}

/// An admitted connection; its slot is freed when it is dropped.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _slot: Slot,
}

#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// Lets one event through per `LOG_INTERVAL`, and counts the others: for a log line that a failure in a loop
/// would otherwise repeat as fast as the loop runs.
#[derive(Debug, Default)]
pub struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// `Some(count of events left out since the last one let through)` when this one may be logged.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now < last + LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn listening(max_connections: usize) -> (Incoming, SocketAddr) {
        let listener = TcpListener::from_std(bind_shared("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        (Incoming::new(listener, "test", max_connections), address)
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_until_a_slot_frees() {
        let (mut incoming, address) = listening(2).await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(address).await.unwrap());
        }
        let first = incoming.accept().await;
        let _second = incoming.accept().await;
        let next = tokio::spawn(async move {
            let admitted = incoming.accept().await;
            (incoming, admitted)
        });
        // The third is over the cap: accepted and closed at once.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), clients[2].read(&mut buf)).await.expect("closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(first);
        let _fourth = TcpStream::connect(address).await.unwrap();
        let (incoming, _fourth) = tokio::time::timeout(Duration::from_secs(5), next).await.unwrap().unwrap();
        assert_eq!(incoming.open.load(Ordering::Acquire), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count_left_out() {
        let mut limited = RateLimited::default();
        assert_eq!(limited.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(limited.allow(), None);
        }
        tokio::time::advance(LOG_INTERVAL).await;
        assert_eq!(limited.allow(), Some(1000));
        assert_eq!(limited.allow(), None);
    }
}
