//! The gateway's configuration: typed, parsed from flags and environment variables (every flag has one),
//! validated before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::balance::ConnectionBalance;
use crate::forward::{CopyMode, Keepalive};
use crossgate_istio::labels::{CLUSTER_LABEL, Locality, NETWORK_LABEL};
use crossgate_istio::locality_lb::GatewayIdentity;

/// A duration written as Istio and Envoy write them: `15s`, `1h`, `500ms`, `0s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HumanDuration(#[serde(serialize_with = "serialize_duration")] pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = humantime::DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// Everything `crossgate-proxy` (the gateway) needs to run.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct GatewayConfig {
    /// Where Istio workloads connect with mTLS (the AUTO_PASSTHROUGH SNI router).
    #[arg(long, env = "CROSSGATE_LISTEN", default_value = "0.0.0.0:15443")]
    pub listen: SocketAddr,

    /// Readiness (`/healthz/ready`), as Istio's status port.
    #[arg(long, env = "CROSSGATE_STATUS_ADDR", default_value = "0.0.0.0:15021")]
    pub status_addr: SocketAddr,

    /// Prometheus metrics (`/stats/prometheus`).
    #[arg(long, env = "CROSSGATE_METRICS_ADDR", default_value = "0.0.0.0:15090")]
    pub metrics_addr: SocketAddr,

    /// Admin endpoints (`/config_dump`); loopback only by default, like Envoy's admin port.
    #[arg(long, env = "CROSSGATE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Connections each side door (status, metrics, admin) serves at once; more are closed as they come, so
    /// that the side doors cannot take the descriptors the data plane needs.
    #[arg(long, env = "CROSSGATE_SIDE_DOOR_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub side_door_max_connections: u16,

    /// A static resources file (YAML or JSON form of crossgate.discovery.v1.Resources), reloaded when it
    /// changes.
    #[arg(long, env = "CROSSGATE_RESOURCES", conflicts_with = "xds")]
    pub resources: Option<PathBuf>,

    /// The control plane's Envoy xDS (delta ADS), `http://host:15010` (or `https://` for TLS). The gateway is
    /// ready once its first listener is accepted.
    #[arg(long, env = "CROSSGATE_XDS")]
    pub xds: Option<String>,

    /// The port of the pushed listener whose filter chains route (Istio's AUTO_PASSTHROUGH server); its chains
    /// are served on `--listen`, and other listeners are ignored.
    #[arg(long, env = "CROSSGATE_XDS_LISTENER_PORT", default_value_t = 15443)]
    pub xds_listener_port: u16,

    /// CA bundle (PEM) that the control service's certificate must chain to; `https://` URLs need it.
    #[arg(long, env = "CROSSGATE_XDS_CA", requires = "xds")]
    pub xds_ca: Option<PathBuf>,

    /// The gateway's client certificate (PEM) for mTLS to the control service.
    #[arg(long, env = "CROSSGATE_XDS_CERT", requires = "xds_key")]
    pub xds_cert: Option<PathBuf>,

    #[arg(long, env = "CROSSGATE_XDS_KEY", requires = "xds_cert")]
    pub xds_key: Option<PathBuf>,

    /// The name in the control service's certificate, when not the URL's host.
    #[arg(long, env = "CROSSGATE_XDS_SERVER_NAME")]
    pub xds_server_name: Option<String>,

    /// This gateway's name in the control service (defaults to the host name, i.e. the pod name).
    #[arg(long, env = "CROSSGATE_NODE_ID")]
    pub node_id: Option<String>,

    /// Networks whose endpoints this gateway may route to (comma-separated); Istio sets the gateway's own.
    #[arg(long, env = "ISTIO_META_REQUESTED_NETWORK_VIEW", value_delimiter = ',')]
    pub requested_network_view: Vec<String>,

    /// The Kubernetes cluster this gateway runs in (Istio's CLUSTER_ID; the `topology.istio.io/cluster` label).
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// The gateway's network (`topology.istio.io/network`).
    #[arg(long, env = "ISTIO_META_NETWORK", default_value = "")]
    pub network: String,

    /// The gateway's `region/zone/subzone`: locality failover prefers endpoints near it.
    #[arg(long, env = "CROSSGATE_LOCALITY", default_value = "")]
    pub locality: String,

    /// More gateway labels (`key=value`, repeatable or comma-separated), compared by `failoverPriority`.
    #[arg(long = "label", env = "CROSSGATE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Which Istio release's locality rules to follow where releases differ (`failoverPriority` with the
    /// network first): 1.31 or 1.30.
    #[arg(long, env = "CROSSGATE_ISTIO_VERSION", default_value = "1.31")]
    pub istio_version: String,

    /// Replace every cluster's pick algorithm with this registered policy (e.g. MAGLEV, or one of your own:
    /// see proxy/src/lb/policy).
    #[arg(long, env = "CROSSGATE_LB_POLICY")]
    pub lb_policy: Option<String>,

    /// Pass every TLS connection on a port to one upstream, as Istio's `expose-istiod` does for istiod:
    /// `15012=istiod.istio-system.svc:15012,15017=istiod.istio-system.svc:443`. Off by default.
    #[arg(long, env = "CROSSGATE_ISTIOD_PASSTHROUGH", value_delimiter = ',', value_parser = parse_passthrough)]
    pub istiod_passthrough: Vec<PassthroughRoute>,

    /// How tunnels move bytes: `auto` (small chunks through a buffer, bulk by splice), `splice` (always zero-copy
    /// through a pipe) or `buffer` (always read/write through user space).
    #[arg(long, env = "CROSSGATE_COPY", value_enum, default_value_t = CopyMode::Auto)]
    pub copy: CopyMode,

    /// Data-plane worker threads; defaults to the number of cores.
    #[arg(long, env = "CROSSGATE_WORKERS")]
    pub workers: Option<usize>,

    /// `exact`: a worker holding more connections than the least loaded one hands new ones over (Envoy's
    /// `exact_balance`); `kernel`: connections stay where the kernel's SO_REUSEPORT hash put them.
    #[arg(long, env = "CROSSGATE_CONNECTION_BALANCE", value_enum, default_value_t = ConnectionBalance::Exact)]
    pub connection_balance: ConnectionBalance,

    /// How long a client may take to send its whole ClientHello (Envoy's listener filter timeout).
    #[arg(long, env = "CROSSGATE_HELLO_TIMEOUT", default_value = "15s")]
    pub hello_timeout: HumanDuration,

    /// Upstream connect timeout, unless the cluster's DestinationRule sets `tcp.connectTimeout`
    /// (Istio's meshConfig.connectTimeout default).
    #[arg(long, env = "CROSSGATE_CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: HumanDuration,

    /// Endpoints tried per connection before giving up (each attempt picks an endpoint not yet tried). 1 is
    /// Envoy's tcp_proxy default (`max_connect_attempts`), which Istio never sets.
    #[arg(long, env = "CROSSGATE_CONNECT_ATTEMPTS", default_value_t = 1)]
    pub connect_attempts: usize,

    /// Close a tunnel after this long with no bytes either way, unless the DestinationRule sets
    /// `tcp.idleTimeout`; `0s` disables it (Envoy's tcp_proxy default is 1h).
    #[arg(long, env = "CROSSGATE_IDLE_TIMEOUT", default_value = "1h")]
    pub idle_timeout: HumanDuration,

    /// Close any tunnel after this long, unless the DestinationRule sets `tcp.maxConnectionDuration`;
    /// `0s` (the default) means no limit.
    #[arg(long, env = "CROSSGATE_MAX_CONNECTION_DURATION", default_value = "0s")]
    pub max_connection_duration: HumanDuration,

    /// Downstream connections open at once across the gateway; more are closed at accept
    /// (ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS).
    #[arg(long, env = "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS", default_value_t = i32::MAX as usize)]
    pub max_downstream_connections: usize,

    /// TCP keepalive on both sides: idle time before the first probe (a DestinationRule's
    /// `tcp.tcpKeepalive` overrides it upstream).
    #[arg(long, env = "CROSSGATE_TCP_KEEPALIVE_TIME", default_value = "300s")]
    pub tcp_keepalive_time: HumanDuration,

    #[arg(long, env = "CROSSGATE_TCP_KEEPALIVE_INTERVAL", default_value = "75s")]
    pub tcp_keepalive_interval: HumanDuration,

    #[arg(long, env = "CROSSGATE_TCP_KEEPALIVE_PROBES", default_value_t = 9)]
    pub tcp_keepalive_probes: u32,

    /// After SIGTERM, how long the listener keeps accepting (readiness already fails), as Envoy's graceful
    /// listener drain does.
    #[arg(long, env = "CROSSGATE_DRAIN_DURATION", default_value = "5s")]
    pub drain_duration: HumanDuration,

    /// After SIGTERM, when open tunnels are closed by force if they have not ended.
    #[arg(long, env = "CROSSGATE_TERMINATION_GRACE", default_value = "25s")]
    pub termination_grace: HumanDuration,

    /// Exit as soon as no tunnel remains, once the minimum drain duration has passed.
    #[arg(long, env = "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", default_value_t = false)]
    pub exit_on_zero_active_connections: bool,

    #[arg(long, env = "MINIMUM_DRAIN_DURATION", default_value = "5s")]
    pub minimum_drain_duration: HumanDuration,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("no configuration source: give --resources FILE or --xds URL")]
    NoSource,
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("--connect-attempts must be at least 1")]
    NoConnectAttempts,
    #[error("--connect-timeout must be more than 0s")]
    ZeroConnectTimeout,
    #[error("--hello-timeout must be more than 0s")]
    ZeroHelloTimeout,
    #[error("--drain-duration ({drain:?}) must not exceed --termination-grace ({grace:?})")]
    DrainLongerThanGrace { drain: Duration, grace: Duration },
    #[error("--max-downstream-connections must be at least 1")]
    NoDownstreamConnections,
    #[error("--locality: {0}")]
    Locality(String),
    #[error("--istio-version: {0}")]
    IstioVersion(String),
}

/// One `--istiod-passthrough` entry: a listening port and the `host:port` it passes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassthroughRoute {
    pub port: u16,
    pub upstream: String,
}

fn parse_passthrough(text: &str) -> Result<PassthroughRoute, String> {
    let problem = || format!("{text:?} is not PORT=HOST:PORT");
    let (port, upstream) = text.split_once('=').ok_or_else(problem)?;
    let port = port.parse().map_err(|_| problem())?;
    match upstream.rsplit_once(':') {
        Some((host, upstream_port)) if !host.is_empty() && upstream_port.parse::<u16>().is_ok() => {
            Ok(PassthroughRoute { port, upstream: upstream.to_owned() })
        }
        _ => Err(problem()),
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

/// The gateway's flags alone, for parsing them outside the binary (tests, benches).
#[derive(Debug, clap::Parser)]
#[command(name = "crossgate-proxy")]
struct GatewayFlags {
    #[command(flatten)]
    config: GatewayConfig,
}

impl GatewayConfig {
    /// Parses flags as the binary does (`args` excludes the program name); environment variables apply.
    pub fn from_flags<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let args = std::iter::once(std::ffi::OsString::from("crossgate-proxy")).chain(args.into_iter().map(Into::into));
        GatewayFlags::try_parse_from(args).map(|flags| flags.config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.resources.is_none() && self.xds.is_none() {
            return Err(ConfigError::NoSource);
        }
        if self.workers == Some(0) {
            return Err(ConfigError::NoWorkers);
        }
        if self.connect_attempts == 0 {
            return Err(ConfigError::NoConnectAttempts);
        }
        if self.connect_timeout.0.is_zero() {
            return Err(ConfigError::ZeroConnectTimeout);
        }
        if self.hello_timeout.0.is_zero() {
            return Err(ConfigError::ZeroHelloTimeout);
        }
        if self.max_downstream_connections == 0 {
            return Err(ConfigError::NoDownstreamConnections);
        }
        self.gateway_identity()?;
        if self.drain_duration.0 > self.termination_grace.0 {
            return Err(ConfigError::DrainLongerThanGrace {
                drain: self.drain_duration.0,
                grace: self.termination_grace.0,
            });
        }
        Ok(())
    }

    /// Zero means "off" for the optional timeouts.
    pub fn idle_timeout(&self) -> Option<Duration> {
        non_zero(self.idle_timeout.0)
    }

    pub fn max_connection_duration(&self) -> Option<Duration> {
        non_zero(self.max_connection_duration.0)
    }

    /// Who this gateway is, for locality-aware balancing: its locality, and its labels with the network and
    /// cluster added as Istio adds them.
    pub fn gateway_identity(&self) -> Result<GatewayIdentity, ConfigError> {
        let locality: Locality = self.locality.parse().map_err(|e| ConfigError::Locality(format!("{e}")))?;
        let mut labels: BTreeMap<String, String> = self.labels.iter().cloned().collect();
        if !self.network.is_empty() {
            labels.insert(NETWORK_LABEL.to_owned(), self.network.clone());
        }
        labels.insert(CLUSTER_LABEL.to_owned(), self.cluster_id.clone());
        let mut identity = GatewayIdentity::new(locality, labels);
        identity.network_failover = self.istio_version.parse().map_err(ConfigError::IstioVersion)?;
        Ok(identity)
    }

    pub fn keepalive(&self) -> Keepalive {
        Keepalive {
            time: self.tcp_keepalive_time.0,
            interval: self.tcp_keepalive_interval.0,
            probes: self.tcp_keepalive_probes,
        }
    }
}

pub fn non_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> GatewayConfig {
        GatewayConfig::from_flags([&["--resources", "r.yaml"], args].concat()).unwrap()
    }

    #[test]
    fn defaults_match_istio() {
        let config = parse(&[]);
        assert_eq!(config.listen.port(), 15443);
        assert_eq!(config.status_addr.port(), 15021);
        assert_eq!(config.metrics_addr.port(), 15090);
        assert_eq!(config.hello_timeout.0, Duration::from_secs(15));
        assert_eq!(config.connect_timeout.0, Duration::from_secs(10));
        assert_eq!(config.idle_timeout(), Some(Duration::from_secs(3600)));
        assert_eq!(config.max_connection_duration(), None);
        config.validate().unwrap();
    }

    #[test]
    fn refusals_name_the_flag() {
        let config = parse(&["--drain-duration", "60s", "--termination-grace", "30s"]);
        assert!(config.validate().unwrap_err().to_string().contains("--drain-duration"));
        assert_eq!(parse(&["--connect-attempts", "0"]).validate(), Err(ConfigError::NoConnectAttempts));
        assert!(parse(&["--idle-timeout", "0s"]).idle_timeout().is_none());
        let error = GatewayConfig::from_flags(["--resources", "r.yaml", "--hello-timeout", "soon"]).unwrap_err();
        assert!(error.to_string().contains("--hello-timeout"), "{error}");
        assert!(parse(&["--locality", "a/b/c/d"]).validate().unwrap_err().to_string().contains("--locality"));
        assert!(parse(&["--istio-version", "1.29"]).validate().is_err());
        assert!(GatewayConfig::from_flags(["--resources", "r.yaml", "--label", "novalue"]).is_err());
        assert!(GatewayConfig::from_flags(["--resources", "r.yaml", "--istiod-passthrough", "15012=istiod"]).is_err());
        let config =
            parse(&["--istiod-passthrough", "15012=istiod.istio-system.svc:15012,15017=istiod.istio-system.svc:443"]);
        assert_eq!(
            config.istiod_passthrough[1],
            PassthroughRoute { port: 15017, upstream: "istiod.istio-system.svc:443".into() }
        );
    }

    #[test]
    fn identity_carries_network_cluster_and_locality() {
        let config = parse(&[
            "--network",
            "network1",
            "--cluster-id",
            "cluster1",
            "--locality",
            "us-east1/us-east1-b",
            "--label",
            "a=1,b=2",
            "--istio-version",
            "1.30",
        ]);
        let identity = config.gateway_identity().unwrap();
        assert_eq!(identity.labels["topology.istio.io/network"], "network1");
        assert_eq!(identity.labels["topology.istio.io/cluster"], "cluster1");
        assert_eq!(identity.labels["topology.kubernetes.io/zone"], "us-east1-b");
        assert_eq!((identity.labels["a"].as_str(), identity.labels["b"].as_str()), ("1", "2"));
        assert_eq!(identity.network_failover, crossgate_istio::locality_lb::NetworkFailover::Istio130);
    }
}
