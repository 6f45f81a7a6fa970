//! The control service in this process, on its real pipeline: the mesh model through `server::debounce` into
//! `ads::AdsServer`, served by tonic on 127.0.0.1, on a runtime of its own whose threads are named `control`
//! (so that its CPU time can be told from the driver's). Its metrics go to a recorder that counts pushes and
//! ACKs by type and wakes the driver at each ACK, so that the driver waits for ACKs without polling.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossgate_control::ads::{AdsGatewayStatus, AdsOptions, AdsServer, Kind};
use crossgate_control::model::MeshModel;
use crossgate_control::server::{self, MeshVersion};
use crossgate_control::views::ViewOptions;
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// The name of the control runtime's threads.
pub const THREAD_NAME: &str = "control";

/// Pushes, ACKs and NACKs the control service counted, by [`Kind::index`], and when the last ACK came.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub pushes: [u64; 3],
    pub acks: [u64; 3],
    pub nacks: [u64; 3],
    pub last_ack: Option<Instant>,
}

/// What the recorder saw, with a condition variable the driver waits on.
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<Counts>,
    answered: Condvar,
}

impl Tally {
    pub fn counts(&self) -> Counts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until an ACK or NACK newer than `seen` arrives, or `timeout` passes; the counts then.
    pub fn wait_answer(&self, seen: &Counts, timeout: Duration) -> Counts {
        let answered = |c: &Counts| c.acks.iter().chain(&c.nacks).sum::<u64>();
        let before = answered(seen);
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (counts, _) = self
            .answered
            .wait_timeout_while(counts, timeout, |c| answered(c) == before)
            .unwrap_or_else(|e| e.into_inner());
        *counts
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Push(usize),
    Ack(usize),
    Nack(usize),
}

#[derive(Debug)]
struct TallyCounter {
    tally: Arc<Tally>,
    slot: Slot,
}

impl CounterFn for TallyCounter {
    fn increment(&self, value: u64) {
        let now = Instant::now();
        let mut counts = self.tally.counts.lock().unwrap_or_else(|e| e.into_inner());
        match self.slot {
            Slot::Push(i) => counts.pushes[i] += value,
            Slot::Ack(i) => {
                counts.acks[i] += value;
                counts.last_ack = Some(now);
            }
            Slot::Nack(i) => counts.nacks[i] += value,
        }
        drop(counts);
        if !matches!(self.slot, Slot::Push(_)) {
            self.tally.answered.notify_all();
        }
    }

    fn absolute(&self, _value: u64) {}
}

/// Counts `crossgate_control_xds_pushes_total{type}` and `crossgate_control_xds_responses_total{type,result}`;
/// every other metric is dropped.
struct TallyRecorder(Arc<Tally>);

impl Recorder for TallyRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let label = |name: &str| key.labels().find(|l| l.key() == name).map(|l| l.value().to_owned());
        let Some(kind) = label("type").and_then(|t| Kind::ALL.into_iter().find(|k| k.short() == t)) else {
            return Counter::noop();
        };
        let slot = match (key.name(), label("result").as_deref()) {
            ("crossgate_control_xds_pushes_total", _) => Slot::Push(kind.index()),
            ("crossgate_control_xds_responses_total", Some("ack")) => Slot::Ack(kind.index()),
            ("crossgate_control_xds_responses_total", Some("nack")) => Slot::Nack(kind.index()),
            _ => return Counter::noop(),
        };
        Counter::from_arc(Arc::new(TallyCounter { tally: Arc::clone(&self.0), slot }))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The control service, serving.
pub struct InProcessControl {
    runtime: Runtime,
    updates: watch::Sender<MeshModel>,
    _primed: watch::Sender<bool>,
    versions: watch::Receiver<Arc<MeshVersion>>,
    ads: AdsServer,
    tally: Arc<Tally>,
    addr: SocketAddr,
}

impl InProcessControl {
    /// Serves `mesh`, primed at once (as for a mesh file), with `debounce` as `--debounce`.
    pub fn start(mesh: MeshModel, debounce: Duration) -> anyhow::Result<InProcessControl> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(THREAD_NAME)
            .enable_all()
            .build()
            .context("the control runtime")?;
        let tally = Arc::new(Tally::default());
        let recorder = TallyRecorder(Arc::clone(&tally));
        let (updates, input) = watch::channel(mesh);
        let (primed, primed_receiver) = watch::channel(false);
        let (versions, ads, listener) = runtime.block_on(async {
            // As `crossgate-control run` wires it (service.rs): the same quiet period and max delay.
            let versions = server::debounce(input, primed_receiver, debounce, debounce * 10);
            let ads = metrics::with_local_recorder(&recorder, || {
                AdsServer::new(versions.clone(), ViewOptions::default(), AdsOptions::default())
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok((versions, ads, listener))
        })?;
        let addr = listener.local_addr()?;
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(ads.clone().service());
        runtime.spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        primed.send_replace(true);
        let control = InProcessControl { runtime, updates, _primed: primed, versions, ads, tally, addr };
        control.wait_version(1, Duration::from_secs(60))?;
        Ok(control)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Publishes a new model, as a source does.
    pub fn publish(&self, mesh: MeshModel) {
        self.updates.send_replace(mesh);
    }

    /// The latest mesh version the debounce published.
    pub fn version(&self) -> u64 {
        self.versions.borrow().version
    }

    /// Waits until the debounce has published `version`.
    pub fn wait_version(&self, version: u64, timeout: Duration) -> anyhow::Result<()> {
        let mut versions = self.versions.clone();
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, versions.wait_for(|v| v.version >= version))
                .await
                .context("the debounce did not publish in time")?
                .context("the debounce stopped")?;
            anyhow::Ok(())
        })
    }

    /// Every gateway, with `acked` holding only `name` of `kind` (the control's read-only accessor).
    pub fn holding(&self, kind: Kind, name: &str) -> Vec<AdsGatewayStatus> {
        self.ads.gateways_holding(kind, name)
    }

    /// Every gateway, whole.
    pub fn gateways(&self) -> Vec<AdsGatewayStatus> {
        self.ads.gateways()
    }

    /// Stops serving: the streams end, and the gateways start reconnecting.
    pub fn stop(self) {
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// The version of `name` of `kind` a gateway ACKed, from a [`InProcessControl::holding`] entry.
pub fn held_version(status: &AdsGatewayStatus, kind: Kind, name: &str) -> Option<String> {
    status.acked.get(&kind.type_url())?.get(name).cloned()
}
