//! Keeps the workers' connection counts level. Each worker accepts on its own `SO_REUSEPORT` socket, and the
//! kernel picks that socket by a hash of the client's address and port, so a few long-lived connections can
//! land 12 to 4 and leave one worker queueing while the other idles. A worker that accepts a connection while
//! it holds more than the least loaded worker hands it over (Envoy's exact connection balance, without its
//! lock: the counts are read as they are, and a race costs at most a connection of imbalance).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::{Counter, Gauge};
use tokio::runtime::Handle;

/// Whether connections stay where the kernel put them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionBalance {
    /// A worker ahead of the least loaded hands its new connections over (Envoy's `exact_balance`).
    #[default]
    Exact,
    /// Each connection stays on the worker whose socket the kernel picked (Envoy's default).
    Kernel,
}

/// The workers' open connections and runtimes.
#[derive(Debug)]
pub struct Balancer {
    workers: Box<[Worker]>,
    mode: ConnectionBalance,
}

#[derive(Debug)]
struct Worker {
    load: PaddedCount,
    runtime: Handle,
    /// `load`, for the metrics (Envoy's `listener.<address>.worker_<n>.downstream_cx_active`).
    active: Gauge,
    handed_over: Counter,
}

/// One worker's count on its own cache line: every connection moves it, and the workers run on different cores.
#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedCount(AtomicUsize);

impl Balancer {
    /// One worker per runtime, in order; metric handles go to the current recorder.
    pub fn new(runtimes: impl IntoIterator<Item = Handle>, mode: ConnectionBalance) -> Arc<Self> {
        let workers = runtimes
            .into_iter()
            .enumerate()
            .map(|(index, runtime)| {
                let worker = index.to_string();
                Worker {
                    load: PaddedCount::default(),
                    runtime,
                    active: metrics::gauge!("crossgate_worker_downstream_cx_active", "worker" => worker.clone()),
                    handed_over: metrics::counter!("crossgate_worker_downstream_cx_handed_over_total", "worker" => worker),
                }
            })
            .collect();
        Arc::new(Balancer { workers, mode })
    }

    /// The worker that should serve a connection accepted by worker `here`, with the connection already counted
    /// in its load until the returned guard drops.
    pub fn place(self: &Arc<Self>, here: usize) -> Placement {
        let worker = match self.mode {
            ConnectionBalance::Kernel => here,
            ConnectionBalance::Exact => self.least_loaded_unless_level(here),
        };
        self.workers[worker].load.0.fetch_add(1, Ordering::Relaxed);
        self.workers[worker].active.increment(1.0);
        Placement { worker, load: LoadGuard { balancer: Arc::clone(self), worker } }
    }

    /// `here`, unless it holds more connections than the least loaded worker: that one then (counted as a
    /// hand-over).
    fn least_loaded_unless_level(&self, here: usize) -> usize {
        let (least, least_load) = (0..self.workers.len())
            .map(|index| (index, self.load(index)))
            .min_by_key(|&(_, load)| load)
            .expect("at least one worker");
        if self.load(here) > least_load {
            self.workers[here].handed_over.increment(1);
            least
        } else {
            here
        }
    }

    /// The runtime of worker `index`, to spawn a handed-over connection on.
    pub fn runtime(&self, index: usize) -> &Handle {
        &self.workers[index].runtime
    }

    /// Worker `index`'s open connections.
    pub fn load(&self, index: usize) -> usize {
        self.workers[index].load.0.load(Ordering::Relaxed)
    }
}

/// Where a connection goes, and its share of that worker's load.
#[derive(Debug)]
pub struct Placement {
    pub worker: usize,
    pub load: LoadGuard,
}

/// Counts one connection in its worker's load for as long as it lives.
#[derive(Debug)]
pub struct LoadGuard {
    balancer: Arc<Balancer>,
    worker: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let worker = &self.balancer.workers[self.worker];
        worker.load.0.fetch_sub(1, Ordering::Relaxed);
        worker.active.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(workers: usize, mode: ConnectionBalance) -> Arc<Balancer> {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        Balancer::new((0..workers).map(|_| runtime.handle().clone()), mode)
    }

    #[test]
    fn a_worker_keeps_what_it_accepts_unless_it_is_ahead() {
        let balancer = balancer(2, ConnectionBalance::Exact);
        let first = balancer.place(0);
        assert_eq!(first.worker, 0, "level: kept");
        let second = balancer.place(0);
        assert_eq!(second.worker, 1, "one ahead: handed over");
        assert_eq!((balancer.load(0), balancer.load(1)), (1, 1));
        drop(first);
        assert_eq!((balancer.load(0), balancer.load(1)), (0, 1));
        drop(second);
        assert_eq!((balancer.load(0), balancer.load(1)), (0, 0));
    }

    #[test]
    fn connections_hashed_to_one_worker_end_up_level() {
        let balancer = balancer(3, ConnectionBalance::Exact);
        let placed: Vec<Placement> = (0..12).map(|_| balancer.place(1)).collect();
        let loads: Vec<usize> = (0..3).map(|index| balancer.load(index)).collect();
        assert_eq!(loads, [4, 4, 4]);
        assert_eq!(placed.iter().filter(|placement| placement.worker == 1).count(), 4);
    }

    #[test]
    fn a_single_worker_takes_everything() {
        let balancer = balancer(1, ConnectionBalance::Exact);
        let placed: Vec<Placement> = (0..5).map(|_| balancer.place(0)).collect();
        assert!(placed.iter().all(|placement| placement.worker == 0));
        assert_eq!(balancer.load(0), 5);
    }

    #[test]
    fn kernel_balance_keeps_every_connection_where_it_was_accepted() {
        let balancer = balancer(2, ConnectionBalance::Kernel);
        let placed: Vec<Placement> = (0..4).map(|_| balancer.place(1)).collect();
        assert!(placed.iter().all(|placement| placement.worker == 1));
        assert_eq!((balancer.load(0), balancer.load(1)), (0, 4), "still counted");
    }
}
