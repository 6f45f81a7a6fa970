//! The routing step after the hello: parsing the Istio key, and the route table lookup at 10 and 100,000
//! clusters (a hit, a miss, and a hit that needs case folding).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use crossgate_proto::{Cluster, Endpoint, Resources};
use crossgate_proxy::route::{ClusterDefaults, RouteTable, SniKey};

fn sni(i: usize) -> String {
    format!("outbound_.8080_.v{}_.service-{i}.namespace-{}.svc.cluster.local", i % 3, i % 97)
}

/// `n` clusters of one endpoint each, built the way a config update builds them.
fn table(n: usize) -> RouteTable {
    let clusters = (0..n)
        .map(|i| Cluster {
            name: sni(i),
            endpoints: vec![Endpoint {
                address: format!("10.{}.{}.{}:8080", (i >> 16) as u8, (i >> 8) as u8, i as u8),
                ..Endpoint::default()
            }],
            ..Cluster::default()
        })
        .collect();
    RouteTable::build(&Resources { clusters }, &ClusterDefaults::default(), &RouteTable::default())
        .expect("valid resources")
}

fn key(c: &mut Criterion) {
    let key = sni(42);
    c.bench_function("route/key_parse", |b| b.iter(|| SniKey::parse(black_box(&key)).map(|k| k.port)));
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route/get");
    for n in [10, 100_000] {
        let table = table(n);
        let hit = sni(n / 2);
        let miss = sni(n + 1);
        let upper = hit.to_ascii_uppercase();
        group.bench_function(format!("hit/{n}"), |b| b.iter(|| table.get(black_box(&hit)).is_some()));
        group.bench_function(format!("miss/{n}"), |b| b.iter(|| table.get(black_box(&miss)).is_some()));
        group.bench_function(format!("hit_uppercase/{n}"), |b| b.iter(|| table.get(black_box(&upper)).is_some()));
    }
    group.finish();
}

criterion_group!(benches, key, lookup);
criterion_main!(benches);
