//! The control service's view at mesh scale: 100,000 endpoints (1,000 services x 100 endpoints, half in each
//! of two clusters, with v1/v2 subsets), one endpoint changes, and the gateway's view is rebuilt (exactly the
//! clusters of that endpoint differ), or updated for the changed service as the control service does.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use crossgate_control::model::{
    ClusterModel, DestinationRuleModel, EndpointModel, MeshModel, Protocol, ServiceModel, ServicePort, SubsetModel,
};
use crossgate_control::server::MeshVersion;
use crossgate_control::views::{GatewayView, ViewOptions, gateway_view};
use crossgate_istio::node::GatewayNode;

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_CLUSTER: usize = 50;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn cluster(index: u8) -> ClusterModel {
    let id = format!("cluster{index}");
    let network = format!("network{index}");
    let services = (0..SERVICES)
        .map(|s| ServiceModel {
            name: format!("svc-{s}"),
            namespace: "bench".to_owned(),
            hostname: format!("svc-{s}.bench.svc.cluster.local"),
            ports: vec![ServicePort { name: "tcp".to_owned(), port: 80, protocol: Protocol::Tcp }],
            endpoints: (0..ENDPOINTS_PER_CLUSTER)
                .map(|e| EndpointModel {
                    address: [10, index, (s / 4) as u8, (s % 4 * 64 + e) as u8].into(),
                    target_ports: [(80, 8080)].into(),
                    labels: labels(&[
                        ("app", &format!("svc-{s}")),
                        ("version", if e % 2 == 0 { "v1" } else { "v2" }),
                        ("security.istio.io/tlsMode", "istio"),
                    ]),
                    locality: format!("region{index}/zone{}", e % 3),
                    network: network.clone(),
                    ready: true,
                    terminating: false,
                    workload_name: format!("svc-{s}-v{}-5d9f7c8b4-{e:05}", e % 2 + 1),
                    node_name: format!("node-{}", e % 10),
                })
                .collect(),
            publish_not_ready: false,
        })
        .map(Arc::new)
        .collect();
    let subset =
        |name: &str| SubsetModel { name: name.to_owned(), labels: labels(&[("version", name)]), traffic_policy: None };
    let catch_all = DestinationRuleModel {
        name: "versions".to_owned(),
        namespace: "istio-system".to_owned(),
        host: "*.local".to_owned(),
        traffic_policy: None,
        subsets: vec![subset("v1"), subset("v2")],
        export_to: Vec::new(),
    };
    ClusterModel { id, network, services, destination_rules: vec![catch_all] }
}

fn registry(c: &mut Criterion) {
    let mesh = MeshModel { clusters: [1, 2].map(|i| (format!("cluster{i}"), Arc::new(cluster(i)))).into() };
    let gateway = GatewayNode { cluster_id: "cluster1".to_owned(), ..Default::default() };
    let options = ViewOptions::default();
    let held = gateway_view(&mesh, &gateway, &options);
    let endpoints: usize = held.values().filter(|c| c.name.contains("_._.")).map(|c| c.endpoints.len()).sum();
    assert_eq!(endpoints, SERVICES * ENDPOINTS_PER_CLUSTER * 2);

    // One endpoint of svc-500 (a v2 pod in cluster2) stops being ready.
    let mut changed = mesh.clone();
    let service = &mut Arc::make_mut(changed.clusters.get_mut("cluster2").unwrap()).services[500];
    Arc::make_mut(service).endpoints[1].ready = false;

    let started = Instant::now();
    let next = gateway_view(&changed, &gateway, &options);
    let elapsed = started.elapsed();
    let names: Vec<_> =
        next.iter().filter(|(name, c)| held.get(*name) != Some(*c)).map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["outbound_.80_._.svc-500.bench.svc.cluster.local", "outbound_.80_.v2_.svc-500.bench.svc.cluster.local"]
    );
    println!(
        "one endpoint changed in a {endpoints}-endpoint mesh ({} clusters): the view took {elapsed:?}, changed = {names:?}",
        held.len()
    );

    let mut group = c.benchmark_group("registry");
    group.sample_size(10).measurement_time(Duration::from_secs(15));
    group.bench_function("gateway_view, 100k endpoints", |b| {
        b.iter(|| gateway_view(black_box(&changed), &gateway, &options))
    });
    // What the control service does for that change: the next mesh version (what changed, where the services
    // are), then the gateway's kept view updated for the changed service alone.
    let first = MeshVersion::whole(mesh, 1);
    let mut kept = GatewayView::default();
    kept.rebuild(&first.mesh, &gateway, &options);
    group.bench_function("one change: next version and view update, 100k endpoints", |b| {
        b.iter(|| {
            let next = first.next(black_box(changed.clone()), Instant::now());
            let hosts = next.changed_hosts.as_deref().expect("the changes are known");
            kept.update(&next.mesh, &next.services, &gateway, &options, hosts)
        })
    });
    group.finish();
}

criterion_group!(benches, registry);
criterion_main!(benches);
