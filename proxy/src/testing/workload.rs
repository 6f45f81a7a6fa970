//! Mesh workloads speaking mTLS: a backend that greets each client with its own name and the client's
//! SPIFFE identity (proof that TLS went through the gateway untouched), then echoes; and a sidecar-like
//! client.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crossgate_mtls::spiffe_ids;

use super::pki::WorkloadIdentity;

/// What the backend writes after the client's EOF, before closing its side: proof of half-close.
pub const EOF_TRAILER: &[u8] = b"saw-eof\n";

/// A TLS echo backend on 127.0.0.1.
#[derive(Debug)]
pub struct EchoBackend {
    pub address: SocketAddr,
    pub name: String,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start(identity: &WorkloadIdentity, name: &str) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        Self::serve(listener, identity, name)
    }

    /// Serves on an already bound listener (to bring a backend back on the same port).
    pub fn serve(listener: TcpListener, identity: &WorkloadIdentity, name: &str) -> EchoBackend {
        let address = listener.local_addr().expect("bound");
        let acceptor = TlsAcceptor::from(identity.server_config());
        let connections = Arc::new(AtomicUsize::new(0));
        let task = {
            let (name, connections) = (name.to_owned(), Arc::clone(&connections));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::Relaxed);
                    // As a sidecar's sockets are: without it the greeting, written after the TLS session tickets,
                    // waits for the client's delayed ACK (about 40 ms a connection).
                    let _ = stream.set_nodelay(true);
                    let (acceptor, name) = (acceptor.clone(), name.clone());
                    tokio::spawn(async move {
                        let _ = echo(acceptor, stream, &name).await;
                    });
                }
            })
        };
        EchoBackend { address, name: name.to_owned(), connections, task }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting (open connections go on).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(acceptor: TlsAcceptor, stream: TcpStream, name: &str) -> io::Result<()> {
    let mut tls = acceptor.accept(stream).await?;
    let certs = tls.get_ref().1.peer_certificates();
    let client = certs.and_then(|certs| spiffe_ids(certs.first()?).first().cloned()).unwrap_or_default();
    tls.write_all(format!("{name} {client}\n").as_bytes()).await?;
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        tls.write_all(&buf[..n]).await?;
    }
    tls.write_all(EOF_TRAILER).await?;
    tls.shutdown().await
}

/// A sidecar's connection through a gateway: TLS to `address` with `sni`.
pub async fn connect(
    address: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    connect_over(tcp, sni, config).await
}

/// The TLS handshake over any byte stream (e.g. a [`Dribble`]).
pub async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<S>> {
    let server_name =
        ServerName::try_from(sni.to_owned()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(server_name, stream).await
}

/// Reads the backend's greeting: `(backend name, client SPIFFE identity it saw)`.
pub async fn read_greeting<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(String, String)> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let (name, client) = line.split_once(' ').ok_or_else(|| io::Error::other(format!("bad greeting {line:?}")))?;
    Ok((name.to_owned(), client.to_owned()))
}

/// Writes the first `slow_bytes` bytes one per write, `pause` apart, so that a ClientHello reaches the
/// gateway in many TCP segments.
#[derive(Debug)]
pub struct Dribble {
    inner: TcpStream,
    slow_bytes: usize,
    pause: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Dribble {
    pub fn new(inner: TcpStream, slow_bytes: usize, pause: Duration) -> Self {
        Dribble { inner, slow_bytes, pause, sleep: None }
    }
}

impl AsyncRead for Dribble {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dribble {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.slow_bytes == 0 {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..1]))?;
        self.slow_bytes -= written;
        let pause = self.pause;
        self.sleep = Some(Box::pin(tokio::time::sleep(pause)));
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads everything until EOF.
pub async fn read_to_end<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await?;
    Ok(all)
}

/// The first flight a rustls sidecar client sends for `sni` and `alpn`: a real ClientHello, as bytes.
pub fn client_hello(identity: &super::pki::WorkloadIdentity, sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    // Only the hello is written, so the server identity the client would check does not matter.
    let config = identity.client_config(&identity.spiffe, alpn);
    let server_name = ServerName::try_from(sni.to_owned()).expect("valid server name");
    let mut connection = rustls::ClientConnection::new(config, server_name).expect("client connection");
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello).expect("write to a Vec");
    }
    hello
}

/// A sidecar-like client and a backend identity of one mesh, and the cluster the client asks the gateway for.
#[derive(Debug)]
pub struct Mesh {
    pub client: WorkloadIdentity,
    pub server: WorkloadIdentity,
    /// The Istio SNI of the cluster the client connects to.
    pub sni: String,
}

impl Mesh {
    /// `sleep/sleep` calling `sample/helloworld` through `sni`, under a fresh mesh root.
    pub fn new(sni: &str) -> Mesh {
        let ca = super::pki::TestCa::new("cluster.local");
        Mesh { client: ca.workload("sleep", "sleep"), server: ca.workload("sample", "helloworld"), sni: sni.to_owned() }
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.client_config(&self.server.spiffe, &super::pki::SIDECAR_ALPN)
    }

    /// A sidecar's tunnel through the gateway at `gateway` to the mesh's cluster, past the backend's greeting:
    /// the stream, and the name of the backend that answered.
    pub async fn tunnel(&self, gateway: SocketAddr) -> (TlsStream<TcpStream>, String) {
        let mut tls = connect(gateway, &self.sni, self.client_config()).await.unwrap();
        let (backend, _) = read_greeting(&mut tls).await.unwrap();
        (tls, backend)
    }
}
