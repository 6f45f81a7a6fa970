//! The harness's quick mode, as CI runs it: every target that is installed moves bytes correctly (echoes come
//! back intact, bulk arrives whole, a wrong SNI and a hello without Istio's ALPNs never reach the backend).
//! crossgate runs in-process; the direct path and crossgate always run, peers that are missing are skipped.
//! The speed figures are the report's business, not this test's.

use crossgate_benches::harness::{self, Options};
use crossgate_benches::targets::{Kind, Launch};
use crossgate_proxy::testing::gateway::TempDir;

#[test]
fn every_installed_target_moves_bytes_correctly() {
    let out = TempDir::new("bench-quick");
    let mut options = Options::quick(Launch::InProcess);
    options.out = Some(out.path().to_owned());
    let report = harness::run(&options).expect("the harness runs");
    eprintln!("{}", report.markdown());

    assert_eq!(report.failures(), Vec::<String>::new());
    let ran: Vec<Kind> = report.rows.iter().map(|row| row.target).collect();
    for kind in Kind::ALL {
        let skipped = report.notes.iter().any(|note| note.contains("not installed") && note.starts_with(kind.name()));
        assert!(ran.contains(&kind) != skipped, "{} neither ran nor was skipped with a note", kind.name());
    }
    assert!(ran.contains(&Kind::Direct) && ran.contains(&Kind::Crossgate));
    for row in &report.rows {
        for figure in ["conn_per_s", "rr_per_s", "bulk_1_gbit_s", "bulk_8_gbit_s"] {
            assert!(row.figures.contains_key(figure), "{}: no {figure}", row.target.name());
        }
    }
    for file in ["report.md", "report.json", "conn_per_s.svg"] {
        assert!(out.path().join(file).is_file(), "{file} written");
    }
}
