//! Hostile load and local faults (issue #11) on the control service, run from its binary: its ports held by
//! idle clients with descriptors running out, SIGHUP, and a closed log pipe then SIGTERM. Each test failed
//! before its fix.

use std::net::SocketAddr;
use std::time::Duration;

use crossgate_sidedoor::testing::{LimitedChild, free_address, hold_idle, http_get};

const WITHIN: Duration = Duration::from_secs(10);

/// The control service serving its embedded mesh, with `max_files` descriptors at most, once it is ready.
async fn start(max_files: u32) -> (LimitedChild, SocketAddr, SocketAddr) {
    let (grpc, admin) = (free_address(), free_address());
    let args = ["run".to_owned(), format!("--listen={grpc}"), format!("--admin-addr={admin}")];
    let child = LimitedChild::spawn(env!("CARGO_BIN_EXE_crossgate-control"), &args, max_files);
    ready_within(admin).await;
    (child, grpc, admin)
}

async fn ready_within(admin: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
        assert!(tokio::time::Instant::now() < deadline, "not ready within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Idle clients on the gRPC and admin ports take every descriptor left: both accept loops pause instead of
/// spinning, log a line now and then, and serve again once descriptors are freed. Before: tonic's loop and the
/// admin loop each spun on EMFILE, the admin one with a warning per try.
#[tokio::test]
async fn ports_out_of_descriptors_pause_and_recover() {
    let (child, grpc, admin) = start(64).await;
    let (cpu, lines) = (child.cpu_time(), child.log_lines());
    let start = tokio::time::Instant::now();
    let mut held = hold_idle(grpc, 100).await;
    held.extend(hold_idle(admin, 100).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = (child.cpu_time() - cpu).as_secs_f64() / start.elapsed().as_secs_f64();
    let logged = child.log_lines() - lines;
    assert!(used < 0.5, "the control service used {used:.2} of a core");
    assert!(logged < 20, "{logged} log lines:\n{}", child.log());
    drop(held);
    ready_within(admin).await;
}

/// SIGHUP is ignored; once the log's reader has gone, SIGTERM still stops the service. Before: SIGHUP killed it.
#[tokio::test]
async fn sighup_is_ignored_and_sigterm_works_with_a_closed_log_pipe() {
    let (mut child, _, admin) = start(1024).await;
    child.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.running(), "SIGHUP killed the control service");
    assert!(child.log().contains("SIGHUP ignored"), "{}", child.log());
    child.close_output().await;
    child.signal("HUP");
    ready_within(admin).await;
    child.signal("TERM");
    let status = child.exited_within(WITHIN).await.expect("the control service stops on SIGTERM");
    assert!(status.success(), "{status}");
}
