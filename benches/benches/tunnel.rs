//! One tunnel end to end, in process: connect to a gateway, send a real ClientHello, the gateway routes it to
//! a plain TCP upstream that answers with one byte once it has the hello, then close. What a new connection
//! costs the gateway beyond the TLS handshake it never takes part in.

use std::net::SocketAddr;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use crossgate_proxy::testing::gateway::TestGateway;
use crossgate_proxy::testing::pki::{SIDECAR_ALPN, TestCa};
use crossgate_proxy::testing::workload::client_hello;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

const SNI: &str = "outbound_.9080_._.upstream.bench.svc.cluster.local";

/// Reads the hello, answers one byte, waits for the close.
async fn upstream(listener: TcpListener, hello_len: usize) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut hello = vec![0; hello_len];
            stream.read_exact(&mut hello).await?;
            stream.write_all(b"x").await?;
            stream.read(&mut hello).await
        });
    }
}

async fn one_tunnel(gateway: SocketAddr, hello: &[u8]) {
    let socket = TcpSocket::new_v4().expect("socket");
    // A RST on close: a tight loop of closes must not fill the port range with TIME_WAIT.
    socket.set_zero_linger().expect("linger");
    let mut stream = socket.connect(gateway).await.expect("connect to the gateway");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(hello).await.expect("send the hello");
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.expect("the upstream's first byte");
}

fn tunnel(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ca = TestCa::new("bench");
    let hello = client_hello(&ca.workload("bench", "client"), SNI, &SIDECAR_ALPN);
    let gateway = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(upstream(listener, hello.len()));
        TestGateway::start(&format!("clusters:\n- name: {SNI}\n  endpoints: [{{ address: '{address}' }}]\n"), &[]).await
    });
    c.bench_function("tunnel/accept_connect_first_byte_close", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iterations {
                    one_tunnel(gateway.listen, &hello).await;
                }
                start.elapsed()
            })
        })
    });
    drop(gateway);
}

criterion_group!(benches, tunnel);
criterion_main!(benches);
