//! `crossgate-scale`: discovery at mesh scale. A generated mesh is fed in process to the control service's
//! real pipeline (debounce, then the ADS server over tonic on 127.0.0.1), and `crossgate-proxy` gateways run as
//! child processes on it. Measured: the time to every gateway ready, memory per endpoint entry in the control
//! and in each gateway, one endpoint change to the last receiving gateway's ACK, CPU per change on both sides,
//! each gateway's metrics page, and a sustained rate of changes. See the README's "Discovery at scale".

pub mod control;
pub mod gateway;
pub mod mesh;
pub mod probe;
pub mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossgate_control::ads::Kind;

use crate::sys::Machine;
use control::{InProcessControl, THREAD_NAME, held_version};
use gateway::{GatewayProcess, Identity};
use mesh::{MeshShape, ScaleMesh};
use report::{
    ChangeFigures, ControlMemory, GatewayFigures, MeshFigures, ScaleReport, Settings, Spread, SustainedFigures,
};

#[derive(Debug, Clone)]
pub struct Options {
    pub endpoints: usize,
    pub endpoints_per_service: usize,
    pub gateways: usize,
    pub changes: usize,
    pub debounce: Duration,
    pub sustained_rate: f64,
    pub sustained_seconds: f64,
    pub proxy_bin: PathBuf,
    /// How long the gateways may take to become ready, and a change to be ACKed.
    pub ready_timeout: Duration,
    pub ack_timeout: Duration,
    pub log_dir: PathBuf,
    pub quick: bool,
}

impl Options {
    pub fn full(proxy_bin: PathBuf, log_dir: PathBuf) -> Options {
        Options {
            endpoints: 100_000,
            endpoints_per_service: 40,
            gateways: 10,
            changes: 100,
            debounce: Duration::from_millis(100),
            sustained_rate: 10.0,
            sustained_seconds: 10.0,
            proxy_bin,
            ready_timeout: Duration::from_secs(1800),
            ack_timeout: Duration::from_secs(600),
            log_dir,
            quick: false,
        }
    }

    /// A small mesh, two gateways, a few changes: checks that everything still works, in seconds.
    pub fn quick(proxy_bin: PathBuf, log_dir: PathBuf) -> Options {
        Options {
            endpoints: 2_000,
            gateways: 2,
            changes: 10,
            sustained_seconds: 2.0,
            ready_timeout: Duration::from_secs(60),
            ack_timeout: Duration::from_secs(30),
            quick: true,
            ..Options::full(proxy_bin, log_dir)
        }
    }
}

/// CPU time of the bench process (all of it, and the control runtime's threads) and of every gateway.
#[derive(Debug, Clone)]
struct CpuSnapshot {
    process_ns: u64,
    control_ns: u64,
    gateways_ns: Vec<u64>,
}

impl CpuSnapshot {
    fn take(gateways: &[GatewayProcess]) -> CpuSnapshot {
        CpuSnapshot {
            process_ns: probe::process_cpu_ns("self"),
            control_ns: probe::threads_cpu_ns("self", |name| name.starts_with(THREAD_NAME)),
            gateways_ns: gateways.iter().map(GatewayProcess::cpu_ns).collect(),
        }
    }

    /// Milliseconds since `before`: the process, the control threads, each gateway.
    fn since(&self, before: &CpuSnapshot) -> (f64, f64, Vec<f64>) {
        let ms = |after: u64, before: u64| after.saturating_sub(before) as f64 / 1e6;
        let gateways = self.gateways_ns.iter().zip(&before.gateways_ns).map(|(a, b)| ms(*a, *b)).collect();
        (ms(self.process_ns, before.process_ns), ms(self.control_ns, before.control_ns), gateways)
    }
}

/// Runs the benchmark. Errors that end it early are returned; gateways that never become ready or changes
/// never ACKed are in the report's `errors`.
pub fn run(options: &Options) -> anyhow::Result<ScaleReport> {
    std::fs::create_dir_all(&options.log_dir)?;
    let machine = Machine::describe();
    let rss_start = probe::status_bytes("self", "VmRSS:");
    let built = Instant::now();
    let mut mesh = ScaleMesh::build(MeshShape {
        endpoints: options.endpoints,
        endpoints_per_service: options.endpoints_per_service,
    });
    let build_s = built.elapsed().as_secs_f64();
    let rss_model = probe::status_bytes("self", "VmRSS:");
    progress(format_args!(
        "mesh: {} endpoints, {} services, built in {build_s:.2} s",
        mesh.endpoints,
        mesh.services.len()
    ));

    let control = InProcessControl::start(mesh.model.clone(), options.debounce)?;
    let rss_before = probe::status_bytes("self", "VmRSS:");
    let mut errors = Vec::new();

    // Every gateway at once, as after a control-plane rollout.
    let started = Instant::now();
    let mut gateways = (0..options.gateways)
        .map(|i| GatewayProcess::spawn(&options.proxy_bin, control.addr(), Identity::nth(i), &options.log_dir))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ready_s = wait_ready(&mut gateways, started, options.ready_timeout)?;
    let all_ready_s = ready_s.iter().copied().collect::<Option<Vec<f64>>>().map(|r| r.into_iter().fold(0.0, f64::max));
    match all_ready_s {
        Some(s) => progress(format_args!("all {} gateways ready in {s:.2} s", gateways.len())),
        None => {
            let never: Vec<&str> = gateways
                .iter()
                .zip(&ready_s)
                .filter(|(_, r)| r.is_none())
                .map(|(g, _)| g.identity.node_id.as_str())
                .collect();
            errors.push(format!("never ready within {:?}: {}", options.ready_timeout, never.join(", ")));
        }
    }
    settle(&control, options.ack_timeout).context("the initial pushes")?;

    let rss_after = probe::status_bytes("self", "VmRSS:");
    let pages_before = gateways.iter().map(GatewayProcess::metrics_page).collect::<anyhow::Result<Vec<_>>>()?;
    let gauge = |page: &str, name: &str| probe::prometheus_value(page, name).unwrap_or(0.0) as u64;
    let endpoints: Vec<u64> = pages_before.iter().map(|p| gauge(p, "crossgate_config_endpoints")).collect();
    let entries: u64 = endpoints.iter().sum();
    let gateway_rss: Vec<u64> = gateways.iter().map(GatewayProcess::rss_bytes).collect();
    progress(format_args!(
        "{entries} endpoint entries across the views; control {:.0} MiB → {:.0} MiB",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    ));

    // One change at a time: each waits for every receiving gateway's ACK, and for every stream to have taken
    // the version (so that none is still rebuilding when the next change starts).
    let before_paced = CpuSnapshot::take(&gateways);
    let counts_before = control.tally().counts();
    let mut samples = Vec::new();
    let mut edits = Vec::new();
    let mut receivers = Vec::new();
    let mut seen = vec![0usize; gateways.len()];
    for i in 0..options.changes {
        let edit = Instant::now();
        let (model, change) = mesh.change(i * 7 + 3, i, i * 13);
        edits.push(edit.elapsed().as_secs_f64() * 1e3);
        let reached: Vec<bool> = gateways.iter().map(|g| g.identity.sees(change.network)).collect();
        receivers.push(reached.iter().filter(|r| **r).count());
        seen.iter_mut().zip(&reached).for_each(|(n, r)| *n += usize::from(*r));
        let held = acked_by_node(&control, &change.watched_cluster);
        let version = control.version() + 1;
        let published = Instant::now();
        control.publish(model);
        let wanted: Vec<(String, Option<String>)> = gateways
            .iter()
            .zip(&reached)
            .filter(|(_, r)| **r)
            .map(|(g, _)| (g.identity.node_id.clone(), held.get(&g.identity.node_id).cloned().flatten()))
            .collect();
        let awaited = Awaited { cluster: change.watched_cluster.clone(), receivers: wanted };
        match wait_acked(&control, &[awaited], options.ack_timeout) {
            Some(at) => samples.push(at.saturating_duration_since(published).as_secs_f64() * 1e3),
            None => {
                errors.push(format!("change {i} ({}) not ACKed by every receiving gateway", change.watched_cluster));
                break;
            }
        }
        control.wait_version(version, options.ack_timeout)?;
        settle(&control, options.ack_timeout).with_context(|| format!("change {i}"))?;
    }
    let after_paced = CpuSnapshot::take(&gateways);
    let counts_after = control.tally().counts();
    let (process_ms, control_ms, gateway_ms) = after_paced.since(&before_paced);
    let n = samples.len().max(1) as f64;
    let receivers_total: usize = receivers.iter().take(samples.len()).sum();
    let gateway_total: f64 = gateway_ms.iter().sum();
    let kind_delta = |kind: Kind| counts_after.pushes[kind.index()] - counts_before.pushes[kind.index()];
    let changes = ChangeFigures {
        changes: options.changes,
        acked: samples.len(),
        gateways_per_change: receivers_total as f64 / n,
        to_last_ack_ms: Spread::of(&samples),
        samples_ms: samples.clone(),
        process_cpu_ms_per_change: process_ms / n,
        control_cpu_ms_per_change: control_ms / n,
        control_cpu_ms_per_change_per_gateway: control_ms / n / gateways.len().max(1) as f64,
        model_edit_ms: Spread::of(&edits),
        gateway_cpu_ms_per_change: gateway_total / n,
        gateway_cpu_ms_per_change_per_receiver: gateway_total / receivers_total.max(1) as f64,
        eds_pushes: kind_delta(Kind::Endpoint),
        cds_pushes: kind_delta(Kind::Cluster),
        lds_pushes: kind_delta(Kind::Listener),
    };
    progress(format_args!(
        "{} changes: to the last ACK median {:.1} ms, p99 {:.1} ms; control {:.2} ms, gateways {:.3} ms CPU per change",
        samples.len(),
        changes.to_last_ack_ms.median,
        changes.to_last_ack_ms.p99,
        changes.control_cpu_ms_per_change,
        changes.gateway_cpu_ms_per_change
    ));
    let pages_after = gateways.iter().map(GatewayProcess::metrics_page).collect::<anyhow::Result<Vec<_>>>()?;

    let sustained = sustained(options, &control, &gateways, &mut mesh, &mut errors)?;
    progress(format_args!(
        "sustained: {} changes in {} mesh versions, lag {}",
        sustained.changes,
        sustained.mesh_versions,
        sustained.lag_ms.map_or("not all ACKed".to_owned(), |l| format!("{l:.0} ms"))
    ));

    let statuses = control.gateways();
    let gateway_figures = gateways
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let status = statuses.iter().find(|s| s.node.id == g.identity.node_id);
            GatewayFigures {
                identity: g.identity.clone(),
                ready_s: ready_s[i],
                endpoints: endpoints[i],
                clusters: gauge(&pages_before[i], "crossgate_config_clusters"),
                rss_bytes: gateway_rss[i],
                rss_bytes_per_endpoint: gateway_rss[i] as f64 / endpoints[i].max(1) as f64,
                stats_page_bytes_before: pages_before[i].len(),
                stats_page_bytes_after: pages_after[i].len(),
                changes_seen: seen[i],
                paced_cpu_ms: gateway_ms[i],
                pushes: status.map_or(0, |s| s.pushes),
                acks: status.map_or(0, |s| s.acks),
                nacks: status.map_or(0, |s| s.nacks),
                last_nack: status.and_then(|s| s.last_nack.as_ref()).map(|n| format!("{}: {}", n.type_url, n.message)),
            }
        })
        .collect::<Vec<_>>();
    for g in gateway_figures.iter().filter(|g| g.nacks > 0) {
        errors.push(format!("{} NACKed {} responses", g.identity.node_id, g.nacks));
    }
    let peak = probe::status_bytes("self", "VmHWM:");
    drop(gateways);
    control.stop();

    let mut report = ScaleReport {
        settings: Settings {
            endpoints: options.endpoints,
            endpoints_per_service: options.endpoints_per_service,
            gateways: options.gateways,
            changes: options.changes,
            debounce_ms: options.debounce.as_secs_f64() * 1e3,
            sustained_rate_per_s: options.sustained_rate,
            sustained_seconds: options.sustained_seconds,
            quick: options.quick,
            proxy_bin: options.proxy_bin.display().to_string(),
        },
        machine,
        mesh: MeshFigures {
            services: mesh.services.len(),
            destination_rules: mesh.destination_rules,
            endpoints: mesh.endpoints,
            build_s,
            model_rss_bytes_per_endpoint: rss_model.saturating_sub(rss_start) as f64 / mesh.endpoints.max(1) as f64,
        },
        all_ready_s,
        gateways: gateway_figures,
        control_memory: ControlMemory {
            rss_before_bytes: rss_before,
            rss_after_bytes: rss_after,
            peak_rss_bytes: peak,
            entries,
            bytes_per_entry: rss_after.saturating_sub(rss_before) as f64 / entries.max(1) as f64,
        },
        changes,
        sustained,
        checks: Vec::new(),
        errors,
    };
    report.evaluate();
    Ok(report)
}

/// `rate` changes a second for `seconds`, each to a service of its own, then the time from the last change
/// until every receiving gateway has ACKed every change.
fn sustained(
    options: &Options,
    control: &InProcessControl,
    gateways: &[GatewayProcess],
    mesh: &mut ScaleMesh,
    errors: &mut Vec<String>,
) -> anyhow::Result<SustainedFigures> {
    let count = ((options.sustained_rate * options.sustained_seconds).round() as usize).min(mesh.services.len());
    let interval = Duration::from_secs_f64(1.0 / options.sustained_rate.max(0.001));
    // Services of their own, away from the paced ones' first picks: each watched cluster changes once.
    let services: Vec<usize> = (0..count).map(|k| (k * mesh.services.len()) / count.max(1)).collect();
    let mut pending = Vec::new();
    for (k, &service) in services.iter().enumerate() {
        let index = &mesh.services[service];
        let name = format!("outbound_.{}_._.{}", index.first_port, index.hostname);
        pending.push((k, name.clone(), acked_by_node(control, &name)));
    }
    let version_before = control.version();
    let before = CpuSnapshot::take(gateways);
    let start = Instant::now();
    let mut wanted = Vec::new();
    let mut last_change = start;
    for (k, &service) in services.iter().enumerate() {
        let due = start + interval * k as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (model, change) = mesh.change(service, k, k * 11 + 1);
        let (_, name, held) = &pending[k];
        debug_assert_eq!(name, &change.watched_cluster);
        last_change = Instant::now();
        control.publish(model);
        let receivers = gateways
            .iter()
            .filter(|g| g.identity.sees(change.network))
            .map(|g| (g.identity.node_id.clone(), held.get(&g.identity.node_id).cloned().flatten()))
            .collect();
        wanted.push(Awaited { cluster: change.watched_cluster, receivers });
    }
    let lag = wait_acked(control, &wanted, options.ack_timeout).map(|at| at.saturating_duration_since(last_change));
    if lag.is_none() {
        errors.push(format!("the sustained changes were not all ACKed within {:?}", options.ack_timeout));
    }
    settle(control, options.ack_timeout).context("after the sustained changes")?;
    let (process_ms, control_ms, gateway_ms) = CpuSnapshot::take(gateways).since(&before);
    let n = count.max(1) as f64;
    Ok(SustainedFigures {
        rate_per_s: options.sustained_rate,
        seconds: options.sustained_seconds,
        changes: count,
        mesh_versions: control.version() - version_before,
        lag_ms: lag.map(|l| l.as_secs_f64() * 1e3),
        process_cpu_ms_per_change: process_ms / n,
        control_cpu_ms_per_change: control_ms / n,
        gateway_cpu_ms_per_change: gateway_ms.iter().sum::<f64>() / n,
    })
}

/// Polls every gateway's status port until all answer 200 (or one exits, or `timeout` passes): the time each
/// first did, from `started`.
fn wait_ready(
    gateways: &mut [GatewayProcess],
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<Vec<Option<f64>>> {
    let mut ready: Vec<Option<f64>> = vec![None; gateways.len()];
    while started.elapsed() < timeout && ready.iter().any(Option::is_none) {
        for (gateway, ready) in gateways.iter_mut().zip(&mut ready).filter(|(_, r)| r.is_none()) {
            if gateway.ready()? {
                *ready = Some(started.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ready)
}

/// Node ID -> the version of `cluster`'s assignment it ACKed.
fn acked_by_node(control: &InProcessControl, cluster: &str) -> BTreeMap<String, Option<String>> {
    control
        .holding(Kind::Endpoint, cluster)
        .iter()
        .map(|status| (status.node.id.clone(), held_version(status, Kind::Endpoint, cluster)))
        .collect()
}

/// A changed cluster's assignment, and the gateways it must reach with the version each held before.
struct Awaited {
    cluster: String,
    receivers: Vec<(String, Option<String>)>,
}

/// Waits until every gateway of every [`Awaited`] ACKed another version of the cluster's assignment: the time
/// of the last ACK then (as the control counted it), or `None` after `timeout`. Woken by each ACK the control
/// counts, not by polling.
fn wait_acked(control: &InProcessControl, wanted: &[Awaited], timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&Awaited> = wanted.iter().collect();
    let mut counts = control.tally().counts();
    loop {
        pending.retain(|awaited| {
            let now = acked_by_node(control, &awaited.cluster);
            !awaited.receivers.iter().all(|(node, before)| now.get(node).is_some_and(|v| v.is_some() && v != before))
        });
        if pending.is_empty() {
            return control.tally().counts().last_ack.or(Some(Instant::now()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        // The ACK is counted just before the control records what the gateway holds: look again shortly
        // even without another ACK.
        counts = control.tally().wait_answer(&counts, left.min(Duration::from_millis(5)));
    }
}

/// Waits until no response is in flight on any stream and every stream has taken the latest mesh version.
fn settle(control: &InProcessControl, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut counts = control.tally().counts();
    loop {
        let version = control.version();
        // Any name: only the counters are read.
        let statuses = control.holding(Kind::Listener, "");
        if statuses.iter().all(|s| s.mesh_version == version && s.acks + s.nacks == s.pushes) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "the gateways' streams did not settle within {timeout:?}");
        counts = control.tally().wait_answer(&counts, left.min(Duration::from_millis(10)));
    }
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("crossgate-scale: {message}");
}
