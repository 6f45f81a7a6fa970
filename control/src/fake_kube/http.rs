//! The HTTP face of a fake cluster: routing, query parsing, list/get/watch responses and the watch stream body,
//! served by hyper on 127.0.0.1 or in-process as a tower `Service` for `kube::Client::new`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

use super::api::{self, ApiError, RESOURCES, ResourceType};
use super::selectors::{FieldSelector, Filter, LabelSelector};
use super::store::{EventType, Store, WatchFrom, WatchMsg};
use super::{FakeCluster, Fault, RecordedRequest};

/// Errors only ever cut a watch stream; kube reads an `UnexpectedEof` as a dropped connection and resumes.
pub(super) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Answers one request. Synchronous: it takes the store lock once, and a watch's body streams from a channel.
pub(super) fn handle(store: &Mutex<Store>, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    // kube sends `?&limit=..`: empty pairs are skipped.
    let query: Vec<(String, String)> = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut recorded = RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query,
        status: 0,
        authorization: headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    // `Api<PartialObjectMeta<K>>` asks for metadata-only objects through the Accept header.
    let metadata_only =
        headers.get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
    let response = route(&mut store, &recorded, metadata_only).unwrap_or_else(|e| status_response(&e));
    recorded.status = response.status().as_u16();
    store.requests.push(recorded);
    response
}

fn flag(req: &RecordedRequest, name: &str) -> bool {
    matches!(req.param(name), Some("true" | "1"))
}

fn route(store: &mut Store, req: &RecordedRequest, metadata_only: bool) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET.as_str() {
        return Err(ApiError::new(405, format!("the fake serves GET only, not {}", req.method)));
    }
    let absent =
        |rt: &ResourceType| store.faults.iter().any(|f| matches!(f, Fault::ApiAbsent { kind } if kind == rt.kind));
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"}),
            ));
        }
        ["api"] => return Ok(json_response(StatusCode::OK, &api::core_versions())),
        ["apis"] => return Ok(json_response(StatusCode::OK, &api::group_list(|rt| !absent(rt)))),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Ok(page_not_found()),
    };
    // A group/version with nothing served (a CRD that is not installed) answers like the real server: plain text.
    let Some(discovery) = api::resource_list(group, version, |rt| !absent(rt)) else {
        return Ok(page_not_found());
    };
    let (namespace, plural, name) = match rest {
        [] => return Ok(json_response(StatusCode::OK, &discovery)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return Err(ApiError::new(404, "the server could not find the requested resource")),
    };
    let rt = RESOURCES
        .iter()
        .find(|rt| rt.group == group && rt.version == version && rt.plural == plural && !absent(rt))
        .filter(|rt| rt.namespaced || namespace.is_none())
        .ok_or_else(|| ApiError::new(404, "the server could not find the requested resource"))?;
    let verb = if name.is_some() {
        "get"
    } else if req.is_watch() {
        "watch"
    } else {
        "list"
    };
    check_faults(&mut store.faults, rt, verb, namespace)?;

    if let Some(name) = name {
        let obj = store
            .get(rt, namespace, name)
            .ok_or_else(|| ApiError::new(404, format!("{} \"{name}\" not found", rt.plural)))?;
        let obj = if metadata_only { partial_object(&obj) } else { (*obj).clone() };
        return Ok(json_response(StatusCode::OK, &obj));
    }
    let filter = Filter {
        namespace: namespace.map(str::to_owned),
        labels: LabelSelector::parse(req.param("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::new(400, e))?,
        fields: FieldSelector::parse(req.param("fieldSelector").unwrap_or_default())
            .map_err(|e| ApiError::new(400, e))?,
    };
    if verb == "watch" {
        watch(store, rt, filter, req, metadata_only)
    } else {
        list(store, rt, &filter, req, metadata_only)
    }
}

/// Injected faults: a 403 for a type without RBAC, and counted list failures (500, 429...).
fn check_faults(
    faults: &mut Vec<Fault>,
    rt: &ResourceType,
    verb: &str,
    namespace: Option<&str>,
) -> Result<(), ApiError> {
    if faults.iter().any(|f| matches!(f, Fault::Forbidden { kind } if kind == rt.kind)) {
        let scope =
            namespace.map_or_else(|| "at the cluster scope".to_owned(), |ns| format!("in the namespace \"{ns}\""));
        return Err(ApiError::new(
            403,
            format!(
                "{} is forbidden: User \"system:serviceaccount:istio-system:istio-reader-service-account\" cannot \
                 {verb} resource \"{}\" in API group \"{}\" {scope}",
                rt.plural, rt.plural, rt.group
            ),
        ));
    }
    if verb != "list" {
        return Ok(());
    }
    let pending = |f: &Fault| matches!(f, Fault::ListError { kind, times, .. } if kind == rt.kind && *times > 0);
    let Some(i) = faults.iter().position(pending) else {
        return Ok(());
    };
    let Fault::ListError { code, times, .. } = &mut faults[i] else { unreachable!("matched above") };
    let err = ApiError::new(*code, format!("injected failure listing {}", rt.plural));
    *times = times.saturating_sub(1);
    if *times == 0 {
        faults.remove(i);
    }
    Err(err)
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse().map_err(|_| ApiError::new(400, format!("invalid resource version {rv:?}")))
}

fn list(
    store: &mut Store,
    rt: &'static ResourceType,
    filter: &Filter,
    req: &RecordedRequest,
    metadata_only: bool,
) -> Result<Response<Body>, ApiError> {
    let limit = req
        .param("limit")
        .map(|l| l.parse::<usize>().map_err(|_| ApiError::new(400, format!("invalid limit {l:?}"))))
        .transpose()?;
    let continue_token = req.param("continue").filter(|c| !c.is_empty());
    // "" and "0" mean "any/most recent": the fake is never stale, so both read the current state.
    if continue_token.is_none()
        && let Some(rv) = req.param("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0")
    {
        let rv = parse_rv(rv)?;
        let current = store.resource_version();
        if rv > current {
            return Err(ApiError::new(504, format!("Too large resource version: {rv}, current: {current}")));
        }
        // No history of states is kept, so an exact read can only be served at the current RV.
        if req.param("resourceVersionMatch") == Some("Exact") && rv != current {
            return Err(ApiError::new(410, format!("too old resource version: {rv} ({current})")));
        }
    }
    let page = store.list(rt, filter, limit, continue_token)?;
    let items: Vec<Value> =
        page.items.iter().map(|obj| if metadata_only { partial_object(obj) } else { (**obj).clone() }).collect();
    let mut metadata = json!({"resourceVersion": page.rv.to_string()});
    if let Some(token) = page.continue_token {
        metadata["continue"] = token.into();
    }
    let (kind, api_version) = if metadata_only {
        ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1".to_owned())
    } else {
        (format!("{}List", rt.kind), rt.api_version())
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}),
    ))
}

fn watch(
    store: &mut Store,
    rt: &'static ResourceType,
    filter: Filter,
    req: &RecordedRequest,
    metadata_only: bool,
) -> Result<Response<Body>, ApiError> {
    let bookmarks = flag(req, "allowWatchBookmarks");
    let rv = req.param("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0");
    let from = if flag(req, "sendInitialEvents") {
        if req.param("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::new(400, "sendInitialEvents requires resourceVersionMatch=NotOlderThan"));
        }
        WatchFrom::Now { initial_events_end: bookmarks }
    } else if let Some(rv) = rv {
        WatchFrom::Version(parse_rv(rv)?)
    } else {
        WatchFrom::Now { initial_events_end: false }
    };
    let timeout = req
        .param("timeoutSeconds")
        .map(|t| t.parse::<u64>().map_err(|_| ApiError::new(400, format!("invalid timeoutSeconds {t:?}"))))
        .transpose()?
        // 0 asks for the server's default, which has no fixed bound.
        .filter(|&t| t > 0);
    let (first, rx) = match store.watch(rt, from) {
        Ok(opened) => opened,
        // Watch errors come in-stream on an HTTP 200, then EOF (kubernetes/kubernetes#25151, #35068).
        Err(e) if e.code == 410 => {
            let line = event_line("ERROR", &e.status());
            return Ok(streaming_response(stream_body(stream::iter([Ok(Frame::data(line))]))));
        }
        Err(e) => return Err(e),
    };
    let mut stream = WatchStream {
        rt,
        filter,
        bookmarks,
        metadata_only,
        pending: VecDeque::new(),
        rx,
        deadline: timeout.map(|t| Box::pin(tokio::time::sleep(Duration::from_secs(t)))),
        cut_after: None,
    };
    store.faults.retain(|f| match f {
        Fault::MalformedLine { kind } if kind == rt.kind => {
            stream.pending.push_back(Bytes::from_static(b"this is not json\n"));
            false
        }
        Fault::Disconnect { kind, after_events } if kind == rt.kind => {
            stream.cut_after = Some(*after_events);
            false
        }
        _ => true,
    });
    for msg in first {
        stream.push(msg);
    }
    Ok(streaming_response(stream.into_body()))
}

struct WatchStream {
    rt: &'static ResourceType,
    filter: Filter,
    bookmarks: bool,
    metadata_only: bool,
    pending: VecDeque<Bytes>,
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Lines left before an injected mid-stream disconnect.
    cut_after: Option<usize>,
}

impl WatchStream {
    fn into_body(self) -> Body {
        stream_body(stream::unfold(Some(self), |state| async move {
            let mut watch = state?;
            match watch.next_line().await {
                Ok(Some(line)) => Some((Ok(Frame::data(line)), Some(watch))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }))
    }

    /// The next line to send; `Ok(None)` ends the body cleanly (timeoutSeconds), `Err` cuts it.
    async fn next_line(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.cut_after == Some(0) {
                return Err(connection_cut());
            }
            if let Some(line) = self.pending.pop_front() {
                if let Some(left) = &mut self.cut_after {
                    *left -= 1;
                }
                return Ok(Some(line));
            }
            let (rx, deadline) = (&mut self.rx, &mut self.deadline);
            let deadline = async move {
                match deadline {
                    Some(sleep) => sleep.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let received = tokio::select! {
                biased;
                msg = rx.recv() => Some(msg),
                () = deadline => None,
            };
            match received {
                Some(Some(msg)) => self.push(msg),
                // The store dropped this watch: drop_watches(), or the fake itself is gone.
                Some(None) => return Err(connection_cut()),
                None => return Ok(None),
            }
        }
    }

    /// Renders one store message through this watch's filter, the way the watch cache does: an object that starts
    /// matching is ADDED, one that stops matching is DELETED with its previous content and the new RV.
    fn push(&mut self, msg: WatchMsg) {
        let (event_type, object) = match msg {
            WatchMsg::Event(e) => {
                let now = self.filter.matches(&e.object);
                let before = e.previous.as_ref().is_some_and(|p| self.filter.matches(p));
                match (e.event_type, before, now) {
                    (EventType::Added, _, true) => ("ADDED", (*e.object).clone()),
                    (EventType::Deleted, _, true) => ("DELETED", (*e.object).clone()),
                    (EventType::Modified, true, true) => ("MODIFIED", (*e.object).clone()),
                    (EventType::Modified, false, true) => ("ADDED", (*e.object).clone()),
                    (EventType::Modified, true, false) => {
                        let mut last = (**e.previous.as_ref().expect("before implies previous")).clone();
                        last["metadata"]["resourceVersion"] = e.rv.to_string().into();
                        ("DELETED", last)
                    }
                    _ => return,
                }
            }
            WatchMsg::Bookmark { rv, initial_events_end } => {
                if !self.bookmarks {
                    return;
                }
                let mut metadata = json!({"resourceVersion": rv.to_string()});
                if initial_events_end {
                    metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                ("BOOKMARK", json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": metadata}))
            }
        };
        let object = if self.metadata_only && event_type != "BOOKMARK" { partial_object(&object) } else { object };
        self.pending.push_back(event_line(event_type, &object));
    }
}

fn connection_cut() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "fake_kube: watch connection cut")
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object})).expect("JSON values serialize");
    line.push(b'\n');
    line.into()
}

fn partial_object(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

fn stream_body<S>(s: S) -> Body
where
    S: futures::Stream<Item = io::Result<Frame<Bytes>>> + Send + 'static,
{
    StreamBody::new(s).boxed_unsync()
}

fn streaming_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("JSON values serialize");
    let mut response = Response::new(Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn status_response(e: &ApiError) -> Response<Body> {
    json_response(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.status())
}

fn page_not_found() -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from_static(b"404 page not found\n")).map_err(|n| match n {}).boxed_unsync());
    *response.status_mut() = StatusCode::NOT_FOUND;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The fake as a tower `Service`, for `kube::Client::new`: no sockets, so it also runs under paused time.
#[derive(Clone)]
pub(super) struct InProcess(pub FakeCluster);

impl<B> tower::Service<Request<B>> for InProcess {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ready(Ok(handle(&self.0.shared.store, req.method(), req.uri(), req.headers())))
    }
}

/// Serves the fake over HTTP/1.1 on 127.0.0.1:0. Aborting the returned task closes the listener and every connection.
pub(super) async fn serve(cluster: FakeCluster) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Owned here so that aborting this task drops, and so aborts, every connection.
        let mut connections = JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            while connections.try_join_next().is_some() {}
            let cluster = cluster.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    ready(Ok::<_, Infallible>(handle(&cluster.shared.store, req.method(), req.uri(), req.headers())))
                });
                // A client hanging up mid-request, or a cut watch, ends the connection: nothing to report.
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok((addr, task))
}
