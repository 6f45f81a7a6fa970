//! `crossgate-bench`: compares crossgate with the direct path and the peers. See the README's Benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use crossgate_benches::backend::BackendKind;
use crossgate_benches::harness::{self, Options, Phase};
use crossgate_benches::targets::{Kind, Launch};

#[derive(Parser)]
#[command(name = "crossgate-bench", about = "crossgate against the direct path, Envoy, HAProxy, nginx and sniproxy")]
struct Cli {
    /// Write report.md, report.json and one SVG chart per figure here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A few seconds per target: exits non-zero unless every installed target moves bytes correctly.
    #[arg(long)]
    quick: bool,
    /// The crossgate-proxy binary (default: the one beside this program, as `cargo build --release` puts it).
    #[arg(long)]
    crossgate_bin: Option<PathBuf>,
    /// Run crossgate inside the harness instead (no CPU or memory figures for it).
    #[arg(long, conflicts_with = "crossgate_bin")]
    in_process: bool,
    /// Targets to run, comma-separated (direct, crossgate, envoy, haproxy, nginx, sniproxy).
    #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
    targets: Option<Vec<Kind>>,
    /// Worker counts, comma-separated; every proxy gets the same.
    #[arg(long, value_delimiter = ',')]
    workers: Option<Vec<usize>>,
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per timed phase.
    #[arg(long)]
    seconds: Option<f64>,
    /// Idle tunnels held open for the memory figure.
    #[arg(long)]
    idle_tunnels: Option<usize>,
    /// Phases to run, comma-separated (idle, bulk, rr, open, conn); one alone is handy under a profiler.
    #[arg(long, value_delimiter = ',', value_enum)]
    phases: Option<Vec<Phase>>,
    /// The workload behind every target: nginx serving HTTP over TLS, or the harness's own echo server.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// The two open-loop loads, as fractions of the direct path's closed-loop request rate (e.g. 0.25,0.5).
    #[arg(long, value_delimiter = ',', num_args = 2)]
    open_loads: Option<Vec<f64>>,
}

fn parse_kind(name: &str) -> Result<Kind, String> {
    Kind::parse(name).ok_or_else(|| format!("unknown target {name:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let crossgate = if cli.in_process {
        Launch::InProcess
    } else {
        let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("crossgate-proxy")));
        match cli.crossgate_bin.or(beside).filter(|path| path.is_file()) {
            Some(path) => Launch::Binary(path),
            None => {
                eprintln!(
                    "crossgate-bench: no crossgate-proxy binary beside this one; build it (cargo build --release \
                     -p crossgate-proxy), pass --crossgate-bin, or --in-process"
                );
                return ExitCode::from(2);
            }
        }
    };
    let mut options = if cli.quick { Options::quick(crossgate) } else { Options::full(crossgate) };
    options.out = cli.out;
    options.targets = cli.targets.unwrap_or(options.targets);
    options.workers = cli.workers.unwrap_or(options.workers);
    options.rounds = cli.rounds.unwrap_or(options.rounds);
    options.phase = cli.seconds.map_or(options.phase, Duration::from_secs_f64);
    options.idle_tunnels = cli.idle_tunnels.unwrap_or(options.idle_tunnels);
    options.phases = cli.phases.unwrap_or(options.phases);
    options.backend = cli.backend.unwrap_or(options.backend);
    if let Some([low, high]) = cli.open_loads.as_deref() {
        options.open_loads = [*low, *high];
    }

    match harness::run(&options) {
        Err(error) => {
            eprintln!("crossgate-bench: {error:#}");
            ExitCode::FAILURE
        }
        Ok(report) => {
            println!("{}", report.markdown());
            if report.failures().is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}
