//! `crossgate-proxy simulate`: drives the gateway's own lb and outlier detector ([`crate::lb`]) through a
//! scenario in virtual time, with a fixed seed, and reports where connections went.
//!
//! A scenario is the gateway's locality and labels, a DestinationRule traffic policy in Istio's field names, the
//! endpoints, and steps that take endpoints down (their connects fail) or bring them back. Each step opens
//! `picks` connections at `rate` per second; a connection picks an endpoint, and the outcome of each connect
//! attempt is reported back to the lb as the gateway does. For each step the report gives:
//!
//! - `share`: each endpoint's share of the successful connections in the step's steady state, its last
//!   `steady_fraction` (by default the second half), by when outlier detection has normally reacted;
//! - `failed`: connections that failed before the steady state (the cost of detection), and `failed_steady`:
//!   those that still failed in it (non-zero when nothing ejects the dead endpoints).

mod render;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossgate_proto::TrafficPolicy;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crossgate_istio::locality_lb::{GatewayIdentity, NetworkFailover};

use crate::lb::{ClusterLb, Outcome, PickContext, Picked};

pub use render::{svg, table};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub gateway: GatewaySpec,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    pub endpoints: Vec<EndpointEntry>,
    /// Connections per step (a step may override it).
    #[serde(default = "defaults::picks")]
    pub picks: u64,
    /// New connections per virtual second.
    #[serde(default = "defaults::rate")]
    pub rate: f64,
    /// How long a successful connection stays open (LEAST_REQUEST compares open connections).
    #[serde(default = "defaults::connection_seconds")]
    pub connection_seconds: f64,
    /// Distinct client addresses (for consistent hashing).
    #[serde(default = "defaults::clients")]
    pub clients: u32,
    /// Connect attempts per connection: the gateway retries on another endpoint after a failed connect.
    #[serde(default = "defaults::connect_attempts")]
    pub connect_attempts: u32,
    /// The share of each step's connections counted as steady state.
    #[serde(default = "defaults::steady_fraction")]
    pub steady_fraction: f64,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Overrides the pick algorithm by its registry name (e.g. to try a new policy on an Istio config).
    #[serde(default)]
    pub policy: Option<String>,
    pub steps: Vec<Step>,
}

mod defaults {
    pub fn picks() -> u64 {
        20_000
    }
    pub fn rate() -> f64 {
        1000.0
    }
    pub fn connection_seconds() -> f64 {
        1.0
    }
    pub fn clients() -> u32 {
        1000
    }
    pub fn connect_attempts() -> u32 {
        1
    }
    pub fn steady_fraction() -> f64 {
        0.5
    }
    pub fn seed() -> u64 {
        1
    }
    pub fn weight() -> u32 {
        1
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub locality: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The Istio release whose failoverPriority network rule to follow: "1.31" (default) or "1.30".
    #[serde(default)]
    pub istio: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    pub name: String,
    #[serde(default)]
    pub locality: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    /// Endpoints whose connects fail from this step on.
    #[serde(default)]
    pub down: Vec<String>,
    /// Endpoints that accept connections again from this step on.
    #[serde(default)]
    pub up: Vec<String>,
    #[serde(default)]
    pub picks: Option<u64>,
    /// Virtual seconds without traffic before the step (ejections may end meanwhile).
    #[serde(default)]
    pub idle_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Endpoint names, in scenario order.
    pub endpoints: Vec<String>,
    pub steps: Vec<StepReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    pub name: String,
    /// Share of the steady state's successful connections, per endpoint; sums to 1 unless none succeeded.
    pub share: BTreeMap<String, f64>,
    pub connections: u64,
    /// Failed connections before the steady state.
    pub failed: u64,
    /// Failed connections in the steady state.
    pub failed_steady: u64,
    /// Successful share of the steady state's connections.
    pub success_rate: f64,
    /// Endpoints ejected at the end of the step.
    pub ejected: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("the scenario's cluster is refused: {0}")]
    Cluster(String),
    #[error("gateway.locality: {0}")]
    Locality(#[from] crossgate_istio::labels::LocalityError),
    #[error("step {step:?} names endpoint {name:?}, which the scenario does not define")]
    UnknownEndpoint { step: String, name: String },
    #[error("gateway.istio must be \"1.30\" or \"1.31\", not {0:?}")]
    IstioVersion(String),
    #[error("{0} must be positive")]
    NotPositive(&'static str),
}

/// Runs `scenario` to the end; deterministic for a given seed.
pub fn run(scenario: &Scenario) -> Result<Report, ScenarioError> {
    let mut gateway = GatewayIdentity::new(scenario.gateway.locality.parse()?, scenario.gateway.labels.clone());
    if let Some(release) = &scenario.gateway.istio {
        gateway.network_failover =
            release.parse::<NetworkFailover>().map_err(|_| ScenarioError::IstioVersion(release.clone()))?;
    }
    if scenario.rate <= 0.0 || !scenario.rate.is_finite() {
        return Err(ScenarioError::NotPositive("rate"));
    }
    if scenario.connect_attempts == 0 {
        return Err(ScenarioError::NotPositive("connect_attempts"));
    }
    // The scenario as one cluster, through the gateway's configuration path.
    let cluster = crossgate_proto::Cluster {
        name: "outbound_.15443_._.simulate.default.svc.cluster.local".to_owned(),
        traffic_policy: scenario.traffic_policy.clone(),
        endpoints: scenario
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| crossgate_proto::Endpoint {
                address: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 15443)).to_string(),
                locality: e.locality.clone(),
                weight: e.weight.max(1),
                labels: e.labels.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let lb = crate::resources::compact_lb(&cluster, &gateway, scenario.policy.as_deref(), None)
        .map_err(ScenarioError::Cluster)?;
    let names: Vec<String> = scenario.endpoints.iter().map(|e| e.name.clone()).collect();
    let mut sim = Simulation {
        scenario,
        lb: &lb,
        rng: SmallRng::seed_from_u64(scenario.seed),
        start: Instant::now(),
        clock: Duration::ZERO,
        open: VecDeque::new(),
        down: BTreeSet::new(),
    };
    sim.lb.tick(sim.start);
    let mut steps = Vec::with_capacity(scenario.steps.len());
    for step in &scenario.steps {
        for (list, down) in [(&step.down, true), (&step.up, false)] {
            for name in list {
                let index = names
                    .iter()
                    .position(|n| n == name)
                    .ok_or_else(|| ScenarioError::UnknownEndpoint { step: step.name.clone(), name: name.clone() })?;
                if down {
                    sim.down.insert(index)
                } else {
                    sim.down.remove(&index)
                };
            }
        }
        steps.push(sim.step(step, &names));
    }
    Ok(Report { endpoints: names, steps })
}

struct Simulation<'a> {
    scenario: &'a Scenario,
    lb: &'a ClusterLb,
    rng: SmallRng,
    start: Instant,
    /// Virtual time since `start`.
    clock: Duration,
    /// Open connections, by closing time (constant duration keeps this ordered).
    open: VecDeque<(Duration, Picked)>,
    down: BTreeSet<usize>,
}

impl Simulation<'_> {
    fn advance(&mut self, by: Duration) {
        self.clock += by;
        while self.open.front().is_some_and(|(end, _)| *end <= self.clock) {
            self.open.pop_front();
        }
    }

    fn step(&mut self, step: &Step, names: &[String]) -> StepReport {
        // Idle time: the gateway's once-a-second tick keeps running.
        let mut idle = Duration::from_secs_f64(step.idle_seconds.max(0.0));
        while !idle.is_zero() {
            let by = idle.min(Duration::from_secs(1));
            self.advance(by);
            idle -= by;
            self.lb.tick(self.start + self.clock);
        }
        let picks = step.picks.unwrap_or(self.scenario.picks);
        let steady_from = picks - (picks as f64 * self.scenario.steady_fraction.clamp(0.0, 1.0)) as u64;
        let gap = Duration::from_secs_f64(1.0 / self.scenario.rate);
        let hold = Duration::from_secs_f64(self.scenario.connection_seconds.max(0.0));
        let mut successes = vec![0u64; names.len()];
        let (mut failed, mut failed_steady) = (0, 0);
        let mut tried = Vec::with_capacity(self.scenario.connect_attempts as usize);
        for n in 0..picks {
            self.advance(gap);
            let now = self.start + self.clock;
            let client = self.rng.random_range(0..self.scenario.clients.max(1));
            let source = IpAddr::from((0x0a80_0000 + client).to_be_bytes());
            tried.clear();
            let mut connected = None;
            for _ in 0..self.scenario.connect_attempts {
                let Some(picked) = self.lb.pick(&PickContext { source, tried: &tried }, &mut self.rng) else { break };
                if self.down.contains(&picked.index) {
                    self.lb.report(picked.index, Outcome::ConnectFailure, now);
                    tried.push(picked.index);
                } else {
                    self.lb.report(picked.index, Outcome::ConnectSuccess, now);
                    connected = Some(picked);
                    break;
                }
            }
            let steady = n >= steady_from;
            match connected {
                Some(picked) => {
                    if steady {
                        successes[picked.index] += 1;
                    }
                    self.open.push_back((self.clock + hold, picked));
                }
                None if steady => failed_steady += 1,
                None => failed += 1,
            }
        }
        let succeeded: u64 = successes.iter().sum();
        let share = names
            .iter()
            .zip(&successes)
            .map(|(name, s)| (name.clone(), if succeeded == 0 { 0.0 } else { *s as f64 / succeeded as f64 }))
            .collect();
        let steady_connections = picks - steady_from;
        StepReport {
            name: step.name.clone(),
            share,
            connections: picks,
            failed,
            failed_steady,
            success_rate: if steady_connections == 0 { 0.0 } else { succeeded as f64 / steady_connections as f64 },
            ejected: self
                .lb
                .hosts()
                .iter()
                .zip(names)
                .filter(|(h, _)| h.state.ejected())
                .map(|(_, n)| n.clone())
                .collect(),
        }
    }
}

/// `crossgate-proxy simulate SCENARIO.yaml [--json] [--plot FILE.svg]`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The scenario (YAML): gateway, traffic_policy, endpoints, steps.
    pub scenario: PathBuf,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the steady-state shares per step as an SVG chart.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

pub fn load(path: &std::path::Path) -> anyhow::Result<Scenario> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading scenario {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("scenario {}", path.display()))
}

pub fn main_simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let report = run(&load(&args.scenario)?)?;
    // The chart first: a closed stdout (`| head`) must not lose it.
    if let Some(path) = &args.plot {
        let title = args.scenario.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        std::fs::write(path, svg(&report, &title)).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
