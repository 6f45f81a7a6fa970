//! `crossgate-control`: parses the command line and wires the control service together.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use crossgate_control::ads::AdsOptions;
use crossgate_control::bootstrap::{EnvoyBootstrap, XdsAddress};
use crossgate_control::certs;
use crossgate_control::service::{ConnectionLimits, Control, ControlConfig, MeshSource, TlsFiles, install_metrics};
use crossgate_control::sources::kube::KubeOptions;
use crossgate_control::views::ViewOptions;
use crossgate_istio::labels::Locality;
use crossgate_istio::locality_lb::NetworkFailover;
use crossgate_istio::node::GatewayNode;
use crossgate_sidedoor::process::{self, Signals};

#[derive(Parser)]
#[command(
    name = "crossgate-control",
    version,
    about = "Watches every cluster of an Istio mesh and pushes endpoints to crossgate gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gateways. With no source flag, serves the embedded example mesh (deploy/local/mesh.yaml).
    Run(RunArgs),
    /// Write certificates in Istio's cacerts layout (Makefile.selfsigned.mk).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print the bootstrap of a gateway fed by this service.
    #[command(subcommand)]
    Bootstrap(BootstrapCommand),
}

#[derive(Subcommand)]
enum BootstrapCommand {
    /// An Envoy bootstrap (JSON) like Istio's gateway bootstrap: delta ADS to --xds, the admin on 127.0.0.1,
    /// /healthz/ready and /stats/prometheus listeners. Run it with `envoy -c FILE`.
    Envoy(EnvoyBootstrapArgs),
}

#[derive(Args)]
struct EnvoyBootstrapArgs {
    /// The gateway's node ID (e.g. its pod name).
    #[arg(long)]
    node_id: String,
    /// The cluster it runs in (Istio's CLUSTER_ID).
    #[arg(long)]
    cluster_id: String,
    /// Its network (ISTIO_META_NETWORK).
    #[arg(long)]
    network: String,
    /// Networks whose endpoints it is sent (ISTIO_META_REQUESTED_NETWORK_VIEW), comma-separated.
    #[arg(long, value_delimiter = ',')]
    requested_network_view: Vec<String>,
    /// `region/zone/subzone`, for locality failover.
    #[arg(long, default_value = "")]
    locality: Locality,
    /// Its pod labels, compared by failoverPriority: `--label key=value`, repeated.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The control service's gRPC address, HOST:PORT.
    #[arg(long)]
    xds: XdsAddress,
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    #[arg(long, default_value_t = 15021)]
    status_port: u16,
    #[arg(long, default_value_t = 15090)]
    metrics_port: u16,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

#[derive(Args)]
struct RunArgs {
    /// A mesh file (clusters, networks, services, endpoints), followed as it changes.
    #[arg(long, env = "CROSSGATE_MESH", conflicts_with_all = ["kubeconfig", "kubeconfig_in_cluster"])]
    mesh: Option<PathBuf>,
    /// Watch the cluster of this kubeconfig.
    #[arg(long, env = "KUBECONFIG", conflicts_with = "kubeconfig_in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch the cluster this pod runs in (its service account).
    #[arg(long)]
    kubeconfig_in_cluster: bool,
    /// Also watch every cluster named by Istio remote secrets (label istio/multiCluster=true) in the system
    /// namespace.
    #[arg(long)]
    remote_secrets: bool,
    /// This cluster's ID (Istio's CLUSTER_ID, global.multiCluster.clusterName).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    #[arg(long, env = "CROSSGATE_SYSTEM_NAMESPACE", default_value = "istio-system")]
    system_namespace: String,
    #[arg(long, env = "CROSSGATE_DOMAIN_SUFFIX", default_value = "cluster.local")]
    domain_suffix: String,
    /// The delta discovery stream gateways connect to.
    #[arg(long, env = "CROSSGATE_LISTEN", default_value = "0.0.0.0:15010")]
    listen: SocketAddr,
    /// /metrics, /ready, /debug/gateways, /debug/clusters.
    #[arg(long, env = "CROSSGATE_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    admin_addr: SocketAddr,
    /// Gateway connections served at once; more are closed as they come.
    #[arg(long, env = "CROSSGATE_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Admin-port connections served at once; more are closed as they come.
    #[arg(long, env = "CROSSGATE_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    admin_max_connections: usize,
    /// At start, how long gateways wait for the remote clusters to sync before they are served without the ones
    /// that have not (Istio's PILOT_REMOTE_CLUSTER_TIMEOUT). The local cluster is always waited for.
    #[arg(long, env = "CROSSGATE_REMOTE_SYNC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    remote_sync_timeout: std::time::Duration,
    /// Quiet time after a change before gateways are pushed to.
    #[arg(long, env = "CROSSGATE_DEBOUNCE", default_value = "100ms", value_parser = humantime::parse_duration)]
    debounce: std::time::Duration,
    /// Serve TLS with this certificate chain (PEM)...
    #[arg(long, env = "CROSSGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ...and key.
    #[arg(long, env = "CROSSGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require gateway certificates chaining to this CA (mTLS).
    #[arg(long, env = "CROSSGATE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Whose failoverPriority network rule Envoy gateways' priorities follow: 1.31 (the network preferred) or
    /// 1.30 (another network last).
    #[arg(long, env = "CROSSGATE_ISTIO_VERSION", default_value = "1.31")]
    istio_version: NetworkFailover,
    /// The port of the sni-dnat listener pushed to Envoy gateways (Istio's 15443).
    #[arg(long, env = "CROSSGATE_GATEWAY_LISTEN_PORT", default_value_t = 15443)]
    gateway_listen_port: u16,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// root-cert.pem and root-key.pem.
    RootCa {
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// NAME/{ca-cert,ca-key,root-cert,cert-chain}.pem, signed by the root in --out: one per cluster.
    Intermediate {
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// cert.pem, key.pem and ca.pem for a server or client (the control channel, a test workload), signed by
    /// the intermediate in --ca-dir.
    Leaf {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// URI SANs, e.g. spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway.
        #[arg(long = "uri")]
        uris: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let logging = process::init_logging();
    let result = match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Certs(command) => write_certs(command),
        Command::Bootstrap(BootstrapCommand::Envoy(args)) => print_envoy_bootstrap(args),
    };
    logging.exit("crossgate-control", result)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = match (args.mesh, args.kubeconfig, args.kubeconfig_in_cluster) {
        (Some(path), _, _) => MeshSource::File(path),
        (None, kubeconfig @ Some(_), _) | (None, kubeconfig @ None, true) => MeshSource::Kube {
            kubeconfig,
            options: KubeOptions {
                system_namespace: args.system_namespace.clone(),
                domain_suffix: args.domain_suffix.clone(),
                remote_secrets: args.remote_secrets,
                remote_sync_timeout: args.remote_sync_timeout,
                ..KubeOptions::default()
            },
        },
        (None, None, false) => MeshSource::Embedded,
    };
    let config = ControlConfig {
        source,
        cluster_id: args.cluster_id,
        view: ViewOptions {
            domain_suffix: args.domain_suffix,
            gateway_namespace: args.system_namespace.clone(),
            root_namespace: args.system_namespace,
        },
        ads: AdsOptions {
            network_failover: args.istio_version,
            listener_port: args.gateway_listen_port,
            ..AdsOptions::default()
        },
        listen: args.listen,
        admin: args.admin_addr,
        debounce: args.debounce,
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles { cert, key, client_ca: args.tls_client_ca }),
        limits: ConnectionLimits { grpc: args.max_connections, admin: args.admin_max_connections },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut signals = Signals::install()?;
        let metrics = install_metrics()?;
        let control = Control::bind(config).await?;
        // SIGTERM and SIGINT alike: nothing to drain but streams that gateways reopen elsewhere.
        let shutdown = async move {
            signals.stop().await;
            tracing::info!("stopping");
        };
        control.run(Some(metrics), shutdown).await
    })
}

fn print_envoy_bootstrap(args: EnvoyBootstrapArgs) -> anyhow::Result<()> {
    let node = GatewayNode {
        id: args.node_id,
        cluster_id: args.cluster_id,
        network: args.network,
        requested_network_view: args.requested_network_view.into_iter().filter(|n| !n.is_empty()).collect(),
        locality: args.locality,
        labels: args.labels.into_iter().collect(),
    };
    let bootstrap = EnvoyBootstrap {
        admin_port: args.admin_port,
        status_port: args.status_port,
        metrics_port: args.metrics_port,
        ..EnvoyBootstrap::new(node, args.xds)
    };
    println!("{}", serde_json::to_string_pretty(&bootstrap.to_json())?);
    Ok(())
}

fn write_certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::RootCa { out } => {
            certs::root_ca(&out)?;
            println!("wrote {0}/root-cert.pem and {0}/root-key.pem", out.display());
        }
        CertsCommand::Intermediate { name, out } => {
            certs::intermediate(&out, &name)?;
            println!("wrote {}/{name}/{{ca-cert,ca-key,root-cert,cert-chain}}.pem", out.display());
        }
        CertsCommand::Leaf { ca_dir, dns_names, uris, days, out } => {
            certs::leaf(&ca_dir, &dns_names, &uris, days, &out)?;
            println!("wrote {0}/cert.pem, {0}/key.pem and {0}/ca.pem", out.display());
        }
    }
    Ok(())
}
