//! One gateway's Envoy resources: each compact cluster of its view through `crossgate_istio::gateway::build`,
//! versioned from what it was built from (the compact cluster and the gateway's identity), never from the
//! Envoy encoding, whose metadata maps are `HashMap`s encoded in a random order.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hasher;
use std::sync::{Arc, Mutex};

use crossgate_istio::gateway::{self, MeshDefaults, SniDnatCluster};
use crossgate_istio::locality_lb::{GatewayIdentity, NetworkFailover};
use crossgate_proto::Cluster as CompactCluster;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use envoy_types::pb::google::protobuf::Any;
use metrics::Counter;
use prost::{Message, Name};

/// The resource types served, in the order a change is pushed: clusters before their endpoints (an EDS
/// cluster warms until its assignment arrives), both before the listener that routes to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Cluster,
    Endpoint,
    Listener,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Cluster, Kind::Endpoint, Kind::Listener];

    pub fn type_url(self) -> String {
        match self {
            Kind::Cluster => Cluster::type_url(),
            Kind::Endpoint => ClusterLoadAssignment::type_url(),
            Kind::Listener => Listener::type_url(),
        }
    }

    pub fn from_type_url(type_url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.type_url() == type_url)
    }

    /// Short, for metric labels and logs.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Cluster => "cds",
            Kind::Endpoint => "eds",
            Kind::Listener => "lds",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A resource ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: String,
    /// Shared between the builder's cache and every snapshot of this gateway's resources.
    pub resource: Arc<Any>,
}

/// What a gateway is served, by kind, by name.
#[derive(Debug, Clone, Default)]
pub struct GatewayResources {
    by_kind: [BTreeMap<String, Versioned>; 3],
}

impl GatewayResources {
    pub fn of(&self, kind: Kind) -> &BTreeMap<String, Versioned> {
        &self.by_kind[kind.index()]
    }

    fn insert(&mut self, name: &str, good: &Good) {
        let versioned = |version: &String, resource: &Arc<Any>| Versioned {
            version: version.clone(),
            resource: Arc::clone(resource),
        };
        self.by_kind[Kind::Cluster.index()].insert(name.to_owned(), versioned(&good.cds_version, &good.cluster));
        self.by_kind[Kind::Endpoint.index()].insert(name.to_owned(), versioned(&good.eds_version, &good.assignment));
    }

    fn remove(&mut self, name: &str) {
        self.by_kind[Kind::Cluster.index()].remove(name);
        self.by_kind[Kind::Endpoint.index()].remove(name);
    }
}

/// How the served resources are built, the same for every gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct AdsOptions {
    /// Whose `failoverPriority` network rule priorities follow (`--istio-version`).
    pub network_failover: NetworkFailover,
    /// The port of the pushed sni-dnat listener (`--gateway-listen-port`): Istio's 15443.
    pub listener_port: u16,
    pub mesh: MeshDefaults,
}

impl Default for AdsOptions {
    fn default() -> Self {
        AdsOptions {
            network_failover: NetworkFailover::default(),
            listener_port: gateway::LISTENER_PORT,
            mesh: MeshDefaults::default(),
        }
    }
}

/// The clusters the builder refused, remembered so that each (cluster, version) is warned about once
/// across all gateways.
pub struct InvalidClusters {
    seen: Mutex<HashSet<(String, String)>>,
    counter: Counter,
}

impl InvalidClusters {
    /// Bounds the memory a long churn of invalid versions can take; forgetting only means warning again.
    const MAX_REMEMBERED: usize = 10_000;

    pub fn new() -> Self {
        InvalidClusters {
            seen: Mutex::default(),
            counter: metrics::counter!("crossgate_control_invalid_clusters_total"),
        }
    }

    fn report(&self, name: &str, version: &str, errors: &[gateway::BuildError]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::MAX_REMEMBERED {
            seen.clear();
        }
        if seen.insert((name.to_owned(), version.to_owned())) {
            self.counter.increment(1);
            let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
            tracing::warn!(
                cluster = name,
                version,
                problems = %problems.join("; "),
                "cluster not served: it cannot be built into Envoy resources"
            );
        }
    }
}

impl Default for InvalidClusters {
    fn default() -> Self {
        Self::new()
    }
}

/// The Envoy resources of one version of a compact cluster.
#[derive(Clone)]
struct Good {
    eds_version: String,
    cds_version: String,
    cluster: Arc<Any>,
    assignment: Arc<Any>,
    chain: Arc<FilterChain>,
}

/// One compact cluster: the version last seen, and the last version the builder accepted. A version it
/// refuses leaves the last good one served to this gateway (the gateway keeps routing as it did, as after a
/// NACK); a cluster never accepted is not served.
struct Built {
    seen: String,
    good: Option<Good>,
}

/// Builds one gateway's resources from its views, rebuilding only the clusters whose version changed.
pub struct ResourceBuilder {
    identity: GatewayIdentity,
    /// The identity and settings every version covers, encoded once.
    salt: Vec<u8>,
    options: AdsOptions,
    built: BTreeMap<String, Built>,
    listener: Option<(String, Arc<Any>)>,
    /// What the gateway is served now.
    current: GatewayResources,
}

impl ResourceBuilder {
    pub fn new(identity: GatewayIdentity, options: AdsOptions) -> Self {
        let salt = identity_salt(&identity, &options);
        ResourceBuilder { identity, salt, options, built: BTreeMap::new(), listener: None, current: Default::default() }
    }

    /// What the gateway is served now.
    pub fn current(&self) -> &GatewayResources {
        &self.current
    }

    /// The resources of a view (cluster name -> compact cluster), all of it looked at; refused versions are
    /// reported, and left out (see [`Built`]).
    pub fn resources(
        &mut self,
        view: &BTreeMap<String, CompactCluster>,
        invalid: &InvalidClusters,
    ) -> &GatewayResources {
        self.built.retain(|name, _| view.contains_key(name));
        for (name, compact) in view {
            let eds_version = self.version(b"eds", &compact.encode_to_vec());
            let previous = self.built.get(name);
            if previous.is_none_or(|b| b.seen != eds_version) {
                let built = self.build(compact, eds_version, previous, invalid);
                self.built.insert(name.clone(), built);
            }
        }
        let mut resources = GatewayResources::default();
        for (name, good) in self.built.iter().filter_map(|(name, built)| Some((name, built.good.as_ref()?))) {
            resources.insert(name, good);
        }
        self.current = resources;
        self.refresh_listener();
        &self.current
    }

    /// The resources after a change that touched only the clusters in `changed` (each as it is now, `None` when
    /// it went away): the work is proportional to the change, not to the view.
    pub fn update(
        &mut self,
        changed: &BTreeMap<String, Option<CompactCluster>>,
        invalid: &InvalidClusters,
    ) -> &GatewayResources {
        let mut chains_changed = false;
        for (name, compact) in changed {
            let old_cds = self.built.get(name).and_then(|b| b.good.as_ref()).map(|g| g.cds_version.clone());
            match compact {
                None => {
                    self.built.remove(name);
                    self.current.remove(name);
                }
                Some(compact) => {
                    let eds_version = self.version(b"eds", &compact.encode_to_vec());
                    let previous = self.built.get(name);
                    if previous.is_some_and(|b| b.seen == eds_version) {
                        continue;
                    }
                    let built = self.build(compact, eds_version, previous, invalid);
                    match &built.good {
                        Some(good) => self.current.insert(name, good),
                        None => self.current.remove(name),
                    }
                    self.built.insert(name.clone(), built);
                }
            }
            let new_cds = self.built.get(name).and_then(|b| b.good.as_ref()).map(|g| g.cds_version.clone());
            chains_changed |= old_cds != new_cds;
        }
        if chains_changed {
            self.refresh_listener();
        }
        &self.current
    }

    /// The listener over every served cluster's chain.
    fn refresh_listener(&mut self) {
        let chains: Vec<(&str, &FilterChain)> = self
            .built
            .values()
            .filter_map(|built| built.good.as_ref())
            .map(|good| (good.cds_version.as_str(), &*good.chain))
            .collect();
        let port = self.options.listener_port;
        let listeners = &mut self.current.by_kind[Kind::Listener.index()];
        listeners.clear();
        if let Some((version, listener)) = cached_listener(&mut self.listener, &self.salt, port, &chains) {
            listeners.insert(listener_name(port), Versioned { version, resource: listener });
        }
    }

    fn build(
        &self,
        compact: &CompactCluster,
        eds_version: String,
        previous: Option<&Built>,
        invalid: &InvalidClusters,
    ) -> Built {
        match gateway::build(compact, &self.identity, &self.options.mesh) {
            Ok(SniDnatCluster { cluster, assignment, filter_chain }) => {
                // The Envoy Cluster and its filter chain come from the name and traffic policy alone (endpoints
                // only reach the assignment: see the test `an_endpoint_change_only_changes_the_assignment`),
                // so that an endpoint change does not resend the cluster, which Envoy would then re-warm.
                let bare = CompactCluster { endpoints: Vec::new(), ..compact.clone() };
                let cds_version = self.version(b"cds", &bare.encode_to_vec());
                let (cluster, chain) = match previous.and_then(|p| p.good.as_ref()) {
                    Some(kept) if kept.cds_version == cds_version => {
                        (Arc::clone(&kept.cluster), Arc::clone(&kept.chain))
                    }
                    _ => (Arc::new(gateway::pack(&cluster)), Arc::new(filter_chain)),
                };
                let assignment = Arc::new(gateway::pack(&assignment));
                let good = Good { eds_version: eds_version.clone(), cds_version, cluster, assignment, chain };
                Built { seen: eds_version, good: Some(good) }
            }
            Err(errors) => {
                invalid.report(&compact.name, &eds_version, &errors);
                Built { seen: eds_version, good: previous.and_then(|p| p.good.clone()) }
            }
        }
    }

    fn version(&self, kind: &[u8], bytes: &[u8]) -> String {
        let mut hasher = hasher(kind, &self.salt);
        hasher.write(bytes);
        format!("{:016x}", hasher.finish())
    }
}

/// The listener over these (cds version, chain)s, rebuilt only when one of them changed; none without a chain
/// (Envoy refuses a listener without filter chains, and istiod does not build one).
fn cached_listener(
    cache: &mut Option<(String, Arc<Any>)>,
    salt: &[u8],
    port: u16,
    chains: &[(&str, &FilterChain)],
) -> Option<(String, Arc<Any>)> {
    if chains.is_empty() {
        *cache = None;
        return None;
    }
    let mut hasher = hasher(b"lds", salt);
    for (version, chain) in chains {
        hasher.write(chain.name.as_bytes());
        hasher.write(version.as_bytes());
    }
    let version = format!("{:016x}", hasher.finish());
    if cache.as_ref().is_none_or(|(built, _)| *built != version) {
        let mut listener = gateway::listener(chains.iter().map(|(_, chain)| *chain));
        if port != gateway::LISTENER_PORT {
            listener.name = listener_name(port);
            listener.address = Some(gateway::socket_address("0.0.0.0", port));
        }
        *cache = Some((version, Arc::new(gateway::pack(&listener))));
    }
    cache.clone()
}

/// std's SipHash with its fixed keys: the same in every process of one build, so that a gateway that
/// reconnects to another replica resends versions that still match.
fn hasher(kind: &[u8], salt: &[u8]) -> std::hash::DefaultHasher {
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(kind);
    hasher.write(salt);
    hasher
}

/// Istio's listener name, `0.0.0.0_PORT`.
pub fn listener_name(port: u16) -> String {
    format!("0.0.0.0_{port}")
}

/// Everything besides the compact cluster that the built resources depend on, in a fixed order.
fn identity_salt(identity: &GatewayIdentity, options: &AdsOptions) -> Vec<u8> {
    let mut salt = Vec::new();
    let mut field = |bytes: &[u8]| {
        salt.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        salt.extend_from_slice(bytes);
    };
    field(identity.locality.to_string().as_bytes());
    for (key, value) in &identity.labels {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    let failover = match identity.network_failover {
        NetworkFailover::Istio131 => b"1.31",
        NetworkFailover::Istio130 => b"1.30",
    };
    field(failover);
    field(&options.mesh.connect_timeout.as_nanos().to_le_bytes());
    field(&options.listener_port.to_le_bytes());
    salt
}

#[cfg(test)]
mod tests {
    use crossgate_proto::Endpoint;

    use super::*;

    fn compact(addresses: &[&str]) -> CompactCluster {
        CompactCluster {
            name: "outbound_.5000_._.helloworld.sample.svc.cluster.local".to_owned(),
            endpoints: addresses
                .iter()
                .map(|a| Endpoint { address: (*a).to_owned(), locality: "r1/z1".to_owned(), ..Default::default() })
                .collect(),
            ..Default::default()
        }
    }

    fn view(clusters: &[CompactCluster]) -> BTreeMap<String, CompactCluster> {
        clusters.iter().map(|c| (c.name.clone(), c.clone())).collect()
    }

    fn identity(locality: &str) -> GatewayIdentity {
        GatewayIdentity::new(locality.parse().unwrap(), BTreeMap::new())
    }

    #[test]
    fn an_endpoint_change_only_changes_the_assignment() {
        let (before, after) = (compact(&["10.0.0.1:5000"]), compact(&["10.0.0.1:5000", "10.0.0.2:5000"]));
        // The assumption the versions rest on, checked on the builder itself.
        let mesh = MeshDefaults::default();
        let (a, b) =
            (gateway::build(&before, &identity("r1/z1"), &mesh), gateway::build(&after, &identity("r1/z1"), &mesh));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.cluster, b.cluster);
        assert_eq!(a.filter_chain, b.filter_chain);
        assert_ne!(a.assignment, b.assignment);

        let invalid = InvalidClusters::new();
        let mut builder = ResourceBuilder::new(identity("r1/z1"), AdsOptions::default());
        let first = builder.resources(&view(&[before]), &invalid).clone();
        let second = builder.resources(&view(&[after]), &invalid);
        for kind in [Kind::Cluster, Kind::Listener] {
            assert_eq!(first.of(kind), second.of(kind), "{kind:?}");
        }
        assert_ne!(first.of(Kind::Endpoint), second.of(Kind::Endpoint));
        assert_eq!(second.of(Kind::Listener).keys().collect::<Vec<_>>(), ["0.0.0.0_15443"]);
    }

    #[test]
    fn an_update_of_the_changed_clusters_serves_what_a_whole_rebuild_would() {
        let invalid = InvalidClusters::new();
        let mut other = compact(&["10.0.1.1:5000"]);
        other.name = "outbound_.5000_._.other.sample.svc.cluster.local".to_owned();
        let before = view(&[compact(&["10.0.0.1:5000"]), other.clone()]);
        let after = view(&[compact(&["10.0.0.2:5000"])]);
        let mut kept = ResourceBuilder::new(identity("r1/z1"), AdsOptions::default());
        kept.resources(&before, &invalid);
        let changed = before.keys().map(|name| (name.clone(), after.get(name).cloned())).collect();
        let updated = kept.update(&changed, &invalid).clone();
        let whole = ResourceBuilder::new(identity("r1/z1"), AdsOptions::default()).resources(&after, &invalid).clone();
        // Versions, not bytes: the encoding of Envoy's metadata maps is not ordered.
        let versions = |resources: &GatewayResources, kind| {
            resources.of(kind).iter().map(|(name, v)| (name.clone(), v.version.clone())).collect::<Vec<_>>()
        };
        for kind in Kind::ALL {
            assert_eq!(versions(&updated, kind), versions(&whole, kind), "{kind:?}");
        }
        assert!(!updated.of(Kind::Cluster).contains_key(&other.name), "a removed cluster is gone");
    }

    #[test]
    fn versions_are_stable_and_cover_the_gateway() {
        let view = view(&[compact(&["10.0.0.1:5000"])]);
        let invalid = InvalidClusters::new();
        let versions = |locality: &str, port: u16| {
            let options = AdsOptions { listener_port: port, ..AdsOptions::default() };
            let mut builder = ResourceBuilder::new(identity(locality), options);
            let resources = builder.resources(&view, &invalid);
            Kind::ALL.map(|kind| resources.of(kind).values().map(|v| v.version.clone()).collect::<Vec<_>>())
        };
        assert_eq!(versions("r1/z1", 15443), versions("r1/z1", 15443));
        let other_gateway = versions("r2/z1", 15443);
        assert!(versions("r1/z1", 15443).iter().zip(&other_gateway).all(|(a, b)| a != b));
        assert_ne!(versions("r1/z1", 15443)[2], versions("r1/z1", 16443)[2]);
    }

    #[test]
    fn each_refused_version_is_counted_once() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let invalid = metrics::with_local_recorder(&recorder, InvalidClusters::new);
        let errors = [gateway::BuildError { field: "name".into(), problem: "bad".into() }];
        for (name, version) in [("a", "1"), ("a", "1"), ("a", "2"), ("b", "1")] {
            invalid.report(name, version, &errors);
        }
        assert!(handle.render().contains("crossgate_control_invalid_clusters_total 3"), "{}", handle.render());
    }

    #[test]
    fn a_refused_cluster_is_left_out_and_the_others_served() {
        let mut bad = compact(&["10.0.0.1"]);
        bad.name = "outbound_.80_._.bad.sample.svc.cluster.local".to_owned();
        let invalid = InvalidClusters::new();
        let mut builder = ResourceBuilder::new(identity(""), AdsOptions::default());
        let resources = builder.resources(&view(&[bad.clone(), compact(&["10.0.0.1:5000"])]), &invalid);
        for kind in [Kind::Cluster, Kind::Endpoint] {
            assert_eq!(resources.of(kind).len(), 1, "{kind:?}");
            assert!(!resources.of(kind).contains_key(&bad.name));
        }
        assert_eq!(invalid.seen.lock().unwrap().len(), 1);
        // Seen again, by this gateway or another: not reported twice.
        builder.resources(&view(&[bad.clone()]), &invalid);
        ResourceBuilder::new(identity(""), AdsOptions::default()).resources(&view(&[bad]), &invalid);
        assert_eq!(invalid.seen.lock().unwrap().len(), 1);
        // With no valid cluster there is no listener.
        assert!(builder.resources(&BTreeMap::new(), &invalid).of(Kind::Listener).is_empty());

        // A cluster that turns invalid keeps its last good resources.
        let good = compact(&["10.0.0.1:5000"]);
        let served = builder.resources(&view(std::slice::from_ref(&good)), &invalid).clone();
        let mut broken = good.clone();
        broken.endpoints.push(Endpoint { address: "10.0.0.2".to_owned(), ..Default::default() });
        let kept = builder.resources(&view(&[broken]), &invalid);
        for kind in Kind::ALL {
            assert_eq!(served.of(kind), kept.of(kind), "{kind:?}");
        }
        assert_eq!(invalid.seen.lock().unwrap().len(), 2);
    }
}
