use std::time::Duration;

use crossgate_istio::node::GatewayNode;

use super::*;
use crate::views::{ViewOptions, gateway_view};

fn parse(text: &str) -> MeshFile {
    MeshFile::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_issue_shape_loads_with_istio_defaults() {
    let mesh = parse(
        r#"
clusters:
- name: cluster1
  network: network1
  services:
  - name: helloworld
    namespace: sample
    ports: [{ port: 5000, target_port: 5000 }]
    endpoints:
    - address: 10.1.0.5           # the gateway connects to address:target_port
      labels: { app: helloworld, version: v1, security.istio.io/tlsMode: istio }
      locality: us-east1/us-east1-b
"#,
    )
    .model("cluster.local");
    let cluster = &mesh.clusters["cluster1"];
    assert_eq!((cluster.id.as_str(), cluster.network.as_str()), ("cluster1", "network1"));
    let service = &cluster.services[0];
    assert_eq!(service.hostname, "helloworld.sample.svc.cluster.local");
    assert_eq!(service.ports, [ServicePort { name: String::new(), port: 5000, protocol: Protocol::Tcp }]);
    assert!(!service.publish_not_ready);
    let endpoint = &service.endpoints[0];
    assert_eq!(endpoint.address, "10.1.0.5".parse::<IpAddr>().unwrap());
    assert_eq!(endpoint.target_ports, [(5000, 5000)].into());
    assert_eq!(endpoint.network, "network1");
    assert_eq!(endpoint.locality, "us-east1/us-east1-b");
    assert!(endpoint.ready && !endpoint.terminating);
    assert_eq!(endpoint.labels["version"], "v1");
}

#[test]
fn every_field_reaches_the_model() {
    let mesh = parse(
        r#"
clusters:
- name: c1
  network: n1
  services:
  - name: db
    namespace: data
    publish_not_ready: true
    ports:
    - { name: tcp, port: 5432 }
    - { name: dns, port: 53, target_port: 5353, protocol: UDP }
    - { port: 9000, protocol: SCTP }
    endpoints:
    - { address: "fd00::1", network: n2, ready: false, terminating: true, workload_name: db-0, node: node1 }
    - { address: 10.0.0.1, labels: { topology.istio.io/network: n3 }, target_ports: { 5432: 15432 } }
    - { address: 10.0.0.2 }
  destination_rules:
  - name: db
    namespace: data
    host: db.data.svc.cluster.local
    exportTo: [".", other]
    trafficPolicy: { connectionPool: { tcp: { connectTimeout: 300ms } } }
    subsets:
    - { name: primary, labels: { role: primary }, trafficPolicy: { loadBalancer: { simple: RANDOM } } }
"#,
    )
    .model("example.org");
    let cluster = &mesh.clusters["c1"];
    let service = &cluster.services[0];
    assert_eq!(service.hostname, "db.data.svc.example.org");
    assert!(service.publish_not_ready);
    let protocols: Vec<_> = service.ports.iter().map(|p| (p.name.as_str(), p.port, p.protocol)).collect();
    assert_eq!(protocols, [("tcp", 5432, Protocol::Tcp), ("dns", 53, Protocol::Udp), ("", 9000, Protocol::Sctp)]);
    let [first, second, third] = &service.endpoints[..] else { panic!("three endpoints") };
    assert_eq!(first.address, "fd00::1".parse::<IpAddr>().unwrap());
    assert_eq!((first.network.as_str(), first.ready, first.terminating), ("n2", false, true));
    assert_eq!((first.workload_name.as_str(), first.node_name.as_str()), ("db-0", "node1"));
    assert_eq!(first.target_ports, [(53, 5353), (5432, 5432), (9000, 9000)].into());
    // The pod label names the network when the entry does not; else the cluster's network.
    assert_eq!(second.network, "n3");
    assert_eq!(second.target_ports, [(53, 5353), (5432, 15432), (9000, 9000)].into());
    assert_eq!(third.network, "n1");
    let rule = &cluster.destination_rules[0];
    assert_eq!(rule.export_to, [".", "other"]);
    let timeout = rule.traffic_policy.as_ref().and_then(|p| p.connection_pool.as_ref()?.tcp.as_ref()?.connect_timeout);
    assert_eq!(timeout, Some(Duration::from_millis(300).into()));
    assert_eq!(rule.subsets[0].labels, [("role".to_owned(), "primary".to_owned())].into());
    assert!(rule.subsets[0].traffic_policy.as_ref().unwrap().load_balancer.is_some());
}

#[test]
fn problems_are_reported_with_their_location() {
    let endpoints = |addresses: &[&str]| addresses.iter().map(|a| format!("    - address: {a}\n")).collect::<String>();
    let cluster2 = |extra: &str, endpoints: &str| {
        format!(
            "clusters:\n- name: cluster1\n- name: cluster2\n  services:\n  - name: helloworld\n    namespace: sample\n    \
             ports: [{{ port: 5000 }}]\n{extra}    endpoints:\n{endpoints}"
        )
    };
    let good = endpoints(&["10.1.0.1"]);
    let at = r#"clusters[1] "cluster2": services[0] "helloworld""#;
    // (file, the problems expected, in order)
    let table: Vec<(String, Vec<String>)> = vec![
        (
            cluster2("", &endpoints(&["10.1.0.1", "fd00::1", "10.1.0.x"])),
            vec![format!(r#"{at}: endpoints[2].address: "10.1.0.x" is not an IP address"#)],
        ),
        (
            cluster2("    publish_not_ready: true\n", &format!("{good}      locality: a/b/c/d\n      network: n1\n      labels: {{ topology.istio.io/network: n2 }}\n      target_ports: {{ 5001: 0 }}\n")),
            vec![
                format!(r#"{at}: endpoints[0].locality: "a/b/c/d" has more than region/zone/subzone"#),
                format!("{at}: endpoints[0].target_ports[5001]: 5001 is not a port of the service"),
                format!("{at}: endpoints[0].target_ports[5001]: 0 is not a port from 1 to 65535"),
                format!(r#"{at}: endpoints[0].network: "n1" disagrees with the label topology.istio.io/network="n2""#),
            ],
        ),
        (
            "clusters:\n- name: c\n  services:\n  - { name: Hello, namespace: a.b, ports: [{ port: 0 }, { port: 70000, target_port: -1 }, { port: 0 }] }\n  - { name: ok, namespace: x, ports: [] }\n  - { name: ok, namespace: x, ports: [{ port: 1 }] }\n".to_owned(),
            vec![
                r#"clusters[0] "c": services[0] "Hello": name: "Hello" is not a DNS-1123 label (lower case letters, digits, '-')"#.to_owned(),
                r#"clusters[0] "c": services[0] "Hello": namespace: "a.b" is not a DNS-1123 label (lower case letters, digits, '-')"#.to_owned(),
                r#"clusters[0] "c": services[0] "Hello": ports[0].port: 0 is not a port from 1 to 65535"#.to_owned(),
                r#"clusters[0] "c": services[0] "Hello": ports[1].port: 70000 is not a port from 1 to 65535"#.to_owned(),
                r#"clusters[0] "c": services[0] "Hello": ports[1].target_port: -1 is not a port from 1 to 65535"#.to_owned(),
                r#"clusters[0] "c": services[0] "Hello": ports[2].port: 0 is not a port from 1 to 65535"#.to_owned(),
                r#"clusters[0] "c": services[0] "Hello": ports[2].port: 0 is listed twice"#.to_owned(),
                r#"clusters[0] "c": services[1] "ok": ports: is empty (a service needs at least one port)"#.to_owned(),
                r#"clusters[0] "c": services[2] "ok": name: is defined twice in namespace "x""#.to_owned(),
            ],
        ),
        (
            "clusters:\n- name: a\n- name: a\n- name: ''\n".to_owned(),
            vec![r#"clusters[1] "a": name: is defined twice"#.to_owned(), r#"clusters[2] "": name: is empty"#.to_owned()],
        ),
        (
            "clusters:\n- name: c\n  destination_rules:\n  - { name: r, namespace: ns, host: '', exportTo: ['*', 'Bad'], subsets: [{ name: v1.0 }, { name: a }, { name: a }] }\n  - { name: r, namespace: ns, host: h }\n".to_owned(),
            vec![
                r#"clusters[0] "c": destination_rules[0] "r": host: is empty"#.to_owned(),
                r#"clusters[0] "c": destination_rules[0] "r": subsets[0].name: "v1.0" is not a DNS-1123 label (lower case letters, digits, '-')"#.to_owned(),
                r#"clusters[0] "c": destination_rules[0] "r": subsets[2].name: "a" is defined twice"#.to_owned(),
                r#"clusters[0] "c": destination_rules[0] "r": exportTo[1]: "Bad" is not *, . or a namespace"#.to_owned(),
                r#"clusters[0] "c": destination_rules[1] "r": name: is defined twice in namespace "ns""#.to_owned(),
            ],
        ),
    ];
    for (text, expected) in table {
        match MeshFile::parse(&text) {
            Err(MeshError::Invalid(problems)) => assert_eq!(problems, expected, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let error = MeshFile::parse(&cluster2("", &endpoints(&["x", "y"]))).unwrap_err().to_string();
    assert!(error.starts_with("2 problem(s): clusters[1]"), "{error}");
}

#[test]
fn unknown_fields_and_bad_types_are_refused_by_path() {
    // (file, what the message must hold)
    let table = [
        ("clusters:\n- name: c\n  netwrk: n\n", "clusters[0]: unknown field `netwrk`"),
        (
            "clusters:\n- name: c\n  services:\n  - { name: a, namespace: b, ports: [{ port: 1, targetPort: 2 }] }\n",
            "unknown field `targetPort`",
        ),
        (
            "clusters:\n- name: c\n  services:\n  - { name: a, namespace: b, ports: [{ port: 1, protocol: tcp }] }\n",
            "tcp",
        ),
        (
            "clusters:\n- name: c\n  destination_rules:\n  - { name: r, namespace: n, host: h, trafficPolicy: { connectionPool: { tcp: { connectTimeout: 5 } } } }\n",
            "clusters[0].destination_rules[0].trafficPolicy",
        ),
        (
            "clusters:\n- name: c\n  destination_rules:\n  - { name: r, namespace: n, host: h, trafficPolicy: { tls: { mode: ISTIO_MUTUAL } } }\n",
            "unknown field `tls`",
        ),
        ("clusters: {}\n", "clusters"),
    ];
    for (text, expected) in table {
        match MeshFile::parse(text) {
            Err(error @ MeshError::Syntax(_)) => assert!(error.to_string().contains(expected), "{text}: {error}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn the_shipped_mesh_loads_and_splits_by_network() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/mesh.yaml")).unwrap();
    assert_eq!(shipped, EMBEDDED_MESH);
    let mesh = parse(EMBEDDED_MESH).model("cluster.local");
    assert_eq!(mesh.clusters.keys().collect::<Vec<_>>(), ["cluster1", "cluster2"]);
    assert_eq!(mesh.clusters["cluster1"].destination_rules, mesh.clusters["cluster2"].destination_rules);
    let key = |subset: &str| format!("outbound_.5000_.{subset}_.helloworld.sample.svc.cluster.local");
    // (gateway cluster, network view, the addresses of the default, v1 and v2 clusters)
    let v1 = &["127.0.0.1:19443"][..];
    let v2 = &["127.0.0.1:19444"][..];
    let table = [("cluster1", "network1", [v1, v1, &[]]), ("cluster2", "network2", [v2, &[], v2])];
    for (cluster_id, network, expected) in table {
        let gateway = GatewayNode {
            cluster_id: cluster_id.to_owned(),
            requested_network_view: vec![network.to_owned()],
            ..Default::default()
        };
        let view = gateway_view(&mesh, &gateway, &ViewOptions::default());
        assert_eq!(view.len(), 3);
        for (subset, addresses) in ["", "v1", "v2"].into_iter().zip(expected) {
            let sent: Vec<_> = view[&key(subset)].endpoints.iter().map(|e| e.address.as_str()).collect();
            assert_eq!(sent, addresses, "{cluster_id} {subset}");
        }
    }
}

/// A fresh directory under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("crossgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn one_endpoint(address: &str) -> String {
    format!(
        "clusters:\n- name: c1\n  services:\n  - name: a\n    namespace: b\n    ports: [{{ port: 80 }}]\n    endpoints: [{{ address: {address} }}]\n"
    )
}

#[tokio::test]
async fn the_watch_follows_the_file_and_keeps_the_last_good_mesh() {
    let dir = TempDir::new("mesh-watch");
    let path = dir.0.join("mesh.yaml");
    let address = |model: &MeshModel| model.clusters["c1"].services[0].endpoints[0].address.to_string();
    std::fs::write(&path, one_endpoint("10.0.0.1")).unwrap();
    let (updates, mut receiver) = channel::channel(MeshModel::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(watch(path.clone(), "cluster.local".to_owned(), updates, async {
        let _ = stopped.await;
    }));
    let next = async |receiver: &mut channel::Receiver<MeshModel>| {
        tokio::time::timeout(Duration::from_secs(10), receiver.changed()).await.expect("a new mesh in time").unwrap();
        address(&receiver.borrow_and_update())
    };
    assert_eq!(next(&mut receiver).await, "10.0.0.1");
    // A broken version is refused: nothing is published until the next good one.
    std::fs::write(&path, one_endpoint("10.0.0.x")).unwrap();
    tokio::time::sleep(crossgate_files::SETTLE * 3).await;
    std::fs::write(&path, one_endpoint("10.0.0.2")).unwrap();
    assert_eq!(next(&mut receiver).await, "10.0.0.2");
    // A ConfigMap update: a new file renamed over the old one.
    let staged = dir.0.join("..staged");
    std::fs::write(&staged, one_endpoint("10.0.0.3")).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    assert_eq!(next(&mut receiver).await, "10.0.0.3");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bad_first_version_stops_the_watch() {
    let dir = TempDir::new("mesh-bad-start");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, one_endpoint("nope")).unwrap();
    let (updates, _receiver) = channel::channel(MeshModel::default());
    let error = watch(path.clone(), "cluster.local".to_owned(), updates, std::future::pending()).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("mesh.yaml was refused") && message.contains(r#"endpoints[0].address: "nope""#),
        "{message}"
    );
    let (updates, _receiver) = channel::channel(MeshModel::default());
    let missing = watch(dir.0.join("absent.yaml"), String::new(), updates, std::future::pending()).await.unwrap_err();
    assert!(matches!(missing, FileError::Read { .. }), "{missing}");
}
