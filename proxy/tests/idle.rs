//! Idle tunnels hold no pipe and no buffer: a gateway must carry tens of thousands of pooled HTTP/2 connections
//! that sit idle between requests. In its own test binary, so that the process's descriptors are its own.

use crossgate_proxy::testing::gateway::TestGateway;
use crossgate_proxy::testing::pki::{SIDECAR_ALPN, TestCa};
use crossgate_proxy::testing::workload::{self, EchoBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const TUNNELS: usize = 100;

fn open_pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test]
async fn idle_tunnels_hold_no_pipes() {
    let ca = TestCa::new("cluster.local");
    let (client, server) = (ca.workload("sleep", "sleep"), ca.workload("sample", "helloworld"));
    let backend = EchoBackend::start(&server, "v1").await;
    let yaml = format!("clusters:\n- name: {SNI}\n  endpoints: [{{ address: '{}' }}]\n", backend.address);
    let gateway = TestGateway::start(&yaml, &["--copy=splice"]).await;
    let before = open_pipes();
    let mut tunnels = Vec::new();
    for _ in 0..TUNNELS {
        let mut tls =
            workload::connect(gateway.listen, SNI, client.client_config(&server.spiffe, &SIDECAR_ALPN)).await.unwrap();
        workload::read_greeting(&mut tls).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await.unwrap();
        tunnels.push(tls);
    }
    // Every tunnel has moved bytes both ways and is now idle: only the per-thread pool of pipes remains (at most
    // 64 pipes, 2 descriptors each, on this test's one thread), not 2 pipes per tunnel.
    let held = open_pipes() - before;
    assert!(held <= 2 * 64, "{held} pipe descriptors held by {TUNNELS} idle tunnels");
    assert!(held < 4 * TUNNELS);
    drop(tunnels);
}
