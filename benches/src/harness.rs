//! The comparison run: first the direct path's closed-loop request rate, which sets the fixed offered loads;
//! then for each round, each worker count and each target (rotated every round, so that drift on the machine
//! spreads over all of them), a turn: a fresh backend, the target started, its routing checked, then idle
//! tunnels, bulk, request/response in closed and open loop, and new connections, and the target stopped. The
//! CPU time of the proxy, the backend and the client is read before and after every timed phase.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::ClientConfig;
use tokio::runtime::Runtime;

use crate::backend::{self, Backend, BackendKind, OWN_BACKEND_THREADS};
use crate::client::{Load, REQUEST_BYTES, Tally, Tls};
use crate::report::{Cost, OpenLoop, Report, Sample, Settings};
use crate::sys::{self, Account, Machine};
use crate::targets::{FD_RESERVE, IN_PROCESS_THREADS, Kind, Launch, SNI, Target, WRONG_SNI};

#[derive(Debug, Clone)]
pub struct Options {
    /// A few seconds per target, one round, small counts: checks that every target moves bytes correctly.
    pub quick: bool,
    pub rounds: usize,
    pub workers: Vec<usize>,
    pub targets: Vec<Kind>,
    pub crossgate: Launch,
    pub backend: BackendKind,
    pub phase: Duration,
    pub conn_concurrency: usize,
    pub rr_connections: usize,
    pub idle_tunnels: usize,
    /// The phases to run, in their fixed order (idle tunnels, bulk, request/response in closed loop, then in
    /// open loop, new connections).
    pub phases: Vec<Phase>,
    /// The open-loop loads, low and high, as fractions of the direct path's closed-loop request rate.
    pub open_loads: [f64; 2],
    /// Before a turn, wait up to this long for TIME_WAIT sockets left by earlier turns to drain.
    pub time_wait_grace: Duration,
    pub out: Option<PathBuf>,
}

impl Options {
    pub fn full(crossgate: Launch) -> Options {
        Options {
            quick: false,
            rounds: 3,
            workers: vec![1, 2],
            targets: Kind::ALL.to_vec(),
            crossgate,
            backend: BackendKind::Nginx,
            phase: Duration::from_secs(5),
            conn_concurrency: 16,
            rr_connections: 16,
            idle_tunnels: 10_000,
            phases: Phase::ALL.to_vec(),
            open_loads: [0.25, 0.5],
            time_wait_grace: Duration::from_secs(10),
            out: None,
        }
    }

    pub fn quick(crossgate: Launch) -> Options {
        Options {
            quick: true,
            rounds: 1,
            workers: vec![1],
            phase: Duration::from_millis(400),
            conn_concurrency: 4,
            rr_connections: 4,
            idle_tunnels: 100,
            time_wait_grace: Duration::ZERO,
            ..Options::full(crossgate)
        }
    }
}

/// A measured phase of a turn; running one alone helps profiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Idle,
    Bulk,
    Rr,
    /// Request/response at the two fixed offered loads.
    Open,
    Conn,
}

impl Phase {
    pub const ALL: [Phase; 5] = [Phase::Idle, Phase::Bulk, Phase::Rr, Phase::Open, Phase::Conn];
}

/// The load client's CPU: the harness, less the threads of its own backend and of an in-process crossgate.
const CLIENT: Account = Account::ThisProcessExcept(&[OWN_BACKEND_THREADS, IN_PROCESS_THREADS]);

/// The open-file limit asked for at least, where the hard limit may be raised (root with CAP_SYS_RESOURCE).
const PEER_NOFILE: u64 = 262_144;

/// TIME_WAIT sockets below this count are no longer waited for.
const TIME_WAIT_QUIET: u64 = 1000;

/// Runs the comparison and writes the report to `options.out` if set.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    // Children inherit the limit: a proxy needs two descriptors per tunnel, and the peers' connection limits
    // are sized to it.
    let nofile = sys::raise_nofile((2 * options.idle_tunnels as u64 + FD_RESERVE).max(PEER_NOFILE));
    let mut notes = Vec::new();
    // The harness holds a client and a backend descriptor per tunnel, and an in-process crossgate two more.
    let per_tunnel = if matches!(options.crossgate, Launch::InProcess) { 4 } else { 2 };
    let room = usize::try_from(nofile.saturating_sub(FD_RESERVE) / per_tunnel).unwrap_or(usize::MAX);
    let idle_tunnels = options.idle_tunnels.min(room);
    if idle_tunnels < options.idle_tunnels {
        notes.push(format!(
            "open-file limit {nofile} (the hard limit could not be raised): {idle_tunnels} idle tunnels instead of {}",
            options.idle_tunnels
        ));
    }
    if matches!(options.crossgate, Launch::InProcess) && options.targets.contains(&Kind::Crossgate) {
        notes.push("crossgate ran in-process: no CPU or memory figures for it".to_owned());
    }
    if options.targets.contains(&Kind::Sniproxy) && options.workers.iter().any(|&w| w > 1) {
        notes.push("sniproxy is single-threaded: it runs with 1 worker only".to_owned());
    }
    let targets = Target::discover(&options.targets, options.crossgate.clone(), &mut notes);
    let versions: BTreeMap<Kind, String> =
        targets.iter().filter(|t| !t.version.is_empty()).map(|t| (t.kind, t.version.clone())).collect();
    let machine = Machine::describe();

    let backend = backend::Setup::new(options.backend)?;
    let alpn = options.backend.client_alpn();
    let bench = Bench {
        options,
        idle_tunnels,
        nofile,
        client_config: backend.pki.client_config(&alpn)?,
        without_istio_alpn: backend.pki.client_config(&[b"h2"])?,
        backend,
        // Backend and client each get their own runtime as wide as the machine, so that neither queues
        // behind the other's tasks; the proxy under test competes with both for the cores, as it would with
        // the sidecars on a node.
        backend_runtime: runtime(OWN_BACKEND_THREADS[0])?,
        client_runtime: runtime("bench-client")?,
    };

    let direct_rr_per_s = if options.phases.contains(&Phase::Open) {
        let direct = targets.iter().find(|t| t.kind == Kind::Direct).context("the fixed loads need the direct path")?;
        let mut progress = Progress::new(1);
        progress.turn("direct: the closed-loop rate that sets the fixed loads");
        let mut sample = Sample::default();
        bench.measure(direct, 1, &mut sample, &[Phase::Rr], None, &mut progress)?;
        anyhow::ensure!(sample.failures.is_empty(), "the direct path failed: {}", sample.failures.join("; "));
        Some(sample.rr_per_s.context("no closed-loop rate for the direct path")?)
    } else {
        None
    };

    let mut turns: Vec<(usize, usize, &Target)> = Vec::new();
    for round in 0..options.rounds {
        for &workers in &options.workers {
            let rotation = round % targets.len().max(1);
            let order = targets[rotation..].iter().chain(&targets[..rotation]);
            turns.extend(order.filter(|t| t.kind.runs_with(workers)).map(|t| (round, workers, t)));
        }
    }
    let mut progress = Progress::new(turns.len());
    let samples: Vec<Sample> = turns
        .into_iter()
        .map(|(round, workers, target)| {
            progress.turn(&format!("{} w={workers} round {}/{}", target.kind.name(), round + 1, options.rounds));
            bench.turn(target, workers, round, direct_rr_per_s, &mut progress)
        })
        .collect();
    progress.finish();

    notes.push(
        "TIME_WAIT: the client closes with SO_LINGER 0 (a RST, no TIME_WAIT on its side) from 16 loopback source \
         addresses; each turn gets a fresh backend port and proxy port, so sockets a proxy left in TIME_WAIT \
         never share a 4-tuple with a later turn; a turn starts once fewer than 1,000 remain or the grace has \
         passed (the count at each start is in report.json)"
            .to_owned(),
    );
    let settings = Settings {
        quick: options.quick,
        backend: options.backend,
        rounds: options.rounds,
        workers: options.workers.clone(),
        phase_seconds: options.phase.as_secs_f64(),
        conn_concurrency: options.conn_concurrency,
        rr_connections: options.rr_connections,
        idle_tunnels,
        request_bytes: REQUEST_BYTES,
        nofile_limit: nofile,
        direct_rr_per_s,
        open_loads: options.open_loads,
    };
    let report = Report::new(machine, versions, settings, notes, samples);
    if let Some(out) = &options.out {
        report.write(out)?;
    }
    Ok(report)
}

fn runtime(name: &str) -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread().thread_name(name).enable_all().build()
}

struct Bench<'a> {
    options: &'a Options,
    idle_tunnels: usize,
    nofile: u64,
    backend: backend::Setup,
    client_config: Arc<ClientConfig>,
    /// A sidecar's client that offers none of Istio's ALPNs: the targets that match them must refuse it.
    without_istio_alpn: Arc<ClientConfig>,
    backend_runtime: Runtime,
    client_runtime: Runtime,
}

impl Bench<'_> {
    fn turn(
        &self,
        target: &Target,
        workers: usize,
        round: usize,
        direct_rr_per_s: Option<f64>,
        progress: &mut Progress,
    ) -> Sample {
        let mut sample = Sample { target: Some(target.kind), workers, round, ..Sample::default() };
        let grace = Instant::now() + self.options.time_wait_grace;
        while sys::time_wait() > TIME_WAIT_QUIET && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(200));
        }
        sample.time_wait_at_start = sys::time_wait();
        if let Err(error) = self.measure(target, workers, &mut sample, &self.options.phases, direct_rr_per_s, progress)
        {
            sample.failures.push(format!("{error:#}"));
        }
        sample
    }

    fn measure(
        &self,
        target: &Target,
        workers: usize,
        sample: &mut Sample,
        phases: &[Phase],
        direct_rr_per_s: Option<f64>,
        progress: &mut Progress,
    ) -> anyhow::Result<()> {
        let mut backend = self.backend.start(&self.backend_runtime, self.nofile)?;
        let mut running = target.start(workers, backend.address, self.nofile)?;
        let load = Load::new(Arc::clone(&self.client_config), self.backend.kind, running.address, SNI);
        let client = &self.client_runtime;

        progress.phase("ready");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !client.block_on(load.answers(Duration::from_secs(1))) {
            if let Some(exit) = running.exit_report() {
                anyhow::bail!("never answered: {exit}");
            }
            if let Some(exit) = backend.exit_report() {
                anyhow::bail!("the backend, nginx, {exit}");
            }
            anyhow::ensure!(Instant::now() < deadline, "never answered within 20s");
            std::thread::sleep(Duration::from_millis(50));
        }
        if target.kind != Kind::Direct {
            progress.phase("routing");
            sample.failures.extend(self.check_routing(target.kind, &backend, running.address)?);
        }

        let meter = Meter { proxy: running.account(), backend: backend.account() };
        let runs = |phase: Phase| phases.contains(&phase);
        if let Some(pid) = running.pid().filter(|_| runs(Phase::Idle)) {
            progress.phase("idle tunnels");
            let rss_before = sys::rss_kib(pid);
            let (tally, held) = client.block_on(load.hold(self.idle_tunnels, 32));
            std::thread::sleep(if self.options.quick { Duration::from_millis(100) } else { Duration::from_secs(1) });
            let rss_after = sys::rss_kib(pid);
            sample.idle_tunnels = held.len();
            if !held.is_empty() {
                sample.idle_kib_per_tunnel = Some(rss_after.saturating_sub(rss_before) as f64 / held.len() as f64);
            }
            sample.failures.extend(failure("idle tunnels", &tally));
            drop(held);
        }

        if runs(Phase::Bulk) {
            progress.phase("bulk");
            for streams in [1, 8] {
                let before = meter.read();
                let (tally, bytes, elapsed) = client.block_on(load.bulk(streams, self.options.phase));
                sample.failures.extend(failure(&format!("bulk over {streams}"), &tally));
                let gbit_s = (bytes > 0).then(|| bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9);
                if streams == 1 {
                    sample.bulk_1_gbit_s = gbit_s;
                    sample.cpu_ms_per_gib = meter.per(before, bytes as f64 / f64::from(1u32 << 30), 1e-3);
                } else {
                    sample.bulk_8_gbit_s = gbit_s;
                }
            }
        }

        if runs(Phase::Rr) {
            progress.phase("request/response");
            let connections = self.connections(&load, self.options.rr_connections, &mut sample.failures)?;
            let before = meter.read();
            let (tally, latencies, elapsed) = client.block_on(load.request_response(connections, self.options.phase));
            sample.failures.extend(failure("request/response", &tally));
            if !latencies.is_empty() {
                sample.rr_per_s = Some(latencies.len() as f64 / elapsed.as_secs_f64());
                sample.cpu_us_per_req = meter.per(before, latencies.len() as f64, 1e-6);
                [sample.rr_p50_us, sample.rr_p99_us, sample.rr_p999_us] = quantiles(&latencies).map(Some);
            }
        }
        if let Some(direct) = direct_rr_per_s.filter(|_| runs(Phase::Open)) {
            for (slot, fraction) in sample.open_loop.iter_mut().zip(self.options.open_loads) {
                progress.phase(&format!("open loop at {:.0}%", fraction * 100.0));
                // Four times the closed loop's connections, so that requests queue on a connection only
                // when the target falls behind, not at the fixed load's mean.
                let connections = self.connections(&load, 4 * self.options.rr_connections, &mut sample.failures)?;
                let (tally, latencies, run) =
                    client.block_on(load.open_loop(connections, direct * fraction, self.options.phase));
                sample.failures.extend(failure("open loop", &tally));
                let [p50_us, p99_us, p999_us] = quantiles(&latencies);
                *slot = (!latencies.is_empty()).then(|| OpenLoop {
                    offered_per_s: run.offered_per_s,
                    answered_per_s: run.answered_per_s,
                    kept_up: run.kept_up(self.options.phase),
                    p50_us,
                    p99_us,
                    p999_us,
                });
            }
        }
        if runs(Phase::Conn) {
            // Last: it is the phase that leaves TIME_WAIT sockets behind (on the proxy's upstream side).
            progress.phase("new connections");
            let before = meter.read();
            let (tally, elapsed) = client.block_on(load.connections(self.options.conn_concurrency, self.options.phase));
            sample.failures.extend(failure("new connections", &tally));
            sample.conn_per_s = (tally.ok > 0).then(|| tally.ok as f64 / elapsed.as_secs_f64());
            sample.cpu_us_per_conn = meter.per(before, tally.ok as f64, 1e-6);
        }
        progress.phase("stop");
        Ok(())
    }

    /// The kept-alive connections of a request/response phase, all of them or an error.
    fn connections(&self, load: &Load, count: usize, failures: &mut Vec<String>) -> anyhow::Result<Vec<Tls>> {
        let (tally, connections) = self.client_runtime.block_on(load.hold(count, count));
        failures.extend(failure("opening kept-alive connections", &tally));
        anyhow::ensure!(connections.len() == count, "{} of {count} connections opened", connections.len());
        Ok(connections)
    }

    /// A wrong SNI, and (where the target matches ALPN, as Istio's filter chains do) a hello without Istio's
    /// ALPNs, must be closed without reaching the backend.
    fn check_routing(
        &self,
        kind: Kind,
        backend: &Backend,
        address: std::net::SocketAddr,
    ) -> anyhow::Result<Option<String>> {
        let load = Load::new(Arc::clone(&self.client_config), self.backend.kind, address, WRONG_SNI);
        let h2_only = Load::new(Arc::clone(&self.without_istio_alpn), self.backend.kind, address, SNI);
        let before = backend.accepted()?;
        let within = Duration::from_secs(3);
        let wrong_sni_through = self.client_runtime.block_on(load.answers(within));
        let wrong_alpn_through = kind.checks_alpn() && self.client_runtime.block_on(h2_only.answers(within));
        // A proxy may connect upstream after the client has given up: give it a moment to do so.
        std::thread::sleep(Duration::from_millis(100));
        let reached = backend.accepted()? - before;
        Ok((wrong_sni_through || wrong_alpn_through || reached > 0).then(|| {
            format!(
                "routing: a wrong SNI {}, a hello without Istio's ALPNs {}, {reached} reached the backend",
                if wrong_sni_through { "got through" } else { "was refused" },
                if wrong_alpn_through { "got through" } else { "was refused or not checked" },
            )
        }))
    }
}

/// p50, p99 and p99.9 in microseconds.
fn quantiles(latencies: &hdrhistogram::Histogram<u64>) -> [f64; 3] {
    [0.5, 0.99, 0.999].map(|q| latencies.value_at_quantile(q) as f64 / 1000.0)
}

/// A phase's failures, if any, as one line.
fn failure(what: &str, tally: &Tally) -> Option<String> {
    (tally.failed > 0).then(|| {
        format!(
            "{what}: {} of {} failed, first: {}",
            tally.failed,
            tally.failed + tally.ok,
            tally.first_error.as_deref().unwrap_or("?")
        )
    })
}

/// Reads the CPU time of a turn's proxy, backend and client.
struct Meter {
    proxy: Option<Account>,
    backend: Account,
}

#[derive(Clone, Copy)]
struct CpuSeconds {
    proxy: Option<f64>,
    backend: f64,
    client: f64,
}

impl Meter {
    fn read(&self) -> CpuSeconds {
        CpuSeconds {
            proxy: self.proxy.map(Account::cpu_seconds),
            backend: self.backend.cpu_seconds(),
            client: CLIENT.cpu_seconds(),
        }
    }

    /// CPU time since `before` per operation of `operations`, in units of `unit` seconds.
    fn per(&self, before: CpuSeconds, operations: f64, unit: f64) -> Cost {
        let now = self.read();
        let per = |spent: f64| (operations > 0.0).then(|| spent / operations / unit);
        Cost {
            proxy: now.proxy.zip(before.proxy).and_then(|(now, before)| per(now - before)),
            backend: per(now.backend - before.backend),
            client: per(now.client - before.client),
        }
    }
}

/// A one-line progress bar on stderr (a line per turn when stderr is not a terminal).
struct Progress {
    total: usize,
    done: usize,
    turn: String,
    started: Instant,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            turn: String::new(),
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn turn(&mut self, label: &str) {
        if !self.turn.is_empty() {
            self.done += 1;
        }
        self.turn = label.to_owned();
        if !self.terminal {
            eprintln!("[{}/{}] {label} (at {:.0}s)", self.done + 1, self.total, self.started.elapsed().as_secs_f64());
        }
    }

    fn phase(&mut self, phase: &str) {
        if !self.terminal {
            eprintln!("    {phase} (at {:.1}s)", self.started.elapsed().as_secs_f64());
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * self.done / self.total.max(1);
        let eta = match self.done {
            0 => String::new(),
            done => format!(
                ", ~{}s left",
                (self.started.elapsed().as_secs_f64() / done as f64 * (self.total - done) as f64).round()
            ),
        };
        eprint!(
            "\r\x1b[2K[{}{}] {}/{} {}: {phase}{eta}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.done + 1,
            self.total,
            self.turn
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!("\r\x1b[2K{} turns in {:.0}s", self.total, self.started.elapsed().as_secs_f64());
        }
    }
}
