//! `crossgate-scale`: discovery at mesh scale, the control service in process and `crossgate-proxy` gateways
//! as child processes. See the README's "Discovery at scale".

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use crossgate_benches::scale::report::{self, ScaleReport};
use crossgate_benches::scale::{self, Options, gateway};

#[derive(Parser)]
#[command(name = "crossgate-scale", about = "The control service and its gateways at mesh scale")]
struct Cli {
    /// Endpoints in the mesh (pod addresses of services; each serves every port of its service).
    #[arg(long)]
    endpoints: Option<usize>,
    /// Endpoints per service.
    #[arg(long)]
    endpoints_per_service: Option<usize>,
    /// crossgate-proxy gateways, as child processes.
    #[arg(long)]
    gateways: Option<usize>,
    /// One-endpoint changes, one at a time, each waited for.
    #[arg(long)]
    changes: Option<usize>,
    /// The control service's quiet period before a push (its `--debounce`).
    #[arg(long, value_parser = humantime::parse_duration)]
    debounce: Option<Duration>,
    /// Changes per second in the sustained phase.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of the sustained phase.
    #[arg(long)]
    sustained_seconds: Option<f64>,
    /// 2,000 endpoints, 2 gateways, 10 changes, 2 s sustained: checks that it all works.
    #[arg(long)]
    quick: bool,
    /// The crossgate-proxy binary (default: the one beside this program, else target/release's).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the gateways' logs go (default: a directory under the system's temp dir).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// How long the gateways may take to become ready.
    #[arg(long, value_parser = humantime::parse_duration)]
    ready_timeout: Option<Duration>,
    /// Print the trend over these reports (one per mesh size) instead of running.
    #[arg(long, num_args = 1.., conflicts_with_all = ["quick", "json"])]
    compare: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.compare.is_empty() {
        return compare(&cli.compare);
    }
    let proxy = match gateway::find_proxy(cli.proxy_bin) {
        Ok(path) => path,
        Err(error) => {
            eprintln!("crossgate-scale: {error:#}");
            return ExitCode::from(2);
        }
    };
    let log_dir =
        cli.log_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("crossgate-scale-{}", std::process::id())));
    let mut options = if cli.quick { Options::quick(proxy, log_dir) } else { Options::full(proxy, log_dir) };
    options.endpoints = cli.endpoints.unwrap_or(options.endpoints);
    options.endpoints_per_service = cli.endpoints_per_service.unwrap_or(options.endpoints_per_service);
    options.gateways = cli.gateways.unwrap_or(options.gateways);
    options.changes = cli.changes.unwrap_or(options.changes);
    options.debounce = cli.debounce.unwrap_or(options.debounce);
    options.sustained_rate = cli.rate.unwrap_or(options.sustained_rate);
    options.sustained_seconds = cli.sustained_seconds.unwrap_or(options.sustained_seconds);
    options.ready_timeout = cli.ready_timeout.unwrap_or(options.ready_timeout);

    let report = match scale::run(&options) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("crossgate-scale: {error:#} (gateway logs in {})", options.log_dir.display());
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.table());
    if let Some(path) = &cli.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|json| std::fs::write(path, json + "\n").map_err(anyhow::Error::from));
        if let Err(error) = written {
            eprintln!("crossgate-scale: cannot write {}: {error:#}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.errors.is_empty() {
        let _ = std::fs::remove_dir_all(&options.log_dir);
        ExitCode::SUCCESS
    } else {
        eprintln!("crossgate-scale: gateway logs in {}", options.log_dir.display());
        ExitCode::FAILURE
    }
}

fn compare(paths: &[PathBuf]) -> ExitCode {
    let mut reports = Vec::new();
    for path in paths {
        let read = std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|text| serde_json::from_str::<ScaleReport>(&text).map_err(anyhow::Error::from));
        match read {
            Ok(report) => reports.push(report),
            Err(error) => {
                eprintln!("crossgate-scale: {}: {error:#}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", report::trend(&reports));
    ExitCode::SUCCESS
}
