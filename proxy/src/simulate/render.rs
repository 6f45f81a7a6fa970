//! The report as a text table and as an SVG chart (written by hand: one stacked bar per step).

use std::fmt::Write;

use super::Report;

/// One row per step: connections, failures, steady success rate, then each endpoint's share in percent.
pub fn table(report: &Report) -> String {
    let name_width = report.steps.iter().map(|s| s.name.len()).chain([4]).max().unwrap_or(4);
    let col = |name: &str| name.len().max(6);
    let mut out = String::new();
    let _ = write!(out, "{:<name_width$}  {:>7}  {:>6}  {:>6}  {:>7}", "step", "conns", "failed", "steady", "success");
    for e in &report.endpoints {
        let _ = write!(out, "  {:>w$}", e, w = col(e));
    }
    out.push('\n');
    for step in &report.steps {
        let _ = write!(
            out,
            "{:<name_width$}  {:>7}  {:>6}  {:>6}  {:>6.1}%",
            step.name,
            step.connections,
            step.failed,
            step.failed_steady,
            step.success_rate * 100.0
        );
        for e in &report.endpoints {
            let share = step.share.get(e).copied().unwrap_or(0.0) * 100.0;
            let _ = write!(out, "  {:>w$}", format!("{share:.1}%"), w = col(e));
        }
        out.push('\n');
    }
    out.push_str("shares: of successful connections in each step's steady state; failed: before it; steady: in it\n");
    out
}

const PALETTE: [&str; 10] =
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A stacked horizontal bar per step (each endpoint's steady-state share), failures on the right, a legend below.
pub fn svg(report: &Report, title: &str) -> String {
    let (label_w, bar_w, row_h, top) = (160.0, 600.0, 28.0, 40.0);
    let legend_rows = report.endpoints.len().div_ceil(5) as f64;
    let width = label_w + bar_w + 140.0;
    let height = top + row_h * report.steps.len() as f64 + 30.0 + 20.0 * legend_rows;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    let _ = writeln!(
        out,
        r##"<text x="{}" y="34" fill="#555">steady-state share of successful connections</text>"##,
        label_w
    );
    for (row, step) in report.steps.iter().enumerate() {
        let y = top + row_h * row as f64;
        let _ = writeln!(out, r#"<text x="10" y="{}">{}</text>"#, y + 17.0, escape(&step.name));
        let mut x = label_w;
        for (i, endpoint) in report.endpoints.iter().enumerate() {
            let share = step.share.get(endpoint).copied().unwrap_or(0.0);
            if share <= 0.0 {
                continue;
            }
            let w = share * bar_w;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{}: {:.1}%</title></rect>"#,
                y + 4.0,
                row_h - 8.0,
                PALETTE[i % PALETTE.len()],
                escape(endpoint),
                share * 100.0
            );
            if w > 40.0 {
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" fill="white" text-anchor="middle">{:.0}%</text>"#,
                    x + w / 2.0,
                    y + 18.0,
                    share * 100.0
                );
            }
            x += w;
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" fill="{}">failed {} / {}</text>"#,
            label_w + bar_w + 10.0,
            y + 17.0,
            if step.failed + step.failed_steady > 0 { "#c00" } else { "#555" },
            step.failed,
            step.failed_steady
        );
    }
    let legend_y = top + row_h * report.steps.len() as f64 + 20.0;
    for (i, endpoint) in report.endpoints.iter().enumerate() {
        let (x, y) = (label_w + 130.0 * (i % 5) as f64, legend_y + 20.0 * (i / 5) as f64);
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/>"#,
            y - 10.0,
            PALETTE[i % PALETTE.len()]
        );
        let _ = writeln!(out, r#"<text x="{}" y="{y}">{}</text>"#, x + 16.0, escape(endpoint));
    }
    out.push_str("</svg>\n");
    out
}
