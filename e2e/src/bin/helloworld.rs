//! `crossgate-helloworld`: Istio's helloworld sample as a mesh workload with its sidecar folded in. It serves
//! HTTP/1.1 over mTLS (a client certificate chaining to the mesh root is required) and answers
//!
//! - `GET /hello`: `Hello version: v1, instance: helloworld-v1, cluster: cluster1`, as the sample does (plus
//!   the cluster, to tell the clusters of a mesh apart);
//! - `GET /stream?bytes=N&duration_ms=M`: N bytes of a known pattern, paced over M ms, for long transfers.
//!
//! Every answer carries `x-cluster` and `x-instance` headers, and closes the connection: each call is a new
//! connection, so each is load balanced (and routed by a gateway) afresh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use crossgate_e2e::{Identity, read_head, stream_byte};
use crossgate_mtls::spiffe_ids;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A client gets this long to finish its handshake and send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `/stream` writes in chunks of this size.
const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(name = "crossgate-helloworld", about = "Istio's helloworld sample over mTLS")]
struct Args {
    #[arg(long, default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// cert.pem, key.pem and ca.pem, as `crossgate-control certs leaf` writes them.
    #[arg(long)]
    cert_dir: PathBuf,
    #[arg(long, default_value = "v1")]
    version: String,
    /// The pod name.
    #[arg(long, default_value = "helloworld-v1")]
    instance: String,
    #[arg(long, default_value = "cluster1")]
    cluster: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let acceptor = TlsAcceptor::from(Identity::load(&args.cert_dir)?.server_config()?);
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("{} ({}, {}) serving mTLS on {}", args.instance, args.version, args.cluster, args.listen);
    let args = std::sync::Arc::new(args);
    loop {
        let (stream, peer) = listener.accept().await?;
        let (acceptor, args) = (acceptor.clone(), std::sync::Arc::clone(&args));
        tokio::spawn(async move {
            if let Err(error) = serve(acceptor, stream, &args).await {
                eprintln!("{peer}: {error:#}");
            }
        });
    }
}

async fn serve(acceptor: TlsAcceptor, stream: tokio::net::TcpStream, args: &Args) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (mut tls, head) = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut tls = acceptor.accept(stream).await?;
        let (head, _) = read_head(&mut tls).await?;
        anyhow::Ok((tls, head))
    })
    .await??;
    let client = tls.get_ref().1.peer_certificates().and_then(|c| spiffe_ids(c.first()?).pop()).unwrap_or_default();
    let target = head.lines().next().and_then(|line| line.strip_prefix("GET ")).and_then(|rest| rest.split(' ').next());
    eprintln!("{client}: {}", head.lines().next().unwrap_or_default());
    let (path, query) = target.map_or(("", ""), |t| t.split_once('?').unwrap_or((t, "")));
    match path {
        "/hello" => {
            let body =
                format!("Hello version: {}, instance: {}, cluster: {}\n", args.version, args.instance, args.cluster);
            respond(&mut tls, "200 OK", args, body.len() as u64).await?;
            tls.write_all(body.as_bytes()).await?;
        }
        "/stream" => {
            let bytes: u64 = query_value(query, "bytes").unwrap_or(0);
            let duration = Duration::from_millis(query_value(query, "duration_ms").unwrap_or(0));
            respond(&mut tls, "200 OK", args, bytes).await?;
            stream_body(&mut tls, bytes, duration).await?;
        }
        _ => {
            let body = "not found: GET /hello or /stream?bytes=N&duration_ms=M\n";
            respond(&mut tls, "404 Not Found", args, body.len() as u64).await?;
            tls.write_all(body.as_bytes()).await?;
        }
    }
    // close_notify: the client tells a complete answer from a cut connection.
    tls.shutdown().await?;
    Ok(())
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    args: &Args,
    content_length: u64,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {content_length}\r\nx-cluster: {}\r\n\
         x-instance: {}\r\nconnection: close\r\n\r\n",
        args.cluster, args.instance
    );
    stream.write_all(head.as_bytes()).await
}

/// Writes `bytes` bytes of the pattern, spread evenly over `duration`.
async fn stream_body<S: AsyncWrite + Unpin>(stream: &mut S, bytes: u64, duration: Duration) -> std::io::Result<()> {
    let start = tokio::time::Instant::now();
    let chunks = bytes.div_ceil(CHUNK as u64).max(1);
    let mut buf = vec![0u8; CHUNK];
    let (mut offset, mut chunk) = (0u64, 0u64);
    while offset < bytes {
        // Chunk k is due at k/chunks of the duration, so a slow write does not stretch the whole transfer.
        tokio::time::sleep_until(start + duration.mul_f64(chunk as f64 / chunks as f64)).await;
        let len = (bytes - offset).min(CHUNK as u64) as usize;
        for (i, byte) in buf[..len].iter_mut().enumerate() {
            *byte = stream_byte(offset + i as u64);
        }
        stream.write_all(&buf[..len]).await?;
        offset += len as u64;
        chunk += 1;
    }
    Ok(())
}

fn query_value(query: &str, key: &str) -> Option<u64> {
    query.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}
