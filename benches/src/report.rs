//! The report: medians over rounds, each beside the direct path and the best peer, in three tables (rates;
//! CPU per operation; latency at a fixed offered load), with issue #14's targets checked, as Markdown, JSON
//! and one SVG bar chart per compared figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::backend::BackendKind;
use crate::sys::Machine;
use crate::targets::Kind;

/// One turn of one target: everything measured while it ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub target: Option<Kind>,
    pub workers: usize,
    pub round: usize,
    /// TIME_WAIT sockets on the machine when the turn started.
    pub time_wait_at_start: u64,
    pub conn_per_s: Option<f64>,
    pub rr_per_s: Option<f64>,
    pub rr_p50_us: Option<f64>,
    pub rr_p99_us: Option<f64>,
    pub rr_p999_us: Option<f64>,
    pub bulk_1_gbit_s: Option<f64>,
    pub bulk_8_gbit_s: Option<f64>,
    pub idle_tunnels: usize,
    pub idle_kib_per_tunnel: Option<f64>,
    /// CPU per request of the closed-loop phase, per new connection, and per GiB over one stream.
    pub cpu_us_per_req: Cost,
    pub cpu_us_per_conn: Cost,
    pub cpu_ms_per_gib: Cost,
    /// At the run's two offered loads, the lower first.
    pub open_loop: [Option<OpenLoop>; 2],
    /// What went wrong: a wrong byte, a refused connection, a wrong SNI let through. Empty when correct.
    pub failures: Vec<String>,
}

/// User plus system CPU time per operation, of the proxy (none for the direct path), and of the backend and
/// the load client for reference.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cost {
    pub proxy: Option<f64>,
    pub backend: Option<f64>,
    pub client: Option<f64>,
}

/// An open-loop phase: the load offered and answered, and the latencies counted from each scheduled send.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpenLoop {
    pub offered_per_s: f64,
    pub answered_per_s: f64,
    /// Whether the target answered the load as offered, without a backlog at the end.
    pub kept_up: bool,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// The report's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Rates,
    Cost,
    FixedLoad,
}

impl Table {
    const ALL: [Table; 3] = [Table::Rates, Table::Cost, Table::FixedLoad];

    fn heading(self) -> &'static str {
        match self {
            Table::Rates => "Rates (closed loop) and memory",
            Table::Cost => {
                "CPU per operation (user + system): the proxy's, and the backend's and the client's for reference"
            }
            Table::FixedLoad => {
                "Latency at a fixed offered load (open loop, from each scheduled send): the direct path's own, \
                 the others' added over it"
            }
        }
    }
}

/// A figure of the report.
pub struct Figure {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub table: Table,
    pub higher_is_better: bool,
    /// Compared with the direct path and the best peer, and charted; a reference figure (the backend's or the
    /// client's CPU) is not.
    pub compared: bool,
    /// Issue #14's target for crossgate: at most this times the best peer's.
    pub target: Option<f64>,
    pub value: fn(&Sample) -> Option<f64>,
}

impl Figure {
    const fn new(key: &'static str, title: &'static str, unit: &'static str, table: Table) -> Figure {
        Figure { key, title, unit, table, higher_is_better: false, compared: true, target: None, value: |_| None }
    }

    /// Shown, for every target but the direct path, as the excess over the direct path's median.
    fn over_direct(&self) -> bool {
        self.table == Table::FixedLoad
    }

    const fn higher(self) -> Figure {
        Figure { higher_is_better: true, ..self }
    }

    const fn reference(self) -> Figure {
        Figure { compared: false, ..self }
    }

    const fn target(self, at_most: f64) -> Figure {
        Figure { target: Some(at_most), ..self }
    }

    const fn of(self, value: fn(&Sample) -> Option<f64>) -> Figure {
        Figure { value, ..self }
    }
}

pub const FIGURES: [Figure; 23] = [
    Figure::new("conn_per_s", "new connections", "conn/s", Table::Rates).higher().of(|s| s.conn_per_s),
    Figure::new("rr_per_s", "request/response", "req/s", Table::Rates).higher().of(|s| s.rr_per_s),
    Figure::new("rr_p50_us", "p50", "µs", Table::Rates).of(|s| s.rr_p50_us),
    Figure::new("rr_p99_us", "p99", "µs", Table::Rates).of(|s| s.rr_p99_us),
    Figure::new("rr_p999_us", "p99.9", "µs", Table::Rates).of(|s| s.rr_p999_us),
    Figure::new("bulk_1_gbit_s", "bulk, 1 stream", "Gbit/s", Table::Rates).higher().of(|s| s.bulk_1_gbit_s),
    Figure::new("bulk_8_gbit_s", "bulk, 8 streams", "Gbit/s", Table::Rates).higher().of(|s| s.bulk_8_gbit_s),
    Figure::new("idle_kib_per_tunnel", "memory per idle tunnel", "KiB", Table::Rates).of(|s| s.idle_kib_per_tunnel),
    Figure::new("cpu_us_per_req", "CPU per request", "µs", Table::Cost).target(0.7).of(|s| s.cpu_us_per_req.proxy),
    Figure::new("cpu_us_per_conn", "CPU per new connection", "µs", Table::Cost)
        .target(0.8)
        .of(|s| s.cpu_us_per_conn.proxy),
    Figure::new("cpu_ms_per_gib", "CPU per GiB, 1 stream", "ms", Table::Cost)
        .target(0.5)
        .of(|s| s.cpu_ms_per_gib.proxy),
    Figure::new("backend_us_per_req", "backend per request", "µs", Table::Cost)
        .reference()
        .of(|s| s.cpu_us_per_req.backend),
    Figure::new("backend_us_per_conn", "backend per connection", "µs", Table::Cost)
        .reference()
        .of(|s| s.cpu_us_per_conn.backend),
    Figure::new("backend_ms_per_gib", "backend per GiB", "ms", Table::Cost)
        .reference()
        .of(|s| s.cpu_ms_per_gib.backend),
    Figure::new("client_us_per_req", "client per request", "µs", Table::Cost)
        .reference()
        .of(|s| s.cpu_us_per_req.client),
    Figure::new("client_us_per_conn", "client per connection", "µs", Table::Cost)
        .reference()
        .of(|s| s.cpu_us_per_conn.client),
    Figure::new("client_ms_per_gib", "client per GiB", "ms", Table::Cost).reference().of(|s| s.cpu_ms_per_gib.client),
    Figure::new("low_p50_us", "low load p50", "µs", Table::FixedLoad).of(|s| Some(s.open_loop[0]?.p50_us)),
    Figure::new("low_p99_us", "low load p99", "µs", Table::FixedLoad).target(1.0).of(|s| Some(s.open_loop[0]?.p99_us)),
    Figure::new("low_p999_us", "low load p99.9", "µs", Table::FixedLoad).of(|s| Some(s.open_loop[0]?.p999_us)),
    Figure::new("high_p50_us", "high load p50", "µs", Table::FixedLoad).of(|s| Some(s.open_loop[1]?.p50_us)),
    Figure::new("high_p99_us", "high load p99", "µs", Table::FixedLoad)
        .target(1.0)
        .of(|s| Some(s.open_loop[1]?.p99_us)),
    Figure::new("high_p999_us", "high load p99.9", "µs", Table::FixedLoad).of(|s| Some(s.open_loop[1]?.p999_us)),
];

/// A figure's median for one target and worker count, and its ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub median: f64,
    pub vs_direct: Option<f64>,
    pub vs_best_peer: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: Kind,
    pub workers: usize,
    pub rounds: usize,
    pub figures: BTreeMap<&'static str, Cell>,
}

/// Issue #14's target for one figure at one worker count: crossgate's median against the best peer's.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub workers: usize,
    pub figure: &'static str,
    pub crossgate: f64,
    pub best_peer: Kind,
    pub best: f64,
    /// crossgate's figure may be at most this times the best peer's.
    pub at_most: f64,
    pub met: bool,
}

/// The settings of the run, as the report states them.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub backend: BackendKind,
    pub rounds: usize,
    pub workers: Vec<usize>,
    pub phase_seconds: f64,
    pub conn_concurrency: usize,
    pub rr_connections: usize,
    pub idle_tunnels: usize,
    pub request_bytes: usize,
    pub nofile_limit: u64,
    /// The direct path's closed-loop request rate, measured at the start of the run: the open-loop loads are
    /// fractions of it.
    pub direct_rr_per_s: Option<f64>,
    pub open_loads: [f64; 2],
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub versions: BTreeMap<Kind, String>,
    pub settings: Settings,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
    pub targets: Vec<TargetCheck>,
    pub samples: Vec<Sample>,
}

impl Report {
    pub fn new(
        machine: Machine,
        versions: BTreeMap<Kind, String>,
        settings: Settings,
        notes: Vec<String>,
        samples: Vec<Sample>,
    ) -> Report {
        let rows = summarize(&samples);
        let targets = check_targets(&rows);
        Report { machine, versions, settings, notes, rows, targets, samples }
    }

    /// Every failure, named by target, worker count and round.
    pub fn failures(&self) -> Vec<String> {
        self.samples
            .iter()
            .flat_map(|s| {
                let name = s.target.map_or("?", Kind::name);
                s.failures.iter().map(move |f| format!("{name} (workers {}, round {}): {f}", s.workers, s.round + 1))
            })
            .collect()
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        for figure in FIGURES.iter().filter(|f| f.compared) {
            if let Some(svg) = self.chart(figure) {
                std::fs::write(dir.join(format!("{}.svg", figure.key)), svg)?;
            }
        }
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Machine: {}, {} cores, {:.0} GiB, Linux {}; load average at start {}.",
            m.cpu, m.cores, m.memory_gib, m.kernel, m.load_at_start
        );
        let versions: Vec<String> = self.versions.iter().map(|(kind, v)| format!("{} {v}", kind.name())).collect();
        let _ = writeln!(out, "Versions: {}.", versions.join(", "));
        let _ = writeln!(
            out,
            "Backend: {}.",
            match s.backend {
                BackendKind::Nginx => {
                    "nginx serving HTTP/1.1 over TLS (`GET /r`, a 64-byte body; bulk fetches a 16 MiB file), the \
                     client offering Istio's ALPNs and http/1.1"
                }
                BackendKind::Own => "the harness's own (rustls echo; bulk sent to a sink)",
            }
        );
        let _ = writeln!(
            out,
            "Run: {} round(s), {} s per phase, {} concurrent new-connection loops, {} kept-alive connections for \
             request/response, {} idle tunnels{}.",
            s.rounds,
            s.phase_seconds,
            s.conn_concurrency,
            s.rr_connections,
            s.idle_tunnels,
            if s.quick { " (quick mode: correctness only, figures not meaningful)" } else { "" }
        );
        if let Some(direct) = s.direct_rr_per_s {
            let _ = writeln!(
                out,
                "Fixed loads: low {:.0}% and high {:.0}% of the direct path's closed-loop rate ({} req/s at the \
                 start of the run): {} and {} req/s.",
                s.open_loads[0] * 100.0,
                s.open_loads[1] * 100.0,
                number(direct),
                number(direct * s.open_loads[0]),
                number(direct * s.open_loads[1]),
            );
        }
        let _ = writeln!(
            out,
            "\nEach cell: median over rounds (ratio to direct · ratio to the best peer). Above 1 is better for \
             rates and throughput, below 1 for latency, memory and CPU.\n"
        );
        for &workers in &s.workers {
            let _ = writeln!(out, "### {workers} worker{}\n", if workers == 1 { "" } else { "s" });
            for table in Table::ALL {
                self.table(&mut out, table, workers);
            }
            self.target_table(&mut out, workers);
        }
        let behind: Vec<String> = self
            .samples
            .iter()
            .flat_map(|s| s.open_loop.iter().flatten().filter(|o| !o.kept_up).map(move |o| (s, o)))
            .map(|(s, o)| {
                format!(
                    "{} (workers {}, round {}): {} of {} req/s",
                    s.target.map_or("?", Kind::name),
                    s.workers,
                    s.round + 1,
                    number(o.answered_per_s),
                    number(o.offered_per_s)
                )
            })
            .collect();
        if !behind.is_empty() {
            let _ = writeln!(
                out,
                "- Fell behind an offered load (its latencies include the backlog): {}.",
                behind.join("; ")
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        let failures = self.failures();
        if !failures.is_empty() {
            let _ = writeln!(out, "\n**Failures**\n");
            for failure in failures {
                let _ = writeln!(out, "- {failure}");
            }
        }
        out
    }

    fn table(&self, out: &mut String, table: Table, workers: usize) {
        let figures: Vec<&Figure> = FIGURES.iter().filter(|f| f.table == table).collect();
        let rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.workers == workers && figures.iter().any(|f| r.figures.contains_key(f.key)))
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "{}:\n", table.heading());
        let header: Vec<String> = figures.iter().map(|f| format!("{} {}", f.title, f.unit)).collect();
        let _ = writeln!(out, "| target | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(figures.len()));
        for row in rows {
            let cells: Vec<String> = figures
                .iter()
                .map(|f| match row.figures.get(f.key) {
                    None => "–".to_owned(),
                    Some(cell) if !f.compared || row.target == Kind::Direct && f.over_direct() => number(cell.median),
                    Some(cell) => {
                        format!("{} ({} · {})", number(cell.median), ratio(cell.vs_direct), ratio(cell.vs_best_peer))
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", row.target.name(), cells.join(" | "));
        }
        out.push('\n');
    }

    fn target_table(&self, out: &mut String, workers: usize) {
        let checks: Vec<&TargetCheck> = self.targets.iter().filter(|t| t.workers == workers).collect();
        if checks.is_empty() {
            return;
        }
        let _ = writeln!(out, "Issue #14's targets for crossgate:\n");
        let _ = writeln!(out, "| figure | crossgate | best peer | ratio | target | |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
        for check in checks {
            let figure = FIGURES.iter().find(|f| f.key == check.figure).expect("a figure of the report");
            let _ = writeln!(
                out,
                "| {} {} | {} | {} {} | {} | ≤ {:.1}× | {} |",
                figure.title,
                figure.unit,
                number(check.crossgate),
                check.best_peer.name(),
                number(check.best),
                ratio((check.best > 0.0).then(|| check.crossgate / check.best)),
                check.at_most,
                if check.met { "met" } else { "**missed**" }
            );
        }
        out.push('\n');
    }

    /// Bars grouped by worker count, one colour per target, the median written on each bar.
    fn chart(&self, figure: &Figure) -> Option<String> {
        const COLOURS: [&str; 6] = ["#8c8c8c", "#d9480f", "#1971c2", "#2f9e44", "#7048e8", "#e8a200"];
        let groups: Vec<(usize, Vec<(Kind, f64)>)> = self
            .settings
            .workers
            .iter()
            .map(|&w| {
                let bars = self
                    .rows
                    .iter()
                    .filter(|r| r.workers == w && !(figure.over_direct() && r.target == Kind::Direct))
                    .filter_map(|r| Some((r.target, r.figures.get(figure.key)?.median)));
                (w, bars.collect())
            })
            .collect();
        // An added latency may be below the direct path's: its bar stays at 0, its label shows the value.
        let max = groups.iter().flat_map(|(_, bars)| bars.iter().map(|(_, v)| v.abs())).fold(0.0, f64::max);
        if max <= 0.0 {
            return None;
        }
        let (width, height, top, bottom, left) = (720.0, 340.0, 50.0, 60.0, 20.0);
        let plot = height - top - bottom;
        let group_width = (width - 2.0 * left) / groups.len() as f64;
        let bar = group_width / (Kind::ALL.len() as f64 + 1.0);
        let over = if figure.over_direct() { ", added over direct" } else { "" };
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="15" font-weight="bold">{} ({}{over}, {} is better)</text>
<line x1="{left}" y1="{base}" x2="{right}" y2="{base}" stroke="black"/>
"#,
            figure.title,
            figure.unit,
            if figure.higher_is_better { "higher" } else { "lower" },
            base = top + plot,
            right = width - left,
        );
        for (g, (workers, bars)) in groups.iter().enumerate() {
            let x0 = left + g as f64 * group_width + bar / 2.0;
            for (kind, value) in bars {
                let slot = Kind::ALL.iter().position(|k| k == kind).unwrap_or(0);
                let (x, h) = (x0 + slot as f64 * bar, value.max(0.0) / max * plot);
                let y = top + plot - h;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {}</title></rect>"#,
                    bar * 0.9,
                    COLOURS[slot],
                    kind.name(),
                    number(*value)
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    x + bar * 0.45,
                    y - 4.0,
                    number(*value)
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" transform="rotate(-35 {:.1} {:.1})">{}</text>"#,
                    x + bar * 0.45,
                    top + plot + 14.0,
                    x + bar * 0.45,
                    top + plot + 14.0,
                    kind.name()
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{workers} worker{}</text>"#,
                left + (g as f64 + 0.5) * group_width,
                height - 8.0,
                if *workers == 1 { "" } else { "s" }
            );
        }
        svg.push_str("</svg>\n");
        Some(svg)
    }
}

/// Medians per target and worker count, in the order targets first ran; ratios against the direct path and
/// the best peer of the same worker count.
fn summarize(samples: &[Sample]) -> Vec<Row> {
    let mut keys: Vec<(Kind, usize)> = Vec::new();
    for sample in samples {
        if let Some(kind) = sample.target
            && !keys.contains(&(kind, sample.workers))
        {
            keys.push((kind, sample.workers));
        }
    }
    keys.sort_by_key(|&(kind, workers)| (workers, kind));
    let median_of = |kind: Kind, workers: usize, figure: &Figure| {
        median(
            samples
                .iter()
                .filter(|s| s.target == Some(kind) && s.workers == workers)
                .filter_map(figure.value)
                .collect(),
        )
    };
    keys.iter()
        .map(|&(kind, workers)| {
            let figures = FIGURES
                .iter()
                .filter_map(|figure| {
                    let direct = median_of(Kind::Direct, workers, figure);
                    let mut value = median_of(kind, workers, figure)?;
                    if figure.over_direct() && kind != Kind::Direct {
                        value -= direct?;
                    }
                    let peers = keys.iter().filter(|(k, w)| k.is_peer() && *w == workers).filter_map(|&(k, w)| {
                        Some(median_of(k, w, figure)? - direct.filter(|_| figure.over_direct()).unwrap_or(0.0))
                    });
                    let best = if figure.higher_is_better { peers.reduce(f64::max) } else { peers.reduce(f64::min) };
                    // An added latency below the direct path's has no meaningful ratio.
                    let ratio = |reference: Option<f64>| {
                        reference.filter(|r| *r > 0.0 && value >= 0.0 && figure.compared).map(|r| value / r)
                    };
                    let vs_direct = if figure.over_direct() { None } else { ratio(direct) };
                    Some((figure.key, Cell { median: value, vs_direct, vs_best_peer: ratio(best) }))
                })
                .collect();
            let rounds = samples.iter().filter(|s| s.target == Some(kind) && s.workers == workers).count();
            Row { target: kind, workers, rounds, figures }
        })
        .collect()
}

/// crossgate against the best peer on every figure with a target, at each worker count both ran.
fn check_targets(rows: &[Row]) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    for crossgate in rows.iter().filter(|r| r.target == Kind::Crossgate) {
        for figure in FIGURES.iter() {
            let (Some(at_most), Some(cell)) = (figure.target, crossgate.figures.get(figure.key)) else { continue };
            let best = rows
                .iter()
                .filter(|r| r.target.is_peer() && r.workers == crossgate.workers)
                .filter_map(|r| Some((r.target, r.figures.get(figure.key)?.median)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((best_peer, best)) = best {
                checks.push(TargetCheck {
                    workers: crossgate.workers,
                    figure: figure.key,
                    crossgate: cell.median,
                    best_peer,
                    best,
                    at_most,
                    // For an added latency the best peer's may be near 0 or below it: then at most the same.
                    met: cell.median <= if best > 0.0 { at_most * best } else { best },
                });
            }
        }
    }
    checks
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

/// Three significant figures, thousands grouped.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    let sign = if value < 0.0 && magnitude >= 0.005 { "-" } else { "" };
    let digits = if magnitude >= 1000.0 {
        let digits = format!("{magnitude:.0}");
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        grouped
    } else if magnitude >= 100.0 {
        format!("{magnitude:.0}")
    } else if magnitude >= 10.0 {
        format!("{magnitude:.1}")
    } else {
        format!("{magnitude:.2}")
    };
    format!("{sign}{digits}")
}

fn ratio(value: Option<f64>) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.2}×"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        let sample =
            |kind, conn| Sample { target: Some(kind), workers: 1, conn_per_s: Some(conn), ..Sample::default() };
        let samples = vec![
            sample(Kind::Direct, 1000.0),
            sample(Kind::Crossgate, 800.0),
            sample(Kind::Crossgate, 900.0),
            sample(Kind::Crossgate, 600.0),
            sample(Kind::Envoy, 400.0),
            sample(Kind::Haproxy, 500.0),
        ];
        let rows = summarize(&samples);
        let crossgate = rows.iter().find(|r| r.target == Kind::Crossgate).unwrap();
        let cell = &crossgate.figures["conn_per_s"];
        assert_eq!(cell.median, 800.0);
        assert_eq!(cell.vs_direct, Some(0.8));
        assert_eq!(cell.vs_best_peer, Some(1.6));
        assert!(!crossgate.figures.contains_key("rr_per_s"));
        assert_eq!(median(vec![1.0, 4.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(number(1234567.0), "1,234,567");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(-1234.5), "-1,234");
    }

    #[test]
    fn added_latency_and_targets() {
        let sample = |kind, cpu: f64, p99: f64| Sample {
            target: Some(kind),
            workers: 1,
            cpu_us_per_req: Cost { proxy: Some(cpu), ..Cost::default() },
            open_loop: [
                Some(OpenLoop {
                    offered_per_s: 1000.0,
                    answered_per_s: 1000.0,
                    kept_up: true,
                    p50_us: p99 / 2.0,
                    p99_us: p99,
                    p999_us: p99,
                }),
                None,
            ],
            ..Sample::default()
        };
        let samples = vec![
            sample(Kind::Direct, 0.0, 100.0),
            sample(Kind::Crossgate, 6.0, 130.0),
            sample(Kind::Envoy, 20.0, 200.0),
            sample(Kind::Haproxy, 10.0, 150.0),
        ];
        let rows = summarize(&samples);
        let crossgate = rows.iter().find(|r| r.target == Kind::Crossgate).unwrap();
        assert_eq!(crossgate.figures["low_p99_us"].median, 30.0, "added over direct");
        assert_eq!(crossgate.figures["low_p99_us"].vs_best_peer, Some(0.6), "against haproxy's added 50");
        let direct = rows.iter().find(|r| r.target == Kind::Direct).unwrap();
        assert_eq!(direct.figures["low_p99_us"].median, 100.0, "the direct path's own");
        let checks = check_targets(&rows);
        let cpu = checks.iter().find(|c| c.figure == "cpu_us_per_req").unwrap();
        assert_eq!((cpu.best_peer, cpu.best, cpu.met), (Kind::Haproxy, 10.0, true), "6 <= 0.7 x 10");
        let p99 = checks.iter().find(|c| c.figure == "low_p99_us").unwrap();
        assert!(p99.met);
        assert!(!checks.iter().any(|c| c.figure == "high_p99_us"), "no high load ran");
    }
}
