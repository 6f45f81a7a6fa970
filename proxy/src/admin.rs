//! The HTTP side doors: readiness on the status port (15021), Prometheus metrics (15090), and the
//! loopback admin port with the config dump. They run on threads and runtimes of their own (see
//! `gateway::spawn_side_doors`), so that a slow scrape never competes with the data-plane workers, and are
//! bounded by `crossgate_sidedoor` (connections, request-head and idle timeouts, accept failures).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use crossgate_sidedoor::{Incoming, Limits};
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::config::GatewayConfig;
use crate::discovery::ConfigStore;
use crate::drain::{Drain, Phase};
use crate::lb::Health;
use crate::metrics::Telemetry;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub store: Arc<ConfigStore>,
    pub telemetry: Arc<Telemetry>,
    pub drain: Drain,
    /// Set once the :15443 listener accepts.
    pub listening: AtomicBool,
    pub config: GatewayConfig,
}

/// Which endpoints a port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// `/healthz/ready` only: this port is on the Service and reachable by load balancers.
    Status,
    /// `/stats/prometheus` only.
    Metrics,
    /// Everything, for operators on loopback: `/config_dump`, `/healthz/ready`, `/stats/prometheus`.
    Admin,
}

impl Port {
    /// The `listener` label of its metrics and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Port::Status => "status",
            Port::Metrics => "metrics",
            Port::Admin => "admin",
        }
    }
}

/// Serves `port`'s endpoints on the connections `incoming` admits until the gateway terminates.
pub async fn serve(incoming: Incoming, limits: Limits, port: Port, state: Arc<AdminState>) {
    let drain = state.drain.clone();
    let handler = move |request| {
        let state = Arc::clone(&state);
        async move { respond(&request, port, &state) }
    };
    crossgate_sidedoor::http::serve(incoming, limits, handler, async move { drain.reached(Phase::Terminated).await })
        .await;
}

fn respond(request: &Request<hyper::body::Incoming>, port: Port, state: &AdminState) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
    }
    match (port, request.uri().path()) {
        (Port::Status | Port::Admin, "/healthz/ready") => readiness(state),
        (Port::Metrics | Port::Admin, "/stats/prometheus") => {
            let mut response = text(StatusCode::OK, state.telemetry.render());
            response.headers_mut().insert(CONTENT_TYPE, "text/plain; version=0.0.4".parse().expect("static header"));
            response
        }
        (Port::Admin, "/config_dump") => {
            let mut response = text(StatusCode::OK, config_dump(state).to_string());
            response.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("static header"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Istio's readiness: 200 once a configuration is accepted and the listener is up, 503 before that and
/// from the moment draining starts (so load balancers stop sending new connections).
fn readiness(state: &AdminState) -> Response<Full<Bytes>> {
    let problem = if state.drain.phase() != Phase::Running {
        Some("draining")
    } else if !state.store.is_loaded() {
        Some("no configuration accepted yet")
    } else if !state.listening.load(Ordering::Acquire) {
        Some("listener not up")
    } else {
        None
    };
    match problem {
        None => text(StatusCode::OK, "ready\n".to_owned()),
        Some(problem) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {problem}\n")),
    }
}

/// The gateway's configuration and every cluster with its endpoints and live state.
pub fn config_dump(state: &AdminState) -> serde_json::Value {
    let routes = state.store.routes();
    let clusters: Vec<_> = routes
        .clusters()
        .into_iter()
        .map(|cluster| {
            let endpoints: Vec<_> = cluster
                .hosts()
                .iter()
                .map(|host| {
                    let workload = &host.spec.workload;
                    json!({
                        "address": host.spec.address.to_string(),
                        "locality": host.spec.locality.to_string(),
                        "weight": host.spec.weight,
                        "health": match host.spec.health {
                            Health::Healthy => "HEALTHY",
                            Health::Unhealthy => "UNHEALTHY",
                            Health::Draining => "DRAINING",
                        },
                        "cluster_id": workload.cluster,
                        "workload_name": workload.name,
                        "canonical_service": workload.canonical_service,
                        "canonical_revision": workload.canonical_revision,
                        "active_connections": host.state.active(),
                    })
                })
                .collect();
            let (settings, service) = (cluster.settings(), cluster.service());
            json!({
                "name": cluster.name(),
                "service": { "host": service.host, "port": service.port, "subset": service.subset,
                             "name": service.name, "namespace": service.namespace },
                "lb": format!("{:?}", cluster.lb_settings()),
                "connect_timeout": humantime::format_duration(settings.connect_timeout).to_string(),
                "max_connections": settings.max_connections,
                "active_connections": cluster.open_connections(),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "gateway": &state.config, "clusters": clusters })
}

/// The bound addresses of the side doors.
#[derive(Debug, Clone, Copy)]
pub struct AdminAddresses {
    pub status: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
}
