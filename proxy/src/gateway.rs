//! One gateway: binds its sockets, loads its configuration, runs the data plane and the side doors, and
//! shuts down through its [`Drain`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::{self, AdminAddresses, AdminState, Port};
use crate::balance::{Balancer, ConnectionBalance};
use crate::cluster::ClusterDefaults;
use crate::config::{ConfigError, GatewayConfig};
use crate::discovery::ConfigStore;
use crate::discovery::file::ResourcesFile;
use crate::discovery::xds::{Backoff, XdsClient, XdsSettings, XdsTls};
use crate::drain::{self, ConnectionCount, Drain, DrainTiming, Phase};
use crate::listener::{self, Limits, Passthrough, Routing, Shared};
use crate::metrics::{ListenerMetrics, Telemetry};
use crossgate_istio::gateway::MeshDefaults;
use crossgate_istio::node::GatewayNode;

/// How long `run` waits, once tunnels are told to close, for their tasks to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A bound, configured gateway, ready to run.
#[derive(Debug)]
pub struct Gateway {
    /// :15443 first, then the istiod passthrough ports.
    listeners: Vec<Listener>,
    /// Data-plane threads, each with its own runtime and its own socket of every listener.
    workers: usize,
    side_doors: [(std::net::TcpListener, Port); 3],
    shared: Arc<Shared>,
    admin: Arc<AdminState>,
    source: Source,
    timing: DrainTiming,
}

/// One port: a socket per worker (SO_REUSEPORT), and what its connections share.
#[derive(Debug)]
struct Listener {
    sockets: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
}

/// Where the configuration comes from.
#[derive(Debug)]
enum Source {
    File(ResourcesFile),
    Xds(Box<XdsClient>),
}

/// Controls a running gateway from outside (signal handlers, tests).
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    pub drain: Drain,
    pub connections: Arc<ConnectionCount>,
    pub store: Arc<ConfigStore>,
    pub telemetry: Arc<Telemetry>,
    timing: DrainTiming,
}

impl GatewayHandle {
    /// The SIGTERM path: drain, then terminate (see [`drain::shut_down`]).
    pub async fn shut_down(&self) {
        drain::shut_down(&self.drain, &self.connections, self.timing).await;
    }

    /// The SIGINT path: close everything now.
    pub fn terminate(&self) {
        self.drain.advance(Phase::Terminated);
    }
}

impl Gateway {
    /// Validates `config`, loads the resources file (a bad one is an error: nothing to serve) and binds
    /// every port.
    pub async fn bind(config: GatewayConfig) -> anyhow::Result<Gateway> {
        config.validate()?;
        let telemetry = Arc::new(Telemetry::default());
        let defaults = ClusterDefaults {
            connect_timeout: config.connect_timeout.0,
            idle_timeout: config.idle_timeout(),
            max_connection_duration: config.max_connection_duration(),
            keepalive: config.keepalive(),
            lb_policy: config.lb_policy.clone(),
        };
        let source_name = if config.xds.is_some() { "xds" } else { "file" };
        let store = Arc::new(ConfigStore::new(defaults, config.xds_listener_port, Arc::clone(&telemetry), source_name));
        let source = match (&config.resources, &config.xds) {
            (Some(path), _) => {
                let mesh = MeshDefaults { connect_timeout: config.connect_timeout.0 };
                let mut file = ResourcesFile::new(path, Arc::clone(&store), config.gateway_identity()?, mesh);
                file.reload()?;
                Source::File(file)
            }
            (None, Some(url)) => {
                let settings = xds_settings(&config, url)?;
                Source::Xds(Box::new(telemetry.register(|| XdsClient::new(settings, Arc::clone(&store)))?))
            }
            (None, None) => return Err(ConfigError::NoSource.into()),
        };

        let workers = config.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let keepalive = config.keepalive();
        let sockets = listener::bind_group(config.listen, workers, &keepalive)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        // Shared ports, as the data plane's: a new gateway binds beside a draining one (an in-place restart).
        let bind_side_door = |address: SocketAddr, what: &str| -> anyhow::Result<std::net::TcpListener> {
            crossgate_sidedoor::bind_shared(address).with_context(|| format!("cannot bind the {what} port {address}"))
        };
        let side_doors = [
            (bind_side_door(config.status_addr, "status")?, Port::Status),
            (bind_side_door(config.metrics_addr, "metrics")?, Port::Metrics),
            (bind_side_door(config.admin_addr, "admin")?, Port::Admin),
        ];
        let listener_name = format!("{}_{}", config.listen.ip(), config.listen.port());
        let drain = Drain::default();
        let shared = Arc::new(Shared {
            routing: Routing::Sni(Arc::clone(&store)),
            metrics: telemetry.register(|| ListenerMetrics::new(&listener_name)),
            connections: Arc::default(),
            drain: drain.clone(),
            limits: Limits {
                hello_timeout: config.hello_timeout.0,
                connect_attempts: config.connect_attempts,
                max_downstream_connections: config.max_downstream_connections,
                keepalive,
                copy: config.copy,
            },
        });
        let mut listeners = vec![Listener { sockets, shared: Arc::clone(&shared) }];
        for route in &config.istiod_passthrough {
            let address = SocketAddr::new(config.listen.ip(), route.port);
            let sockets = listener::bind_group(address, workers, &keepalive)
                .with_context(|| format!("cannot listen on {address} (istiod passthrough)"))?;
            let name = format!("{}_{}", address.ip(), route.port);
            let routing = telemetry.register(|| {
                Routing::Passthrough(Passthrough::new(
                    &route.upstream,
                    &name,
                    config.connect_timeout.0,
                    config.idle_timeout(),
                ))
            });
            let metrics = telemetry.register(|| ListenerMetrics::new(&name));
            let connections = Arc::clone(&shared.connections);
            let (drain, limits) = (drain.clone(), shared.limits);
            let shared = Arc::new(Shared { routing, metrics, connections, drain, limits });
            listeners.push(Listener { sockets, shared });
        }
        let timing = DrainTiming {
            drain_duration: config.drain_duration.0,
            termination_grace: config.termination_grace.0,
            exit_on_zero_active_connections: config.exit_on_zero_active_connections,
            minimum_drain_duration: config.minimum_drain_duration.0,
        };
        let admin = Arc::new(AdminState { store, telemetry, drain, listening: Default::default(), config });
        Ok(Gateway { listeners, workers, side_doors, shared, admin, source, timing })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listeners[0].sockets[0].local_addr().expect("bound listener has an address")
    }

    pub fn admin_addresses(&self) -> AdminAddresses {
        let address = |i: usize| self.side_doors[i].0.local_addr().expect("bound listener has an address");
        AdminAddresses { status: address(0), metrics: address(1), admin: address(2) }
    }

    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            drain: self.shared.drain.clone(),
            connections: Arc::clone(&self.shared.connections),
            store: Arc::clone(&self.admin.store),
            telemetry: Arc::clone(&self.admin.telemetry),
            timing: self.timing,
        }
    }

    /// Runs until shutdown (through a [`GatewayHandle`]) has terminated the gateway. The configuration source
    /// and the outlier sweep run on the caller's runtime, the data plane on the worker threads.
    pub async fn run(self) -> anyhow::Result<()> {
        let Gateway { listeners, workers, side_doors, shared, admin, source, timing: _ } = self;
        let side_threads = spawn_side_doors(side_doors, &admin)?;
        let drain = shared.drain.clone();
        let watcher = match source {
            Source::File(file) => tokio::spawn(file.watch(drain.clone())),
            Source::Xds(client) => {
                let drain = drain.clone();
                tokio::spawn(async move {
                    client.run(drain).await;
                    Ok(())
                })
            }
        };
        tokio::spawn(sweep_outliers(Arc::clone(&admin.store), drain.clone()));
        // Like Envoy, which opens its listeners once configured: until the first configuration is accepted,
        // connections wait in the kernel's backlog instead of being refused for an SNI not known yet.
        tokio::select! {
            () = admin.store.wait_loaded() => {}
            () = drain.reached(Phase::ListenerClosed) => {}
        }
        let listen = listeners[0].sockets[0].local_addr()?;
        let balance = admin.config.connection_balance;
        let finished = spawn_workers(listeners, workers, balance, &shared, &admin.telemetry)?;
        admin.listening.store(true, Ordering::Release);
        tracing::info!(%listen, workers, "gateway accepting");
        for worker in finished {
            worker.await.map_err(|_| anyhow::anyhow!("a worker thread panicked"))?;
        }
        watcher.await.context("configuration source panicked")??;
        for thread in side_threads {
            thread.join().map_err(|_| anyhow::anyhow!("a side-door thread panicked"))?;
        }
        Ok(())
    }
}

/// The discovery client's settings from the gateway's flags: its identity as Istio's proxy metadata, and
/// the TLS files read now, so that a missing file fails the start.
fn xds_settings(config: &GatewayConfig, url: &str) -> anyhow::Result<XdsSettings> {
    let read = |path: &std::path::Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let tls = match (&config.xds_ca, url.starts_with("https://")) {
        (Some(ca), _) => Some(XdsTls {
            ca: read(ca)?,
            identity: match (&config.xds_cert, &config.xds_key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            },
            server_name: config.xds_server_name.clone(),
        }),
        (None, true) => anyhow::bail!("--xds {url} is https: give --xds-ca with the control service's CA"),
        (None, false) => None,
    };
    config.gateway_identity()?;
    let node_id = match &config.node_id {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default(),
    };
    Ok(XdsSettings {
        url: url.to_owned(),
        node: GatewayNode {
            id: node_id,
            cluster_id: config.cluster_id.clone(),
            network: config.network.clone(),
            locality: config.locality.parse().map_err(|e| ConfigError::Locality(format!("{e}")))?,
            requested_network_view: config.requested_network_view.clone(),
            labels: config.labels.iter().cloned().collect(),
        },
        tls,
        backoff: Backoff::default(),
    })
}

/// Un-ejects hosts whose ejection time is over and decays ejection multipliers (Envoy's outlier detection
/// interval). It sleeps until the next cluster is due: a thread woken for nothing can preempt a busy worker on a
/// shared core, which showed in the 2-worker p99.9. A configuration change wakes it only while no cluster has
/// outlier detection, so that the first one gets its schedule; a change does not make it visit every cluster.
/// A cluster added later joins at the next sweep (within one interval), and until then un-ejects on its own
/// traffic (each connection's report runs its sweep when due).
async fn sweep_outliers(store: Arc<ConfigStore>, drain: Drain) {
    let mut changes = store.changes();
    let terminated = drain.reached(Phase::Terminated);
    tokio::pin!(terminated);
    loop {
        let now = std::time::Instant::now();
        let next = store.routes().iter().filter_map(|cluster| cluster.tick(now)).min();
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut terminated => return,
            _ = changes.changed(), if next.is_none() => {}
            () = due => {}
        }
    }
}

/// Starts the data-plane threads, like Envoy's workers: each runs its own single-threaded runtime and accepts
/// on its own socket of every listener, so a connection lives on one thread from accept to close, without
/// work stealing or cross-thread wakeups (but for the connections `balance` hands over). Each thread ends once
/// the gateway is terminated and its tunnels have closed (or `CLOSE_WAIT` has passed); the receivers resolve
/// then.
fn spawn_workers(
    listeners: Vec<Listener>,
    workers: usize,
    balance: ConnectionBalance,
    shared: &Shared,
    telemetry: &Telemetry,
) -> anyhow::Result<Vec<tokio::sync::oneshot::Receiver<()>>> {
    let mut shares: Vec<Vec<(std::net::TcpListener, Arc<Shared>)>> = (0..workers).map(|_| Vec::new()).collect();
    for Listener { sockets, shared } in listeners {
        for (share, socket) in shares.iter_mut().zip(sockets) {
            share.push((socket, Arc::clone(&shared)));
        }
    }
    let runtimes = (0..workers)
        .map(|_| tokio::runtime::Builder::new_current_thread().enable_all().build())
        .collect::<Result<Vec<_>, _>>()?;
    let handles = runtimes.iter().map(|runtime| runtime.handle().clone());
    let balancer = telemetry.register(|| Balancer::new(handles, balance));
    let mut finished = Vec::with_capacity(workers);
    for (index, (share, runtime)) in shares.into_iter().zip(runtimes).enumerate() {
        let (drain, connections) = (shared.drain.clone(), Arc::clone(&shared.connections));
        let balancer = Arc::clone(&balancer);
        let (done, done_receiver) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(format!("crossgate-worker-{index}")).spawn(move || {
            runtime.block_on(async move {
                let mut accept_loops = tokio::task::JoinSet::new();
                for (socket, shared) in share {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => {
                            accept_loops.spawn(listener::accept_loop(listener, shared, Arc::clone(&balancer), index));
                        }
                        Err(error) => tracing::error!(%error, "cannot accept on a worker's socket"),
                    }
                }
                let pacer = tokio::spawn(pace_timer_wheel());
                accept_loops.join_all().await;
                pacer.abort();
                drain.terminated().await;
                // Tunnels see Terminated and close; give their tasks a moment to finish.
                let _ = tokio::time::timeout(CLOSE_WAIT, connections.wait_zero()).await;
            });
            let _ = done.send(());
        })?;
        finished.push(done_receiver);
    }
    Ok(finished)
}

/// How often a worker's timer wheel is woken for nothing (see [`pace_timer_wheel`]).
const TIMER_PACE: Duration = Duration::from_millis(100);

/// Keeps a timer due within `TIMER_PACE` on the worker's runtime. tokio wakes its driver through an eventfd
/// whenever a new timer is due sooner than every registered one, even from the driver's own thread; with this
/// one always near, a connection's hello and connect timeouts (seconds away) never are, which spares three
/// syscalls per connection (the eventfd write and read, and an extra epoll_wait) for ten wakeups a second.
async fn pace_timer_wheel() {
    let mut ticks = tokio::time::interval(TIMER_PACE);
    loop {
        ticks.tick().await;
    }
}

/// Starts the side doors on two threads, each with its own runtime: readiness alone on one, so that it answers
/// at once whatever the other is doing (a scrape of a large gateway renders for seconds), and the metrics and
/// admin ports on the other.
fn spawn_side_doors(
    side_doors: [(std::net::TcpListener, Port); 3],
    admin: &Arc<AdminState>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let (status, others): (Vec<_>, Vec<_>) = side_doors.into_iter().partition(|(_, port)| *port == Port::Status);
    Ok(vec![
        spawn_side_door_thread("crossgate-status", status, Arc::clone(admin))?,
        spawn_side_door_thread("crossgate-admin", others, Arc::clone(admin))?,
    ])
}

fn spawn_side_door_thread(
    name: &str,
    side_doors: Vec<(std::net::TcpListener, Port)>,
    admin: Arc<AdminState>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let limits = crossgate_sidedoor::Limits::new(admin.config.side_door_max_connections.into());
    Ok(std::thread::Builder::new().name(name.into()).spawn(move || {
        runtime.block_on(async move {
            let mut servers = tokio::task::JoinSet::new();
            for (listener, port) in side_doors {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        // In the gateway's registry: crossgate_connections_over_limit_total{listener}.
                        let incoming = admin.telemetry.register(|| limits.incoming(listener, port.name()));
                        servers.spawn(admin::serve(incoming, limits, port, Arc::clone(&admin)));
                    }
                    Err(error) => tracing::error!(%error, ?port, "cannot serve admin port"),
                }
            }
            servers.join_all().await;
        });
    })?)
}
