//! The report: medians over rounds, each beside the direct path and the best peer, as Markdown, JSON and one
//! SVG bar chart per figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

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
    pub cpu_s_per_gib: Option<f64>,
    /// What went wrong: a wrong byte, a refused connection, a wrong SNI let through. Empty when correct.
    pub failures: Vec<String>,
}

/// A figure of the report.
pub struct Figure {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub value: fn(&Sample) -> Option<f64>,
}

pub const FIGURES: [Figure; 9] = [
    Figure {
        key: "conn_per_s",
        title: "new connections",
        unit: "conn/s",
        higher_is_better: true,
        value: |s| s.conn_per_s,
    },
    Figure { key: "rr_per_s", title: "request/response", unit: "req/s", higher_is_better: true, value: |s| s.rr_per_s },
    Figure { key: "rr_p50_us", title: "RR latency p50", unit: "µs", higher_is_better: false, value: |s| s.rr_p50_us },
    Figure { key: "rr_p99_us", title: "RR latency p99", unit: "µs", higher_is_better: false, value: |s| s.rr_p99_us },
    Figure {
        key: "rr_p999_us",
        title: "RR latency p99.9",
        unit: "µs",
        higher_is_better: false,
        value: |s| s.rr_p999_us,
    },
    Figure {
        key: "bulk_1_gbit_s",
        title: "bulk, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
        value: |s| s.bulk_1_gbit_s,
    },
    Figure {
        key: "bulk_8_gbit_s",
        title: "bulk, 8 streams",
        unit: "Gbit/s",
        higher_is_better: true,
        value: |s| s.bulk_8_gbit_s,
    },
    Figure {
        key: "idle_kib_per_tunnel",
        title: "memory per idle tunnel",
        unit: "KiB",
        higher_is_better: false,
        value: |s| s.idle_kib_per_tunnel,
    },
    Figure {
        key: "cpu_s_per_gib",
        title: "CPU per GiB moved",
        unit: "CPU s/GiB",
        higher_is_better: false,
        value: |s| s.cpu_s_per_gib,
    },
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

/// The settings of the run, as the report states them.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub rounds: usize,
    pub workers: Vec<usize>,
    pub phase_seconds: f64,
    pub conn_concurrency: usize,
    pub rr_connections: usize,
    pub idle_tunnels: usize,
    pub request_bytes: usize,
    pub nofile_limit: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub versions: BTreeMap<Kind, String>,
    pub settings: Settings,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
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
        Report { machine, versions, settings, notes, rows, samples }
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
        for figure in &FIGURES {
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
            "Run: {} round(s), {} s per phase, {} concurrent new-connection loops, {} kept-alive RR connections, \
             {}-byte requests, {} idle tunnels{}.\n",
            s.rounds,
            s.phase_seconds,
            s.conn_concurrency,
            s.rr_connections,
            s.request_bytes,
            s.idle_tunnels,
            if s.quick { " (quick mode: correctness only, figures not meaningful)" } else { "" }
        );
        let _ = writeln!(
            out,
            "Each cell: median over rounds (ratio to direct · ratio to the best peer). Ratios are value / reference: above 1 is better for rates and throughput, below 1 is better for latency, memory and CPU.\n"
        );
        for &workers in &s.workers {
            let _ = writeln!(out, "#### {workers} worker{}\n", if workers == 1 { "" } else { "s" });
            let header: Vec<String> = FIGURES.iter().map(|f| format!("{} ({})", f.title, f.unit)).collect();
            let _ = writeln!(out, "| target | {} |", header.join(" | "));
            let _ = writeln!(out, "|---|{}", "---:|".repeat(FIGURES.len()));
            for row in self.rows.iter().filter(|r| r.workers == workers) {
                let cells: Vec<String> = FIGURES
                    .iter()
                    .map(|f| match row.figures.get(f.key) {
                        None => "–".to_owned(),
                        Some(cell) => format!(
                            "{} ({} · {})",
                            number(cell.median),
                            ratio(cell.vs_direct),
                            ratio(cell.vs_best_peer)
                        ),
                    })
                    .collect();
                let _ = writeln!(out, "| {} | {} |", row.target.name(), cells.join(" | "));
            }
            out.push('\n');
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
                    .filter(|r| r.workers == w)
                    .filter_map(|r| Some((r.target, r.figures.get(figure.key)?.median)));
                (w, bars.collect())
            })
            .collect();
        let max = groups.iter().flat_map(|(_, bars)| bars.iter().map(|(_, v)| *v)).fold(0.0, f64::max);
        if max <= 0.0 {
            return None;
        }
        let (width, height, top, bottom, left) = (720.0, 340.0, 50.0, 60.0, 20.0);
        let plot = height - top - bottom;
        let group_width = (width - 2.0 * left) / groups.len() as f64;
        let bar = group_width / (Kind::ALL.len() as f64 + 1.0);
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="15" font-weight="bold">{} ({}, {} is better)</text>
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
                let (x, h) = (x0 + slot as f64 * bar, value / max * plot);
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
                    let value = median_of(kind, workers, figure)?;
                    let direct = median_of(Kind::Direct, workers, figure);
                    let peers = keys
                        .iter()
                        .filter(|(k, w)| k.is_peer() && *w == workers)
                        .filter_map(|&(k, w)| median_of(k, w, figure));
                    let best = if figure.higher_is_better { peers.reduce(f64::max) } else { peers.reduce(f64::min) };
                    let ratio = |reference: Option<f64>| reference.filter(|r| *r > 0.0).map(|r| value / r);
                    Some((figure.key, Cell { median: value, vs_direct: ratio(direct), vs_best_peer: ratio(best) }))
                })
                .collect();
            let rounds = samples.iter().filter(|s| s.target == Some(kind) && s.workers == workers).count();
            Row { target: kind, workers, rounds, figures }
        })
        .collect()
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
    if value >= 1000.0 {
        let digits = format!("{:.0}", value);
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        grouped
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
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
    }
}
