//! `crossgate-scale --quick`, as CI runs it: a 2,000-endpoint mesh in the control service's pipeline, two
//! crossgate-proxy gateways as child processes, ten one-endpoint changes and two seconds of 10 changes a second.
//! Every gateway must become ready and ACK every change that reaches its view, without a NACK. The figures are
//! the report's business (the quick mode's mesh is too small for them), not this test's.

use std::path::{Path, PathBuf};
use std::process::Command;

use crossgate_benches::scale::report::ScaleReport;
use crossgate_proxy::testing::gateway::TempDir;

/// The crossgate-proxy binary beside this package's binaries (where `cargo test --workspace` and
/// `cargo build` put it), built now if it is not there yet.
fn proxy_binary() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_crossgate-scale")).parent().expect("a directory").to_owned();
    let proxy = dir.join("crossgate-proxy");
    if !proxy.is_file() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "crossgate-proxy", "--bin", "crossgate-proxy"]);
        if dir.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success() && proxy.is_file(), "cannot build {}", proxy.display());
    }
    proxy
}

#[test]
fn quick_mode_readies_every_gateway_and_every_change_is_acked() {
    let out = TempDir::new("scale-quick");
    let json = out.path().join("scale.json");
    let output = Command::new(env!("CARGO_BIN_EXE_crossgate-scale"))
        .arg("--quick")
        .arg("--proxy-bin")
        .arg(proxy_binary())
        .arg("--json")
        .arg(&json)
        .arg("--log-dir")
        .arg(out.path().join("logs"))
        .output()
        .expect("crossgate-scale runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}{stdout}");
    let logs = std::fs::read_dir(out.path().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
        .collect::<String>();
    assert!(output.status.success(), "crossgate-scale failed; gateway logs:\n{logs}");

    let report: ScaleReport =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report")).expect("the report parses");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.gateways.len(), 2);
    for gateway in &report.gateways {
        let name = &gateway.identity.node_id;
        assert!(gateway.ready_s.is_some(), "{name} never became ready");
        assert!(gateway.endpoints > 0 && gateway.clusters > 0, "{name} holds nothing");
        assert_eq!(gateway.nacks, 0, "{name}: {:?}", gateway.last_nack);
        assert!(gateway.changes_seen > 0, "{name} saw no change");
    }
    assert!(report.all_ready_s.is_some());
    let changes = &report.changes;
    assert_eq!((changes.changes, changes.acked, changes.samples_ms.len()), (10, 10, 10), "every change ACKed");
    // An endpoint change sends assignments only, one push to each gateway it reaches.
    assert_eq!((changes.cds_pushes, changes.lds_pushes), (0, 0));
    let reached: usize = report.gateways.iter().map(|g| g.changes_seen).sum();
    assert_eq!(changes.eds_pushes as usize, reached);
    assert_eq!(report.sustained.changes, 20);
    assert!(report.sustained.lag_ms.is_some(), "the sustained changes were all ACKed");
    assert_eq!(report.checks.len(), 6, "every target is reported");
    assert!(stdout.contains("| target |"), "the table is printed");
}
