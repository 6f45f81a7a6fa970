//! The two-cluster, two-network mesh of `deploy/local/two-clusters.sh`, in network namespaces: real
//! `crossgate-proxy` gateways and `crossgate-control` processes, helloworld workloads and a sidecar-like
//! client, mTLS end to end. The script owns the topology; each test brings up its own mesh with `up`, acts
//! on it with the script's sub-commands and tears it down with `down`.
//!
//! Namespaces need root and iproute2. Where they cannot be made, the tests print why and pass, except in
//! CI (`CI=true`), where they fail. They run the binaries in the target directory: `cargo test --workspace`
//! builds crossgate-proxy's and crossgate-control's along with this crate's; alone, build them first with
//! `cargo build -p crossgate-proxy -p crossgate-control --bins`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossgate_proxy::testing::metric;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/two-clusters.sh");
const TRANSFER_BYTES: u64 = 16 << 20;

/// One mesh, torn down on drop (also when the test fails, after printing the end of every log).
struct Mesh {
    state: PathBuf,
    bin: PathBuf,
}

/// The directory of the binaries, or None (having said why) where namespaces cannot be made, outside CI.
fn namespaces_and_binaries(test: &str) -> Option<PathBuf> {
    let preflight = Command::new("bash").arg(SCRIPT).arg("preflight").output().expect("bash runs");
    if !preflight.status.success() {
        let why = String::from_utf8_lossy(&preflight.stderr);
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run the namespace tests: {why}");
        eprintln!("SKIPPED {test}: {why}(run as root, with iproute2, to include it)");
        return None;
    }
    // This crate's binaries are built for its tests; the others are their neighbours.
    let bin = Path::new(env!("CARGO_BIN_EXE_crossgate-helloworld")).parent().expect("a directory").to_owned();
    for other in ["crossgate-proxy", "crossgate-control"] {
        assert!(
            bin.join(other).exists(),
            "{} is missing: run `cargo build -p crossgate-proxy -p crossgate-control --bins` first",
            bin.join(other).display()
        );
    }
    Some(bin)
}

impl Mesh {
    /// Brings a mesh up, unless namespaces cannot be made here.
    fn up(test: &str) -> Option<Mesh> {
        let bin = namespaces_and_binaries(test)?;
        let state = std::env::temp_dir().join(format!("crossgate-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mesh = Mesh { state, bin };
        mesh.ok(&["up"]);
        Some(mesh)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("bash");
        command.arg(SCRIPT).args(args).env("CG_STATE", &self.state).env("CG_BIN_DIR", &self.bin);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("bash runs")
    }

    /// Runs a sub-command that must succeed; its output.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
        stdout
    }

    /// cluster1's client: its exit status and report.
    fn client(&self, flags: &[&str]) -> (bool, String) {
        let output = self.run(&[&["client", "cluster1"], flags].concat());
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        println!("{report}{}", String::from_utf8_lossy(&output.stderr));
        (output.status.success(), report)
    }

    fn metrics(&self, cluster: &str) -> String {
        self.ok(&["metrics", cluster])
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in std::fs::read_dir(self.state.join("logs")).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {}", log.path().display());
                tail.iter().rev().for_each(|line| eprintln!("{line}"));
            }
        }
        let _ = self.run(&["down"]);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// How many calls of a client report `cluster` answered.
fn answers(report: &str, cluster: &str) -> usize {
    let needle = format!("cluster: {cluster}");
    report.lines().filter(|line| line.contains(&needle)).count()
}

/// Whether process `pid` still runs (a zombie has exited).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

#[test]
fn the_script_calls_helloworld_in_both_clusters_and_cleans_up() {
    let Some(bin) = namespaces_and_binaries("script") else { return };
    // The plain run, as a user types it, with the binaries built already.
    let output = Command::new("bash").arg(SCRIPT).env("CG_BIN_DIR", bin).output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success());
    assert_eq!(answers(&report, "cluster1"), 5, "{report}");
    assert_eq!(answers(&report, "cluster2"), 5, "{report}");
    assert!(report.contains("Hello version: v1, instance: helloworld-v1, cluster: cluster1"), "{report}");
    assert!(report.contains("Hello version: v2, instance: helloworld-v2, cluster: cluster2"), "{report}");
    // Torn down: the namespaces are gone.
    let prefix = report.split("== namespaces ").nth(1).and_then(|rest| rest.split('-').next()).unwrap();
    for network in ["net1", "net2", "inet"] {
        assert!(!Path::new(&format!("/run/netns/{prefix}-{network}")).exists(), "{prefix}-{network} is left");
    }
}

#[test]
fn a_real_envoy_can_be_cluster2s_gateway_on_the_same_control_service() {
    let Some(bin) = namespaces_and_binaries("envoy") else { return };
    if Command::new("envoy").arg("--version").output().is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "envoy is not installed (benches/install-peers.sh)");
        eprintln!("skipped: envoy is not on PATH");
        return;
    }
    let output = Command::new("bash").arg(SCRIPT).env("CG_BIN_DIR", bin).env("CG_ENVOY", "cluster2").output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success());
    // cluster1's client reaches cluster2's helloworld through the Envoy gateway, and its own through nothing.
    assert_eq!(answers(&report, "cluster1"), 5, "{report}");
    assert_eq!(answers(&report, "cluster2"), 5, "{report}");
    assert!(report.contains("gateway of cluster2: a real Envoy"), "{report}");
}

#[test]
fn with_cluster2_workloads_stopped_its_gateway_refuses_cleanly_and_cluster1_answers() {
    let Some(mesh) = Mesh::up("stopped") else { return };
    mesh.ok(&["stop-workloads", "cluster2"]);
    let (all_answered, report) = mesh.client(&["--calls", "10"]);
    assert!(!all_answered, "cluster2 cannot answer: the client says so");
    assert!(report.contains("10 of 10 calls answered, by cluster1 10"), "{report}");
    assert!(report.contains("never answered: cluster2"), "{report}");
    // Each call given to cluster2's gateway is refused during the handshake, and retried on cluster1.
    let refused = "(network2's gateway): refused: the connection was closed during the TLS handshake";
    let refusals = report.lines().filter(|line| line.contains(refused)).count();
    assert_eq!(refusals, 5, "{report}");
    let upstream_failures = metric(
        &mesh.metrics("cluster2"),
        "crossgate_downstream_cx_rejected_total",
        &[("reason", "upstream_connect_failed")],
    );
    assert_eq!(upstream_failures, 5.0, "the gateway closed them because it could not reach an endpoint");
}

#[test]
fn a_workload_added_in_cluster2_is_reachable_within_a_second() {
    let Some(mesh) = Mesh::up("added") else { return };
    mesh.ok(&["helloworld", "cluster2", "v2", "helloworld-v2b", "10.244.2.12"]);
    // The script returns right after renaming the new mesh file into place.
    let written = Instant::now();
    let reachable = loop {
        let (_, report) = mesh.client(&["--only-network", "network2", "--calls", "4", "--retries", "0"]);
        if report.contains("instance: helloworld-v2b, cluster: cluster2") {
            break written.elapsed();
        }
        assert!(written.elapsed() < Duration::from_secs(10), "helloworld-v2b never answered");
    };
    println!("helloworld-v2b answered through cluster2's gateway {reachable:?} after the mesh file changed");
    assert!(reachable < Duration::from_secs(1), "{reachable:?}");
    // cluster1's client now weighs cluster2's gateway by its two endpoints.
    let (all_answered, report) = mesh.client(&["--calls", "3"]);
    assert!(all_answered, "{report}");
    assert!(report.contains("172.31.2.1:15443 (network2's gateway), weight 2"), "{report}");
}

#[test]
fn a_gateway_restarted_with_sigterm_finishes_a_long_transfer_while_a_new_process_takes_new_connections() {
    let Some(mesh) = Mesh::up("restart") else { return };
    let path = format!("/stream?bytes={TRANSFER_BYTES}&duration_ms=6000");
    let mut transfer = mesh
        .command(&[
            "client",
            "cluster1",
            "--only-network",
            "network2",
            "--calls",
            "1",
            "--retries",
            "0",
            "--path",
            &path,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, receive) = mpsc::channel();
    let stdout = transfer.stdout.take().unwrap();
    std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).try_for_each(|l| lines.send(l)));
    let started = receive.iter().find(|line| line.contains("receiving")).expect("the transfer starts");
    println!("{started}");

    let restart = mesh.ok(&["restart-gateway", "cluster2"]);
    println!("{restart}");
    let old: u32 = restart.split("SIGTERM to pid ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    // New connections go to the new process while the old one still carries the transfer.
    let (all_answered, report) = mesh.client(&["--only-network", "network2", "--calls", "3", "--retries", "0"]);
    assert!(all_answered, "{report}");
    assert!(transfer.try_wait().unwrap().is_none(), "the transfer is still running");
    assert!(running(old), "the old gateway drains while its tunnel is open");
    let opened = metric(&mesh.metrics("cluster2"), "crossgate_downstream_cx_total", &[]);
    assert_eq!(opened, 3.0, "the new gateway took the new connections");

    assert!(transfer.wait().unwrap().success());
    let report: Vec<String> = receive.iter().collect();
    let report = report.join("\n");
    println!("{report}");
    assert!(report.contains(&format!("received {TRANSFER_BYTES} bytes")) && report.contains("intact"), "{report}");
    // Its last tunnel closed, the old gateway exits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(old) {
        assert!(Instant::now() < deadline, "the old gateway should exit once its tunnel is closed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn traffic_continues_on_the_last_configuration_when_the_control_service_is_killed() {
    let Some(mesh) = Mesh::up("control-killed") else { return };
    mesh.ok(&["stop-control"]);
    // Both gateways have noticed the stream is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ["cluster1", "cluster2"].iter().any(|c| metric(&mesh.metrics(c), "crossgate_xds_connected", &[]) != 0.0) {
        assert!(Instant::now() < deadline, "the gateways did not notice the control service is gone");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (all_answered, report) = mesh.client(&["--calls", "10"]);
    assert!(all_answered, "{report}");
    assert_eq!((answers(&report, "cluster1"), answers(&report, "cluster2")), (5, 5), "{report}");
}

#[test]
fn workloads_with_certificates_from_another_root_fail_their_handshake_though_the_gateway_routes_them() {
    let Some(mesh) = Mesh::up("roots") else { return };
    let other = mesh.state.join("other-mesh");
    let certs = |args: &[&str]| {
        let status = Command::new(mesh.bin.join("crossgate-control")).arg("certs").args(args).output().unwrap().status;
        assert!(status.success(), "certs {args:?}");
    };
    let other_dir = other.to_str().unwrap();
    certs(&["root-ca", "--out", other_dir]);
    certs(&["intermediate", "cluster1", "--out", other_dir]);
    let sleep = other.join("sleep");
    let ca_dir = other.join("cluster1");
    let uri = "spiffe://cluster.local/ns/sample/sa/sleep";
    certs(&["leaf", "--ca-dir", ca_dir.to_str().unwrap(), "--uri", uri, "--out", sleep.to_str().unwrap()]);

    let output = mesh.command(&["client", "cluster1", "--calls", "4"]).env("CG_CLIENT_CERTS", &sleep).output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}");
    assert!(!output.status.success());
    assert!(report.contains("0 of 4 calls answered"), "{report}");
    let failed = |target: &str| {
        report
            .lines()
            .filter(|l| l.contains(target) && l.contains("failed: TLS handshake: invalid peer certificate"))
            .count()
    };
    assert!(failed("10.244.1.11:5000 (cluster1)") > 0 && failed("(network2's gateway)") > 0, "{report}");
    // The gateway passed the handshake through to helloworld-v2: the refusal was the workloads' own.
    let tunnels = metric(
        &mesh.metrics("cluster2"),
        "istio_tcp_connections_opened_total",
        &[("destination_workload", "helloworld-v2"), ("response_flags", "-")],
    );
    assert!(tunnels >= 1.0, "the gateway routed the calls ({tunnels})");
}
