//! The Kubernetes manifests under `deploy/kubernetes`: every object parses into its Kubernetes type, and each
//! overlay, rendered as kustomize renders it, is a drop-in for Istio's `istio-eastwestgateway` (the Service's
//! name, labels, selector and ports; the pods' labels, probe and grace) with a least-privilege control service.
//!
//! kustomize is not available to the tests, so `render` implements the part of it the manifests use:
//! `resources`, `components` and `patches` by path with strategic-merge patches. Anything else in a
//! kustomization, and any list whose merge key it does not know, fails the test rather than render wrongly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const SYSTEM_NAMESPACE: &str = "istio-system";
const GATEWAY_SERVICE: &str = "istio-eastwestgateway";
const GATEWAY_DEPLOYMENT: &str = "crossgate-eastwestgateway";
const GATEWAY_CONTAINER: &str = "crossgate-proxy";
const CONTROL: &str = "crossgate-control";

/// Each overlay with the cluster ID and network it must give, as Istio's multi-primary multi-network walkthrough.
const OVERLAYS: &[(&str, &str, &str)] = &[("cluster1", "cluster1", "network1"), ("cluster2", "cluster2", "network2")];

/// The ports of Istio's `istio-eastwestgateway` Service (gen-eastwest-gateway.sh), in its order: name, port and
/// target port.
const ISTIO_GATEWAY_PORTS: &[(&str, i32)] =
    &[("status-port", 15021), ("tls", 15443), ("tls-istiod", 15012), ("tls-webhook", 15017)];

/// Read grants of Istio's `istio-reader-clusterrole` (istio-discovery `reader-clusterrole.yaml`) for the core kinds,
/// endpointslices and Istio's networking API, as (API group, resource); "*" is every resource of the group. It is
/// the role of the ServiceAccount whose token `istioctl create-remote-secret` puts in a remote secret.
const ISTIO_READER: &[(&str, &str)] = &[
    ("", "endpoints"),
    ("", "pods"),
    ("", "services"),
    ("", "nodes"),
    ("", "replicationcontrollers"),
    ("", "namespaces"),
    ("", "secrets"),
    ("discovery.k8s.io", "endpointslices"),
    ("networking.istio.io", "*"),
];

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every YAML document of a file, refusing empty ones.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            let value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            assert!(!matches!(value, Value::Null), "{}: an empty YAML document", path.display());
            value
        })
        .collect()
}

fn single_document(path: &Path) -> Value {
    let mut documents = documents(path);
    assert_eq!(documents.len(), 1, "{}: one document expected", path.display());
    documents.remove(0)
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// What identifies an object to kustomize: apiVersion, kind, namespace and name.
fn object_id(object: &Value) -> String {
    let namespace = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    format!(
        "{} {} {namespace}/{}",
        str_at(object, "/apiVersion"),
        str_at(object, "/kind"),
        str_at(object, "/metadata/name")
    )
}

// ---- a kustomize for what the manifests use ----

/// A kustomization file: what it lists, with paths resolved against its directory.
struct Kustomization {
    resources: Vec<PathBuf>,
    components: Vec<PathBuf>,
    patches: Vec<PathBuf>,
}

fn read_kustomization(dir: &Path, kind: &str) -> Kustomization {
    let path = dir.join("kustomization.yaml");
    let value = single_document(&path);
    let api_version = if kind == "Component" { "v1alpha1" } else { "v1beta1" };
    assert_eq!(str_at(&value, "/apiVersion"), format!("kustomize.config.k8s.io/{api_version}"), "{}", path.display());
    assert_eq!(str_at(&value, "/kind"), kind, "{}", path.display());
    let fields = value.as_object().unwrap();
    for key in fields.keys() {
        assert!(
            ["apiVersion", "kind", "resources", "components", "patches"].contains(&key.as_str()),
            "{}: `{key}` is not rendered by this test; teach `render` about it",
            path.display()
        );
    }
    let paths = |key: &str, entry: fn(&Value) -> &str| -> Vec<PathBuf> {
        let entries = fields.get(key).map(|v| v.as_array().expect("a list").as_slice()).unwrap_or_default();
        entries
            .iter()
            .map(|e| {
                let resolved = dir.join(entry(e));
                assert!(resolved.exists(), "{}: `{key}` names {}, which does not exist", path.display(), entry(e));
                resolved
            })
            .collect()
    };
    Kustomization {
        resources: paths("resources", |e| e.as_str().expect("a resource is a path")),
        components: paths("components", |e| e.as_str().expect("a component is a path")),
        patches: paths("patches", |e| {
            let fields = e.as_object().expect("a patch is a map");
            assert_eq!(fields.len(), 1, "only `patches: [{{path: FILE}}]` is rendered by this test, not {e}");
            e["path"].as_str().expect("a patch path")
        }),
    }
}

/// The objects `kustomize build dir` writes, as if the kustomization also listed `extra_components`.
fn render(dir: &Path, extra_components: &[PathBuf]) -> Vec<Value> {
    let kustomization = read_kustomization(dir, "Kustomization");
    let mut objects = Vec::new();
    for resource in &kustomization.resources {
        if resource.is_dir() {
            objects.extend(render(resource, &[]));
        } else {
            objects.extend(documents(resource));
        }
    }
    for component in kustomization.components.iter().chain(extra_components) {
        apply_component(component, &mut objects);
    }
    apply_patches(&kustomization.patches, &mut objects);
    let mut ids = BTreeSet::new();
    for object in &objects {
        assert!(ids.insert(object_id(object)), "{}: {} twice", dir.display(), object_id(object));
    }
    objects
}

/// A Component's resources join those of the kustomization that lists it, and its patches apply to them all.
fn apply_component(dir: &Path, objects: &mut Vec<Value>) {
    let component = read_kustomization(dir, "Component");
    assert!(component.components.is_empty(), "{}: nested components are not rendered by this test", dir.display());
    for resource in &component.resources {
        objects.extend(documents(resource));
    }
    apply_patches(&component.patches, objects);
}

fn apply_patches(patches: &[PathBuf], objects: &mut [Value]) {
    for path in patches {
        let patch = single_document(path);
        let id = object_id(&patch);
        let mut targets = objects.iter_mut().filter(|o| object_id(o) == id);
        let target = targets.next().unwrap_or_else(|| panic!("{}: no object {id} to patch", path.display()));
        strategic_merge(target, &patch, &path.display().to_string());
    }
}

/// A strategic merge patch (Kubernetes' `strategicpatch` semantics) without its directives: maps merge, lists of
/// objects merge on their merge key, everything else is replaced.
fn strategic_merge(target: &mut Value, patch: &Value, at: &str) {
    let (Value::Object(target), Value::Object(patch)) = (target, patch) else {
        panic!("{at}: a patch and its target must both be maps");
    };
    for (key, patch_value) in patch {
        let here = format!("{at}.{key}");
        assert!(!key.starts_with('$') && !patch_value.is_null(), "{here}: patch directives are not rendered here");
        match (target.get_mut(key), patch_value) {
            (Some(existing @ Value::Object(_)), Value::Object(_)) => strategic_merge(existing, patch_value, &here),
            (Some(Value::Array(existing)), Value::Array(items)) => merge_list(key, existing, items, &here),
            _ => {
                target.insert(key.clone(), patch_value.clone());
            }
        }
    }
}

fn merge_list(field: &str, existing: &mut Vec<Value>, items: &[Value], at: &str) {
    // The patchMergeKey of each list the patches touch, from the Kubernetes API types; lists of strings
    // (command, args) have none and are replaced whole.
    let merge_key = match field {
        "containers" | "initContainers" | "env" | "volumes" => "name",
        "volumeMounts" => "mountPath",
        "ports" if existing.iter().all(|p| p.get("containerPort").is_some()) => "containerPort",
        "ports" => "port",
        "command" | "args" => {
            *existing = items.to_vec();
            return;
        }
        _ => panic!("{at}: the merge key of `{field}` is not known to this test; add it from the API type"),
    };
    for item in items {
        let key = item.get(merge_key).unwrap_or_else(|| panic!("{at}: an item without its merge key {merge_key}"));
        match existing.iter_mut().find(|e| e.get(merge_key) == Some(key)) {
            Some(found) => strategic_merge(found, item, &format!("{at}[{merge_key}={key}]")),
            None => existing.push(item.clone()),
        }
    }
}

// ---- typed objects ----

/// Parses into a Kubernetes type and back, and requires the same object: k8s-openapi skips unknown fields and
/// defaults missing required ones, so a misspelt or misplaced field shows only as a difference.
fn typed<T: DeserializeOwned + Serialize>(value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", object_id(value), std::any::type_name::<T>()));
    let again = serde_json::to_value(&object).unwrap();
    if let Some(difference) = first_difference(value, &again, String::new()) {
        panic!("{}: {difference} (a field the Kubernetes type does not have, or lacks)", object_id(value));
    }
    object
}

fn first_difference(written: &Value, parsed: &Value, at: String) -> Option<String> {
    match (written, parsed) {
        (Value::Object(a), Value::Object(b)) => {
            a.keys().chain(b.keys()).collect::<BTreeSet<_>>().into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => first_difference(x, y, format!("{at}.{k}")),
                (Some(_), None) => Some(format!("{at}.{k} is lost when parsed")),
                (None, _) => Some(format!("{at}.{k} is required and missing")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| first_difference(x, y, format!("{at}[{i}]")))
        }
        _ if written == parsed => None,
        _ => Some(format!("{at}: {written} reads back as {parsed}")),
    }
}

/// The objects of one rendering, typed. Only the kinds crossgate deploys are accepted.
#[derive(Default)]
struct Objects {
    deployments: BTreeMap<String, Deployment>,
    services: BTreeMap<String, Service>,
    service_accounts: BTreeMap<String, ServiceAccount>,
    budgets: BTreeMap<String, PodDisruptionBudget>,
    autoscalers: BTreeMap<String, HorizontalPodAutoscaler>,
    cluster_roles: BTreeMap<String, ClusterRole>,
    cluster_role_bindings: BTreeMap<String, ClusterRoleBinding>,
    roles: BTreeMap<String, Role>,
    role_bindings: BTreeMap<String, RoleBinding>,
}

impl Objects {
    fn new(values: &[Value]) -> Self {
        let mut objects = Objects::default();
        for value in values {
            let name = str_at(value, "/metadata/name").to_owned();
            let first = match (str_at(value, "/apiVersion"), str_at(value, "/kind")) {
                ("apps/v1", "Deployment") => objects.deployments.insert(name, typed(value)).is_none(),
                ("v1", "Service") => objects.services.insert(name, typed(value)).is_none(),
                ("v1", "ServiceAccount") => objects.service_accounts.insert(name, typed(value)).is_none(),
                ("policy/v1", "PodDisruptionBudget") => objects.budgets.insert(name, typed(value)).is_none(),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => {
                    objects.autoscalers.insert(name, typed(value)).is_none()
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    objects.cluster_roles.insert(name, typed(value)).is_none()
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    objects.cluster_role_bindings.insert(name, typed(value)).is_none()
                }
                ("rbac.authorization.k8s.io/v1", "Role") => objects.roles.insert(name, typed(value)).is_none(),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    objects.role_bindings.insert(name, typed(value)).is_none()
                }
                (api_version, kind) => {
                    panic!("{}: {api_version} {kind} is not a kind crossgate deploys", object_id(value))
                }
            };
            assert!(first, "{}: twice", object_id(value));
        }
        objects
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments.get(name).unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    fn pod(&self, deployment: &str) -> (&BTreeMap<String, String>, &BTreeMap<String, String>, &PodSpec) {
        let template = &self.deployment(deployment).spec.as_ref().unwrap().template;
        let metadata = template.metadata.as_ref().unwrap();
        (metadata.labels.as_ref().unwrap(), metadata.annotations.as_ref().unwrap(), template.spec.as_ref().unwrap())
    }

    fn container(&self, deployment: &str, name: &str) -> &Container {
        let (_, _, spec) = self.pod(deployment);
        spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{deployment}: no container {name}"))
    }

    fn service(&self, name: &str) -> &Service {
        self.services.get(name).unwrap_or_else(|| panic!("no Service {name}"))
    }
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container.env.as_deref()?.iter().find(|e| e.name == name)?.value.as_deref()
}

fn container_ports(container: &Container) -> BTreeMap<i32, &str> {
    container.ports.iter().flatten().map(|p| (p.container_port, p.name.as_deref().unwrap_or(""))).collect()
}

/// The value after a flag in a container's args.
fn flag<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    let args = container.args.as_deref()?;
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// Whole seconds from a duration written as `25s`.
fn seconds(duration: &str) -> i64 {
    duration.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| {
        panic!("{duration}: write durations in the manifests as whole seconds (`25s`), which this test compares")
    })
}

/// The components shipped under `components/`.
fn components() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(kubernetes_dir().join("components")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs
}

/// One rendering of an overlay with some of the components.
struct Rendering {
    what: String,
    cluster: &'static str,
    network: &'static str,
    components: Vec<String>,
    objects: Objects,
}

impl Rendering {
    fn with(&self, component: &str) -> bool {
        self.components.iter().any(|c| c == component)
    }
}

/// Every overlay, alone, with each component and with all of them.
fn renderings() -> Vec<Rendering> {
    let components = components();
    let mut choices: Vec<Vec<PathBuf>> = vec![vec![]];
    choices.extend(components.iter().map(|c| vec![c.clone()]));
    choices.push(components);
    let mut renderings = Vec::new();
    for &(overlay, cluster, network) in OVERLAYS {
        for chosen in &choices {
            let names: Vec<String> =
                chosen.iter().map(|c| c.file_name().unwrap().to_string_lossy().into_owned()).collect();
            let values = render(&kubernetes_dir().join("overlays").join(overlay), chosen);
            renderings.push(Rendering {
                what: format!("overlays/{overlay} with {names:?}"),
                cluster,
                network,
                components: names,
                objects: Objects::new(&values),
            });
        }
    }
    renderings
}

// ---- the tests ----

#[test]
fn every_overlay_is_listed_with_its_cluster_and_network() {
    let mut found: Vec<String> = std::fs::read_dir(kubernetes_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let listed: Vec<&str> = OVERLAYS.iter().map(|o| o.0).collect();
    assert_eq!(found, listed, "a new overlay needs its cluster ID and network in OVERLAYS");
}

#[test]
fn every_file_is_a_kustomization_resource_or_patch_and_every_reference_exists() {
    let mut referenced = BTreeSet::new();
    let mut yaml_files = BTreeSet::new();
    let mut pending = vec![kubernetes_dir()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path().canonicalize().unwrap();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().unwrap() == "kustomization.yaml" {
                let kind = str_at(&single_document(&path), "/kind").to_owned();
                let kustomization = read_kustomization(path.parent().unwrap(), &kind);
                let files = kustomization.resources.iter().chain(&kustomization.patches).filter(|p| p.is_file());
                referenced.extend(files.map(|p| p.canonicalize().unwrap()));
                for dir in kustomization.resources.iter().chain(&kustomization.components).filter(|p| p.is_dir()) {
                    assert!(dir.join("kustomization.yaml").is_file(), "{}: no kustomization.yaml", dir.display());
                }
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                yaml_files.insert(path);
            }
        }
    }
    let unused: Vec<_> = yaml_files.difference(&referenced).collect();
    assert!(unused.is_empty(), "manifests no kustomization uses: {unused:?}");
}

#[test]
fn every_object_parses_into_its_kubernetes_type() {
    // The base's resources as written; the patches of overlays and components as part of what they render.
    let base = render(&kubernetes_dir().join("base"), &[]);
    for object in &base {
        let namespace = object.pointer("/metadata/namespace").and_then(Value::as_str);
        let cluster_scoped = matches!(str_at(object, "/kind"), "ClusterRole" | "ClusterRoleBinding");
        let expected = if cluster_scoped { None } else { Some(SYSTEM_NAMESPACE) };
        assert_eq!(namespace, expected, "{}: everything lives beside istiod", object_id(object));
    }
    let objects = Objects::new(&base);
    assert_eq!(objects.deployments.keys().collect::<Vec<_>>(), [CONTROL, GATEWAY_DEPLOYMENT]);
    assert_eq!(objects.services.keys().collect::<Vec<_>>(), [CONTROL, GATEWAY_SERVICE]);
    assert_eq!(renderings().len(), OVERLAYS.len() * (components().len() + 2));
}

#[test]
fn the_gateway_service_is_istios() {
    for r in renderings() {
        let service = r.objects.service(GATEWAY_SERVICE);
        let metadata = &service.metadata;
        assert_eq!(metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE), "{}", r.what);
        let istio_labels = BTreeMap::from([
            ("app".to_owned(), "istio-eastwestgateway".to_owned()),
            ("istio".to_owned(), "eastwestgateway".to_owned()),
            ("topology.istio.io/network".to_owned(), r.network.to_owned()),
        ]);
        let labels = metadata.labels.as_ref().unwrap();
        for (key, value) in &istio_labels {
            assert_eq!(labels.get(key), Some(value), "{}: Service label {key}", r.what);
        }
        let spec = service.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"), "{}", r.what);
        assert_eq!(spec.selector.as_ref(), Some(&istio_labels), "{}: Istio selects on all its gateway labels", r.what);
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.target_port.clone(), p.protocol.as_deref()))
            .collect();
        let istio: Vec<_> = ISTIO_GATEWAY_PORTS
            .iter()
            .map(|&(name, port)| (Some(name), port, Some(IntOrString::Int(port)), Some("TCP")))
            .collect();
        assert_eq!(ports, istio, "{}: Istio's ports, in its order", r.what);
    }
}

#[test]
fn the_gateway_pods_are_what_the_service_and_istios_gateways_select() {
    for r in renderings() {
        let (labels, annotations, spec) = r.objects.pod(GATEWAY_DEPLOYMENT);
        let selector = r.objects.service(GATEWAY_SERVICE).spec.as_ref().unwrap().selector.as_ref().unwrap();
        for (key, value) in selector {
            assert_eq!(labels.get(key), Some(value), "{}: the Service selects {key}={value}", r.what);
        }
        // What expose-services.yaml's `cross-network-gateway` and expose-istiod.yaml's `istiod-gateway` select.
        assert_eq!(labels.get("istio").map(String::as_str), Some("eastwestgateway"), "{}", r.what);
        assert_eq!(labels.get("sidecar.istio.io/inject").map(String::as_str), Some("false"), "{}", r.what);

        let deployment = r.objects.deployment(GATEWAY_DEPLOYMENT);
        let deployment_spec = deployment.spec.as_ref().unwrap();
        let match_labels = deployment_spec.selector.match_labels.as_ref().unwrap();
        assert!(match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)), "{}: the Deployment's selector", r.what);
        assert_eq!(deployment.metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE));
        // The autoscaler owns the replica count; a re-apply must not reset it.
        assert_eq!(deployment_spec.replicas, None, "{}", r.what);

        for (key, value) in [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "15090"),
            ("prometheus.io/path", "/stats/prometheus"),
        ] {
            assert_eq!(annotations.get(key).map(String::as_str), Some(value), "{}: pod annotation {key}", r.what);
        }
        let container = r.objects.container(GATEWAY_DEPLOYMENT, GATEWAY_CONTAINER);
        let ports = container_ports(container);
        assert_eq!(ports.get(&15090), Some(&"http-envoy-prom"), "{}: metrics port", r.what);
        for (name, port) in [("status-port", 15021), ("tls", 15443)] {
            assert_eq!(ports.get(&port), Some(&name), "{}: container port {port}", r.what);
        }

        let anti_affinity = spec.affinity.as_ref().and_then(|a| a.pod_anti_affinity.as_ref()).unwrap();
        let terms = anti_affinity.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap();
        assert!(
            terms.iter().any(|t| t.pod_affinity_term.topology_key == "kubernetes.io/hostname"
                && t.pod_affinity_term.label_selector.as_ref().and_then(|s| s.match_labels.as_ref())
                    == Some(match_labels)),
            "{}: one gateway per node, preferred",
            r.what
        );
        assert_eq!(spec.service_account_name.as_deref(), Some(GATEWAY_DEPLOYMENT));
        assert!(r.objects.service_accounts.contains_key(GATEWAY_DEPLOYMENT), "{}", r.what);
        assert_eq!(spec.automount_service_account_token, Some(false), "{}: the gateway needs no API token", r.what);
    }
}

#[test]
fn the_gateway_is_ready_and_drains_as_istios() {
    for r in renderings() {
        let container = r.objects.container(GATEWAY_DEPLOYMENT, GATEWAY_CONTAINER);
        let probe = container.readiness_probe.as_ref().unwrap();
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"), "{}", r.what);
        assert_eq!(get.port, IntOrString::Int(15021), "{}", r.what);
        // Istio's gateway probe (manifests/charts/gateways/istio-ingress).
        assert_eq!(
            (probe.initial_delay_seconds, probe.period_seconds, probe.timeout_seconds, probe.failure_threshold),
            (Some(1), Some(2), Some(1), Some(30)),
            "{}",
            r.what
        );
        assert!(container.liveness_probe.is_none(), "{}: a draining gateway must not be restarted", r.what);

        let (_, _, spec) = r.objects.pod(GATEWAY_DEPLOYMENT);
        let drain = seconds(env(container, "CROSSGATE_DRAIN_DURATION").unwrap());
        let grace = seconds(env(container, "CROSSGATE_TERMINATION_GRACE").unwrap());
        let pod_grace = spec.termination_grace_period_seconds.unwrap();
        assert!(drain < grace, "{}: the listener drain ends before open tunnels are closed", r.what);
        assert!(grace < pod_grace, "{}: the gateway closes its tunnels before the kubelet kills it", r.what);
    }
}

#[test]
fn every_container_runs_unprivileged() {
    for r in renderings() {
        for (name, deployment) in &r.objects.deployments {
            let spec = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let pod = spec.security_context.as_ref();
            for container in &spec.containers {
                let at = format!("{}: {name}/{}", r.what, container.name);
                let sc = container.security_context.as_ref().unwrap_or_else(|| panic!("{at}: no securityContext"));
                let non_root = sc.run_as_non_root.or(pod.and_then(|p| p.run_as_non_root));
                let user = sc.run_as_user.or(pod.and_then(|p| p.run_as_user));
                assert_eq!(non_root, Some(true), "{at}");
                assert!(user.is_some_and(|u| u != 0), "{at}: a non-root UID");
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{at}");
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{at}");
                assert_ne!(sc.privileged, Some(true), "{at}");
                let capabilities = sc.capabilities.as_ref().unwrap();
                assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{at}");
                assert!(capabilities.add.as_deref().unwrap_or_default().is_empty(), "{at}");
                for port in container.ports.iter().flatten() {
                    assert!(port.container_port >= 1024, "{at}: port {} needs NET_BIND_SERVICE", port.container_port);
                }
                assert!(container.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some(), "{at}: requests");
            }
        }
    }
}

#[test]
fn the_gateway_keeps_a_replica_through_disruptions() {
    for r in renderings() {
        let hpa = r.objects.autoscalers.get(GATEWAY_DEPLOYMENT).unwrap().spec.as_ref().unwrap();
        assert_eq!(
            (hpa.scale_target_ref.api_version.as_deref(), hpa.scale_target_ref.kind.as_str()),
            (Some("apps/v1"), "Deployment")
        );
        assert_eq!(hpa.scale_target_ref.name, GATEWAY_DEPLOYMENT, "{}", r.what);
        let cpu = hpa.metrics.iter().flatten().find_map(|m| m.resource.as_ref().filter(|r| r.name == "cpu")).unwrap();
        assert_eq!((cpu.target.type_.as_str(), cpu.target.average_utilization), ("Utilization", Some(80)));
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 5), "{}", r.what);

        let pdb = r.objects.budgets.get(GATEWAY_DEPLOYMENT).unwrap().spec.as_ref().unwrap();
        assert_eq!(pdb.min_available, Some(IntOrString::Int(1)), "{}", r.what);
        assert!(1 < hpa.min_replicas.unwrap(), "{}: the budget must let one pod go", r.what);
        let (labels, _, _) = r.objects.pod(GATEWAY_DEPLOYMENT);
        let selector = pdb.selector.as_ref().and_then(|s| s.match_labels.as_ref()).unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "{}: the budget selects the gateway", r.what);
    }
}

/// (API group, resource) pairs a rule grants, requiring read-only verbs and no wildcards.
fn read_only_grants(rules: &[PolicyRule], at: &str) -> BTreeSet<(String, String)> {
    let mut grants = BTreeSet::new();
    for rule in rules {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{at}: read-only verbs");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{at}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                assert!(group != "*" && resource != "*", "{at}: no wildcards");
                grants.insert((group.clone(), resource.clone()));
            }
        }
    }
    grants
}

#[test]
fn the_control_service_reads_only_what_it_watches_and_secrets_only_in_the_system_namespace() {
    let grant = |group: &str, resource: &str| (group.to_owned(), resource.to_owned());
    for r in renderings() {
        let objects = &r.objects;
        assert_eq!(objects.cluster_roles.keys().collect::<Vec<_>>(), [CONTROL], "{}", r.what);
        assert_eq!(objects.roles.keys().collect::<Vec<_>>(), [CONTROL], "{}", r.what);
        let cluster_grants = read_only_grants(objects.cluster_roles[CONTROL].rules.as_deref().unwrap(), &r.what);
        let watched = BTreeSet::from([
            grant("", "services"),
            grant("", "pods"),
            grant("", "nodes"),
            grant("", "namespaces"),
            grant("discovery.k8s.io", "endpointslices"),
            grant("networking.istio.io", "destinationrules"),
        ]);
        assert_eq!(cluster_grants, watched, "{}: cluster-wide", r.what);

        let role = &objects.roles[CONTROL];
        assert_eq!(role.metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE), "{}", r.what);
        let namespaced = read_only_grants(role.rules.as_deref().unwrap(), &r.what);
        assert_eq!(namespaced, BTreeSet::from([grant("", "secrets")]), "{}: remote secrets", r.what);

        // In remote clusters crossgate-control uses the remote secrets' token, Istio's reader.
        for (group, resource) in cluster_grants.iter().chain(&namespaced) {
            assert!(
                ISTIO_READER.iter().any(|&(g, r)| g == group && (r == resource || r == "*")),
                "{}: {group}/{resource} is not granted by Istio's reader role in remote clusters",
                r.what
            );
        }

        let subject = |subjects: Option<&Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            let subjects = subjects.unwrap();
            assert_eq!(subjects.len(), 1);
            (subjects[0].kind.clone(), subjects[0].name.clone(), subjects[0].namespace.clone())
        };
        let control_account = ("ServiceAccount".to_owned(), CONTROL.to_owned(), Some(SYSTEM_NAMESPACE.to_owned()));
        assert_eq!(objects.cluster_role_bindings.keys().collect::<Vec<_>>(), [CONTROL]);
        assert_eq!(objects.role_bindings.keys().collect::<Vec<_>>(), [CONTROL]);
        let binding = &objects.cluster_role_bindings[CONTROL];
        assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("ClusterRole", CONTROL));
        assert_eq!(subject(binding.subjects.as_ref()), control_account);
        let binding = &objects.role_bindings[CONTROL];
        assert_eq!(binding.metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE));
        assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("Role", CONTROL));
        assert_eq!(subject(binding.subjects.as_ref()), control_account);

        let (_, _, spec) = objects.pod(CONTROL);
        assert_eq!(spec.service_account_name.as_deref(), Some(CONTROL), "{}", r.what);
        assert!(objects.service_accounts.contains_key(CONTROL), "{}", r.what);
    }
}

#[test]
fn each_overlay_gives_one_cluster_id_and_one_network() {
    for r in renderings() {
        let gateway = r.objects.container(GATEWAY_DEPLOYMENT, GATEWAY_CONTAINER);
        assert_eq!(env(gateway, "ISTIO_META_CLUSTER_ID"), Some(r.cluster), "{}", r.what);
        assert_eq!(env(gateway, "ISTIO_META_NETWORK"), Some(r.network), "{}", r.what);
        // As gen-eastwest-gateway.sh: the gateway routes only to endpoints of its own network.
        assert_eq!(env(gateway, "ISTIO_META_REQUESTED_NETWORK_VIEW"), Some(r.network), "{}", r.what);
        let (labels, _, _) = r.objects.pod(GATEWAY_DEPLOYMENT);
        assert_eq!(labels.get("topology.istio.io/network").map(String::as_str), Some(r.network), "{}", r.what);
        let service_labels = r.objects.service(GATEWAY_SERVICE).metadata.labels.as_ref().unwrap();
        assert_eq!(service_labels.get("topology.istio.io/network").map(String::as_str), Some(r.network));

        let control = r.objects.container(CONTROL, CONTROL);
        assert_eq!(env(control, "CLUSTER_ID"), Some(r.cluster), "{}", r.what);
        assert_eq!(flag(control, "--cluster-id"), Some("$(CLUSTER_ID)"), "{}", r.what);
        assert_eq!(flag(control, "--system-namespace"), Some(SYSTEM_NAMESPACE), "{}", r.what);
        assert!(control.args.iter().flatten().any(|a| a == "--remote-secrets"), "{}", r.what);
    }
}

#[test]
fn the_gateway_reaches_the_control_service() {
    for r in renderings() {
        let gateway = r.objects.container(GATEWAY_DEPLOYMENT, GATEWAY_CONTAINER);
        let xds = env(gateway, "CROSSGATE_XDS").unwrap();
        let scheme = if r.with("xds-mtls") { "https" } else { "http" };
        assert_eq!(xds, format!("{scheme}://{CONTROL}.{SYSTEM_NAMESPACE}.svc:15010"), "{}", r.what);

        let service = r.objects.service(CONTROL);
        assert_eq!(service.metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE));
        let spec = service.spec.as_ref().unwrap();
        let (labels, annotations, _) = r.objects.pod(CONTROL);
        assert!(spec.selector.as_ref().unwrap().iter().all(|(k, v)| labels.get(k) == Some(v)), "{}", r.what);
        let control = r.objects.container(CONTROL, CONTROL);
        let ports = container_ports(control);
        for port in spec.ports.iter().flatten() {
            assert_eq!(port.target_port, Some(IntOrString::Int(port.port)));
            assert_eq!(ports.get(&port.port).copied(), port.name.as_deref(), "{}: control port {}", r.what, port.port);
        }
        assert_eq!(flag(control, "--listen"), Some("0.0.0.0:15010"), "{}", r.what);
        assert_eq!(flag(control, "--admin-addr"), Some("0.0.0.0:15014"), "{}", r.what);
        let get = control.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((get.path.as_deref(), &get.port), (Some("/ready"), &IntOrString::Int(15014)), "{}", r.what);
        assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("15014"));
        assert_eq!(annotations.get("prometheus.io/path").map(String::as_str), Some("/metrics"));
    }
}

#[test]
fn expose_istiod_serves_the_ports_the_service_carries() {
    for r in renderings() {
        let gateway = r.objects.container(GATEWAY_DEPLOYMENT, GATEWAY_CONTAINER);
        let ports = container_ports(gateway);
        let passthrough = env(gateway, "CROSSGATE_ISTIOD_PASSTHROUGH");
        if r.with("expose-istiod") {
            // As expose-istiod.yaml's VirtualService: 15012 to istiod's 15012, 15017 to istiod's webhook port 443.
            let expected = "15012=istiod.istio-system.svc:15012,15017=istiod.istio-system.svc:443";
            assert_eq!(passthrough, Some(expected), "{}", r.what);
            assert_eq!(ports.get(&15012), Some(&"tls-istiod"), "{}", r.what);
            assert_eq!(ports.get(&15017), Some(&"tls-webhook"), "{}", r.what);
        } else {
            assert_eq!(passthrough, None, "{}: istiod is exposed only with the component", r.what);
            assert!(!ports.contains_key(&15012) && !ports.contains_key(&15017), "{}", r.what);
        }
        // Every Service port lands on a port the gateway serves, or on istiod's only with the component.
        for port in r.objects.service(GATEWAY_SERVICE).spec.as_ref().unwrap().ports.iter().flatten() {
            let served = ports.contains_key(&port.port);
            assert!(
                served || matches!(port.port, 15012 | 15017),
                "{}: port {} is served by nothing",
                r.what,
                port.port
            );
        }
    }
}

#[test]
fn xds_mtls_mounts_each_side_its_certificates() {
    for r in renderings().into_iter().filter(|r| r.with("xds-mtls")) {
        let mounted = |deployment: &str, container: &Container, secret: &str| -> String {
            let (_, _, spec) = r.objects.pod(deployment);
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
                .unwrap_or_else(|| panic!("{}: {deployment} does not mount the Secret {secret}", r.what));
            let mount = container.volume_mounts.iter().flatten().find(|m| m.name == volume.name).unwrap();
            assert_eq!(mount.read_only, Some(true));
            mount.mount_path.clone()
        };
        let gateway = r.objects.container(GATEWAY_DEPLOYMENT, GATEWAY_CONTAINER);
        let dir = mounted(GATEWAY_DEPLOYMENT, gateway, "crossgate-proxy-xds-certs");
        for (name, file) in
            [("CROSSGATE_XDS_CA", "ca.crt"), ("CROSSGATE_XDS_CERT", "tls.crt"), ("CROSSGATE_XDS_KEY", "tls.key")]
        {
            assert_eq!(env(gateway, name), Some(format!("{dir}/{file}").as_str()), "{}", r.what);
        }
        let control = r.objects.container(CONTROL, CONTROL);
        let dir = mounted(CONTROL, control, "crossgate-control-certs");
        for (name, file) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-client-ca", "ca.crt")] {
            assert_eq!(flag(control, name), Some(format!("{dir}/{file}").as_str()), "{}", r.what);
        }
    }
}
