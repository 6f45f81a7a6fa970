//! `crossgate-proxy`: parses the command line and wires the gateway together.

use clap::Parser;
use crossgate_proxy::config::GatewayConfig;
use crossgate_proxy::gateway::Gateway;
use crossgate_sidedoor::process::{self, Signals, Stop};

#[derive(Parser)]
#[command(name = "crossgate-proxy", version, about = "An Istio east-west gateway: SNI passthrough on :15443")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    gateway: GatewayConfig,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run a failover scenario through the gateway's own load balancer and outlier detection.
    Simulate(crossgate_proxy::simulate::SimulateArgs),
}

fn main() -> std::process::ExitCode {
    let logging = process::init_logging();
    let result = run_cli();
    logging.exit("crossgate-proxy", result)
}

fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Simulate(args)) = cli.command {
        return crossgate_proxy::simulate::main_simulate(args);
    }
    // The main thread runs the configuration source and the signals; the data plane has threads of its own.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(cli.gateway))
}

async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let gateway = Gateway::bind(config).await?;
    let handle = gateway.handle();
    tokio::spawn(async move {
        match signals.stop().await {
            Stop::Drain => {
                tracing::info!("SIGTERM: draining");
                handle.shut_down().await;
            }
            Stop::Now => {
                tracing::info!("SIGINT: exiting now");
                handle.terminate();
            }
        }
    });
    gateway.run().await
}
