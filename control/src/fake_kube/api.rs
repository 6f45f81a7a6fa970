//! The resource types the fake serves, its `Status` errors and its discovery documents.

use serde_json::{Value, json};

/// One served resource type; the table below is what the control service watches (ISTIO-SEMANTICS.md §6).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ResourceType {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }
}

const fn core(plural: &'static str, kind: &'static str, namespaced: bool) -> ResourceType {
    ResourceType { group: "", version: "v1", plural, kind, namespaced }
}

pub(super) static RESOURCES: &[ResourceType] = &[
    core("services", "Service", true),
    core("pods", "Pod", true),
    core("secrets", "Secret", true),
    core("nodes", "Node", false),
    core("namespaces", "Namespace", false),
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    ResourceType {
        group: "networking.istio.io",
        version: "v1",
        plural: "destinationrules",
        kind: "DestinationRule",
        namespaced: true,
    },
];

pub(super) fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES.iter().find(|rt| rt.kind == kind && rt.api_version() == api_version)
}

/// A failed request, rendered as the JSON `Status` body kube-apiserver sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            410 => "Expired",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "",
        };
        Self { code, reason, message: message.into() }
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// `GET /api`.
pub(super) fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

/// `GET /apis`: the groups with at least one served resource type.
pub(super) fn group_list(served: impl Fn(&ResourceType) -> bool) -> Value {
    let mut groups: Vec<&ResourceType> = RESOURCES.iter().filter(|rt| !rt.group.is_empty() && served(rt)).collect();
    groups.dedup_by_key(|rt| rt.group);
    let groups: Vec<Value> = groups
        .iter()
        .map(|rt| {
            let gv = json!({"groupVersion": rt.api_version(), "version": rt.version});
            json!({"name": rt.group, "versions": [gv], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `/apis/{group}/{version}`; `None` when nothing in it is served (its paths 404).
pub(super) fn resource_list(group: &str, version: &str, served: impl Fn(&ResourceType) -> bool) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|rt| rt.group == group && rt.version == version && served(rt))
        .map(|rt| {
            json!({
                "name": rt.plural,
                "singularName": rt.kind.to_lowercase(),
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    (!resources.is_empty())
        .then(|| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}
