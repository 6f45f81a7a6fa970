//! The routing step after the hello: parsing the Istio key, and the route table lookup at 10 and 100,000
//! clusters (a hit, a miss, and a hit that needs case folding); and the cost of one endpoint change reaching a
//! gateway that holds 100,000 clusters (one assignment applied, the route table rebuilt around it).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::Arc;

use crossgate_istio::gateway::MeshDefaults;
use crossgate_istio::locality_lb::GatewayIdentity;
use crossgate_proto::{Cluster, Endpoint, Resources};
use crossgate_proxy::cluster::ClusterDefaults;
use crossgate_proxy::discovery::file::envoy_resources;
use crossgate_proxy::discovery::{ConfigStore, Update};
use crossgate_proxy::metrics::Telemetry;
use crossgate_proxy::route::SniKey;

fn sni(i: usize) -> String {
    format!("outbound_.8080_.v{}_.service-{i}.namespace-{}.svc.cluster.local", i % 3, i % 97)
}

fn resources(n: usize) -> Resources {
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
    Resources { clusters }
}

/// A gateway's configuration of `n` clusters of one endpoint each, applied the way a config update applies it.
fn store(n: usize) -> ConfigStore {
    let envoy = envoy_resources(&resources(n), &GatewayIdentity::default(), &MeshDefaults::default()).unwrap();
    let store = ConfigStore::new(ClusterDefaults::default(), 15443, Arc::new(Telemetry::default()), "bench");
    store.replace(envoy.listener, envoy.clusters, envoy.assignments).expect("valid resources");
    store
}

fn key(c: &mut Criterion) {
    let key = sni(42);
    c.bench_function("route/key_parse", |b| b.iter(|| SniKey::parse(black_box(&key)).map(|k| k.port)));
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route/get");
    for n in [10, 100_000] {
        let store = store(n);
        let table = store.routes();
        let hit = sni(n / 2);
        let miss = sni(n + 1);
        let upper = hit.to_ascii_uppercase();
        group.bench_function(format!("hit/{n}"), |b| b.iter(|| table.get(black_box(&hit)).is_some()));
        group.bench_function(format!("miss/{n}"), |b| b.iter(|| table.get(black_box(&miss)).is_some()));
        group.bench_function(format!("hit_uppercase/{n}"), |b| b.iter(|| table.get(black_box(&upper)).is_some()));
    }
    group.finish();
}

fn update(c: &mut Criterion) {
    let n = 100_000;
    let store = store(n);
    let mut changed = resources(1);
    changed.clusters[0].name = sni(n / 2);
    let assignments: Vec<_> = (0..2)
        .map(|port| {
            changed.clusters[0].endpoints[0].address = format!("10.9.9.9:{}", 8080 + port);
            let envoy = envoy_resources(&changed, &GatewayIdentity::default(), &MeshDefaults::default()).unwrap();
            envoy.assignments[0].clone()
        })
        .collect();
    let mut flip = 0;
    c.bench_function("route/update_one_endpoint/100000", |b| {
        b.iter(|| {
            flip ^= 1;
            let update = Update {
                resources: vec![(sni(n / 2), assignments[flip].clone())],
                removed: Vec::new(),
                complete: false,
            };
            assert!(store.apply_assignments(update).is_empty());
        })
    });
}

criterion_group!(benches, key, lookup, update);
criterion_main!(benches);
