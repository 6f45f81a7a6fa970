//! The gateway end to end, in process: real mTLS between a sidecar-like client and a backend, through the
//! gateway, which never terminates TLS.

use std::net::SocketAddr;
use std::time::Duration;

use crossgate_proxy::testing::gateway::TestGateway;
use crossgate_proxy::testing::pki::SIDECAR_ALPN;
use crossgate_proxy::testing::workload::{self, Dribble, EOF_TRAILER, EchoBackend, Mesh};
use crossgate_proxy::testing::{eventually, metric, refusing_address};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const WITHIN: Duration = Duration::from_secs(10);

fn mesh() -> Mesh {
    Mesh::new(SNI)
}

/// Resources with one cluster `SNI` over `endpoints`; `extra` is more YAML for the cluster.
fn resources(endpoints: &[SocketAddr], extra: &str) -> String {
    let mut yaml = format!("clusters:\n- name: {SNI}\n{extra}  endpoints:\n");
    for endpoint in endpoints {
        yaml.push_str(&format!(
            "  - address: '{endpoint}'\n    cluster_id: cluster1\n    labels: {{ app: helloworld, version: v1 }}\n"
        ));
    }
    yaml
}

fn rejected(gateway: &TestGateway, reason: &str) -> f64 {
    metric(&gateway.metrics(), "crossgate_downstream_cx_rejected_total", &[("reason", reason)])
}

/// Reads until EOF or error: true when the gateway closed the connection.
async fn closed_by_gateway(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WITHIN, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn mtls_passes_through_intact_both_ways_with_splice() {
    passes_through_intact(&["--copy=splice"]).await;
}

#[tokio::test]
async fn mtls_passes_through_intact_both_ways_with_a_buffer() {
    passes_through_intact(&["--copy=buffer"]).await;
}

/// The default copy switches a direction to splice once a chunk fills its buffer and back once a chunk is
/// small: exchanges in lockstep must flow before, between and after bulk transfers, with nothing stalled.
#[tokio::test]
async fn adaptive_copy_keeps_small_exchanges_flowing_around_bulk() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "helloworld-v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &["--copy=auto"]).await;
    let (mut tls, _) = mesh.tunnel(gateway.listen).await;
    let bulk: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for round in 0..3 {
        for exchange in 0..20 {
            let request = format!("round {round} exchange {exchange}");
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = vec![0; request.len()];
            tokio::time::timeout(WITHIN, tls.read_exact(&mut answer))
                .await
                .unwrap_or_else(|_| panic!("{request}: no answer (stalled)"))
                .unwrap();
            assert_eq!(answer, request.as_bytes());
        }
        let (mut reader, mut writer) = tokio::io::split(tls);
        let mut echoed = vec![0; bulk.len()];
        let (written, read) = tokio::time::timeout(WITHIN, async {
            tokio::join!(writer.write_all(&bulk), reader.read_exact(&mut echoed))
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: bulk stalled"));
        written.unwrap();
        read.unwrap();
        assert!(echoed == bulk, "round {round}: bulk bytes changed in transit");
        tls = reader.unsplit(writer);
    }
}

async fn passes_through_intact(flags: &[&str]) {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "helloworld-v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), flags).await;

    let mut tls = workload::connect(gateway.listen, SNI, mesh.client_config()).await.unwrap();
    let (name, client_seen) = workload::read_greeting(&mut tls).await.unwrap();
    assert_eq!(name, "helloworld-v1");
    // The backend saw the client's own certificate: TLS was passed through, not terminated.
    assert_eq!(client_seen, mesh.client.spiffe);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio-peer-exchange"[..]));

    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let sent = payload.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let echoed = workload::read_to_end(&mut reader).await.unwrap();
    writing.await.unwrap();
    assert_eq!(echoed.len(), payload.len() + EOF_TRAILER.len());
    assert!(echoed[..payload.len()] == payload[..], "bytes changed in transit");
    // The trailer comes after the client's half-close: the FIN went upstream while the other direction
    // stayed open.
    assert_eq!(&echoed[payload.len()..], EOF_TRAILER);

    let labels = [("destination_service", "helloworld.sample.svc.cluster.local"), ("destination_cluster", "cluster1")];
    eventually(WITHIN, "istio metrics count the tunnel", || async {
        let m = gateway.metrics();
        metric(&m, "istio_tcp_connections_closed_total", &labels) == 1.0
            && metric(&m, "istio_tcp_connections_opened_total", &labels) == 1.0
            && metric(&m, "istio_tcp_received_bytes_total", &labels) > payload.len() as f64
            && metric(&m, "istio_tcp_sent_bytes_total", &labels) > payload.len() as f64
    })
    .await;
    let m = gateway.metrics();
    let istio_labels = [
        ("reporter", "source"),
        ("destination_app", "helloworld"),
        ("destination_version", "v1"),
        ("destination_service_name", "helloworld"),
        ("destination_service_namespace", "sample"),
        ("response_flags", "-"),
    ];
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &istio_labels), 1.0);
    assert_eq!(metric(&m, "crossgate_upstream_cx_total", &[("cluster", SNI)]), 1.0);
    assert_eq!(metric(&m, "crossgate_downstream_cx_total", &[]), 1.0);
}

#[tokio::test]
async fn bytes_are_counted_while_the_tunnel_is_open() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &[]).await;
    let (mut tls, _) = mesh.tunnel(gateway.listen).await;
    tls.write_all(&[7u8; 100_000]).await.unwrap();
    let mut echoed = vec![0u8; 100_000];
    tls.read_exact(&mut echoed).await.unwrap();
    eventually(WITHIN, "bytes counted before the tunnel closes", || async {
        let m = gateway.metrics();
        metric(&m, "istio_tcp_received_bytes_total", &[]) > 100_000.0
            && metric(&m, "istio_tcp_sent_bytes_total", &[]) > 100_000.0
    })
    .await;
    let m = gateway.metrics();
    assert_eq!(metric(&m, "istio_tcp_connections_closed_total", &[]), 0.0);
    assert_eq!(metric(&m, "crossgate_upstream_cx_active", &[("cluster", SNI)]), 1.0);
}

#[tokio::test]
async fn a_hello_dribbled_byte_by_byte_routes() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &[]).await;
    let tcp = TcpStream::connect(gateway.listen).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let dribble = Dribble::new(tcp, 400, Duration::from_millis(1));
    let mut tls = workload::connect_over(dribble, SNI, mesh.client_config()).await.unwrap();
    let (name, _) = workload::read_greeting(&mut tls).await.unwrap();
    assert_eq!(name, "v1");
}

#[tokio::test]
async fn every_refusal_closes_and_is_counted() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &["--hello-timeout=300ms"]).await;

    // Unknown SNI (e.g. the old `.global` hosts).
    let global = "outbound_.5000_._.helloworld.sample.global";
    assert!(workload::connect(gateway.listen, global, mesh.client_config()).await.is_err());
    // No SNI: with an IP address as server name rustls sends none.
    assert!(workload::connect(gateway.listen, "127.0.0.1", mesh.client_config()).await.is_err());
    // An ALPN that is not Istio's mTLS (a plain HTTP/2 client), and no ALPN at all.
    let h2 = mesh.client.client_config(&mesh.server.spiffe, &[b"h2"]);
    assert!(workload::connect(gateway.listen, SNI, h2).await.is_err());
    let no_alpn = mesh.client.client_config(&mesh.server.spiffe, &[]);
    assert!(workload::connect(gateway.listen, SNI, no_alpn).await.is_err());

    // Plaintext HTTP.
    let mut plain = TcpStream::connect(gateway.listen).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(closed_by_gateway(&mut plain).await);
    // A handshake record that is not a ClientHello (a ServerHello).
    let mut server_hello = TcpStream::connect(gateway.listen).await.unwrap();
    server_hello.write_all(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]).await.unwrap();
    assert!(closed_by_gateway(&mut server_hello).await);
    // A malformed ClientHello: a body shorter than its version and random.
    let mut malformed = TcpStream::connect(gateway.listen).await.unwrap();
    malformed.write_all(&[0x16, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3]).await.unwrap();
    assert!(closed_by_gateway(&mut malformed).await);
    // A hello larger than the 16 KiB cap: a handshake announcing 64 KiB, sent in full records.
    let mut huge = TcpStream::connect(gateway.listen).await.unwrap();
    let mut bytes = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0xff, 0xff, 3, 3];
    bytes.resize(5 + 0x4000, 0);
    bytes.extend_from_slice(&[0x16, 3, 1, 0x40, 0x00]);
    bytes.resize(bytes.len() + 0x4000, 0);
    let _ = huge.write_all(&bytes).await;
    assert!(closed_by_gateway(&mut huge).await);
    // Too slow: part of a hello, then nothing.
    let mut slow = TcpStream::connect(gateway.listen).await.unwrap();
    slow.write_all(&[0x16, 3, 1]).await.unwrap();
    assert!(closed_by_gateway(&mut slow).await);
    // Gone before the hello was complete.
    let mut gone = TcpStream::connect(gateway.listen).await.unwrap();
    gone.write_all(&[0x16, 3, 1]).await.unwrap();
    drop(gone);

    let once = [
        "unknown_sni",
        "no_sni",
        "not_tls",
        "not_client_hello",
        "malformed_hello",
        "hello_too_large",
        "hello_timeout",
        "closed_before_hello",
    ];
    eventually(WITHIN, "each reason counted", || async {
        once.iter().all(|reason| rejected(&gateway, reason) == 1.0) && rejected(&gateway, "alpn_mismatch") == 2.0
    })
    .await;
    assert_eq!(backend.connections(), 0, "nothing unroutable reached the backend");
}

#[tokio::test]
async fn upstream_refusals_are_counted_with_envoy_flags() {
    let mesh = mesh();
    let (_reserved, dead) = refusing_address(std::net::Ipv4Addr::LOCALHOST);
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let v2 = "outbound_.5000_.v2_.helloworld.sample.svc.cluster.local";
    let v3 = "outbound_.5000_.v3_.helloworld.sample.svc.cluster.local";
    // Only an unhealthy host, and outlier detection, which sets Envoy's panic threshold to 0 (Istio's
    // minHealthPercent default): no panic routing, so no healthy upstream.
    let v4 = "outbound_.5000_.v4_.helloworld.sample.svc.cluster.local";
    let live = backend.address;
    let yaml = format!(
        "clusters:
- name: {SNI}
  endpoints: [{{ address: '{dead}' }}]
- name: {v2}
  endpoints: []
- name: {v4}
  trafficPolicy: {{ outlierDetection: {{ consecutive5xxErrors: 5 }} }}
  endpoints: [{{ address: '{live}', health: UNHEALTHY }}]
- name: {v3}
  trafficPolicy: {{ connectionPool: {{ tcp: {{ maxConnections: 1 }} }} }}
  endpoints: [{{ address: '{live}' }}]
"
    );
    let gateway = TestGateway::start(&yaml, &[]).await;
    assert!(workload::connect(gateway.listen, SNI, mesh.client_config()).await.is_err());
    assert!(workload::connect(gateway.listen, v2, mesh.client_config()).await.is_err());
    assert!(workload::connect(gateway.listen, v4, mesh.client_config()).await.is_err());
    let mut first = workload::connect(gateway.listen, v3, mesh.client_config()).await.unwrap();
    workload::read_greeting(&mut first).await.unwrap();
    assert!(workload::connect(gateway.listen, v3, mesh.client_config()).await.is_err(), "over maxConnections");
    drop(first);

    eventually(WITHIN, "upstream refusals counted", || async {
        let m = gateway.metrics();
        rejected(&gateway, "upstream_connect_failed") == 1.0
            && rejected(&gateway, "no_healthy_upstream") == 2.0
            && rejected(&gateway, "upstream_overflow") == 1.0
            && metric(&m, "crossgate_upstream_cx_connect_fail_total", &[("cluster", SNI)]) == 1.0
            && metric(&m, "crossgate_upstream_cx_none_healthy_total", &[("cluster", v2)]) == 1.0
            && metric(&m, "crossgate_upstream_cx_overflow_total", &[("cluster", v3)]) == 1.0
            && metric(&m, "istio_tcp_connections_closed_total", &[("response_flags", "UF")]) == 1.0
            && metric(&m, "crossgate_upstream_cx_none_healthy_total", &[("cluster", v4)]) == 1.0
            && metric(&m, "istio_tcp_connections_closed_total", &[("response_flags", "UH")]) == 2.0
            && metric(&m, "istio_tcp_connections_closed_total", &[("response_flags", "UO")]) == 1.0
    })
    .await;
    // The slot is given back when the tunnel closes.
    eventually(WITHIN, "maxConnections slot released", || async {
        workload::connect(gateway.listen, v3, mesh.client_config()).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn the_downstream_connection_limit_holds() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &["--max-downstream-connections=1"]).await;
    let (_first, _) = mesh.tunnel(gateway.listen).await;
    assert!(workload::connect(gateway.listen, SNI, mesh.client_config()).await.is_err());
    eventually(WITHIN, "overflow counted", || async { rejected(&gateway, "downstream_overflow") == 1.0 }).await;
}

#[tokio::test]
async fn refused_endpoints_are_skipped() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "live").await;
    let (_reserved, dead) = refusing_address(std::net::Ipv4Addr::LOCALHOST);
    let extra = "  trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }\n";
    // Envoy's tcp_proxy tries one endpoint (the default); with two, the refusal is hidden from the client.
    let gateway = TestGateway::start(&resources(&[dead, backend.address], extra), &["--connect-attempts=2"]).await;
    for _ in 0..10 {
        assert_eq!(mesh.tunnel(gateway.listen).await.1, "live");
    }
    let m = gateway.metrics();
    assert!(metric(&m, "crossgate_upstream_cx_connect_fail_total", &[("cluster", SNI)]) >= 1.0);
    assert_eq!(rejected(&gateway, "upstream_connect_failed"), 0.0);
}

#[tokio::test]
async fn reload_keeps_open_tunnels_and_refuses_bad_files() {
    let mesh = mesh();
    let old = EchoBackend::start(&mesh.server, "old").await;
    let new = EchoBackend::start(&mesh.server, "new").await;
    let gateway = TestGateway::start(&resources(&[old.address], ""), &[]).await;
    let (mut open, backend) = mesh.tunnel(gateway.listen).await;
    assert_eq!(backend, "old");

    gateway.write_resources(&resources(&[new.address], ""));
    eventually(WITHIN, "the new endpoint takes new connections", || async {
        mesh.tunnel(gateway.listen).await.1 == "new"
    })
    .await;
    // The tunnel opened before the reload still carries bytes.
    open.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    open.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here");

    // A bad file is refused, and the last good configuration keeps serving.
    gateway.write_resources("clusters:\n- name: not-an-istio-key\n  endpoints: [{ address: nowhere }]\n");
    eventually(WITHIN, "the bad file is refused", || async {
        metric(&gateway.metrics(), "crossgate_config_updates_total", &[("result", "rejected")]) >= 1.0
    })
    .await;
    assert_eq!(mesh.tunnel(gateway.listen).await.1, "new");
}

async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = workload::read_to_end(&mut stream).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn admin_ports_serve_readiness_metrics_and_config_dump() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &[]).await;
    eventually(WITHIN, "ready", || async { http_get(gateway.admin.status, "/healthz/ready").await.0 == 200 }).await;
    let (status, body) = http_get(gateway.admin.metrics, "/stats/prometheus").await;
    assert_eq!(status, 200);
    assert!(body.contains("crossgate_config_clusters 1"), "{body}");
    assert_eq!(
        http_get(gateway.admin.status, "/stats/prometheus").await.0,
        404,
        "the status port serves readiness only"
    );
    let (status, dump) = http_get(gateway.admin.admin, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["clusters"][0]["name"], SNI);
    assert_eq!(dump["clusters"][0]["endpoints"][0]["address"], backend.address.to_string());
    assert_eq!(dump["clusters"][0]["service"]["namespace"], "sample");
}

#[tokio::test]
async fn drain_fails_readiness_keeps_accepting_then_closes_and_lets_tunnels_finish() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let flags = ["--drain-duration=500ms", "--termination-grace=20s"];
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &flags).await;
    eventually(WITHIN, "ready", || async { http_get(gateway.admin.status, "/healthz/ready").await.0 == 200 }).await;
    let (mut open, _) = mesh.tunnel(gateway.listen).await;

    let handle = gateway.handle.clone();
    let shutdown = tokio::spawn(async move { handle.shut_down().await });
    eventually(WITHIN, "readiness fails at once", || async {
        http_get(gateway.admin.status, "/healthz/ready").await.0 == 503
    })
    .await;
    // Within the drain duration the listener still accepts and routes, as Envoy's graceful drain does.
    let (during, _) = mesh.tunnel(gateway.listen).await;
    drop(during);
    // Then it closes.
    eventually(WITHIN, "listener closed", || async { TcpStream::connect(gateway.listen).await.is_err() }).await;
    // The open tunnel still flows.
    open.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    open.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    // When it ends, shutdown completes well before the grace deadline.
    drop(open);
    tokio::time::timeout(WITHIN, shutdown).await.expect("shutdown ends with the last tunnel").unwrap();
    tokio::time::timeout(WITHIN, gateway.finished()).await.expect("run returns").unwrap();
}

#[tokio::test]
async fn termination_grace_closes_lingering_tunnels() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let flags = ["--drain-duration=100ms", "--termination-grace=500ms"];
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &flags).await;
    let (mut open, _) = mesh.tunnel(gateway.listen).await;
    gateway.handle.shut_down().await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WITHIN, open.read(&mut buf)).await.expect("tunnel closed by the gateway");
    assert!(matches!(read, Ok(0) | Err(_)));
    tokio::time::timeout(WITHIN, gateway.finished()).await.unwrap().unwrap();
}

#[tokio::test]
async fn exit_on_zero_active_connections_exits_early() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let flags = [
        "--drain-duration=20s",
        "--termination-grace=30s",
        "--exit-on-zero-active-connections",
        "--minimum-drain-duration=200ms",
    ];
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &flags).await;
    let started = std::time::Instant::now();
    gateway.handle.shut_down().await;
    tokio::time::timeout(WITHIN, gateway.finished()).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "did not wait for the 20s drain");
}

#[tokio::test]
async fn idle_tunnels_time_out() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let extra = "  trafficPolicy: { connectionPool: { tcp: { idleTimeout: 300ms } } }\n";
    let gateway = TestGateway::start(&resources(&[backend.address], extra), &[]).await;
    let (mut tls, _) = mesh.tunnel(gateway.listen).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WITHIN, tls.read(&mut buf)).await.expect("closed for idleness");
    assert!(matches!(read, Ok(0) | Err(_)));
    let m = gateway.metrics();
    assert_eq!(metric(&m, "crossgate_upstream_cx_idle_timeout_total", &[("cluster", SNI)]), 1.0);
}

/// A client that sent a real sidecar ClientHello through the gateway, and the plain TCP upstream that received
/// it (standing in for a workload, so that the test controls its resets and FINs).
async fn raw_tunnel(mesh: &Mesh) -> (TestGateway, TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = TestGateway::start(&resources(&[listener.local_addr().unwrap()], ""), &[]).await;
    let mut client = TcpStream::connect(gateway.listen).await.unwrap();
    let hello = workload::client_hello(&mesh.client, SNI, &SIDECAR_ALPN);
    client.write_all(&hello).await.unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    let mut forwarded = vec![0u8; hello.len()];
    upstream.read_exact(&mut forwarded).await.unwrap();
    assert_eq!(forwarded, hello, "the hello is forwarded as it came");
    (gateway, client, upstream)
}

async fn read_error(stream: &mut TcpStream) -> Result<usize, std::io::ErrorKind> {
    let mut buf = [0u8; 16];
    tokio::time::timeout(WITHIN, stream.read(&mut buf)).await.unwrap().map_err(|e| e.kind())
}

#[tokio::test]
async fn an_upstream_reset_resets_the_client() {
    let (_gateway, mut client, upstream) = raw_tunnel(&mesh()).await;
    upstream.set_zero_linger().unwrap();
    drop(upstream);
    assert_eq!(read_error(&mut client).await, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn a_client_reset_resets_the_upstream() {
    let (_gateway, client, mut upstream) = raw_tunnel(&mesh()).await;
    client.set_zero_linger().unwrap();
    drop(client);
    assert_eq!(read_error(&mut upstream).await, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn a_client_half_close_reaches_the_upstream_as_eof() {
    let (_gateway, mut client, mut upstream) = raw_tunnel(&mesh()).await;
    client.shutdown().await.unwrap();
    assert_eq!(read_error(&mut upstream).await, Ok(0), "EOF after the hello");
    // The other direction is still open.
    upstream.write_all(b"late answer").await.unwrap();
    upstream.shutdown().await.unwrap();
    assert_eq!(workload::read_to_end(&mut client).await.unwrap(), b"late answer");
}

#[tokio::test]
async fn istiod_ports_pass_any_tls_through_to_istiod() {
    let mesh = mesh();
    let istiod = EchoBackend::start(&mesh.server, "istiod").await;
    // A free port for the passthrough listener (it listens on --listen's address, on a fixed port).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let route = format!("--istiod-passthrough={port}=localhost:{}", istiod.address.port());
    let gateway = TestGateway::start(&resources(&[], ""), &[&route]).await;
    let passthrough: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Any SNI and no Istio ALPN: a remote cluster's istiod client, or the API server calling the webhook.
    let grpc_client = mesh.client.client_config(&mesh.server.spiffe, &[]);
    let mut tls = workload::connect(passthrough, "istiod.istio-system.svc", grpc_client).await.unwrap();
    assert_eq!(workload::read_greeting(&mut tls).await.unwrap(), ("istiod".to_owned(), mesh.client.spiffe.clone()));
    // Plaintext is still refused.
    let mut plain = TcpStream::connect(passthrough).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed_by_gateway(&mut plain).await);
    let listener = format!("127.0.0.1_{port}");
    eventually(WITHIN, "counted on the passthrough listener", || async {
        let m = gateway.metrics();
        metric(&m, "crossgate_downstream_cx_rejected_total", &[("listener", &listener), ("reason", "not_tls")]) == 1.0
            && metric(&m, "crossgate_passthrough_received_bytes_total", &[("listener", &listener)]) > 0.0
    })
    .await;
}

#[tokio::test]
async fn tunnels_end_at_the_max_connection_duration_even_when_busy() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let extra = "  trafficPolicy: { connectionPool: { tcp: { maxConnectionDuration: 500ms } } }\n";
    let gateway = TestGateway::start(&resources(&[backend.address], extra), &[]).await;
    let (mut tls, _) = mesh.tunnel(gateway.listen).await;
    let started = std::time::Instant::now();
    // Keep the tunnel busy: it is closed for its age, not for idleness.
    let mut echoed = [0u8; 4];
    let closed = loop {
        if tls.write_all(b"ping").await.is_err() || tls.read_exact(&mut echoed).await.is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < WITHIN, "never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(closed >= Duration::from_millis(400), "closed after {closed:?}");
    let m = gateway.metrics();
    assert_eq!(metric(&m, "crossgate_upstream_cx_max_duration_reached_total", &[("cluster", SNI)]), 1.0);
}

#[tokio::test]
async fn workers_hold_level_shares_of_the_connections_and_each_one_carries_traffic() {
    let mesh = mesh();
    let backend = EchoBackend::start(&mesh.server, "v1").await;
    let gateway = TestGateway::start(&resources(&[backend.address], ""), &["--workers=2"]).await;
    let mut tunnels = Vec::new();
    for _ in 0..16 {
        let (tls, _) = mesh.tunnel(gateway.listen).await;
        tunnels.push(tls);
    }
    // The kernel's hash splits 16 connections 8/8 only one time in five; the gateway evens out the rest.
    let m = gateway.metrics();
    let active = |worker: &str| metric(&m, "crossgate_worker_downstream_cx_active", &[("worker", worker)]);
    assert_eq!((active("0"), active("1")), (8.0, 8.0), "{m}");
    for (index, tls) in tunnels.iter_mut().enumerate() {
        let message = [index as u8; 1000];
        tls.write_all(&message).await.unwrap();
        let mut echoed = [0u8; 1000];
        tls.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message, "tunnel {index}");
    }
    drop(tunnels);
    eventually(WITHIN, "every worker's share closed", || async {
        let m = gateway.metrics();
        let active = |worker: &str| metric(&m, "crossgate_worker_downstream_cx_active", &[("worker", worker)]);
        active("0") + active("1") == 0.0
    })
    .await;
}
