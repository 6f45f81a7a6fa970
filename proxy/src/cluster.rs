//! One upstream cluster and the life of a connection to it. A [`Cluster`] is built off the hot path from its
//! Envoy cluster and assignment; its endpoints (spec, live state and Istio series together, in the lb's hosts)
//! and its limits are private. A connection [`Cluster::open`]s a [`Lease`]: a place in the connection limit,
//! an endpoint picked and connected (retrying others), the hello passed on. The lease carries the tunnel's byte
//! counters and [`Lease::finish`]es with the way the tunnel ended. A new per-cluster metric, limit or policy is a change
//! to this file.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::forward::Keepalive;
use crate::forward::{self, TunnelCounters, TunnelEnd};
use crate::lb::{
    ClusterLb, Host, LbSettings, Outcome, PickContext, Picked, Topology, load::DEFAULT_OVERPROVISIONING_FACTOR,
};
use crate::metrics::{
    ClusterMembership, ClusterTraffic, Destination, GaugeGuard, IstioTcpMetrics, RejectReason, Telemetry,
};
use crate::resources::{AssignmentSpec, ClusterSpec, ServiceSpec};

/// Gateway-wide settings that shape every cluster and filter chain: defaults they may override.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterDefaults {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    pub keepalive: Keepalive,
    /// A registered pick policy replacing every cluster's algorithm (experiments).
    pub lb_policy: Option<String>,
}

impl Default for ClusterDefaults {
    /// Istio's: 10 s connect timeout, Envoy's 1 h tcp_proxy idle timeout, no duration limit; the gateway's
    /// keepalive defaults.
    fn default() -> Self {
        ClusterDefaults {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            keepalive: Keepalive { time: Duration::from_secs(300), interval: Duration::from_secs(75), probes: 9 },
            lb_policy: None,
        }
    }
}

/// The connection settings of one cluster, after its DestinationRule's `connectionPool.tcp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterSettings {
    pub connect_timeout: Duration,
    /// Tunnels open at once to this cluster (Istio's default is 2^32-1, effectively unlimited).
    pub max_connections: usize,
    pub keepalive: Keepalive,
}

/// The refusals counted in Istio's series, by the response flag they carry.
const REFUSALS: [RejectReason; 3] =
    [RejectReason::UpstreamOverflow, RejectReason::NoHealthyUpstream, RejectReason::UpstreamConnectFailed];

/// What outlives a rebuild of the cluster: the connection limit's count and the metrics.
#[derive(Debug)]
struct Lasting {
    /// Tunnels open to this cluster, in every version of it.
    open: AtomicUsize,
    membership: ClusterMembership,
    /// Registered on the first connection.
    traffic: OnceLock<ClusterTraffic>,
    /// Istio's opened/closed counters per refusal in [`REFUSALS`], registered on the first such refusal.
    refused: [OnceLock<(Counter, Counter)>; 3],
}

/// One routable cluster: its service, its endpoints and how to choose among them, its limits and metrics.
#[derive(Debug)]
pub struct Cluster {
    name: Arc<str>,
    service: ServiceSpec,
    lb: ClusterLb,
    settings: ClusterSettings,
    lasting: Arc<Lasting>,
    telemetry: Arc<Telemetry>,
}

impl Cluster {
    /// Builds cluster `name` from its Envoy cluster and assignment (none yet: no endpoints), carrying over from
    /// `previous` (its last version) the open connections, the live state of every host it still has, and the
    /// metric handles.
    pub fn build(
        name: &str,
        spec: &ClusterSpec,
        assignment: Option<&AssignmentSpec>,
        previous: Option<&Cluster>,
        defaults: &ClusterDefaults,
        telemetry: &Arc<Telemetry>,
    ) -> Cluster {
        // Hosts' series are labelled with the service: another service starts them anew.
        let previous = previous.filter(|p| p.service == spec.service);
        let mut lb_settings = spec.lb.clone();
        if let Some(policy) = &defaults.lb_policy {
            // Validated at start: the name is registered.
            lb_settings = lb_settings.clone().with_policy(policy).unwrap_or(lb_settings);
        }
        let (endpoints, topology) = match assignment {
            Some(assignment) => (assignment.endpoints.clone(), assignment.topology(spec.locality_weighted)),
            None => (Vec::new(), empty_topology(spec.locality_weighted)),
        };
        let (lb, lasting) = telemetry.register(|| {
            let lb = ClusterLb::new(endpoints, topology, lb_settings, previous.map(|p| &p.lb), name);
            let lasting = previous.map_or_else(
                || {
                    Arc::new(Lasting {
                        open: AtomicUsize::new(0),
                        membership: ClusterMembership::new(name),
                        traffic: OnceLock::new(),
                        refused: Default::default(),
                    })
                },
                |p| Arc::clone(&p.lasting),
            );
            (lb, lasting)
        });
        lasting.membership.total.set(lb.hosts().len() as f64);
        lasting.membership.healthy.set(lb.healthy_count() as f64);
        let settings = ClusterSettings {
            connect_timeout: spec.connect_timeout.unwrap_or(defaults.connect_timeout),
            max_connections: spec.max_connections,
            keepalive: Keepalive {
                time: spec.keepalive.time.unwrap_or(defaults.keepalive.time),
                interval: spec.keepalive.interval.unwrap_or(defaults.keepalive.interval),
                probes: spec.keepalive.probes.filter(|p| *p > 0).unwrap_or(defaults.keepalive.probes),
            },
        };
        Cluster {
            name: Arc::from(name),
            service: spec.service.clone(),
            lb,
            settings,
            lasting,
            telemetry: Arc::clone(telemetry),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn service(&self) -> &ServiceSpec {
        &self.service
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn lb_settings(&self) -> &LbSettings {
        self.lb.settings()
    }

    /// The endpoints with their live state, in the assignment's order.
    pub fn hosts(&self) -> &[Host] {
        self.lb.hosts()
    }

    /// Tunnels open to this cluster now.
    pub fn open_connections(&self) -> usize {
        self.lasting.open.load(Ordering::Relaxed)
    }

    /// Runs the outlier detector's sweep if due; when the next is due (`None`: no outlier detection).
    pub fn tick(&self, now: Instant) -> Option<Instant> {
        self.lb.tick(now)
    }

    /// Opens a tunnel's upstream: takes a place in the connection limit, connects to an endpoint (up to
    /// `attempts` different ones) and gives it the hello. `Ok(None)`: the upstream went away as it was given the
    /// hello (counted as that endpoint's closed connection, not as a refusal).
    pub async fn open(
        self: Arc<Self>,
        source: SocketAddr,
        attempts: usize,
        hello: &[u8],
    ) -> Result<Option<(TcpStream, Lease)>, RejectReason> {
        let place = Place::take(self)?;
        let cluster = &place.0;
        let (mut stream, picked) = cluster.connect(source, attempts).await.inspect_err(|&reason| {
            cluster.record_refused(reason);
        })?;
        let host = picked.index;
        cluster.series(host).connections_opened.increment(1);
        let active = GaugeGuard::new(&cluster.traffic().upstream_cx_active);
        let lease = Lease { place, host, _picked: picked, _active: active };
        if stream.write_all(hello).await.is_err() {
            lease.finish(TunnelEnd::UpstreamReset);
            return Ok(None);
        }
        lease.counters().request.increment(hello.len() as u64);
        Ok(Some((stream, lease)))
    }

    /// Picks endpoints and connects, trying up to `attempts` different endpoints; each failure is counted and
    /// reported to outlier detection, but for the gateway's own (local resources), which ends the attempts.
    async fn connect(&self, source: SocketAddr, attempts: usize) -> Result<(TcpStream, Picked), RejectReason> {
        let mut tried = Vec::new();
        for _ in 0..attempts {
            let ctx = PickContext { source: source.ip(), tried: &tried };
            let Some(picked) = self.lb.pick(&ctx, &mut rand::rng()) else { break };
            let address = self.lb.hosts()[picked.index].spec.address;
            self.traffic().upstream_cx_total.increment(1);
            let outcome =
                timeout(self.settings.connect_timeout, forward::connect_to(address, &self.settings.keepalive)).await;
            let now = Instant::now();
            match outcome {
                Ok(Ok(stream)) => {
                    self.lb.report(picked.index, Outcome::ConnectSuccess, now);
                    return Ok((stream, picked));
                }
                // Another endpoint would fail the same way, and this one did nothing wrong.
                Ok(Err(error)) if forward::is_local_fault(&error) => {
                    tracing::warn!(cluster = %self.name, %address, %error, "no resources to connect upstream");
                    return Err(RejectReason::LocalResources);
                }
                Ok(Err(error)) => {
                    self.lb.report(picked.index, Outcome::ConnectFailure, now);
                    self.traffic().upstream_cx_connect_fail.increment(1);
                    tracing::debug!(cluster = %self.name, %address, %error, "upstream connect failed");
                }
                Err(_) => {
                    self.lb.report(picked.index, Outcome::ConnectTimeout, now);
                    self.traffic().upstream_cx_connect_timeout.increment(1);
                    tracing::debug!(cluster = %self.name, %address, "upstream connect timed out");
                }
            }
            tried.push(picked.index);
        }
        if tried.is_empty() {
            self.traffic().upstream_cx_none_healthy.increment(1);
            Err(RejectReason::NoHealthyUpstream)
        } else {
            Err(RejectReason::UpstreamConnectFailed)
        }
    }

    /// The upstream counters, registered on the first connection.
    fn traffic(&self) -> &ClusterTraffic {
        self.lasting.traffic.get_or_init(|| self.telemetry.register(|| ClusterTraffic::new(&self.name)))
    }

    /// Counts a connection that matched this cluster but could not be tunnelled, in Istio's metrics.
    fn record_refused(&self, reason: RejectReason) {
        let Some(index) = REFUSALS.iter().position(|r| *r == reason) else { return };
        let (opened, closed) = self.lasting.refused[index].get_or_init(|| {
            let unrouted = Destination {
                service: &self.service.host,
                service_name: &self.service.name,
                service_namespace: &self.service.namespace,
                ..Default::default()
            };
            self.telemetry.register(|| IstioTcpMetrics::refused(&unrouted, reason))
        });
        opened.increment(1);
        closed.increment(1);
    }

    /// Istio's TCP series of `hosts()[host]`, registered on its first connection.
    fn series(&self, host: usize) -> &IstioTcpMetrics {
        let host = &self.lb.hosts()[host];
        host.state.series.get_or_init(|| {
            let workload = &host.spec.workload;
            self.telemetry.register(|| {
                Box::new(IstioTcpMetrics::new(&Destination {
                    service: &self.service.host,
                    service_name: &self.service.name,
                    service_namespace: &self.service.namespace,
                    cluster: &workload.cluster,
                    workload: &workload.name,
                    canonical_service: &workload.canonical_service,
                    canonical_revision: &workload.canonical_revision,
                }))
            })
        })
    }
}

fn empty_topology(locality_weighted: bool) -> Topology {
    Topology { priorities: Vec::new(), locality_weighted, overprovisioning_factor: DEFAULT_OVERPROVISIONING_FACTOR }
}

/// One place in a cluster's connection limit, held from before the connect until the tunnel ends.
#[derive(Debug)]
struct Place(Arc<Cluster>);

impl Place {
    fn take(cluster: Arc<Cluster>) -> Result<Self, RejectReason> {
        let open = cluster.lasting.open.fetch_add(1, Ordering::AcqRel);
        let place = Place(cluster);
        if open < place.0.settings.max_connections {
            Ok(place)
        } else {
            place.0.traffic().upstream_cx_overflow.increment(1);
            place.0.record_refused(RejectReason::UpstreamOverflow);
            Err(RejectReason::UpstreamOverflow)
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.lasting.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open tunnel's hold on its cluster and endpoint: its place in the connection limit, its count in the
/// host's open connections (LEAST_REQUEST) and the cluster's active gauge, until [`Lease::finish`].
#[derive(Debug)]
pub struct Lease {
    place: Place,
    host: usize,
    _picked: Picked,
    _active: GaugeGuard,
}

impl Lease {
    pub fn cluster(&self) -> &Cluster {
        &self.place.0
    }

    /// The endpoint the tunnel goes to.
    pub fn address(&self) -> SocketAddr {
        self.cluster().lb.hosts()[self.host].spec.address
    }

    /// The endpoint's byte counters, for the tunnel to count as bytes move.
    pub fn counters(&self) -> TunnelCounters<'_> {
        let series = self.cluster().series(self.host);
        TunnelCounters { request: &series.received_bytes, response: &series.sent_bytes }
    }

    /// Records how the tunnel ended in the cluster's and the endpoint's metrics. Outlier detection hears only of
    /// connects, as from Envoy's tcp_proxy: a reset once connected is not the endpoint's failure to it.
    pub fn finish(self, end: TunnelEnd) {
        let cluster = self.cluster();
        match end {
            TunnelEnd::IdleTimeout => cluster.traffic().upstream_cx_idle_timeout.increment(1),
            TunnelEnd::MaxDuration => cluster.traffic().upstream_cx_max_duration_reached.increment(1),
            _ => {}
        }
        cluster.series(self.host).connections_closed.increment(1);
    }
}
