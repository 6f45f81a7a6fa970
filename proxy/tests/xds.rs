//! The gateway as an Envoy xDS client, against a scripted delta ADS server: what it subscribes to, what it
//! ACKs and NACKs, and that what it accepts reaches traffic. The resources are built as istiod builds them
//! (`crossgate_istio::gateway`), with the parts of a real gateway push the gateway must ignore.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crossgate_istio::gateway::{self, GatewayResources, MeshDefaults, pack};
use crossgate_istio::locality_lb::GatewayIdentity;
use crossgate_proto::{Cluster as Compact, Endpoint};
use crossgate_proxy::testing::ads::ScriptedAds;
use crossgate_proxy::testing::gateway::TestGateway;
use crossgate_proxy::testing::workload::{EchoBackend, Mesh};
use crossgate_proxy::testing::{eventually, metric};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Filter, Listener, filter};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::{Any, Struct};

const SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const OTHER: &str = "outbound_.9080_._.reviews.sample.svc.cluster.local";
const WITHIN: Duration = Duration::from_secs(10);

fn compact(name: &str, endpoints: &[SocketAddr]) -> Compact {
    Compact {
        name: name.to_owned(),
        endpoints: endpoints
            .iter()
            .map(|a| Endpoint {
                address: a.to_string(),
                cluster_id: "cluster1".into(),
                workload_name: "helloworld-v1".into(),
                labels: BTreeMap::from([("app".into(), "helloworld".into()), ("version".into(), "v1".into())]),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// What istiod sends for these clusters, with an `istio.stats` filter (an opaque typed config) in front of
/// every chain's tcp_proxy, as a real east-west gateway push has.
fn istiod_push(clusters: &[Compact]) -> GatewayResources {
    let built = clusters
        .iter()
        .map(|c| gateway::build(c, &GatewayIdentity::default(), &MeshDefaults::default()).unwrap())
        .collect();
    let mut resources = GatewayResources::new(built);
    let stats = Filter {
        name: "istio.stats".into(),
        config_type: Some(filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/udpa.type.v1.TypedStruct".into(),
            value: pack(&Struct::default()).value,
        })),
    };
    for chain in &mut resources.listener.filter_chains {
        chain.filters.insert(0, stats.clone());
    }
    resources
}

/// `BlackHoleCluster`: a STATIC cluster istiod always sends, which a passthrough gateway ignores.
fn black_hole() -> Cluster {
    Cluster {
        name: "BlackHoleCluster".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        ..Default::default()
    }
}

/// Another Gateway server's listener (port 8443, an HTTP filter chain): ignored.
fn other_listener() -> Listener {
    let mut listener = gateway::listener([]);
    listener.name = "0.0.0.0_8443".into();
    listener.address = Some(gateway::socket_address("0.0.0.0", 8443));
    listener
}

/// A gateway on `ads`, brought to serving `resources` the way Envoy is: clusters, their assignments, the listener.
async fn serve(ads: &mut ScriptedAds, resources: &GatewayResources) -> TestGateway {
    let url = ads.url();
    let gateway =
        TestGateway::start_without_resources(&[&format!("--xds={url}"), "--cluster-id=cluster1", "--node-id=gw-1"])
            .await;
    let first = ads.request_of::<Cluster>().await;
    let node = first.node.expect("the node comes first");
    assert_eq!(node.id, "gw-1");
    assert_eq!(first.resource_names_subscribe, ["*"], "wildcard CDS");
    let hole = black_hole();
    let mut clusters: Vec<(&str, &str, &Cluster)> = vec![("BlackHoleCluster", "1", &hole)];
    clusters.extend(resources.clusters.iter().map(|c| (c.name.as_str(), "1", c)));
    let nonce = ads.push(&clusters, &[]);
    assert_eq!(ads.answer(&nonce).await, Ok(()));
    let eds = ads.request_of::<ClusterLoadAssignment>().await;
    let mut wanted: Vec<String> = resources.clusters.iter().map(|c| c.name.clone()).collect();
    wanted.sort();
    let mut subscribed = eds.resource_names_subscribe.clone();
    subscribed.sort();
    assert_eq!(subscribed, wanted, "EDS by the EDS clusters' names only");
    let assignments: Vec<(&str, &str, &ClusterLoadAssignment)> =
        resources.assignments.iter().map(|a| (a.cluster_name.as_str(), "1", a)).collect();
    let nonce = ads.push(&assignments, &[]);
    assert_eq!(ads.answer(&nonce).await, Ok(()));
    assert!(!gateway.handle.store.is_loaded(), "not ready before the listener");
    let other = other_listener();
    let nonce = ads.push(&[("0.0.0.0_8443", "1", &other), (gateway::LISTENER_NAME, "1", &resources.listener)], &[]);
    assert_eq!(ads.answer(&nonce).await, Ok(()));
    assert!(gateway.handle.store.is_loaded());
    gateway
}

#[tokio::test]
async fn the_gateway_follows_what_istiod_would_send() {
    let mesh = Mesh::new(SNI);
    let old = EchoBackend::start(&mesh.server, "old").await;
    let new = EchoBackend::start(&mesh.server, "new").await;
    let mut ads = ScriptedAds::start().await;
    let gateway = serve(&mut ads, &istiod_push(&[compact(SNI, &[old.address])])).await;
    assert_eq!(mesh.tunnel(gateway.listen).await.1, "old");

    // An endpoint change is one assignment; traffic follows it.
    let changed = istiod_push(&[compact(SNI, &[new.address])]);
    let nonce = ads.push(&[(SNI, "2", &changed.assignments[0])], &[]);
    assert_eq!(ads.answer(&nonce).await, Ok(()));
    assert_eq!(mesh.tunnel(gateway.listen).await.1, "new");
    let metrics = gateway.metrics();
    assert_eq!(
        metric(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_workload", "helloworld-v1"),
                ("destination_canonical_service", "helloworld"),
                ("destination_version", "v1"),
                ("destination_cluster", "cluster1")
            ]
        ),
        2.0,
        "{metrics}"
    );

    // A cluster removed takes its assignment and its route with it.
    let nonce = ads.push::<Cluster>(&[], &[SNI]);
    assert_eq!(ads.answer(&nonce).await, Ok(()));
    let unsubscribe = ads.request_of::<ClusterLoadAssignment>().await;
    assert_eq!(unsubscribe.resource_names_unsubscribe, [SNI]);
    eventually(WITHIN, "the removed cluster is not routed", || async {
        gateway.handle.store.routes().cluster(SNI).is_none()
    })
    .await;
}

#[tokio::test]
async fn one_bad_cluster_is_refused_by_name_and_the_others_apply() {
    let mesh = Mesh::new(SNI);
    let first = EchoBackend::start(&mesh.server, "first").await;
    let second = EchoBackend::start(&mesh.server, "second").await;
    let mut ads = ScriptedAds::start().await;
    let mut push = istiod_push(&[compact(SNI, &[first.address]), compact(OTHER, &[first.address])]);
    // OTHER's next version is one this gateway cannot balance: Envoy's CLUSTER_PROVIDED.
    let gateway = serve(&mut ads, &push).await;
    let good = push.clusters[0].clone();
    let mut bad = push.clusters[1].clone();
    bad.lb_policy = LbPolicy::ClusterProvided as i32;
    let mut good_changed = good.clone();
    good_changed.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration { seconds: 3, nanos: 0 });
    let nonce = ads.push(&[(SNI, "2", &good_changed), (OTHER, "2", &bad)], &[]);
    let nack = ads.answer(&nonce).await.expect_err("the bad cluster is NACKed");
    assert!(nack.contains(OTHER) && !nack.contains(SNI), "{nack}");
    let routes = gateway.handle.store.routes();
    assert_eq!(routes.cluster(SNI).unwrap().settings().connect_timeout, Duration::from_secs(3), "the good one applied");
    assert_eq!(
        routes.cluster(OTHER).unwrap().lb_settings().policy.name(),
        "LEAST_REQUEST",
        "the bad one kept its last version"
    );
    drop(routes);

    // Later changes to the other clusters still reach traffic.
    push = istiod_push(&[compact(SNI, &[second.address])]);
    let nonce = ads.push(&[(SNI, "3", &push.assignments[0])], &[]);
    assert_eq!(ads.answer(&nonce).await, Ok(()));
    assert_eq!(mesh.tunnel(gateway.listen).await.1, "second");
    assert_eq!(metric(&gateway.metrics(), "crossgate_xds_responses_total", &[("result", "nack")]), 1.0);
}

#[tokio::test]
async fn a_response_that_does_not_decode_is_refused_whole() {
    let mesh = Mesh::new(SNI);
    let backend = EchoBackend::start(&mesh.server, "kept").await;
    let mut ads = ScriptedAds::start().await;
    let push = istiod_push(&[compact(SNI, &[backend.address])]);
    let gateway = serve(&mut ads, &push).await;
    let mut other = push.clusters[0].clone();
    other.name = OTHER.into();
    let garbage = DeltaDiscoveryResponse {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        resources: vec![
            Resource { name: OTHER.into(), version: "2".into(), resource: Some(pack(&other)), ..Default::default() },
            Resource {
                name: "garbage".into(),
                version: "2".into(),
                resource: Some(Any {
                    type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                    value: vec![0xff; 7],
                }),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let nonce = ads.push_raw(garbage);
    let nack = ads.answer(&nonce).await.expect_err("NACKed");
    assert!(nack.contains("garbage"), "{nack}");
    assert!(gateway.handle.store.routes().cluster(OTHER).is_none(), "nothing of it applied");
    assert_eq!(mesh.tunnel(gateway.listen).await.1, "kept");
}
