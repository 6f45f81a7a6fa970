//! Shutdown as a type. One [`Drain`] per gateway moves through the phases in order; every part watches the
//! phase it cares about: readiness fails from `Draining`, the accept loop stops at `ListenerClosed`, open
//! tunnels are closed by force at `Terminated`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Readiness fails; the listener still accepts (Envoy's graceful listener drain).
    Draining,
    /// No new connections; open tunnels go on.
    ListenerClosed,
    /// Open tunnels are closed.
    Terminated,
}

/// The phase, shared by everything that reacts to shutdown.
#[derive(Debug, Clone)]
pub struct Drain {
    phase: watch::Sender<Phase>,
    /// Woken once at `Terminated`: what every tunnel waits on, and cheaper to hold than a watch receiver.
    terminate: Arc<Notify>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain { phase: watch::Sender::new(Phase::Running), terminate: Arc::default() }
    }
}

impl Drain {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves to `phase` unless shutdown has already gone further.
    pub fn advance(&self, phase: Phase) {
        let terminates = self.phase.send_if_modified(|current| {
            let later = phase > *current;
            if later {
                *current = phase;
            }
            later
        }) && phase == Phase::Terminated;
        if terminates {
            self.terminate.notify_waiters();
        }
    }

    /// Resolves once the phase is `Terminated`; what each tunnel holds, so it is kept small.
    pub async fn terminated(&self) {
        // Made before the phase is read: a notification between the two is not lost.
        let notified = self.terminate.notified();
        if self.phase() < Phase::Terminated {
            notified.await;
        }
    }

    /// Resolves once the phase is `phase` or later.
    pub async fn reached(&self, phase: Phase) {
        let mut receiver = self.phase.subscribe();
        // The sender lives in self, so the channel cannot close while we wait.
        let _ = receiver.wait_for(|current| *current >= phase).await;
    }
}

/// Counts open downstream connections, and wakes whoever waits for them to reach zero.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    open: AtomicUsize,
    zero: Notify,
}

/// One open connection; dropping it closes the count.
#[derive(Debug)]
pub struct OpenConnection(Arc<ConnectionCount>);

impl ConnectionCount {
    pub fn open(self: &Arc<Self>) -> (OpenConnection, usize) {
        let now_open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        (OpenConnection(Arc::clone(self)), now_open)
    }

    pub fn get(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// How shutdown is timed (see `GatewayConfig`).
#[derive(Debug, Clone, Copy)]
pub struct DrainTiming {
    pub drain_duration: Duration,
    pub termination_grace: Duration,
    pub exit_on_zero_active_connections: bool,
    pub minimum_drain_duration: Duration,
}

/// Runs shutdown from the moment SIGTERM arrives to the moment the process may exit.
///
/// Default (Istio's path): readiness fails, the listener accepts for `drain_duration`, then closes; open
/// tunnels go on until they end or `termination_grace` (from SIGTERM) passes. With
/// `exit_on_zero_active_connections`, the gateway exits as soon as no connection is open once
/// `minimum_drain_duration` has passed, even while the listener would still accept.
pub async fn shut_down(drain: &Drain, connections: &ConnectionCount, timing: DrainTiming) {
    let start = Instant::now();
    drain.advance(Phase::Draining);
    let listener_closes = start + timing.drain_duration;
    let deadline = start + timing.termination_grace;
    if timing.exit_on_zero_active_connections {
        sleep_until(start + timing.minimum_drain_duration).await;
        tokio::select! {
            _ = connections.wait_zero() => {}
            _ = sleep_until(deadline) => {}
        }
        drain.advance(Phase::Terminated);
        return;
    }
    sleep_until(listener_closes).await;
    drain.advance(Phase::ListenerClosed);
    tokio::select! {
        _ = connections.wait_zero() => {}
        _ = sleep_until(deadline) => {}
    }
    drain.advance(Phase::Terminated);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(exit_on_zero: bool) -> DrainTiming {
        DrainTiming {
            drain_duration: Duration::from_secs(5),
            termination_grace: Duration::from_secs(25),
            exit_on_zero_active_connections: exit_on_zero,
            minimum_drain_duration: Duration::from_secs(2),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn phases_follow_the_clock_and_wait_for_tunnels() {
        let drain = Drain::default();
        let connections = Arc::new(ConnectionCount::default());
        let (tunnel, _) = connections.open();
        let start = Instant::now();
        let task = {
            let (drain, connections) = (drain.clone(), Arc::clone(&connections));
            tokio::spawn(async move { shut_down(&drain, &connections, timing(false)).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(drain.phase(), Phase::Draining);
        drain.reached(Phase::ListenerClosed).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(drain.phase(), Phase::ListenerClosed, "an open tunnel holds shutdown");
        drop(tunnel);
        task.await.unwrap();
        assert_eq!(drain.phase(), Phase::Terminated);
        assert_eq!(start.elapsed(), Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn grace_deadline_ends_long_tunnels() {
        let drain = Drain::default();
        let connections = Arc::new(ConnectionCount::default());
        let (_tunnel, _) = connections.open();
        let start = Instant::now();
        shut_down(&drain, &connections, timing(false)).await;
        assert_eq!(drain.phase(), Phase::Terminated);
        assert_eq!(start.elapsed(), Duration::from_secs(25));
    }

    #[tokio::test(start_paused = true)]
    async fn exit_on_zero_waits_for_the_minimum_only() {
        let drain = Drain::default();
        let connections = Arc::new(ConnectionCount::default());
        let start = Instant::now();
        shut_down(&drain, &connections, timing(true)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(drain.phase(), Phase::Terminated);
    }

    #[tokio::test]
    async fn terminated_wakes_waiters_made_before_and_answers_at_once_after() {
        let drain = Drain::default();
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.terminated().await }
        });
        tokio::task::yield_now().await;
        drain.advance(Phase::ListenerClosed);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "woken before Terminated");
        drain.advance(Phase::Terminated);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("waiter woken").unwrap();
        tokio::time::timeout(Duration::from_secs(5), drain.terminated()).await.expect("resolves at once");
    }
}
