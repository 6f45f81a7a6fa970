//! The scale benchmark's figures: a report per run (JSON), its table with the targets beside the figures, and
//! the trend over several runs (mesh sizes).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::gateway::Identity;
use crate::sys::Machine;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub endpoints: usize,
    pub endpoints_per_service: usize,
    pub gateways: usize,
    pub changes: usize,
    pub debounce_ms: f64,
    pub sustained_rate_per_s: f64,
    pub sustained_seconds: f64,
    pub quick: bool,
    pub proxy_bin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshFigures {
    pub services: usize,
    pub destination_rules: usize,
    pub endpoints: usize,
    pub build_s: f64,
    /// The model's own resident memory (the source's, not the server's).
    pub model_rss_bytes_per_endpoint: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayFigures {
    pub identity: Identity,
    /// From start to its status port's first 200; `None` if it never answered.
    pub ready_s: Option<f64>,
    pub endpoints: u64,
    pub clusters: u64,
    pub rss_bytes: u64,
    pub rss_bytes_per_endpoint: f64,
    pub stats_page_bytes_before: usize,
    pub stats_page_bytes_after: usize,
    /// Changes of the paced series that reached its view.
    pub changes_seen: usize,
    /// CPU over the paced series.
    pub paced_cpu_ms: f64,
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlMemory {
    /// The bench process (control and model) before any gateway connected, and once every gateway held the mesh.
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Endpoint entries across the gateways' views (the sum of their `crossgate_config_endpoints`).
    pub entries: u64,
    pub bytes_per_entry: f64,
}

/// Milliseconds: the nearest-rank percentiles of a series.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Spread {
        if samples.is_empty() {
            return Spread::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Spread {
            min: sorted[0],
            median: rank(0.5),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeFigures {
    pub changes: usize,
    /// Changes whose every receiving gateway ACKed them.
    pub acked: usize,
    pub gateways_per_change: f64,
    /// From the model's publication to the last receiving gateway's ACK, per change.
    pub to_last_ack_ms: Spread,
    pub samples_ms: Vec<f64>,
    /// The bench process's CPU (the control, and the driver that edits the model and waits), per change.
    pub process_cpu_ms_per_change: f64,
    /// The control runtime's threads alone (debounce, every gateway's stream, gRPC), per change.
    pub control_cpu_ms_per_change: f64,
    /// The same per connected gateway: every gateway's stream rebuilds its view at each mesh version.
    pub control_cpu_ms_per_change_per_gateway: f64,
    /// The driver's copy-and-edit of the changed cluster's model (what a source does), per change.
    pub model_edit_ms: Spread,
    /// All gateways' CPU, per change.
    pub gateway_cpu_ms_per_change: f64,
    /// The same per gateway the change reached.
    pub gateway_cpu_ms_per_change_per_receiver: f64,
    pub eds_pushes: u64,
    pub cds_pushes: u64,
    pub lds_pushes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SustainedFigures {
    pub rate_per_s: f64,
    pub seconds: f64,
    pub changes: usize,
    /// Mesh versions the debounce published for them.
    pub mesh_versions: u64,
    /// From the last change to the last ACK that completed every receiving gateway's view of every change.
    pub lag_ms: Option<f64>,
    pub process_cpu_ms_per_change: f64,
    pub control_cpu_ms_per_change: f64,
    pub gateway_cpu_ms_per_change: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub figure: String,
    pub target: String,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleReport {
    pub settings: Settings,
    pub machine: Machine,
    pub mesh: MeshFigures,
    /// From the gateways' start to the last one's first 200.
    pub all_ready_s: Option<f64>,
    pub gateways: Vec<GatewayFigures>,
    pub control_memory: ControlMemory,
    pub changes: ChangeFigures,
    pub sustained: SustainedFigures,
    pub checks: Vec<Check>,
    pub errors: Vec<String>,
}

/// What "a few ms" of control CPU per change and gateway is held to.
pub const CONTROL_MS_PER_GATEWAY: f64 = 5.0;
pub const GATEWAY_MS_PER_CHANGE: f64 = 1.0;
pub const GATEWAY_BYTES_PER_ENTRY: f64 = 1024.0;
pub const SUSTAINED_LAG_MS: f64 = 1000.0;
pub const ACK_SLACK_MS: f64 = 50.0;

impl ScaleReport {
    /// The targets, each with its figure.
    pub fn evaluate(&mut self) {
        let ready = self.gateways.iter().filter(|g| g.ready_s.is_some()).count();
        let mut checks = vec![Check {
            what: "every gateway ready".to_owned(),
            figure: match self.all_ready_s {
                Some(s) => format!("{ready}/{} in {s:.1} s", self.gateways.len()),
                None => format!("{ready}/{}", self.gateways.len()),
            },
            target: format!("{}/{}", self.gateways.len(), self.gateways.len()),
            pass: ready == self.gateways.len() && !self.gateways.is_empty(),
        }];
        let limit = self.settings.debounce_ms + ACK_SLACK_MS;
        let p99 = self.changes.to_last_ack_ms.p99;
        checks.push(Check {
            what: "one change to every ACK, p99".to_owned(),
            figure: format!("{p99:.0} ms ({}/{} acked)", self.changes.acked, self.changes.changes),
            target: format!("<= {limit:.0} ms (debounce {:.0} + {ACK_SLACK_MS:.0})", self.settings.debounce_ms),
            pass: self.changes.acked == self.changes.changes && self.changes.changes > 0 && p99 <= limit,
        });
        let per_gateway = self.changes.control_cpu_ms_per_change_per_gateway;
        checks.push(Check {
            what: "control CPU per change, per gateway".to_owned(),
            figure: format!("{per_gateway:.2} ms"),
            target: format!("<= {CONTROL_MS_PER_GATEWAY} ms"),
            pass: per_gateway <= CONTROL_MS_PER_GATEWAY,
        });
        let gateway_cpu = self.changes.gateway_cpu_ms_per_change_per_receiver;
        checks.push(Check {
            what: "gateway CPU per change, per receiving gateway".to_owned(),
            figure: format!("{gateway_cpu:.3} ms"),
            target: format!("< {GATEWAY_MS_PER_CHANGE} ms"),
            pass: gateway_cpu < GATEWAY_MS_PER_CHANGE,
        });
        let worst = self.gateways.iter().map(|g| g.rss_bytes_per_endpoint).fold(0.0, f64::max);
        checks.push(Check {
            what: "gateway RSS per endpoint entry (worst gateway)".to_owned(),
            figure: format!("{worst:.0} B"),
            target: format!("<= {GATEWAY_BYTES_PER_ENTRY:.0} B"),
            pass: worst > 0.0 && worst <= GATEWAY_BYTES_PER_ENTRY,
        });
        let lag = self.sustained.lag_ms;
        checks.push(Check {
            what: format!("{} changes/s for {} s, lag to every ACK", self.sustained.rate_per_s, self.sustained.seconds),
            figure: lag.map_or("not all ACKed".to_owned(), |lag| format!("{lag:.0} ms")),
            target: format!("< {SUSTAINED_LAG_MS:.0} ms"),
            pass: lag.is_some_and(|lag| lag < SUSTAINED_LAG_MS),
        });
        self.checks = checks;
    }

    /// The figures and the targets, as Markdown.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "crossgate-scale: {} endpoints ({} services, {} DestinationRules, 2 clusters on 2 networks), {} gateways, \
             debounce {} ms\nmachine: {}, {} cores, {:.0} GiB, Linux {}, load {}\n",
            s.endpoints,
            self.mesh.services,
            self.mesh.destination_rules,
            s.gateways,
            s.debounce_ms,
            self.machine.cpu,
            self.machine.cores,
            self.machine.memory_gib,
            self.machine.kernel,
            self.machine.load_at_start,
        );
        let _ = writeln!(
            out,
            "| gateway | cluster | view | locality | ready s | endpoints | clusters | RSS MiB | B/entry | stats page KiB before → after | CPU ms (paced) | pushes/acks/nacks |"
        );
        let _ = writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for g in &self.gateways {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} → {:.1} | {:.1} | {}/{}/{} |",
                g.identity.node_id,
                g.identity.cluster_id,
                g.identity.view.join(","),
                g.identity.locality,
                g.ready_s.map_or("never".to_owned(), |s| format!("{s:.2}")),
                g.endpoints,
                g.clusters,
                g.rss_bytes as f64 / 1048576.0,
                g.rss_bytes_per_endpoint,
                g.stats_page_bytes_before as f64 / 1024.0,
                g.stats_page_bytes_after as f64 / 1024.0,
                g.paced_cpu_ms,
                g.pushes,
                g.acks,
                g.nacks,
            );
        }
        let c = &self.changes;
        let m = &self.control_memory;
        let _ = writeln!(out, "\n| figure | value |\n|---|---:|");
        let rows = [
            (
                "mesh model built",
                format!("{:.2} s, {:.0} B per endpoint", self.mesh.build_s, self.mesh.model_rss_bytes_per_endpoint),
            ),
            ("all gateways ready", self.all_ready_s.map_or("no".to_owned(), |s| format!("{s:.2} s"))),
            ("endpoint entries across views", m.entries.to_string()),
            (
                "control RSS per entry",
                format!(
                    "{:.0} B ({:.0} → {:.0} MiB, peak {:.0} MiB)",
                    m.bytes_per_entry,
                    m.rss_before_bytes as f64 / 1048576.0,
                    m.rss_after_bytes as f64 / 1048576.0,
                    m.peak_rss_bytes as f64 / 1048576.0
                ),
            ),
            (
                "change → last ACK (ms)",
                format!(
                    "median {:.1}, p99 {:.1}, max {:.1} ({} changes, {:.1} gateways each)",
                    c.to_last_ack_ms.median,
                    c.to_last_ack_ms.p99,
                    c.to_last_ack_ms.max,
                    c.changes,
                    c.gateways_per_change
                ),
            ),
            (
                "control CPU per change",
                format!(
                    "{:.2} ms ({:.2} ms per gateway)",
                    c.control_cpu_ms_per_change, c.control_cpu_ms_per_change_per_gateway
                ),
            ),
            (
                "bench process CPU per change",
                format!("{:.2} ms (model edit median {:.2} ms)", c.process_cpu_ms_per_change, c.model_edit_ms.median),
            ),
            (
                "gateway CPU per change",
                format!(
                    "{:.3} ms all, {:.3} ms per receiving gateway",
                    c.gateway_cpu_ms_per_change, c.gateway_cpu_ms_per_change_per_receiver
                ),
            ),
            ("pushes for the changes", format!("eds {}, cds {}, lds {}", c.eds_pushes, c.cds_pushes, c.lds_pushes)),
            (
                "sustained",
                format!(
                    "{} changes at {}/s in {} mesh versions; lag {}; control {:.2} ms, gateways {:.3} ms per change",
                    self.sustained.changes,
                    self.sustained.rate_per_s,
                    self.sustained.mesh_versions,
                    self.sustained.lag_ms.map_or("not all ACKed".to_owned(), |l| format!("{l:.0} ms")),
                    self.sustained.control_cpu_ms_per_change,
                    self.sustained.gateway_cpu_ms_per_change,
                ),
            ),
        ];
        for (what, value) in rows {
            let _ = writeln!(out, "| {what} | {value} |");
        }
        let _ = writeln!(out, "\n| target | figure | target | |\n|---|---:|---:|---|");
        for check in &self.checks {
            let verdict = if check.pass { "pass" } else { "MISS" };
            let _ = writeln!(out, "| {} | {} | {} | {verdict} |", check.what, check.figure, check.target);
        }
        for error in &self.errors {
            let _ = writeln!(out, "\nerror: {error}");
        }
        out
    }
}

/// The figures of several runs side by side, with whether control and gateway CPU per change stay flat as the
/// mesh grows (the largest mesh's figure at most twice the smallest's, and within its target).
pub fn trend(reports: &[ScaleReport]) -> String {
    let mut reports: Vec<&ScaleReport> = reports.iter().collect();
    reports.sort_by_key(|r| r.settings.endpoints);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| endpoints | gateways | entries | all ready s | change → last ACK median / p99 ms | control CPU ms per change (per gateway) | gateway CPU ms per change per receiver | gateway B/entry (worst) | control B/entry | stats page KiB (largest) | 10/s lag ms |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        let worst = r.gateways.iter().map(|g| g.rss_bytes_per_endpoint).fold(0.0, f64::max);
        let page = r.gateways.iter().map(|g| g.stats_page_bytes_after).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} / {:.0} | {:.1} ({:.2}) | {:.3} | {:.0} | {:.0} | {:.0} | {} |",
            r.settings.endpoints,
            r.settings.gateways,
            r.control_memory.entries,
            r.all_ready_s.map_or("no".to_owned(), |s| format!("{s:.1}")),
            r.changes.to_last_ack_ms.median,
            r.changes.to_last_ack_ms.p99,
            r.changes.control_cpu_ms_per_change,
            r.changes.control_cpu_ms_per_change_per_gateway,
            r.changes.gateway_cpu_ms_per_change_per_receiver,
            worst,
            r.control_memory.bytes_per_entry,
            page as f64 / 1024.0,
            r.sustained.lag_ms.map_or("–".to_owned(), |l| format!("{l:.0}")),
        );
    }
    if let (Some(small), Some(large)) = (reports.first(), reports.last())
        && reports.len() > 1
    {
        let flat = |what: &str, a: f64, b: f64, limit: f64| {
            let ratio = if a > 0.0 { b / a } else { f64::INFINITY };
            let pass = ratio <= 2.0 && b <= limit;
            format!(
                "- {what}: {a:.3} ms at {} endpoints, {b:.3} ms at {} ({ratio:.1}x): {}\n",
                small.settings.endpoints,
                large.settings.endpoints,
                if pass { "pass (flat and within target)" } else { "MISS" }
            )
        };
        out.push_str(
            "\nIndependent of mesh size (the largest mesh's figure at most 2x the smallest's, and within target):\n",
        );
        out.push_str(&flat(
            "control CPU per change per gateway",
            small.changes.control_cpu_ms_per_change_per_gateway,
            large.changes.control_cpu_ms_per_change_per_gateway,
            CONTROL_MS_PER_GATEWAY,
        ));
        out.push_str(&flat(
            "gateway CPU per change per receiving gateway",
            small.changes.gateway_cpu_ms_per_change_per_receiver,
            large.changes.gateway_cpu_ms_per_change_per_receiver,
            GATEWAY_MS_PER_CHANGE,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let spread = Spread::of(&samples);
        assert_eq!((spread.min, spread.median, spread.p99, spread.max), (1.0, 50.0, 99.0, 100.0));
        assert_eq!(Spread::of(&[3.0]).p99, 3.0);
    }
}
