//! `crossgate-sleep`: a client in the mesh that calls a service the way its Istio sidecar would.
//!
//! Its endpoints come from the mesh file crossgate-control serves, filtered as istiod's split horizon
//! filters a sidecar's (`EndpointsByNetworkFilter`): endpoints on the client's own network are called
//! directly; each other network's mTLS endpoints are replaced by that network's gateway, weighted by how
//! many it stands for. Calls go round robin over that table, each on a new connection with Istio's SNI
//! (`outbound_.PORT_._.HOST`) and ALPN, mTLS with the client's own certificate, the server checked by its
//! chain to the mesh root and its SPIFFE identity. A failed attempt is reported and retried on another
//! endpoint, as Istio's default retry policy does (2 retries, other hosts). The process exits non-zero
//! unless every call was answered and every cluster with endpoints answered at least once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use crossgate_control::model::MeshModel;
use crossgate_control::sources::file::MeshFile;
use crossgate_e2e::{Identity, header, read_head, stream_byte};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The mesh's DNS domain: service hostnames and SNI keys end with it.
const DOMAIN: &str = "cluster.local";

#[derive(Parser)]
#[command(name = "crossgate-sleep", about = "Calls a mesh service as an Istio sidecar would, and reports who answered")]
struct Args {
    /// The mesh file the control service serves.
    #[arg(long)]
    mesh: PathBuf,
    /// The client's network (Istio's ISTIO_META_NETWORK).
    #[arg(long)]
    network: String,
    /// A network's east-west gateway, NETWORK=IP:PORT (meshNetworks' gateways); repeat for each network.
    #[arg(long = "gateway", value_name = "NETWORK=IP:PORT", value_parser = parse_gateway)]
    gateways: Vec<(String, SocketAddr)>,
    /// cert.pem, key.pem and ca.pem, as `crossgate-control certs leaf` writes them.
    #[arg(long)]
    cert_dir: PathBuf,
    #[arg(long, default_value = "helloworld.sample.svc.cluster.local")]
    host: String,
    /// The service port (the port of the SNI key).
    #[arg(long, default_value_t = 5000)]
    port: u16,
    /// Who the server must be (Istio's secure naming).
    #[arg(long, default_value = "spiffe://cluster.local/ns/sample/sa/helloworld")]
    server_identity: String,
    #[arg(long, default_value_t = 10)]
    calls: usize,
    /// `/hello`, or `/stream?bytes=N&duration_ms=M` (the body is checked, not printed).
    #[arg(long, default_value = "/hello")]
    path: String,
    /// Keep only the endpoints on this network (to aim at one gateway).
    #[arg(long)]
    only_network: Option<String>,
    /// Other endpoints tried after a failed attempt.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// For the connection, the handshake and the answer's head; then for each read of the body.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn parse_gateway(text: &str) -> Result<(String, SocketAddr), String> {
    let (network, address) = text.split_once('=').ok_or("expected NETWORK=IP:PORT")?;
    Ok((network.to_owned(), address.parse().map_err(|e| format!("{address:?}: {e}"))?))
}

/// One entry of the client's endpoint table.
#[derive(Debug)]
struct Target {
    address: SocketAddr,
    /// For the report: the endpoint's cluster, or which network's gateway it is.
    what: String,
    /// How many endpoints it stands for.
    weight: usize,
}

/// The table the sidecar's EDS would hold, and the clusters whose endpoints are in it.
fn endpoint_table(mesh: &MeshModel, args: &Args) -> (Vec<Target>, BTreeSet<String>) {
    let gateways: BTreeMap<&str, SocketAddr> = args.gateways.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let mut direct = Vec::new();
    let mut through: BTreeMap<String, Target> = BTreeMap::new();
    let mut clusters = BTreeSet::new();
    for cluster in mesh.clusters.values() {
        for service in cluster.services.iter().filter(|s| s.hostname == args.host) {
            for endpoint in &service.endpoints {
                let serving = (endpoint.ready || service.publish_not_ready) && !endpoint.terminating;
                let (Some(&target_port), true) = (endpoint.target_ports.get(&args.port), serving) else { continue };
                if args.only_network.as_ref().is_some_and(|only| *only != endpoint.network) {
                    continue;
                }
                // An endpoint without a network is taken as reachable, as Istio does.
                if endpoint.network.is_empty() || endpoint.network == args.network {
                    let address = SocketAddr::new(endpoint.address, target_port);
                    direct.push(Target { address, what: cluster.id.clone(), weight: 1 });
                } else if endpoint.labels.get("security.istio.io/tlsMode").map(String::as_str) != Some("istio") {
                    // Only mTLS traffic can cross a network: the gateway routes by the SNI of Istio's mTLS.
                    continue;
                } else if let Some(&address) = gateways.get(endpoint.network.as_str()) {
                    through
                        .entry(endpoint.network.clone())
                        .or_insert_with(|| Target {
                            address,
                            what: format!("{}'s gateway", endpoint.network),
                            weight: 0,
                        })
                        .weight += 1;
                } else {
                    // A network without a gateway cannot be reached.
                    continue;
                }
                clusters.insert(cluster.id.clone());
            }
        }
    }
    direct.extend(through.into_values());
    (direct, clusters)
}

/// What one successful call brought back.
struct Answer {
    cluster: String,
    report: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let mesh = MeshFile::read(&args.mesh)?.model(DOMAIN);
    let (targets, clusters) = endpoint_table(&mesh, &args);
    if targets.is_empty() {
        anyhow::bail!("no endpoint of {}:{} is reachable from {}", args.host, args.port, args.network);
    }
    let identity = Identity::load(&args.cert_dir)?;
    let connector = TlsConnector::from(identity.client_config(&args.server_identity)?);
    let sni = ServerName::try_from(format!("outbound_.{}_._.{}", args.port, args.host))?;
    println!("endpoints of {} from {}:", args.host, args.network);
    for target in &targets {
        println!("  {} ({}), weight {}", target.address, target.what, target.weight);
    }

    // Round robin, each target as often as its weight.
    let schedule: Vec<usize> = targets.iter().enumerate().flat_map(|(i, t)| std::iter::repeat_n(i, t.weight)).collect();
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let mut unanswered = 0;
    for call in 0..args.calls {
        let mut tried = Vec::new();
        let mut next = Some(schedule[call % schedule.len()]);
        let mut answer = None;
        while let Some(index) = next.take() {
            let target = &targets[index];
            let label = format!("call {:>2} -> {} ({})", call + 1, target.address, target.what);
            match attempt(&connector, &sni, target, &args, &label).await {
                Ok(got) => {
                    println!("{label}: {}", got.report);
                    answer = Some(got);
                }
                Err(error) => {
                    tried.push(index);
                    // Istio's retry host predicate: a retry goes to an endpoint not yet tried for this call.
                    next = if tried.len() > args.retries {
                        None
                    } else {
                        let mut rest = (1..=schedule.len()).map(|k| schedule[(call + k) % schedule.len()]);
                        rest.find(|i| !tried.contains(i))
                    };
                    let then = if next.is_some() { "; retrying on another endpoint" } else { "" };
                    println!("{label}: {error:#}{then}");
                }
            }
        }
        match answer {
            Some(answer) => *answered.entry(answer.cluster).or_default() += 1,
            None => unanswered += 1,
        }
    }

    let by: Vec<String> = answered.iter().map(|(cluster, n)| format!("{cluster} {n}")).collect();
    let by = if by.is_empty() { String::new() } else { format!(", by {}", by.join(", ")) };
    println!("{} of {} calls answered{by}", args.calls - unanswered, args.calls);
    let silent: Vec<&str> = clusters.iter().filter(|c| !answered.contains_key(*c)).map(String::as_str).collect();
    if !silent.is_empty() {
        println!("never answered: {}", silent.join(", "));
    }
    let all_good = unanswered == 0 && silent.is_empty();
    Ok(if all_good { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

/// One connection to `target`: the handshake, a GET of `args.path`, the answer.
async fn attempt(
    connector: &TlsConnector,
    sni: &ServerName<'static>,
    target: &Target,
    args: &Args,
    label: &str,
) -> anyhow::Result<Answer> {
    let started = Instant::now();
    let (mut tls, head, body_start) = tokio::time::timeout(args.timeout, async {
        let tcp = TcpStream::connect(target.address).await.context("refused: cannot connect")?;
        tcp.set_nodelay(true).context("failed: TCP_NODELAY")?;
        let mut tls = connector.connect(sni.clone(), tcp).await.map_err(handshake_error)?;
        let request =
            format!("GET {} HTTP/1.1\r\nhost: {}:{}\r\nconnection: close\r\n\r\n", args.path, args.host, args.port);
        tls.write_all(request.as_bytes()).await.context("failed: cannot send the request")?;
        let (head, body_start) = read_head(&mut tls).await.context("failed: no answer")?;
        anyhow::Ok((tls, head, body_start))
    })
    .await
    .map_err(|_| anyhow::anyhow!("failed: no answer within {:?}", args.timeout))??;

    let status = head.lines().next().and_then(|line| line.split_once(' ')).map_or("", |(_, s)| s).to_owned();
    let cluster = header(&head, "x-cluster").unwrap_or("unknown").to_owned();
    let length: u64 = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .context("failed: the answer has no content-length")?;
    if !status.starts_with("200") {
        anyhow::bail!("failed: answered {status} from {cluster}");
    }
    if args.path.starts_with("/stream") {
        let instance = header(&head, "x-instance").unwrap_or("unknown");
        println!("{label}: {status} from {cluster} ({instance}), receiving {length} bytes");
        let received = check_stream(&mut tls, body_start, length, args.timeout).await?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(Answer { report: format!("received {received} bytes in {seconds:.1} s, intact, from {cluster}"), cluster })
    } else {
        let mut body = body_start;
        tokio::time::timeout(args.timeout, tls.read_to_end(&mut body))
            .await
            .context("failed: the answer stalled")??;
        if body.len() as u64 != length {
            anyhow::bail!("failed: the answer was cut after {} of {length} bytes", body.len());
        }
        Ok(Answer { report: String::from_utf8_lossy(&body).trim_end().to_owned(), cluster })
    }
}

/// A handshake error as the operator reads it: a peer that closes during the handshake refused the call
/// (a gateway with no endpoint left for the SNI does that); a certificate it did not like is a TLS failure.
fn handshake_error(error: std::io::Error) -> anyhow::Error {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            anyhow::anyhow!("refused: the connection was closed during the TLS handshake ({error})")
        }
        _ => anyhow::anyhow!("failed: TLS handshake: {error}"),
    }
}

/// Reads a `/stream` body to its end, checking every byte against the pattern and that the server closed
/// the TLS session itself (close_notify) after exactly `length` bytes. Returns the bytes received.
async fn check_stream<S: AsyncRead + Unpin>(
    stream: &mut S,
    start: Vec<u8>,
    length: u64,
    idle: Duration,
) -> anyhow::Result<u64> {
    let mut offset = 0u64;
    check_pattern(&start, &mut offset)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(idle, stream.read(&mut buf)).await;
        let n = read
            .map_err(|_| anyhow::anyhow!("failed: the transfer stalled after {offset} of {length} bytes"))?
            .with_context(|| format!("failed: the transfer was cut after {offset} of {length} bytes"))?;
        if n == 0 {
            break;
        }
        check_pattern(&buf[..n], &mut offset)?;
    }
    if offset != length {
        anyhow::bail!("failed: the transfer ended after {offset} of {length} bytes");
    }
    Ok(offset)
}

/// Checks that `bytes`, found at `offset` of the body, follow the pattern; moves `offset` past them.
fn check_pattern(bytes: &[u8], offset: &mut u64) -> anyhow::Result<()> {
    for &byte in bytes {
        if byte != stream_byte(*offset) {
            anyhow::bail!("failed: byte {offset} of the body is wrong");
        }
        *offset += 1;
    }
    Ok(())
}
