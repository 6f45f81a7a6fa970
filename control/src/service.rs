//! crossgate-control as a running service: a source of the mesh (the mesh file, or the Kubernetes clusters
//! and their remote secrets), debounced into versions, served to gateways over gRPC (plaintext or mTLS) as
//! Envoy's xDS (ADS), with an admin port for metrics, readiness and the per-gateway debug view.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use crossgate_sidedoor::{Incoming, Limits};
use http_body_util::Full;
use hyper::{Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::ads::{AdsOptions, AdsServer};
use crate::model::MeshModel;
use crate::server;
use crate::sources::file::{self, EMBEDDED_MESH, MeshFile};
use crate::sources::kube::{self as kube_source, KubeOptions, SyncStatuses};
use crate::views::ViewOptions;

/// Where the mesh comes from.
#[derive(Debug, Clone)]
pub enum MeshSource {
    /// The mesh file shipped in the binary (`deploy/local/mesh.yaml`).
    Embedded,
    /// A mesh file, followed as it changes.
    File(PathBuf),
    /// The local cluster through this kubeconfig (or the in-cluster config when `None`), and with
    /// `remote_secrets` every cluster named by its Istio remote secrets.
    Kube { kubeconfig: Option<PathBuf>, options: KubeOptions },
}

/// PEM files for serving gRPC over TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, gateways must present a certificate chaining to it (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub source: MeshSource,
    /// This cluster's ID (Istio's CLUSTER_ID).
    pub cluster_id: String,
    pub view: ViewOptions,
    /// How Envoy resources are built for the gateways.
    pub ads: AdsOptions,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub debounce: Duration,
    pub tls: Option<TlsFiles>,
    pub limits: ConnectionLimits,
}

/// How many connections each port serves at once; more are closed as they come (see `crossgate_sidedoor`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Gateways: each holds one.
    pub grpc: usize,
    pub admin: usize,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits { grpc: 1024, admin: 64 }
    }
}

/// A bound control service.
#[derive(Debug)]
pub struct Control {
    config: ControlConfig,
    grpc: TcpListener,
    admin: TcpListener,
}

impl Control {
    pub async fn bind(config: ControlConfig) -> anyhow::Result<Control> {
        let grpc =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        let admin = TcpListener::bind(config.admin)
            .await
            .with_context(|| format!("cannot bind the admin port {}", config.admin))?;
        Ok(Control { config, grpc, admin })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` completes. `metrics` renders the process's Prometheus recorder on the admin port.
    pub async fn run(
        self,
        metrics: Option<PrometheusHandle>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Control { config, grpc, admin } = self;
        let (stop, stopped) = watch::channel(false);
        let stopped_signal = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let (updates, mesh) = watch::channel(MeshModel::default());
        let (statuses, status) = watch::channel(SyncStatuses::default());
        let (primed_sender, primed) = watch::channel(false);
        let source = start_source(&config, updates, statuses, primed_sender, stopped_signal()).await?;

        let versions = server::debounce(mesh, primed.clone(), config.debounce, config.debounce * 10);
        let ads = AdsServer::new(versions, config.view.clone(), config.ads.clone());
        let mut builder = Server::builder().http2_keepalive_interval(Some(Duration::from_secs(30)));
        if let Some(tls) = &config.tls {
            builder = builder.tls_config(server_tls(tls)?)?;
        }
        // Capped, and paused on accept failures: tonic's own accept loop retries EMFILE at once.
        let incoming = Incoming::new(grpc, "grpc", config.limits.grpc);
        let router = builder.add_service(ads.clone().service());
        let grpc_task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped_signal()));
        let gateways = Gateways { ads };
        let limits = Limits::new(config.limits.admin);
        let admin = (limits.incoming(admin, "admin"), limits);
        let admin_task = tokio::spawn(serve_admin(admin, gateways, status, primed, metrics, stopped_signal()));
        tracing::info!(listen = %config.listen, "control service serving");

        shutdown.await;
        let _ = stop.send(true);
        grpc_task.await?.context("gRPC server failed")?;
        admin_task.await?;
        source.await?;
        Ok(())
    }
}

/// Starts the mesh source; a mesh file that does not load is an error here, at start. `primed` is set once the
/// mesh is whole enough to serve: at once for a file, after the clusters have synced for Kubernetes.
async fn start_source(
    config: &ControlConfig,
    updates: watch::Sender<MeshModel>,
    statuses: watch::Sender<SyncStatuses>,
    primed: watch::Sender<bool>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let domain = config.view.domain_suffix.clone();
    Ok(match &config.source {
        MeshSource::Embedded => {
            let mesh = MeshFile::parse(EMBEDDED_MESH).context("the embedded mesh")?;
            updates.send_replace(mesh.model(&domain));
            primed.send_replace(true);
            tokio::spawn(async move {
                stopped.await;
                drop(updates);
            })
        }
        MeshSource::File(path) => {
            // Fail at start on a bad file, and serve what it holds from the first gateway on; then follow it.
            updates.send_replace(MeshFile::read(path)?.model(&domain));
            primed.send_replace(true);
            let path = path.clone();
            tokio::spawn(async move {
                if let Err(error) = file::watch(path, domain, updates, stopped).await {
                    tracing::error!(%error, "mesh file source stopped");
                }
            })
        }
        MeshSource::Kube { kubeconfig, options } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let (cluster_id, options) = (config.cluster_id.clone(), options.clone());
            tokio::spawn(kube_source::run_kube_sources(client, cluster_id, options, updates, statuses, primed, stopped))
        }
    })
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::incluster().context("not running in a cluster: give --kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn server_tls(tls: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

/// The connected gateways, for `/debug/gateways`.
#[derive(Clone)]
struct Gateways {
    ads: AdsServer,
}

impl Gateways {
    fn json(&self) -> String {
        json(&self.ads.gateways())
    }
}

/// The admin port: `/metrics`, `/ready` (200 once gateways are being served: a later outage of one cluster
/// must not take the control service out of its Service, or every gateway would lose it), `/debug/gateways`
/// and `/debug/clusters` (JSON).
async fn serve_admin(
    (incoming, limits): (Incoming, Limits),
    gateways: Gateways,
    status: watch::Receiver<SyncStatuses>,
    primed: watch::Receiver<bool>,
    metrics: Option<PrometheusHandle>,
    stopped: impl Future<Output = ()>,
) {
    let handler = move |request: hyper::Request<hyper::body::Incoming>| {
        let (gateways, status, primed, metrics) = (gateways.clone(), status.clone(), primed.clone(), metrics.clone());
        async move {
            let (status_code, body) = match request.uri().path() {
                // A render takes as long as the series are many: off the runtime's workers, which serve the
                // gateways and readiness.
                "/metrics" => match metrics {
                    Some(metrics) => (
                        StatusCode::OK,
                        tokio::task::spawn_blocking(move || metrics.render()).await.unwrap_or_default(),
                    ),
                    None => (StatusCode::OK, String::new()),
                },
                "/ready" if *primed.borrow() => (StatusCode::OK, "ready\n".to_owned()),
                "/ready" => {
                    let statuses = status.borrow();
                    let waiting: Vec<&str> =
                        statuses.iter().filter(|(_, s)| !s.synced()).map(|(cluster, _)| cluster.as_str()).collect();
                    let body = format!("not ready: the mesh is not whole yet; not synced: [{}]\n", waiting.join(", "));
                    (StatusCode::SERVICE_UNAVAILABLE, body)
                }
                "/debug/gateways" => (StatusCode::OK, gateways.json()),
                "/debug/clusters" => (StatusCode::OK, json(&*status.borrow())),
                _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status_code;
            response
        }
    };
    crossgate_sidedoor::http::serve(incoming, limits, handler, stopped).await;
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Installs the process-wide Prometheus recorder (for the binary) and returns its handle.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    const SECONDS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
    const COUNTS: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()), &SECONDS)?
        .set_buckets(&COUNTS)?
        .install_recorder()?)
}
