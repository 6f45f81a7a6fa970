//! The harness's quick mode, as CI runs it: every target that is installed moves bytes correctly (answers come
//! back intact, bulk arrives whole, a wrong SNI and a hello without Istio's ALPNs never reach the backend),
//! and the cost figures are there: CPU per operation for every proxy, the backend and the client, and the
//! open-loop phase at both loads. crossgate runs in-process (its threads' CPU is its own); the direct path
//! and crossgate always run, peers that are missing are skipped. The backend is nginx where it is installed.
//! The speed figures are the report's business, not this test's.

use crossgate_benches::backend::BackendKind;
use crossgate_benches::harness::{self, Options};
use crossgate_benches::targets::{Kind, Launch, which};
use crossgate_proxy::testing::gateway::TempDir;

#[test]
fn every_installed_target_moves_bytes_correctly_and_costs_are_measured() {
    let out = TempDir::new("bench-quick");
    let mut options = Options::quick(Launch::InProcess);
    options.out = Some(out.path().to_owned());
    if which("nginx").is_none() {
        options.backend = BackendKind::Own;
    }
    let report = harness::run(&options).expect("the harness runs");
    eprintln!("{}", report.markdown());

    assert_eq!(report.failures(), Vec::<String>::new());
    let ran: Vec<Kind> = report.rows.iter().map(|row| row.target).collect();
    for kind in Kind::ALL {
        let skipped = report.notes.iter().any(|note| note.contains("not installed") && note.starts_with(kind.name()));
        assert!(ran.contains(&kind) != skipped, "{} neither ran nor was skipped with a note", kind.name());
    }
    assert!(ran.contains(&Kind::Direct) && ran.contains(&Kind::Crossgate));
    assert!(report.settings.direct_rr_per_s.is_some_and(|rate| rate > 0.0), "the fixed loads were set");
    for row in &report.rows {
        let mut figures = vec!["conn_per_s", "rr_per_s", "bulk_1_gbit_s", "bulk_8_gbit_s"];
        figures.extend(["backend_us_per_req", "backend_us_per_conn", "backend_ms_per_gib"]);
        figures.extend(["client_us_per_req", "client_us_per_conn", "client_ms_per_gib"]);
        if row.target != Kind::Direct {
            figures.extend(["cpu_us_per_req", "cpu_us_per_conn", "cpu_ms_per_gib"]);
        }
        figures.extend(["low_p50_us", "low_p99_us", "low_p999_us", "high_p50_us", "high_p99_us", "high_p999_us"]);
        for figure in figures {
            assert!(row.figures.contains_key(figure), "{}: no {figure}", row.target.name());
        }
        for (key, cell) in row.figures.iter().filter(|(key, _)| key.contains("_per_")) {
            assert!(cell.median.is_finite() && cell.median > 0.0, "{}: {key} is {}", row.target.name(), cell.median);
        }
    }
    for sample in &report.samples {
        let name = sample.target.map_or("?", Kind::name);
        for run in &sample.open_loop {
            let run = run.unwrap_or_else(|| panic!("{name}: an open-loop phase did not run"));
            assert!(run.answered_per_s > 0.0 && run.p99_us > 0.0, "{name}: {run:?}");
        }
    }
    for file in ["report.md", "report.json", "conn_per_s.svg", "cpu_us_per_req.svg", "low_p99_us.svg"] {
        assert!(out.path().join(file).is_file(), "{file} written");
    }
}
