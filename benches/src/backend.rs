//! The TLS workload behind every target: rustls with the testing PKI, mTLS and Istio's ALPNs, as a sidecar's
//! inbound side would be. The client's first byte picks the mode: [`ECHO`] sends back what it reads
//! (request/response, idle tunnels); [`SINK`] reads length-prefixed batches up to an empty one and answers
//! with the byte count (bulk). The count ends the exchange, so bulk needs no half-close, which not every peer
//! passes on the same way.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossgate_proxy::testing::pki::WorkloadIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub const ECHO: u8 = b'E';
pub const SINK: u8 = b'S';

/// A backend on 127.0.0.1, serving on the runtime it was started on.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(identity: &WorkloadIdentity) -> io::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(identity.server_config());
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(serve(acceptor.clone(), stream));
                    }
                    // Out of descriptors for a moment: the client sees the refusal, the backend goes on.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                }
            }
        });
        Ok(Backend { address, accepted, task })
    }

    /// TCP connections accepted so far: a refused SNI must not move it.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(acceptor: TlsAcceptor, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut tls = acceptor.accept(stream).await?;
    match tls.read_u8().await? {
        ECHO => {
            // Small: echo carries small requests, and 10,000 idle tunnels hold one buffer each.
            let mut buf = vec![0; 4096];
            loop {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                tls.write_all(&buf[..n]).await?;
                tls.flush().await?;
            }
        }
        SINK => {
            let mut buf = vec![0; 64 * 1024];
            let mut total = 0u64;
            loop {
                let mut left = tls.read_u64().await?;
                if left == 0 {
                    break;
                }
                total += left;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match tls.read(&mut buf[..want]).await? {
                        0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                        n => left -= n as u64,
                    }
                }
            }
            tls.write_u64(total).await?;
            tls.flush().await
        }
        mode => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown mode {mode:#x}"))),
    }
}
