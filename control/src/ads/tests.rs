//! The ADS server over real gRPC on 127.0.0.1, driven by envoy-types' generated ADS client as Envoy drives it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use super::*;
use crate::model::MeshModel;
use crate::sources::file::MeshFile;

const HELLOWORLD: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const IDLE: &str = "outbound_.80_._.idle.sample.svc.cluster.local";
const BROKEN: &str = "outbound_.81_._.broken.sample.svc.cluster.local";
const WITHIN: Duration = Duration::from_secs(5);

/// helloworld with the given endpoint IPs; `idle` without endpoints; `broken`, whose PASSTHROUGH rule the
/// builder refuses.
fn mesh(helloworld: &[&str], with_idle: bool) -> MeshModel {
    mesh_with_rules(helloworld, with_idle, "")
}

/// The same, with more destination rules (YAML flow mappings).
fn mesh_with_rules(helloworld: &[&str], with_idle: bool, rules: &str) -> MeshModel {
    let endpoints: String = helloworld
        .iter()
        .map(|ip| format!("    - {{ address: {ip}, labels: {{ security.istio.io/tlsMode: istio }} }}\n"))
        .collect();
    let idle = if with_idle {
        "  - { name: idle, namespace: sample, ports: [{ port: 80, target_port: 8080 }] }\n"
    } else {
        ""
    };
    let yaml = format!(
        "clusters:\n- name: cluster1\n  network: network1\n  services:\n  - name: helloworld\n    namespace: sample\n    \
         ports: [{{ port: 5000, target_port: 15000 }}]\n    endpoints:\n{endpoints}{idle}  \
         - {{ name: broken, namespace: sample, ports: [{{ port: 81 }}] }}\n  destination_rules:\n  \
         - {{ name: broken, namespace: sample, host: broken, trafficPolicy: {{ loadBalancer: {{ simple: PASSTHROUGH }} }} }}\n{rules}"
    );
    MeshFile::parse(&yaml).unwrap_or_else(|e| panic!("{e}")).model("cluster.local")
}

struct Harness {
    address: SocketAddr,
    server: AdsServer,
    mesh: watch::Sender<Arc<MeshVersion>>,
}

impl Harness {
    async fn start(mesh: MeshModel) -> Harness {
        let (sender, versions) = watch::channel(Arc::new(MeshVersion::whole(mesh, 1)));
        let server = AdsServer::new(versions, ViewOptions::default(), AdsOptions::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let service = server.clone().service();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
        Harness { address, server, mesh: sender }
    }

    /// The next mesh version, with its changes relative to the current one, as the debounce publishes them.
    fn publish(&self, mesh: MeshModel) {
        let previous = Arc::clone(&self.mesh.borrow());
        self.mesh.send_replace(Arc::new(previous.next(mesh, Instant::now())));
    }

    async fn client(&self) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.address)).await.unwrap()
    }

    fn gateway(&self) -> AdsGatewayStatus {
        let gateways = self.server.gateways();
        assert_eq!(gateways.len(), 1, "{gateways:?}");
        gateways[0].clone()
    }
}

fn node(cluster_id: &str) -> Node {
    GatewayNode {
        id: "gw-1".into(),
        cluster_id: cluster_id.into(),
        network: "network1".into(),
        locality: "r1/z1".parse().unwrap(),
        ..Default::default()
    }
    .to_envoy()
}

/// One side of a bidirectional stream, as a test drives it.
struct Stream<Req, Resp> {
    requests: mpsc::Sender<Req>,
    responses: Streaming<Resp>,
}

impl<Req, Resp: Message + Default + std::fmt::Debug> Stream<Req, Resp> {
    async fn send(&self, request: Req) {
        self.requests.send(request).await.map_err(|_| "stream closed").unwrap();
    }

    async fn recv(&mut self) -> Resp {
        tokio::time::timeout(WITHIN, self.responses.message()).await.expect("a response").unwrap().unwrap()
    }

    /// Nothing arrives for a while.
    async fn quiet(&mut self) {
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(300), self.responses.message()).await {
            panic!("unexpected {message:?}");
        }
    }
}

type DeltaStream = Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;
type SotwStream = Stream<DiscoveryRequest, DiscoveryResponse>;

/// The server reads the first request before it answers the call: it is queued before the call is made.
async fn delta(harness: &Harness, first: DeltaDiscoveryRequest) -> Result<DeltaStream, Status> {
    let (requests, outbound) = mpsc::channel(8);
    requests.send(first).await.unwrap();
    let responses = harness.client().await.delta_aggregated_resources(ReceiverStream::new(outbound)).await?;
    Ok(Stream { requests, responses: responses.into_inner() })
}

async fn sotw(harness: &Harness, first: DiscoveryRequest) -> Result<SotwStream, Status> {
    let (requests, outbound) = mpsc::channel(8);
    requests.send(first).await.unwrap();
    let responses = harness.client().await.stream_aggregated_resources(ReceiverStream::new(outbound)).await?;
    Ok(Stream { requests, responses: responses.into_inner() })
}

fn subscribe(kind: Kind, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: kind.type_url(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

fn nack(response: &DeltaDiscoveryResponse, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(rpc::Status { code: 3, message: message.to_owned(), ..Default::default() }),
        ..ack(response)
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

fn decode<M: Message + Default>(resource: &envoy_types::pb::envoy::service::discovery::v3::Resource) -> M {
    M::decode(resource.resource.as_ref().unwrap().value.as_slice()).unwrap()
}

fn endpoint_count(assignment: &ClusterLoadAssignment) -> usize {
    assignment.endpoints.iter().map(|group| group.lb_endpoints.len()).sum()
}

/// A delta stream of gateway `gw-1` in cluster1, its first request subscribing to CDS with `names`.
async fn open_cds(harness: &Harness, names: &[&str]) -> DeltaStream {
    let first = DeltaDiscoveryRequest { node: Some(node("cluster1")), ..subscribe(Kind::Cluster, names) };
    delta(harness, first).await.unwrap()
}

/// CDS, then EDS for the clusters, then LDS, each ACKed, as Envoy starts.
async fn start_delta(harness: &Harness) -> DeltaStream {
    start_delta_as(harness, node("cluster1")).await
}

async fn start_delta_as(harness: &Harness, node: Node) -> DeltaStream {
    let first = DeltaDiscoveryRequest { node: Some(node), ..subscribe(Kind::Cluster, &[]) };
    let mut stream = delta(harness, first).await.unwrap();
    let clusters = stream.recv().await;
    assert_eq!(clusters.type_url, Kind::Cluster.type_url());
    stream.send(ack(&clusters)).await;
    stream.send(subscribe(Kind::Endpoint, &names(&clusters))).await;
    let assignments = stream.recv().await;
    stream.send(ack(&assignments)).await;
    stream.send(subscribe(Kind::Listener, &["*"])).await;
    let listeners = stream.recv().await;
    stream.send(ack(&listeners)).await;
    stream
}

#[tokio::test]
async fn delta_serves_clusters_then_assignments_then_the_listener_and_follows_the_mesh() {
    let harness = Harness::start(mesh(&["10.0.0.1"], true)).await;
    let mut stream = open_cds(&harness, &["*"]).await;
    let clusters = stream.recv().await;
    // The cluster the builder refuses is left out; the others are served.
    assert!(!names(&clusters).contains(&BROKEN));
    assert_eq!(names(&clusters), [HELLOWORLD, IDLE]);
    let cluster: Cluster = decode(&clusters.resources[0]);
    assert_eq!(cluster.eds_cluster_config.unwrap().service_name, HELLOWORLD);
    stream.send(ack(&clusters)).await;
    // No EDS before the gateway subscribes to it; no LDS either.
    stream.quiet().await;

    // A subscription change in its own request, no nonce: every name answered, the empty one too.
    stream.send(subscribe(Kind::Endpoint, &[HELLOWORLD, IDLE])).await;
    let assignments = stream.recv().await;
    assert_eq!(assignments.type_url, Kind::Endpoint.type_url());
    assert_eq!(names(&assignments), [HELLOWORLD, IDLE]);
    let counts: Vec<usize> =
        assignments.resources.iter().map(|r| endpoint_count(&decode::<ClusterLoadAssignment>(r))).collect();
    assert_eq!(counts, [1, 0]);
    stream.send(ack(&assignments)).await;

    stream.send(subscribe(Kind::Listener, &[])).await;
    let listeners = stream.recv().await;
    assert_eq!(names(&listeners), ["0.0.0.0_15443"]);
    let listener: Listener = decode(&listeners.resources[0]);
    assert_eq!(listener.filter_chains.len(), 2);
    stream.send(ack(&listeners)).await;
    stream.quiet().await;

    // An endpoint added: only its assignment is sent.
    harness.publish(mesh(&["10.0.0.1", "10.0.0.2"], true));
    let update = stream.recv().await;
    assert_eq!((update.type_url.as_str(), names(&update)), (Kind::Endpoint.type_url().as_str(), vec![HELLOWORLD]));
    assert_eq!(endpoint_count(&decode(&update.resources[0])), 2);
    stream.send(ack(&update)).await;
    stream.quiet().await;

    // A service removed: the cluster goes, then the listener loses its chain.
    harness.publish(mesh(&["10.0.0.1", "10.0.0.2"], false));
    let clusters = stream.recv().await;
    assert_eq!(
        (clusters.type_url.as_str(), clusters.removed_resources.clone()),
        (Kind::Cluster.type_url().as_str(), vec![IDLE.to_owned()])
    );
    assert!(clusters.resources.is_empty());
    let listeners = stream.recv().await;
    assert_eq!(listeners.type_url, Kind::Listener.type_url());
    assert_eq!(decode::<Listener>(&listeners.resources[0]).filter_chains.len(), 1);
    stream.send(ack(&clusters)).await;
    stream.send(ack(&listeners)).await;
    // Envoy drops its interest in the assignment of the removed cluster.
    stream
        .send(DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec![IDLE.to_owned()],
            ..subscribe(Kind::Endpoint, &[])
        })
        .await;
    stream.quiet().await;

    let status = harness.gateway();
    assert_eq!((status.protocol, status.node.locality.as_str(), status.nacks), ("delta", "r1/z1", 0));
    assert!(status.last_nack.is_none());
    assert_eq!(status.acked[&Kind::Cluster.type_url()].keys().collect::<Vec<_>>(), [HELLOWORLD]);
    assert_eq!(status.acked[&Kind::Listener.type_url()].len(), 1);
}

#[tokio::test]
async fn a_nacked_version_is_remembered_and_not_sent_again() {
    let harness = Harness::start(mesh(&["10.0.0.1"], true)).await;
    let mut stream = open_cds(&harness, &[]).await;
    let clusters = stream.recv().await;
    stream.send(nack(&clusters, "Error adding/updating cluster(s) x: bad")).await;
    // A new mesh version that changes nothing for this gateway: the refused clusters are not resent.
    harness.publish(mesh(&["10.0.0.1"], true));
    stream.quiet().await;
    let status = harness.gateway();
    let nack = status.last_nack.expect("the NACK is remembered");
    assert_eq!(
        (nack.type_url, nack.nonce, nack.message.as_str()),
        (Kind::Cluster.type_url(), clusters.nonce.clone(), "Error adding/updating cluster(s) x: bad")
    );
    assert_eq!(status.nacks, 1);
    assert!(status.acked.is_empty(), "nothing was ACKed");
    // The next change of a refused cluster is sent.
    harness.publish(mesh(&["10.0.0.1"], false));
    let next = stream.recv().await;
    assert_eq!(next.removed_resources, [IDLE]);
}

#[tokio::test]
async fn a_reconnecting_gateway_is_sent_only_what_changed_since_its_initial_versions() {
    let harness = Harness::start(mesh(&["10.0.0.1"], true)).await;
    let mut stream = open_cds(&harness, &[]).await;
    let clusters = stream.recv().await;
    stream.send(ack(&clusters)).await;
    stream.send(subscribe(Kind::Endpoint, &[HELLOWORLD, IDLE])).await;
    let assignments = stream.recv().await;
    stream.send(ack(&assignments)).await;
    let versions = |response: &DeltaDiscoveryResponse| -> HashMap<String, String> {
        response.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect()
    };
    let (held_clusters, mut held_assignments) = (versions(&clusters), versions(&assignments));
    drop(stream);

    // Meanwhile helloworld gained an endpoint; and the gateway says it holds a cluster that is gone.
    harness.publish(mesh(&["10.0.0.1", "10.0.0.2"], true));
    let mut initial = held_clusters.clone();
    initial.insert("outbound_.1_._.gone.sample.svc.cluster.local".to_owned(), "1".to_owned());
    let first = DeltaDiscoveryRequest {
        node: Some(node("cluster1")),
        initial_resource_versions: initial,
        ..subscribe(Kind::Cluster, &["*"])
    };
    let mut stream = delta(&harness, first).await.unwrap();
    let clusters = stream.recv().await;
    assert!(clusters.resources.is_empty(), "the clusters it holds are current");
    assert_eq!(clusters.removed_resources, ["outbound_.1_._.gone.sample.svc.cluster.local"]);
    stream.send(ack(&clusters)).await;
    held_assignments.retain(|name, _| name == HELLOWORLD || name == IDLE);
    stream
        .send(DeltaDiscoveryRequest {
            initial_resource_versions: held_assignments,
            ..subscribe(Kind::Endpoint, &[HELLOWORLD, IDLE])
        })
        .await;
    let assignments = stream.recv().await;
    assert_eq!(names(&assignments), [HELLOWORLD], "only the changed assignment");
    stream.send(ack(&assignments)).await;
    stream.quiet().await;
}

#[tokio::test]
async fn a_replaced_cluster_gets_its_assignment_again() {
    let harness = Harness::start(mesh(&["10.0.0.1"], true)).await;
    let mut stream = start_delta(&harness).await;
    stream.quiet().await;
    // A traffic policy change replaces the cluster, which Envoy warms again: its assignment follows, though
    // it did not change and Envoy's subscription did not either.
    let rule = "  - { name: hw, namespace: sample, host: helloworld, trafficPolicy: { connectionPool: { tcp: { connectTimeout: 2s } } } }\n";
    harness.publish(mesh_with_rules(&["10.0.0.1"], true, rule));
    let clusters = stream.recv().await;
    assert_eq!((clusters.type_url.clone(), names(&clusters)), (Kind::Cluster.type_url(), vec![HELLOWORLD]));
    let assignments = stream.recv().await;
    assert_eq!((assignments.type_url.clone(), names(&assignments)), (Kind::Endpoint.type_url(), vec![HELLOWORLD]));
    let listeners = stream.recv().await;
    assert_eq!(listeners.type_url, Kind::Listener.type_url());
    for response in [&clusters, &assignments, &listeners] {
        stream.send(ack(response)).await;
    }
    stream.quiet().await;
}

#[tokio::test]
async fn state_of_the_world_sends_whole_types_and_removes_by_absence() {
    let harness = Harness::start(mesh(&["10.0.0.1"], true)).await;
    let request = |kind: Kind, names: &[&str], answered: Option<&DiscoveryResponse>| DiscoveryRequest {
        type_url: kind.type_url(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        response_nonce: answered.map(|r| r.nonce.clone()).unwrap_or_default(),
        version_info: answered.map(|r| r.version_info.clone()).unwrap_or_default(),
        ..Default::default()
    };
    let first = DiscoveryRequest { node: Some(node("cluster1")), ..request(Kind::Cluster, &[], None) };
    let mut stream = sotw(&harness, first).await.unwrap();
    let clusters = stream.recv().await;
    assert_eq!(clusters.resources.len(), 2);
    stream.send(request(Kind::Cluster, &[], Some(&clusters))).await;
    stream.send(request(Kind::Endpoint, &[HELLOWORLD], None)).await;
    let assignments = stream.recv().await;
    assert_eq!(assignments.resources.len(), 1);
    // Envoy names the assignments it wants, with the last nonce it got.
    stream.send(request(Kind::Endpoint, &[HELLOWORLD, IDLE], Some(&assignments))).await;
    let more = stream.recv().await;
    let more: Vec<ClusterLoadAssignment> =
        more.resources.iter().map(|any| ClusterLoadAssignment::decode(any.value.as_slice()).unwrap()).collect();
    assert_eq!(more.iter().map(|a| a.cluster_name.as_str()).collect::<Vec<_>>(), [IDLE]);

    harness.publish(mesh(&["10.0.0.1"], false));
    let clusters = stream.recv().await;
    let remaining: Vec<String> =
        clusters.resources.iter().map(|any| Cluster::decode(any.value.as_slice()).unwrap().name).collect();
    assert_eq!(remaining, [HELLOWORLD]);
    stream.send(request(Kind::Cluster, &[], Some(&clusters))).await;
    stream.quiet().await;
    let status = harness.gateway();
    assert_eq!((status.protocol, status.nacks), ("state-of-the-world", 0));
    assert_eq!(status.acked[&Kind::Cluster.type_url()].len(), 1);
}

#[tokio::test]
async fn a_stream_without_a_cluster_id_is_refused() {
    let harness = Harness::start(mesh(&["10.0.0.1"], true)).await;
    let first = DeltaDiscoveryRequest { node: Some(node("")), ..subscribe(Kind::Cluster, &[]) };
    let refused = delta(&harness, first).await.err().expect("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("CLUSTER_ID"), "{}", refused.message());
    let first = DiscoveryRequest { type_url: Kind::Cluster.type_url(), ..Default::default() };
    assert_eq!(sotw(&harness, first).await.err().expect("refused").code(), tonic::Code::InvalidArgument);
    assert!(harness.server.gateways().is_empty());
}

#[tokio::test]
async fn nothing_is_pushed_before_the_mesh_is_primed() {
    let harness = Harness::start(MeshModel::default()).await;
    harness.mesh.send_replace(Arc::new(MeshVersion::whole(MeshModel::default(), crate::server::UNPRIMED)));
    let mut stream = open_cds(&harness, &[]).await;
    stream.quiet().await;
    harness.publish(mesh(&["10.0.0.1"], true));
    assert_eq!(names(&stream.recv().await), [HELLOWORLD, IDLE]);
}

const REVIEWS: &str = "outbound_.9080_._.reviews.sample.svc.cluster.local";

/// helloworld in cluster1 (network1), reviews in cluster2 (network2).
fn two_networks() -> MeshModel {
    let service = |name: &str, port: u16, address: &str| {
        format!(
            "  - {{ name: {name}, namespace: sample, ports: [{{ port: {port} }}], \
             endpoints: [{{ address: {address}, labels: {{ security.istio.io/tlsMode: istio }} }}] }}\n"
        )
    };
    let yaml = format!(
        "clusters:\n- name: cluster1\n  network: network1\n  services:\n{}- name: cluster2\n  network: network2\n  \
         services:\n{}",
        service("helloworld", 5000, "10.0.0.1"),
        service("reviews", 9080, "10.1.0.1")
    );
    MeshFile::parse(&yaml).unwrap_or_else(|e| panic!("{e}")).model("cluster.local")
}

/// `mesh` with the first endpoint of `host` in `cluster` moved to `address`, every other service shared, as the
/// sources change a mesh.
fn moved(mesh: &MeshModel, cluster: &str, host: &str, address: &str) -> MeshModel {
    let mut mesh = mesh.clone();
    let cluster = Arc::make_mut(mesh.clusters.get_mut(cluster).unwrap());
    let service = cluster.services.iter_mut().find(|s| s.hostname.starts_with(host)).unwrap();
    Arc::make_mut(service).endpoints[0].address = address.parse().unwrap();
    mesh
}

fn gateway_node(id: &str, network_view: &[&str]) -> Node {
    GatewayNode {
        id: id.into(),
        cluster_id: "cluster1".into(),
        network: "network1".into(),
        requested_network_view: network_view.iter().map(|n| (*n).to_owned()).collect(),
        locality: "r1/z1".parse().unwrap(),
        ..Default::default()
    }
    .to_envoy()
}

/// The endpoint addresses of an assignment.
fn addresses(resource: &envoy_types::pb::envoy::service::discovery::v3::Resource) -> Vec<String> {
    let assignment: ClusterLoadAssignment = decode(resource);
    let endpoints = assignment.endpoints.iter().flat_map(|group| &group.lb_endpoints);
    let address = |e: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint| {
        use envoy_types::pb::envoy::config::core::v3::address::Address;
        use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
        let Some(HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else { return String::new() };
        match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(Address::SocketAddress(socket)) => socket.address.clone(),
            _ => String::new(),
        }
    };
    endpoints.map(address).collect()
}

#[tokio::test]
async fn a_change_reaches_every_gateway_that_sees_it_and_no_other() {
    let before = two_networks();
    let harness = Harness::start(before.clone()).await;
    // `near` sees its own network alone: reviews is a cluster without endpoints there.
    let mut near = start_delta_as(&harness, gateway_node("gw-near", &["network1"])).await;
    let mut both = start_delta_as(&harness, gateway_node("gw-both", &["network1", "network2"])).await;
    near.quiet().await;

    // A reviews endpoint moves: only the gateway that sees network2 hears of it.
    let after = moved(&before, "cluster2", "reviews", "10.1.0.2");
    harness.publish(after.clone());
    let update = both.recv().await;
    assert_eq!((update.type_url.clone(), names(&update)), (Kind::Endpoint.type_url(), vec![REVIEWS]));
    assert_eq!(addresses(&update.resources[0]), ["10.1.0.2"]);
    both.send(ack(&update)).await;
    near.quiet().await;
    both.quiet().await;

    // A helloworld endpoint moves: both hear of it.
    let after = moved(&after, "cluster1", "helloworld", "10.0.0.2");
    harness.publish(after.clone());
    for stream in [&mut near, &mut both] {
        let update = stream.recv().await;
        assert_eq!((names(&update), addresses(&update.resources[0])), (vec![HELLOWORLD], vec!["10.0.0.2".to_owned()]));
        stream.send(ack(&update)).await;
        stream.quiet().await;
    }

    // reviews goes away: both are told to remove its cluster, and get the listener without its chain.
    let mut gone = after.clone();
    Arc::make_mut(gone.clusters.get_mut("cluster2").unwrap()).services.clear();
    harness.publish(gone);
    for stream in [&mut near, &mut both] {
        let clusters = stream.recv().await;
        assert_eq!(
            (clusters.type_url.clone(), clusters.removed_resources.clone()),
            (Kind::Cluster.type_url(), vec![REVIEWS.to_owned()])
        );
        let listeners = stream.recv().await;
        assert_eq!(decode::<Listener>(&listeners.resources[0]).filter_chains.len(), 1);
        stream.send(ack(&clusters)).await;
        stream.send(ack(&listeners)).await;
        stream.quiet().await;
    }
    let held =
        |gateway: &AdsGatewayStatus| gateway.acked[&Kind::Cluster.type_url()].keys().cloned().collect::<Vec<_>>();
    let gateways = harness.server.gateways();
    assert_eq!(gateways.iter().map(held).collect::<Vec<_>>(), [[HELLOWORLD], [HELLOWORLD]]);
}

#[tokio::test]
async fn changes_made_while_a_response_is_in_flight_follow_its_answer() {
    let before = two_networks();
    let harness = Harness::start(before.clone()).await;
    let mut stream = start_delta_as(&harness, gateway_node("gw-1", &[])).await;
    let first = moved(&before, "cluster1", "helloworld", "10.0.0.2");
    harness.publish(first.clone());
    let update = stream.recv().await;
    assert_eq!(names(&update), [HELLOWORLD]);
    // Two more versions before the answer: reviews, then helloworld again.
    let second = moved(&first, "cluster2", "reviews", "10.1.0.2");
    harness.publish(second.clone());
    harness.publish(moved(&second, "cluster1", "helloworld", "10.0.0.3"));
    stream.quiet().await;
    stream.send(ack(&update)).await;
    let update = stream.recv().await;
    assert_eq!(names(&update), [HELLOWORLD, REVIEWS]);
    let latest: Vec<Vec<String>> = update.resources.iter().map(addresses).collect();
    assert_eq!(latest, [["10.0.0.3"], ["10.1.0.2"]], "the latest versions");
    stream.send(ack(&update)).await;
    stream.quiet().await;
}

#[tokio::test]
async fn a_nacked_assignment_is_named_in_the_status_not_resent_and_its_fix_is_sent() {
    let before = two_networks();
    let harness = Harness::start(before.clone()).await;
    let mut stream = start_delta_as(&harness, gateway_node("gw-1", &[])).await;
    let acked = |harness: &Harness| harness.gateway().acked[&Kind::Endpoint.type_url()][HELLOWORLD].clone();
    let good = acked(&harness);

    let refused = moved(&before, "cluster1", "helloworld", "10.0.0.2");
    harness.publish(refused.clone());
    let update = stream.recv().await;
    stream.send(nack(&update, "bad endpoint")).await;
    // The same mesh again, as another version: the refused version is not sent again.
    harness.publish(refused.clone());
    stream.quiet().await;
    let status = harness.gateway();
    let nack = status.last_nack.expect("the NACK is in the status");
    assert_eq!((nack.type_url, nack.message.as_str()), (Kind::Endpoint.type_url(), "bad endpoint"));
    assert_eq!(nack.refused, BTreeMap::from([(HELLOWORLD.to_owned(), Some(update.resources[0].version.clone()))]));
    assert_eq!(acked(&harness), good, "the gateway keeps its last good version");

    // The fix is sent, and its ACK shows in the status.
    harness.publish(moved(&refused, "cluster1", "helloworld", "10.0.0.3"));
    let fix = stream.recv().await;
    assert_eq!((names(&fix), addresses(&fix.resources[0])), (vec![HELLOWORLD], vec!["10.0.0.3".to_owned()]));
    stream.send(ack(&fix)).await;
    stream.quiet().await;
    assert_eq!(acked(&harness), fix.resources[0].version);
}
