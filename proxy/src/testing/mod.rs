//! Real TLS peers for tests and benches: an Istio-like PKI (rcgen), mTLS backends and clients (rustls) that
//! send SNI and ALPN exactly as Istio sidecars do, and small helpers for asserting on a running gateway.

pub mod ads;
pub mod gateway;
pub mod pki;
pub mod workload;

use std::future::Future;
use std::time::Duration;

/// An address that refuses connections for as long as the returned socket lives: bound, never listening.
/// (A port from a dropped listener is not dead: a parallel test may be given it next.)
pub fn refusing_address(ip: std::net::Ipv4Addr) -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((ip, 0).into()).expect("bind");
    let address = socket.local_addr().expect("bound");
    (socket, address)
}

/// Polls `check` until it holds, or panics with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    // A check that hangs (a connection waiting in an unconfigured gateway's backlog) fails the same way.
    while !tokio::time::timeout_at(deadline, check()).await.unwrap_or(false) {
        assert!(tokio::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of the samples of `name` in a Prometheus text exposition whose labels include every
/// `key="value"` pair of `labels`.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((metric_name, rest)) => (metric_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric_name == name
                && labels.iter().all(|(key, value)| label_text.contains(&format!("{key}=\"{value}\"")));
            if matches { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}
