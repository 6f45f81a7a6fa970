//! One cluster's state: objects, the global resourceVersion, the event log with its compaction floor, continue-token
//! snapshots and the open watches. Synchronous: the HTTP layer locks it, does one request's work, and unlocks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::mpsc;

use super::api::{ApiError, RESOURCES, ResourceType, by_kind};
use super::selectors::Filter;
use super::{Fault, RecordedRequest};

/// Like etcd, only this many events are kept; older RVs fall below the floor and get a 410.
const EVENT_LOG_CAPACITY: usize = 10_000;
/// Continue tokens pin a snapshot each; the oldest expire first, as if compacted.
const MAX_SNAPSHOTS: usize = 64;

/// One resource type's objects by (namespace or "", name). Behind an `Arc` so a list snapshot costs a clone of the
/// pointer; a later write copies the map (`Arc::make_mut`) and leaves the snapshot intact.
type Objects = Arc<BTreeMap<(String, String), Arc<Value>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
pub(super) struct Event {
    pub rv: u64,
    pub event_type: EventType,
    /// The new state; for `Deleted`, the last state stamped with the deletion RV.
    pub object: Arc<Value>,
    /// The state before a `Modified` write: selector transitions need both sides.
    pub previous: Option<Arc<Value>>,
}

pub(super) enum WatchMsg {
    Event(Arc<Event>),
    Bookmark { rv: u64, initial_events_end: bool },
}

/// Where a watch starts.
pub(super) enum WatchFrom {
    /// Replay every event after this RV, then live events.
    Version(u64),
    /// Synthetic ADDED events for the current state, optionally closed by the `initial-events-end` bookmark.
    Now { initial_events_end: bool },
}

pub(super) struct ListPage {
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    pub continue_token: Option<String>,
}

struct Subscriber {
    kind: &'static str,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

struct Snapshot {
    kind: &'static str,
    rv: u64,
    objects: Objects,
}

pub(super) struct Store {
    uid_prefix: u32,
    rv: u64,
    /// Watches from an RV below this get the in-stream 410: the events after it are gone.
    floor: u64,
    objects: HashMap<&'static str, Objects>,
    log: VecDeque<(&'static str, Arc<Event>)>,
    subscribers: Vec<Subscriber>,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    pub faults: Vec<Fault>,
    pub requests: Vec<RecordedRequest>,
}

impl Store {
    pub fn new(name: &str, first_resource_version: u64) -> Self {
        // FNV-1a of the cluster name, so uids differ between fake clusters too.
        let uid_prefix = name.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        Self {
            uid_prefix,
            rv: first_resource_version,
            floor: first_resource_version,
            objects: RESOURCES.iter().map(|rt| (rt.kind, Objects::default())).collect(),
            log: VecDeque::new(),
            subscribers: Vec::new(),
            snapshots: BTreeMap::new(),
            next_snapshot: 0,
            faults: Vec::new(),
            requests: Vec::new(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Create or replace; a write that changes nothing is a no-op, as on the real server.
    pub fn apply(&mut self, mut obj: Value) -> u64 {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        let rt = by_kind(&api_version, &kind)
            .unwrap_or_else(|| panic!("fake_kube: {api_version}/{kind} is not a served resource type"));
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("fake_kube: {kind} without metadata"));
        let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        assert!(!name.is_empty(), "fake_kube: {kind} without metadata.name");
        let namespace = if rt.namespaced {
            let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("default").to_owned();
            meta.insert("namespace".into(), ns.clone().into());
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (namespace, name);
        let previous = self.objects[rt.kind].get(&key).cloned();
        match &previous {
            Some(prev) => {
                for field in ["uid", "creationTimestamp", "resourceVersion"] {
                    meta.insert(field.into(), prev["metadata"][field].clone());
                }
                if obj == **prev {
                    return self.rv;
                }
            }
            None => {
                meta.insert(
                    "uid".into(),
                    format!("{:08x}-0000-4000-8000-{:012x}", self.uid_prefix, self.rv + 1).into(),
                );
                meta.insert("creationTimestamp".into(), rfc3339_now().into());
            }
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let obj = Arc::new(obj);
        Arc::make_mut(self.objects.get_mut(rt.kind).expect("every kind has a map")).insert(key, obj.clone());
        let event_type = if previous.is_some() { EventType::Modified } else { EventType::Added };
        self.record(rt.kind, Event { rv: self.rv, event_type, object: obj, previous });
        self.rv
    }

    pub fn delete(&mut self, kind: &str, namespace: Option<&str>, name: &str) -> Option<u64> {
        let rt =
            RESOURCES.iter().find(|rt| rt.kind == kind).unwrap_or_else(|| panic!("fake_kube: unknown kind {kind}"));
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        let removed = Arc::make_mut(self.objects.get_mut(rt.kind).expect("every kind has a map")).remove(&key)?;
        self.rv += 1;
        let mut last = (*removed).clone();
        last["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.record(
            rt.kind,
            Event { rv: self.rv, event_type: EventType::Deleted, object: Arc::new(last), previous: None },
        );
        Some(self.rv)
    }

    fn record(&mut self, kind: &'static str, event: Event) {
        let event = Arc::new(event);
        self.subscribers.retain(|s| s.kind != kind || s.tx.send(WatchMsg::Event(event.clone())).is_ok());
        self.log.push_back((kind, event));
        if self.log.len() > EVENT_LOG_CAPACITY
            && let Some((_, dropped)) = self.log.pop_front()
        {
            self.floor = dropped.rv;
        }
    }

    /// Forget all history: watches and continue tokens from before now expire (410).
    pub fn compact(&mut self) {
        self.floor = self.rv;
        self.log.clear();
        self.snapshots.clear();
    }

    pub fn bookmark(&mut self) {
        let rv = self.rv;
        self.subscribers.retain(|s| s.tx.send(WatchMsg::Bookmark { rv, initial_events_end: false }).is_ok());
    }

    /// Dropping the senders ends every open watch stream; the stream reports it as a cut connection.
    pub fn drop_watches(&mut self) {
        self.subscribers.clear();
    }

    pub fn open_watches(&mut self) -> usize {
        self.subscribers.retain(|s| !s.tx.is_closed());
        self.subscribers.len()
    }

    pub fn get(&self, rt: &ResourceType, namespace: Option<&str>, name: &str) -> Option<Arc<Value>> {
        self.objects[rt.kind].get(&(namespace.unwrap_or_default().to_owned(), name.to_owned())).cloned()
    }

    /// One page of a list. Every page of a paged list comes from the first page's snapshot and reports its RV,
    /// which is what lets the watcher resume from that RV without losing writes made between pages.
    pub fn list(
        &mut self,
        rt: &'static ResourceType,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let (snapshot_id, rv, objects, offset) = match continue_token {
            Some(token) => {
                let (id, offset) = token
                    .split_once(':')
                    .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)))
                    .ok_or_else(|| ApiError::new(400, format!("invalid continue token {token:?}")))?;
                let snap = self.snapshots.get(&id).filter(|s| s.rv >= self.floor).ok_or_else(|| {
                    ApiError::new(
                        410,
                        "The provided continue parameter is too old to display a consistent list result. You can \
                         start a new list without the continue parameter.",
                    )
                })?;
                if snap.kind != rt.kind {
                    return Err(ApiError::new(400, "continue token is for another resource type"));
                }
                (Some(id), snap.rv, snap.objects.clone(), offset)
            }
            None => (None, self.rv, self.objects[rt.kind].clone(), 0),
        };
        let limit = limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut next = None;
        for (i, obj) in objects.values().enumerate().skip(offset) {
            if !filter.matches(obj) {
                continue;
            }
            if items.len() == limit {
                next = Some(i);
                break;
            }
            items.push(obj.clone());
        }
        let continue_token = next.map(|offset| {
            let id = snapshot_id.unwrap_or_else(|| {
                let id = self.next_snapshot;
                self.next_snapshot += 1;
                self.snapshots.insert(id, Snapshot { kind: rt.kind, rv, objects });
                if self.snapshots.len() > MAX_SNAPSHOTS {
                    self.snapshots.pop_first();
                }
                id
            });
            format!("{id}:{offset}")
        });
        Ok(ListPage { rv, items, continue_token })
    }

    /// Opens a watch: the messages to send first, and the channel for what follows. Registering happens under the
    /// same lock as the replay, so no write falls between them.
    pub fn watch(
        &mut self,
        rt: &'static ResourceType,
        from: WatchFrom,
    ) -> Result<(Vec<WatchMsg>, mpsc::UnboundedReceiver<WatchMsg>), ApiError> {
        let first = match from {
            WatchFrom::Version(rv) if rv < self.floor => {
                return Err(ApiError::new(410, format!("too old resource version: {rv} ({})", self.floor)));
            }
            WatchFrom::Version(rv) if rv > self.rv => {
                return Err(ApiError::new(504, format!("Too large resource version: {rv}, current: {}", self.rv)));
            }
            WatchFrom::Version(rv) => self
                .log
                .iter()
                .filter(|(kind, e)| *kind == rt.kind && e.rv > rv)
                .map(|(_, e)| WatchMsg::Event(e.clone()))
                .collect(),
            WatchFrom::Now { initial_events_end } => {
                let mut msgs: Vec<WatchMsg> = self.objects[rt.kind]
                    .values()
                    .map(|obj| {
                        let rv = obj["metadata"]["resourceVersion"].as_str().and_then(|rv| rv.parse().ok());
                        WatchMsg::Event(Arc::new(Event {
                            rv: rv.unwrap_or(self.rv),
                            event_type: EventType::Added,
                            object: obj.clone(),
                            previous: None,
                        }))
                    })
                    .collect();
                if initial_events_end {
                    msgs.push(WatchMsg::Bookmark { rv: self.rv, initial_events_end: true });
                }
                msgs
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(Subscriber { kind: rt.kind, tx });
        Ok((first, rx))
    }
}

fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days: days since 1970-01-01 -> (year, month, day).
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(kind: &str) -> &'static ResourceType {
        RESOURCES.iter().find(|rt| rt.kind == kind).unwrap()
    }

    #[test]
    fn a_full_event_log_moves_the_floor() {
        let mut store = Store::new("log", 1000);
        let node = |v: usize| serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "labels": {"v": v.to_string()}}});
        for v in 0..=EVENT_LOG_CAPACITY {
            store.apply(node(v));
        }
        let last = store.resource_version();
        assert_eq!(last, 1000 + EVENT_LOG_CAPACITY as u64 + 1);
        assert_eq!(store.watch(rt("Node"), WatchFrom::Version(1000)).err().map(|e| e.code), Some(410));
        let (replay, _rx) = store.watch(rt("Node"), WatchFrom::Version(1001)).ok().unwrap();
        assert_eq!(replay.len(), EVENT_LOG_CAPACITY);
        assert_eq!(store.watch(rt("Node"), WatchFrom::Version(last + 1)).err().map(|e| e.code), Some(504));
    }

    #[test]
    fn continue_tokens_are_per_type_and_expire_on_compaction() {
        let mut store = Store::new("tokens", 1);
        for name in ["a", "b", "c"] {
            store.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}));
        }
        let page = store.list(rt("Namespace"), &Filter::default(), Some(2), None).ok().unwrap();
        let token = page.continue_token.unwrap();
        let other = store.list(rt("Node"), &Filter::default(), Some(2), Some(&token));
        assert_eq!(other.err().map(|e| e.code), Some(400));
        let rest = store.list(rt("Namespace"), &Filter::default(), Some(2), Some(&token)).ok().unwrap();
        assert_eq!((rest.items.len(), rest.rv, rest.continue_token), (1, 4, None));
        store.compact();
        let expired = store.list(rt("Namespace"), &Filter::default(), Some(2), Some(&token));
        assert_eq!(expired.err().map(|e| (e.code, e.reason)), Some((410, "Expired")));
    }

    #[test]
    fn timestamp_format() {
        let ts = rfc3339_now();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }
}
