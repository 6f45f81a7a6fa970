//! The lb's hot paths: one pick (10 and 10,000 endpoints over 9 localities, per algorithm, with default failover
//! priorities), and the outcome report that feeds outlier detection.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use crossgate_istio::locality_lb::GatewayIdentity;
use crossgate_proto::{Cluster, Endpoint};
use crossgate_proxy::lb::{ClusterLb, Outcome, PickContext};
use crossgate_proxy::resources::compact_lb;
use rand::SeedableRng;
use rand::rngs::SmallRng;

/// `n` endpoints spread over 3 regions × 3 zones.
fn cluster(n: usize, policy: &str) -> ClusterLb {
    let endpoints = (0..n)
        .map(|i| Endpoint {
            address: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 15443)).to_string(),
            locality: format!("r{}/z{}", i % 3, (i / 3) % 3),
            ..Default::default()
        })
        .collect();
    let cluster = Cluster {
        name: "outbound_.80_._.bench.default.svc.cluster.local".to_owned(),
        traffic_policy: Some(
            serde_yaml_ng::from_str("outlierDetection: {consecutive5xxErrors: 5, maxEjectionPercent: 100}").unwrap(),
        ),
        endpoints,
        ..Default::default()
    };
    let gateway = GatewayIdentity::new("r0/z0".parse().unwrap(), BTreeMap::new());
    compact_lb(&cluster, &gateway, Some(policy), None).unwrap()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("lb/pick");
    for n in [10, 10_000] {
        for policy in ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "RING_HASH", "MAGLEV"] {
            let lb = cluster(n, policy);
            let mut rng = SmallRng::seed_from_u64(1);
            let mut client = 0u32;
            group.bench_function(format!("{policy}/{n}"), |b| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    let ctx = PickContext { source: IpAddr::from(client.to_be_bytes()), tried: &[] };
                    black_box(lb.pick(&ctx, &mut rng))
                })
            });
        }
    }
    group.finish();
}

fn report(c: &mut Criterion) {
    let mut group = c.benchmark_group("lb/report");
    let lb = cluster(10_000, "LEAST_REQUEST");
    let now = Instant::now();
    group.bench_function("success", |b| b.iter(|| lb.report(black_box(7), Outcome::ConnectSuccess, now)));
    // Four failures then a success: the counting path without ever reaching the threshold.
    let mut n = 0u32;
    group.bench_function("failure", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let outcome = if n.is_multiple_of(5) { Outcome::ConnectSuccess } else { Outcome::ConnectFailure };
            lb.report(black_box(7), outcome, now)
        })
    });
    // An ejection: the cap check, the view rebuild at 10,000 endpoints. Each iteration ejects one new host.
    let mut host = 0;
    group.bench_function("eject", |b| {
        b.iter(|| {
            host = (host + 1) % 10_000;
            for _ in 0..5 {
                lb.report(host, Outcome::ConnectFailure, now);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, pick, report);
criterion_main!(benches);
