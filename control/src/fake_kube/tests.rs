//! The real kube 5 client and `kube::runtime::watcher` against the fake, over HTTP (kubeconfig) and in-process.
//! Tests run on the current-thread runtime, so a run of synchronous fake calls (drop, write, compact) is atomic
//! with respect to the watcher tasks.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Config, Resource, ResourceExt};
use serde_json::{Value, json};

use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn pod(name: &str, app: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": []},
    }))
    .unwrap()
}

fn service(name: &str) -> Service {
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "apps"}}),
    )
    .unwrap()
}

fn secret(name: &str) -> Secret {
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "istio-system"}}),
    )
    .unwrap()
}

fn destination_rule_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "DestinationRule"),
        "destinationrules",
    )
}

/// A client built the way the control service builds one: from a kubeconfig file.
async fn http_client(served: &ServedCluster, name: &str) -> Client {
    let path: PathBuf = std::env::temp_dir().join(format!("crossgate-fake-kube-{}-{name}.yaml", std::process::id()));
    served.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

#[derive(Debug)]
struct WatchErr {
    code: Option<u16>,
}

type Seen<K> = Arc<Mutex<Vec<Result<Event<K>, WatchErr>>>>;

/// Drives a watcher stream on its own task, recording what it yields.
fn spawn_watch<K: Send + 'static>(stream: impl Stream<Item = watcher::Result<Event<K>>> + Send + 'static) -> Seen<K> {
    let seen: Seen<K> = Arc::default();
    let out = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let item = item.map_err(|e| WatchErr {
                code: match &e {
                    watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                    | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
                    watcher::Error::WatchError(s) => Some(s.code),
                    _ => None,
                },
            });
            out.lock().unwrap().push(item);
        }
    });
    seen
}

fn summary<K: Resource>(seen: &Seen<K>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|item| match item {
            Ok(Event::Init) => "Init".to_owned(),
            Ok(Event::InitApply(o)) => format!("InitApply({})", o.name_any()),
            Ok(Event::InitDone) => "InitDone".to_owned(),
            Ok(Event::Apply(o)) => format!("Apply({})", o.name_any()),
            Ok(Event::Delete(o)) => format!("Delete({})", o.name_any()),
            Err(e) => format!("Err({})", e.code.map_or_else(|| "-".to_owned(), |c| c.to_string())),
        })
        .collect()
}

async fn wait_events<K: Resource>(seen: &Seen<K>, expected: &[&str]) {
    let ok = eventually(WAIT, || summary(seen) == expected).await;
    assert!(ok, "expected events {expected:?}, saw {:?}", summary(seen));
}

/// The resourceVersion of each watch request for `path`, in order.
fn watches(fake: &FakeCluster, path: &str) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.path == path && r.is_watch())
        .map(|r| r.param("resourceVersion").unwrap_or_default().to_owned())
        .collect()
}

fn lists(fake: &FakeCluster, path: &str) -> Vec<RecordedRequest> {
    fake.requests().into_iter().filter(|r| r.path == path && !r.is_watch()).collect()
}

fn rv_of<K: Resource>(obj: &K) -> String {
    obj.resource_version().unwrap()
}

#[tokio::test]
async fn paged_list_is_served_from_one_snapshot() {
    let fake = FakeCluster::new("paging", 1000);
    for name in ["svc-a", "svc-b", "svc-c", "svc-d", "svc-e", "svc-f", "svc-g"] {
        fake.apply(&service(name));
    }
    let served = fake.serve().await.unwrap();
    let api: Api<Service> = Api::namespaced(http_client(&served, "paging").await, "apps");

    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    let snapshot_rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(snapshot_rv, "1007");
    // Writes between pages: a key already returned changes, one is added, one not yet returned goes away.
    let modified = fake.apply(&serde_json::from_value::<Service>(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc-a", "namespace": "apps", "labels": {"v": "2"}},
    })).unwrap());
    let added = fake.apply(&service("svc-z"));
    let deleted = fake.delete("Service", Some("apps"), "svc-g").unwrap();

    let mut names: Vec<String> = first.items.iter().map(ResourceExt::name_any).collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api.list(&ListParams::default().limit(3).continue_token(&t)).await.unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(snapshot_rv.as_str()),
            "every page has the first's RV"
        );
        names.extend(page.items.iter().map(ResourceExt::name_any));
        token = page.metadata.continue_;
    }
    assert_eq!(names, ["svc-a", "svc-b", "svc-c", "svc-d", "svc-e", "svc-f", "svc-g"]);
    let continued = lists(&fake, "/api/v1/namespaces/apps/services");
    assert_eq!(continued.len(), 3);
    assert!(continued[1].param("continue").is_some() && continued[2].param("limit") == Some("3"));

    // Watching from the snapshot RV delivers exactly the writes made between pages.
    let mut events = api.watch(&WatchParams::default(), &snapshot_rv).await.unwrap().boxed();
    let mut got = Vec::new();
    for _ in 0..3 {
        match tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap().unwrap() {
            WatchEvent::Modified(s) => got.push(format!("MODIFIED {} {}", s.name_any(), rv_of(&s))),
            WatchEvent::Added(s) => got.push(format!("ADDED {} {}", s.name_any(), rv_of(&s))),
            WatchEvent::Deleted(s) => got.push(format!("DELETED {} {}", s.name_any(), rv_of(&s))),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        got,
        [format!("MODIFIED svc-a {modified}"), format!("ADDED svc-z {added}"), format!("DELETED svc-g {deleted}")]
    );

    // A continue token from before a compaction has expired: 410 Expired.
    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    fake.compact();
    let err = api.list(&ListParams::default().limit(3).continue_token(&first.metadata.continue_.unwrap())).await;
    assert!(matches!(err, Err(kube::Error::Api(s)) if s.code == 410 && s.reason == "Expired"));

    // The watcher follows every page with a small page size and watches from the list RV.
    let fake_rv = fake.resource_version().to_string();
    let seen = spawn_watch(watcher(api, watcher::Config::default().page_size(2)));
    let expected = ["Init", "InitApply(svc-a)", "InitApply(svc-b)", "InitApply(svc-c)", "InitApply(svc-d)"];
    let expected = [&expected[..], &["InitApply(svc-e)", "InitApply(svc-f)", "InitApply(svc-z)", "InitDone"]].concat();
    wait_events(&seen, &expected).await;
    let pages: Vec<_> = lists(&fake, "/api/v1/namespaces/apps/services").into_iter().skip(5).collect();
    assert_eq!(pages.len(), 4);
    assert!(pages.iter().all(|r| r.param("limit") == Some("2")));
    assert_eventually("the watch from the list RV", WAIT, || {
        watches(&fake, "/api/v1/namespaces/apps/services").last() == Some(&fake_rv)
    })
    .await;
}

/// Add, modify, delete arrive in order with their RVs, on either transport.
async fn changes_arrive_in_order(fake: &FakeCluster, client: Client) {
    fake.apply(&pod("a", "web", "n1"));
    let api: Api<Pod> = Api::namespaced(client, "default");
    let seen = spawn_watch(watcher(api, watcher::Config::default()));
    wait_events(&seen, &["Init", "InitApply(a)", "InitDone"]).await;
    assert_eventually("the watch is open", WAIT, || fake.open_watches() == 1).await;

    let added = fake.apply(&pod("b", "web", "n1"));
    let modified = fake.apply(&pod("a", "api", "n1"));
    let deleted = fake.delete("Pod", Some("default"), "b").unwrap();
    assert!(added < modified && modified < deleted);
    wait_events(&seen, &["Init", "InitApply(a)", "InitDone", "Apply(b)", "Apply(a)", "Delete(b)"]).await;
    let seen = seen.lock().unwrap();
    let rvs: Vec<String> = seen[3..]
        .iter()
        .map(|e| match e {
            Ok(Event::Apply(p) | Event::Delete(p)) => rv_of(p),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(rvs, [added.to_string(), modified.to_string(), deleted.to_string()]);
    let Ok(Event::Apply(a)) = &seen[4] else { unreachable!() };
    assert_eq!(a.labels()["app"], "api");
    assert!(a.uid().is_some() && a.creation_timestamp().is_some());
}

#[tokio::test]
async fn watcher_sees_changes_in_order_in_process() {
    let fake = FakeCluster::new("inproc", 1000);
    changes_arrive_in_order(&fake, fake.client()).await;
}

#[tokio::test]
async fn watcher_sees_changes_in_order_over_http() {
    let fake = FakeCluster::new("http", 1000);
    let served = fake.serve().await.unwrap();
    changes_arrive_in_order(&fake, http_client(&served, "http").await).await;
    assert!(fake.requests().iter().all(|r| r.authorization.as_deref() == Some("Bearer fake-token-http")));
}

#[tokio::test]
async fn selector_transitions_are_added_and_deleted() {
    let fake = FakeCluster::new("selectors", 1000);
    fake.apply(&pod("p1", "web", "n1"));
    fake.apply(&pod("p2", "db", "n1"));
    let api: Api<Pod> = Api::namespaced(fake.client(), "default");
    let list = api.list(&ListParams::default().labels("app in (web)").fields("spec.nodeName=n1")).await.unwrap();
    assert_eq!(list.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>(), ["p1"]);

    let wp = WatchParams::default().labels("app=web").fields("spec.nodeName=n1");
    let mut events = api.watch(&wp, &list.metadata.resource_version.unwrap()).await.unwrap().boxed();
    let mut next = async || tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap().unwrap();

    let rv = fake.apply(&pod("p2", "web", "n1"));
    assert!(matches!(next().await, WatchEvent::Added(p) if p.name_any() == "p2" && rv_of(&p) == rv.to_string()));
    let rv = fake.apply(&pod("p1", "db", "n1"));
    match next().await {
        WatchEvent::Deleted(p) => {
            assert_eq!((p.name_any().as_str(), p.labels()["app"].as_str()), ("p1", "web"), "the previous content");
            assert_eq!(rv_of(&p), rv.to_string(), "with the new RV");
        }
        other => panic!("unexpected {other:?}"),
    }
    fake.apply(&pod("p1", "db", "n2")); // never matched: nothing
    let rv = fake.apply(&pod("p2", "web", "n2"));
    assert!(matches!(next().await, WatchEvent::Deleted(p) if p.name_any() == "p2" && rv_of(&p) == rv.to_string()));
    fake.apply(&pod("p2", "web", "n1"));
    fake.apply(&pod("p2", "web", "n1")); // a no-op write: no event, no new RV
    let rv = fake.apply(&pod("p3", "web", "n1"));
    assert!(matches!(next().await, WatchEvent::Added(p) if p.name_any() == "p2"));
    assert!(matches!(next().await, WatchEvent::Added(p) if p.name_any() == "p3" && rv_of(&p) == rv.to_string()));
    let watch = fake.requests().into_iter().find(RecordedRequest::is_watch).unwrap();
    assert_eq!(
        (watch.param("labelSelector"), watch.param("fieldSelector")),
        (Some("app=web"), Some("spec.nodeName=n1"))
    );

    // EndpointSlices are selected by their service label, across namespaces.
    for (ns, name, svc) in [("a", "s1", "reviews"), ("b", "s2", "reviews"), ("a", "s3", "ratings")] {
        fake.apply_json(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4", "endpoints": [],
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        }));
    }
    let slices: Api<EndpointSlice> = Api::all(fake.client());
    let list = slices.list(&ListParams::default().labels("kubernetes.io/service-name=reviews")).await.unwrap();
    assert_eq!(list.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>(), ["s1", "s2"]);
    let bad = slices.list(&ListParams::default().labels("a in b")).await;
    assert!(matches!(bad, Err(kube::Error::Api(s)) if s.code == 400));
}

#[tokio::test]
async fn compaction_forces_a_relist_without_losing_objects() {
    let fake = FakeCluster::new("compact", 1000);
    fake.apply(&pod("a", "web", "n1"));
    fake.apply(&pod("b", "web", "n1"));
    let served = fake.serve().await.unwrap();
    let (reader, writer) = reflector::store::<Pod>();
    let api: Api<Pod> = Api::all(http_client(&served, "compact").await);
    let seen = spawn_watch(watcher(api, watcher::Config::default()).default_backoff().reflect(writer));
    wait_events(&seen, &["Init", "InitApply(a)", "InitApply(b)", "InitDone"]).await;
    assert_eventually("the watch is open", WAIT, || fake.open_watches() == 1).await;
    let watched_from = fake.resource_version().to_string();

    // While the watcher is disconnected, objects change and history is compacted past its RV.
    fake.drop_watches();
    fake.apply(&pod("c", "web", "n1"));
    fake.delete("Pod", Some("default"), "a");
    let b_rv = fake.apply(&pod("b", "db", "n1"));
    fake.compact();

    assert_eventually("the reflector holds exactly b (modified) and c", WAIT, || {
        let mut state: Vec<(String, String)> =
            reader.state().iter().map(|p| (p.name_any(), p.labels()["app"].clone())).collect();
        state.sort();
        state == [("b".to_owned(), "db".to_owned()), ("c".to_owned(), "web".to_owned())]
    })
    .await;
    assert!(
        reader.get(&reflector::ObjectRef::new("b").within("default")).is_some_and(|b| rv_of(&*b) == b_rv.to_string())
    );
    assert!(summary(&seen).contains(&"Err(410)".to_owned()), "{:?}", summary(&seen));
    // The resumed watch (the second) asked for the compacted RV, got the 410 in-stream, and a relist followed.
    let log = fake.requests();
    let resumed = log.iter().enumerate().filter(|(_, r)| r.is_watch()).nth(1).map(|(i, _)| i).unwrap();
    assert_eq!((log[resumed].param("resourceVersion"), log[resumed].status), (Some(watched_from.as_str()), 200));
    assert!(log[resumed + 1..].iter().any(|r| !r.is_watch() && r.path == "/api/v1/pods"), "a relist follows the 410");
}

/// A cut connection (no terminating chunk) resumes from the last RV seen, with no error and no relist.
async fn dropped_watches_resume_from_the_last_rv(fake: &FakeCluster, client: Client) {
    let api: Api<Pod> = Api::namespaced(client, "default");
    let seen = spawn_watch(watcher(api, watcher::Config::default()));
    wait_events(&seen, &["Init", "InitDone"]).await;
    assert_eventually("the watch is open", WAIT, || fake.open_watches() == 1).await;
    let x = fake.apply(&pod("x", "web", "n1"));
    wait_events(&seen, &["Init", "InitDone", "Apply(x)"]).await;

    fake.drop_watches();
    fake.apply(&pod("y", "web", "n1"));
    wait_events(&seen, &["Init", "InitDone", "Apply(x)", "Apply(y)"]).await;
    assert_eq!(watches(fake, "/api/v1/namespaces/default/pods"), ["1000", x.to_string().as_str()]);
    assert_eq!(lists(fake, "/api/v1/namespaces/default/pods").len(), 1, "no relist");
}

#[tokio::test]
async fn dropped_watches_resume_in_process() {
    let fake = FakeCluster::new("drop", 1000);
    dropped_watches_resume_from_the_last_rv(&fake, fake.client()).await;
}

#[tokio::test]
async fn dropped_watches_resume_over_http() {
    let fake = FakeCluster::new("drop-http", 1000);
    let served = fake.serve().await.unwrap();
    dropped_watches_resume_from_the_last_rv(&fake, http_client(&served, "drop-http").await).await;
}

#[tokio::test]
async fn bookmarks_advance_the_resume_rv() {
    let fake = FakeCluster::new("bookmarks", 1000);
    let api: Api<Pod> = Api::all(fake.client());
    let seen = spawn_watch(watcher(api, watcher::Config::default()));
    wait_events(&seen, &["Init", "InitDone"]).await;
    assert_eventually("the watch is open", WAIT, || fake.open_watches() == 1).await;
    // Writes to another type move the global RV, which the pod watch never hears about...
    for name in ["s1", "s2", "s3"] {
        fake.apply(&secret(name));
    }
    // ...until a bookmark carries it; it is sent before the cut, so the resume starts after it.
    fake.bookmark();
    fake.drop_watches();
    assert_eventually("a resumed watch", WAIT, || watches(&fake, "/api/v1/pods").len() == 2).await;
    assert_eq!(watches(&fake, "/api/v1/pods"), ["1000", "1003"]);
    assert_eq!(summary(&seen), ["Init", "InitDone"], "bookmarks are not events");
}

#[tokio::test(start_paused = true)]
async fn server_timeout_ends_the_stream_and_the_watcher_rewatches() {
    let fake = FakeCluster::new("timeout", 1000);
    let api: Api<Pod> = Api::all(fake.client());
    let seen = spawn_watch(watcher(api, watcher::Config::default()));
    wait_events(&seen, &["Init", "InitDone"]).await;
    let a = fake.apply(&pod("a", "web", "n1"));
    wait_events(&seen, &["Init", "InitDone", "Apply(a)"]).await;
    // timeoutSeconds=290 ends the body cleanly; paused time gets there at once.
    assert_eventually("a re-watch after the server timeout", Duration::from_secs(400), || {
        watches(&fake, "/api/v1/pods").len() >= 2
    })
    .await;
    assert_eq!(watches(&fake, "/api/v1/pods")[..2], ["1000".to_owned(), a.to_string()]);
    assert_eq!(fake.requests()[1].param("timeoutSeconds"), Some("290"));
    assert_eq!(lists(&fake, "/api/v1/pods").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn list_errors_recover_with_backoff() {
    let fake = FakeCluster::new("errors", 1000);
    fake.apply(&pod("a", "web", "n1"));
    fake.fail(Fault::ListError { kind: "Pod".into(), code: 500, times: 1 });
    fake.fail(Fault::ListError { kind: "Pod".into(), code: 429, times: 1 });
    let api: Api<Pod> = Api::all(fake.client());
    let seen = spawn_watch(watcher(api, watcher::Config::default()).default_backoff());
    wait_events(&seen, &["Init", "Err(500)", "Init", "Err(429)", "Init", "InitApply(a)", "InitDone"]).await;
    let statuses: Vec<u16> = lists(&fake, "/api/v1/pods").iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 429, 200]);
}

#[tokio::test]
async fn forbidden_type_surfaces_as_403() {
    let fake = FakeCluster::new("rbac", 1000);
    fake.fail(Fault::Forbidden { kind: "Secret".into() });
    let served = fake.serve().await.unwrap();
    let client = http_client(&served, "rbac").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "istio-system");
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
            assert!(s.message.contains("cannot list resource \"secrets\""), "{}", s.message);
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    let seen = spawn_watch(watcher(secrets, watcher::Config::default()).default_backoff());
    assert_eventually("a 403 from the watcher", WAIT, || {
        summary(&seen).starts_with(&["Init".to_owned(), "Err(403)".to_owned()])
    })
    .await;
    // Other types are unaffected.
    assert!(Api::<Pod>::all(client).list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn streaming_lists_send_initial_events_then_live() {
    let fake = FakeCluster::new("streaming", 1000);
    fake.apply(&pod("a", "web", "n1"));
    fake.apply(&pod("b", "web", "n1"));
    let api: Api<Pod> = Api::all(fake.client());
    let seen = spawn_watch(watcher(api, watcher::Config::default().streaming_lists()));
    wait_events(&seen, &["Init", "InitApply(a)", "InitApply(b)", "InitDone"]).await;
    let c = fake.apply(&pod("c", "web", "n1"));
    wait_events(&seen, &["Init", "InitApply(a)", "InitApply(b)", "InitDone", "Apply(c)"]).await;
    fake.drop_watches();
    assert_eventually("a resumed watch", WAIT, || watches(&fake, "/api/v1/pods").len() == 2).await;

    let log = fake.requests();
    assert!(lists(&fake, "/api/v1/pods").is_empty(), "no list at all");
    let (initial, resumed) = (&log[0], &log[1]);
    assert_eq!(
        (initial.param("sendInitialEvents"), initial.param("resourceVersionMatch"), initial.param("resourceVersion")),
        (Some("true"), Some("NotOlderThan"), Some("0"))
    );
    assert_eq!(
        (resumed.param("sendInitialEvents"), resumed.param("resourceVersion")),
        (None, Some(c.to_string().as_str()))
    );
}

#[tokio::test]
async fn injected_malformed_line_and_mid_stream_cut() {
    let fake = FakeCluster::new("faults", 1000);
    let api: Api<Pod> = Api::all(fake.client());
    let seen = spawn_watch(watcher(api, watcher::Config::default()));
    wait_events(&seen, &["Init", "InitDone"]).await;
    assert_eventually("the watch is open", WAIT, || fake.open_watches() == 1).await;

    // The next watch sends garbage, then x, then is cut before y.
    fake.fail(Fault::MalformedLine { kind: "Pod".into() });
    fake.fail(Fault::Disconnect { kind: "Pod".into(), after_events: 2 });
    fake.drop_watches();
    let x = fake.apply(&pod("x", "web", "n1"));
    fake.apply(&pod("y", "web", "n1"));
    wait_events(&seen, &["Init", "InitDone", "Err(-)", "Apply(x)", "Apply(y)"]).await;
    assert_eq!(watches(&fake, "/api/v1/pods"), ["1000", "1000", x.to_string().as_str()]);
}

#[tokio::test]
async fn absent_api_is_404_until_installed() {
    let fake = FakeCluster::new("crd", 1000);
    fake.fail(Fault::ApiAbsent { kind: "DestinationRule".into() });
    let served = fake.serve().await.unwrap();
    let client = http_client(&served, "crd").await;
    let drs: Api<DynamicObject> = Api::all_with(client.clone(), &destination_rule_resource());
    assert!(matches!(drs.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 404));
    let groups = client.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().all(|g| g.name != "networking.istio.io"));
    assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));

    fake.clear_faults();
    assert!(
        client
            .list_api_group_resources("networking.istio.io/v1")
            .await
            .unwrap()
            .resources
            .iter()
            .any(|r| r.name == "destinationrules")
    );
    fake.apply_json(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "bookinfo"},
        "spec": {"host": "reviews.bookinfo.svc.cluster.local", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}},
    }));
    let seen = spawn_watch(watcher(drs, watcher::Config::default()));
    wait_events(&seen, &["Init", "InitApply(reviews)", "InitDone"]).await;
    let Ok(Event::InitApply(dr)) = &seen.lock().unwrap()[1] else { unreachable!() };
    assert_eq!(dr.data["spec"]["trafficPolicy"]["loadBalancer"]["simple"], Value::from("ROUND_ROBIN"));
}

#[tokio::test]
async fn metadata_only_list_watch_and_get() {
    let fake = FakeCluster::new("meta", 1000);
    fake.apply(&pod("a", "web", "n1"));
    let api: Api<Pod> = Api::namespaced(fake.client(), "default");
    let list = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items[0].metadata.labels.as_ref().unwrap()["app"], "web");
    let mut events =
        api.watch_metadata(&WatchParams::default(), &list.metadata.resource_version.unwrap()).await.unwrap().boxed();
    fake.apply(&pod("b", "db", "n1"));
    let event = tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(event, WatchEvent::Added(m) if m.metadata.name.as_deref() == Some("b")));
    assert_eq!(api.get("a").await.unwrap().spec.unwrap().node_name.as_deref(), Some("n1"));
    assert!(matches!(api.get("zzz").await, Err(kube::Error::Api(s)) if s.code == 404 && s.reason == "NotFound"));
}

#[tokio::test]
async fn two_clusters_served_at_once_stay_independent() {
    let (east, west) = (FakeCluster::new("east", 1000), FakeCluster::new("west", 5_000_000));
    east.apply(&pod("east-pod", "web", "n1"));
    west.apply(&pod("west-pod", "web", "n1"));
    let (east_served, west_served) = (east.serve().await.unwrap(), west.serve().await.unwrap());
    assert!(east_served.kubeconfig_yaml("east").contains(&format!("server: {}", east_served.url())));
    let (east_client, west_client) = (http_client(&east_served, "east").await, http_client(&west_served, "west").await);

    let mut readers = Vec::new();
    for client in [east_client, west_client] {
        let (reader, writer) = reflector::store::<Pod>();
        spawn_watch(watcher(Api::<Pod>::all(client), watcher::Config::default()).reflect(writer));
        readers.push(reader);
    }
    for (reader, fake) in readers.iter().zip([&east, &west]) {
        reader.wait_until_ready().await.unwrap();
        assert_eventually("the watch is open", WAIT, || fake.open_watches() == 1).await;
    }
    east.apply(&pod("east-2", "web", "n1"));
    let names = |reader: &reflector::Store<Pod>| {
        let mut names: Vec<(String, String)> = reader.state().iter().map(|p| (p.name_any(), rv_of(&**p))).collect();
        names.sort();
        names
    };
    assert_eventually("east sees its second pod", WAIT, || names(&readers[0]).len() == 2).await;
    assert_eq!(
        names(&readers[0]),
        [("east-2".to_owned(), "1002".to_owned()), ("east-pod".to_owned(), "1001".to_owned())]
    );
    assert_eq!(names(&readers[1]), [("west-pod".to_owned(), "5000001".to_owned())]);
    assert_eq!(watches(&west, "/api/v1/pods"), ["5000001"]);
    assert!(west.requests().iter().all(|r| r.authorization.as_deref() == Some("Bearer fake-token-west")));
}
