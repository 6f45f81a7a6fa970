//! One gateway: binds its sockets, loads its configuration, runs the data plane and the side doors, and
//! shuts down through its [`Drain`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::{self, AdminAddresses, AdminState, Port};
use crate::config::GatewayConfig;
use crate::discovery::ConfigStore;
use crate::discovery::file::ResourcesFile;
use crate::drain::{self, ConnectionCount, Drain, DrainTiming, Phase};
use crate::listener::{self, Shared};
use crate::metrics::{ListenerMetrics, Telemetry};
use crate::route::ClusterDefaults;

/// How long `run` waits, once tunnels are told to close, for their tasks to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often ejections are reviewed; finer than any outlier-detection interval worth configuring.
const OUTLIER_SWEEP: Duration = Duration::from_millis(100);

/// A bound, configured gateway, ready to run.
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
    side_doors: [(std::net::TcpListener, Port); 3],
    shared: Arc<Shared>,
    admin: Arc<AdminState>,
    resources: ResourcesFile,
    timing: DrainTiming,
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
            gateway: config.gateway_identity()?,
            lb_policy: config.lb_policy.clone(),
        };
        let store = Arc::new(ConfigStore::new(defaults, Arc::clone(&telemetry), "file"));
        let path = config.resources.as_deref().ok_or(crate::config::ConfigError::NoSource)?;
        let mut resources = ResourcesFile::new(path, Arc::clone(&store));
        resources.reload()?;

        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        let bind_side_door = |address: SocketAddr, what: &str| -> anyhow::Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot bind the {what} port {address}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let side_doors = [
            (bind_side_door(config.status_addr, "status")?, Port::Status),
            (bind_side_door(config.metrics_addr, "metrics")?, Port::Metrics),
            (bind_side_door(config.admin_addr, "admin")?, Port::Admin),
        ];
        let listener_name = format!("{}_{}", config.listen.ip(), config.listen.port());
        let drain = Drain::default();
        let shared = Arc::new(Shared {
            store: Arc::clone(&store),
            metrics: telemetry.register(|| ListenerMetrics::new(&listener_name)),
            connections: Arc::default(),
            drain: drain.clone(),
            hello_timeout: config.hello_timeout.0,
            connect_attempts: config.connect_attempts,
            max_downstream_connections: config.max_downstream_connections,
            keepalive: config.keepalive(),
        });
        let timing = DrainTiming {
            drain_duration: config.drain_duration.0,
            termination_grace: config.termination_grace.0,
            exit_on_zero_active_connections: config.exit_on_zero_active_connections,
            minimum_drain_duration: config.minimum_drain_duration.0,
        };
        let admin = Arc::new(AdminState { store, telemetry, drain, listening: Default::default(), config });
        Ok(Gateway { listener, side_doors, shared, admin, resources, timing })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addresses(&self) -> AdminAddresses {
        let address = |i: usize| self.side_doors[i].0.local_addr().expect("bound listener has an address");
        AdminAddresses { status: address(0), metrics: address(1), admin: address(2) }
    }

    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            drain: self.shared.drain.clone(),
            connections: Arc::clone(&self.shared.connections),
            store: Arc::clone(&self.shared.store),
            telemetry: Arc::clone(&self.admin.telemetry),
            timing: self.timing,
        }
    }

    /// Runs until shutdown (through a [`GatewayHandle`]) has terminated the gateway.
    pub async fn run(self) -> anyhow::Result<()> {
        let Gateway { listener, side_doors, shared, admin, resources, timing: _ } = self;
        let side_thread = spawn_side_doors(side_doors, Arc::clone(&admin))?;
        let drain = shared.drain.clone();
        let watcher = tokio::spawn(resources.watch(drain.clone()));
        tokio::spawn(sweep_outliers(Arc::clone(&shared.store), drain.clone()));
        admin.listening.store(true, Ordering::Release);
        tracing::info!(listen = %listener.local_addr()?, "gateway accepting");
        listener::accept_loop(listener, Arc::clone(&shared)).await;
        drain.reached(Phase::Terminated).await;
        // Tunnels see Terminated and close; give their tasks a moment to finish.
        let _ = tokio::time::timeout(CLOSE_WAIT, shared.connections.wait_zero()).await;
        watcher.await.context("resources watcher panicked")??;
        side_thread.join().map_err(|_| anyhow::anyhow!("admin thread panicked"))?;
        Ok(())
    }
}

/// Un-ejects hosts whose ejection time is over and decays ejection multipliers (Envoy's outlier detection
/// interval); each cluster knows when it is next due, so a tick is cheap.
async fn sweep_outliers(store: Arc<ConfigStore>, drain: Drain) {
    let mut ticks = tokio::time::interval(OUTLIER_SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let terminated = drain.reached(Phase::Terminated);
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            () = &mut terminated => return,
            _ = ticks.tick() => {}
        }
        let now = std::time::Instant::now();
        for cluster in store.routes().iter() {
            cluster.lb.tick(now);
        }
    }
}

fn spawn_side_doors(
    side_doors: [(std::net::TcpListener, Port); 3],
    admin: Arc<AdminState>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(std::thread::Builder::new().name("crossgate-admin".into()).spawn(move || {
        runtime.block_on(async move {
            let mut servers = tokio::task::JoinSet::new();
            for (listener, port) in side_doors {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        servers.spawn(admin::serve(listener, port, Arc::clone(&admin)));
                    }
                    Err(error) => tracing::error!(%error, ?port, "cannot serve admin port"),
                }
            }
            servers.join_all().await;
        });
    })?)
}
