//! The HTTP/1.1 side doors (readiness, metrics, admin): one serving loop for both binaries, bounded in
//! connections (see [`Incoming`]), in the time a client may take to send its request head, and in the time
//! a connection may stay idle, whether it is waiting for a request or for its reader.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::accept::{Connection, Incoming};

/// The bounds of one side door.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the others are closed at accept. Small, so that the side doors together
    /// cannot take the descriptors the data plane needs.
    pub max_connections: usize,
    /// From the moment the server waits for a request (on a new connection, or after a response on a kept
    /// one) to the end of its head: a slowloris or an idle client is closed by then.
    pub header_read_timeout: Duration,
    /// No byte moved either way for this long: closed (a client that does not read its response).
    pub idle_timeout: Duration,
}

impl Limits {
    /// 64 connections, 10 s for a request head, 60 s idle.
    pub const fn new(max_connections: usize) -> Limits {
        Limits { max_connections, header_read_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60) }
    }

    /// The connections `listener` admits under these limits; `name` labels its metric and log lines.
    pub fn incoming(&self, listener: tokio::net::TcpListener, name: &'static str) -> Incoming {
        Incoming::new(listener, name, self.max_connections)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new(64)
    }
}

/// Serves `handler` on every connection `incoming` admits, until `stop` resolves; connections then open
/// run on (their runtime ends them). `handler` answers every request; it is not told which connection.
pub async fn serve<H, F>(mut incoming: Incoming, limits: Limits, handler: H, stop: impl Future<Output = ()>)
where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::pin!(stop);
    loop {
        let connection = tokio::select! {
            () = &mut stop => return,
            connection = incoming.accept() => connection,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let io = TokioIo::new(Idle::new(connection, limits.idle_timeout));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(io, service)
                .await;
        });
    }
}

/// A connection that fails with `TimedOut` once no byte has moved either way for `timeout`. The deadline is
/// checked whenever hyper waits on the connection, which it always does while the connection is open.
struct Idle {
    connection: Connection,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Idle {
    fn new(connection: Connection, timeout: Duration) -> Idle {
        Idle { connection, timeout, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }

    /// Pushes the deadline back after progress; on no progress, `Err(TimedOut)` if it has passed.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
        moved: impl Fn(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(Ok(value)) if moved(&value) => {
                self.deadline.as_mut().reset(Instant::now() + self.timeout);
                Poll::Ready(Ok(value))
            }
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle side-door connection")))
            }
            other => other,
        }
    }
}

impl AsyncRead for Idle {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.connection).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        this.check(cx, poll, |_| moved)
    }
}

impl AsyncWrite for Idle {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.connection).poll_write(cx, buf);
        this.check(cx, poll, |written| *written > 0)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::bind_shared;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn server(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::from_std(bind_shared("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = limits.incoming(listener, "test");
        let handler = |_request| async { Response::new(Full::new(Bytes::from_static(b"ok\n"))) };
        tokio::spawn(serve(incoming, limits, handler, std::future::pending()));
        address
    }

    /// Reads until the server closes; how long that took.
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        while let Ok(read) = stream.read(&mut buf).await
            && read > 0
        {}
        start.elapsed()
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_client_that_sends_no_whole_request_head_is_closed_at_the_header_timeout() {
        let address = server(Limits { header_read_timeout: SHORT, ..Limits::default() }).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        let mut slowloris = TcpStream::connect(address).await.unwrap();
        slowloris.write_all(b"GET /healthz/ready HTTP/1.1\r\n").await.unwrap();
        for client in [&mut idle, &mut slowloris] {
            let after = closed_after(client).await;
            assert!(after < SHORT * 5, "closed after {after:?}");
        }
    }

    #[tokio::test]
    async fn a_kept_connection_is_served_then_closed_once_idle() {
        let limits = Limits { header_read_timeout: Duration::from_secs(30), idle_timeout: SHORT, ..Limits::default() };
        let address = server(limits).await;
        let mut client = TcpStream::connect(address).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let read = client.read(&mut buf).await.unwrap();
        assert!(buf[..read].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..read]));
        let after = closed_after(&mut client).await;
        assert!(after >= SHORT / 2 && after < SHORT * 5, "closed after {after:?}");
    }
}
