//! Locality failover in a running gateway: real mTLS endpoints in two localities, outlier detection reacting to
//! real refused connects, and the traffic moving back when the near endpoints return.

use std::net::SocketAddr;
use std::time::Duration;

use crossgate_proxy::testing::gateway::TestGateway;
use crossgate_proxy::testing::pki::{SIDECAR_ALPN, TestCa};
use crossgate_proxy::testing::workload::{self, EchoBackend};
use crossgate_proxy::testing::{eventually, metric};
use tokio::net::TcpListener;

const SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const WITHIN: Duration = Duration::from_secs(15);

#[tokio::test]
async fn losing_the_near_locality_moves_connections_far_and_back() {
    let ca = TestCa::new("cluster.local");
    let (client, server) = (ca.workload("sleep", "sleep"), ca.workload("sample", "helloworld"));
    let client_config = client.client_config(&server.spiffe, &SIDECAR_ALPN);
    let mut near = vec![EchoBackend::start(&server, "near-1").await, EchoBackend::start(&server, "near-2").await];
    let far = [EchoBackend::start(&server, "far-1").await, EchoBackend::start(&server, "far-2").await];
    let near_addresses: Vec<SocketAddr> = near.iter().map(|b| b.address).collect();
    let endpoint =
        |address: SocketAddr, locality: &str| format!("  - {{ address: '{address}', locality: {locality} }}\n");
    let mut yaml = format!(
        "clusters:\n- name: {SNI}\n  trafficPolicy:\n    loadBalancer: {{ simple: ROUND_ROBIN }}\n    \
         outlierDetection: {{ consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100 }}\n  \
         endpoints:\n"
    );
    for address in &near_addresses {
        yaml.push_str(&endpoint(*address, "us-east1/us-east1-b"));
    }
    for backend in &far {
        yaml.push_str(&endpoint(backend.address, "us-west1/us-west1-a"));
    }
    // Three attempts per connection (Envoy's tcp_proxy default is one), so that retries hide the refusals.
    let gateway = TestGateway::start(&yaml, &["--locality=us-east1/us-east1-b", "--connect-attempts=3"]).await;
    let call = || {
        let client_config = client_config.clone();
        async move {
            let mut tls = workload::connect(gateway.listen, SNI, client_config).await.ok()?;
            workload::read_greeting(&mut tls).await.ok().map(|(name, _)| name)
        }
    };

    // Healthy: the gateway's own locality takes everything.
    for _ in 0..10 {
        assert!(call().await.unwrap().starts_with("near-"));
    }

    // The near locality goes away: connects are refused, each refusal ejects its host, and the retry on another
    // endpoint hides it from the client.
    for backend in near.drain(..) {
        backend.stop();
    }
    for _ in 0..10 {
        let answer = call().await;
        assert!(answer.as_deref().is_some_and(|name| name.starts_with("far-")), "{answer:?}");
    }
    let m = gateway.metrics();
    assert_eq!(metric(&m, "crossgate_outlier_ejections_active", &[("cluster", SNI)]), 2.0);
    assert_eq!(metric(&m, "crossgate_downstream_cx_rejected_total", &[("reason", "upstream_connect_failed")]), 0.0);

    // The near endpoints come back on the same addresses: once their ejection time is over, traffic returns.
    for (address, name) in near_addresses.iter().zip(["near-1", "near-2"]) {
        near.push(EchoBackend::serve(TcpListener::bind(address).await.unwrap(), &server, name));
    }
    // The gateway's sweep un-ejects them when their time is up, with no connection to prompt it.
    eventually(WITHIN, "the sweep un-ejects without traffic", || async {
        metric(&gateway.metrics(), "crossgate_outlier_ejections_active", &[("cluster", SNI)]) == 0.0
    })
    .await;
    eventually(WITHIN, "traffic is back in the near locality", || async {
        call().await.is_some_and(|name| name.starts_with("near-"))
    })
    .await;
    for _ in 0..10 {
        assert!(call().await.unwrap().starts_with("near-"));
    }
    assert_eq!(metric(&gateway.metrics(), "crossgate_outlier_ejections_active", &[("cluster", SNI)]), 0.0);
}
