use std::sync::Arc;

use crossgate_proto::{LoadBalancerSettings, OutlierDetection, TrafficPolicy, load_balancer_settings::LbPolicy};

use super::*;
use crate::model::{DestinationRuleModel, ServicePort, SubsetModel};

const HOST: &str = "helloworld.sample.svc.cluster.local";

fn endpoint(ip: &str, labels: &[(&str, &str)]) -> EndpointModel {
    let mut all: BTreeMap<String, String> = [(TLS_MODE_LABEL.to_owned(), "istio".to_owned())].into();
    all.extend(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    EndpointModel {
        address: ip.parse().unwrap(),
        target_ports: [(5000, 15000)].into(),
        labels: all,
        locality: String::new(),
        network: String::new(),
        ready: true,
        terminating: false,
        workload_name: String::new(),
        node_name: String::new(),
    }
}

fn service(name: &str, namespace: &str, endpoints: Vec<EndpointModel>) -> ServiceModel {
    ServiceModel {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        ports: vec![ServicePort { name: "tcp".to_owned(), port: 5000, protocol: Protocol::Tcp }],
        endpoints,
        publish_not_ready: false,
    }
}

fn helloworld(endpoints: Vec<EndpointModel>) -> ServiceModel {
    service("helloworld", "sample", endpoints)
}

fn cluster(id: &str, services: Vec<ServiceModel>) -> ClusterModel {
    ClusterModel { id: id.to_owned(), services: services.into_iter().map(Arc::new).collect(), ..Default::default() }
}

fn mesh(clusters: Vec<ClusterModel>) -> MeshModel {
    MeshModel { clusters: clusters.into_iter().map(|c| (c.id.clone(), Arc::new(c))).collect() }
}

fn gateway(cluster_id: &str, network_view: &[&str]) -> GatewayNode {
    GatewayNode {
        cluster_id: cluster_id.to_owned(),
        requested_network_view: network_view.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn subset(name: &str, labels: &[(&str, &str)]) -> SubsetModel {
    SubsetModel {
        name: name.to_owned(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        traffic_policy: None,
    }
}

fn versions_rule() -> DestinationRuleModel {
    DestinationRuleModel {
        name: "helloworld".to_owned(),
        namespace: "sample".to_owned(),
        host: "helloworld".to_owned(),
        subsets: vec![subset("v1", &[("version", "v1")]), subset("v2", &[("version", "v2")])],
        ..Default::default()
    }
}

fn view(mesh: &MeshModel, gateway: &GatewayNode) -> BTreeMap<String, Cluster> {
    gateway_view(mesh, gateway, &ViewOptions::default())
}

fn key(port: u16, subset: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{HOST}")
}

fn addresses(cluster: &Cluster) -> Vec<&str> {
    cluster.endpoints.iter().map(|e| e.address.as_str()).collect()
}

#[test]
fn one_cluster_per_port_and_subset_and_none_for_udp() {
    let mut hello = helloworld(vec![endpoint("10.0.0.1", &[("version", "v1")])]);
    hello.ports = [(5000, Protocol::Tcp), (53, Protocol::Udp), (9000, Protocol::Sctp)]
        .map(|(port, protocol)| ServicePort { name: String::new(), port, protocol })
        .into();
    let mut c1 = cluster("cluster1", vec![hello]);
    c1.destination_rules = vec![versions_rule()];
    let clusters = view(&mesh(vec![c1]), &gateway("cluster1", &[]));
    let names: Vec<_> = clusters.keys().cloned().collect();
    let expected = [key(5000, ""), key(5000, "v1"), key(5000, "v2"), key(9000, ""), key(9000, "v1"), key(9000, "v2")];
    assert_eq!(names, expected);
    let default = &clusters[&key(5000, "")];
    assert_eq!((default.service_name.as_str(), default.service_namespace.as_str()), ("helloworld", "sample"));
    assert_eq!(addresses(default), ["10.0.0.1:15000"]);
    // The endpoint has no target port for 9000: the cluster exists, empty (the gateway answers UH).
    assert!(clusters[&key(9000, "")].endpoints.is_empty());
    assert!(clusters[&key(5000, "v2")].endpoints.is_empty());
}

#[test]
fn only_endpoints_with_a_target_port_serve_a_port() {
    let mut both = endpoint("10.0.0.2", &[]);
    both.target_ports.insert(9000, 19000);
    let mut hello = helloworld(vec![endpoint("10.0.0.1", &[]), both]);
    hello.ports.push(ServicePort { name: String::new(), port: 9000, protocol: Protocol::Tcp });
    let clusters = view(&mesh(vec![cluster("cluster1", vec![hello])]), &gateway("cluster1", &[]));
    assert_eq!(addresses(&clusters[&key(5000, "")]), ["10.0.0.1:15000", "10.0.0.2:15000"]);
    assert_eq!(addresses(&clusters[&key(9000, "")]), ["10.0.0.2:19000"]);
}

#[test]
fn the_network_view_keeps_its_networks_and_network_less_endpoints() {
    let on = |ip: &str, network: &str| EndpointModel { network: network.to_owned(), ..endpoint(ip, &[]) };
    let hello = helloworld(vec![on("10.0.0.1", "network1"), on("10.0.0.2", "network2"), on("10.0.0.3", "")]);
    let mesh = mesh(vec![cluster("cluster1", vec![hello])]);
    let table: [(&[&str], &[&str]); 4] = [
        (&[], &["10.0.0.1:15000", "10.0.0.2:15000", "10.0.0.3:15000"]),
        (&["network1"], &["10.0.0.1:15000", "10.0.0.3:15000"]),
        (&["network1", "network2"], &["10.0.0.1:15000", "10.0.0.2:15000", "10.0.0.3:15000"]),
        (&["network3"], &["10.0.0.3:15000"]),
    ];
    for (network_view, expected) in table {
        assert_eq!(addresses(&view(&mesh, &gateway("cluster1", network_view))[&key(5000, "")]), expected);
    }
}

#[test]
fn a_pod_network_other_than_its_cluster_network_is_honoured() {
    let pod = EndpointModel { network: "network2".to_owned(), ..endpoint("10.0.0.1", &[]) };
    let mut c1 = cluster("cluster1", vec![helloworld(vec![pod])]);
    c1.network = "network1".to_owned();
    let mesh = mesh(vec![c1]);
    assert!(view(&mesh, &gateway("cluster1", &["network1"]))[&key(5000, "")].endpoints.is_empty());
    let clusters = view(&mesh, &gateway("cluster1", &["network2"]));
    let endpoint = &clusters[&key(5000, "")].endpoints[0];
    assert_eq!(endpoint.labels["topology.istio.io/network"], "network2");
}

#[test]
fn readiness_and_mtls_decide_which_endpoints_are_sent_and_how() {
    const DROPPED: Option<Health> = None;
    // (ready, terminating, publish_not_ready, tlsMode label, expected)
    let table = [
        (true, false, false, Some("istio"), Some(Health::Healthy)),
        (false, false, false, Some("istio"), DROPPED),
        (false, true, false, Some("istio"), Some(Health::Draining)),
        (false, true, true, Some("istio"), Some(Health::Draining)),
        (false, false, true, Some("istio"), Some(Health::Healthy)),
        (true, false, false, Some("disabled"), DROPPED),
        (true, false, false, None, DROPPED),
        (false, false, true, None, DROPPED),
    ];
    for (ready, terminating, publish_not_ready, tls_mode, expected) in table {
        let mut pod = EndpointModel { ready, terminating, ..endpoint("10.0.0.1", &[]) };
        match tls_mode {
            Some(mode) => pod.labels.insert(TLS_MODE_LABEL.to_owned(), mode.to_owned()),
            None => pod.labels.remove(TLS_MODE_LABEL),
        };
        let hello = ServiceModel { publish_not_ready, ..helloworld(vec![pod]) };
        let clusters = view(&mesh(vec![cluster("cluster1", vec![hello])]), &gateway("cluster1", &[]));
        let health = clusters[&key(5000, "")].endpoints.first().map(|e| Health::try_from(e.health).unwrap());
        assert_eq!(
            health, expected,
            "ready {ready} terminating {terminating} publish {publish_not_ready} {tls_mode:?}"
        );
    }
}

#[test]
fn subsets_hold_the_endpoints_whose_labels_include_theirs() {
    let hello = helloworld(vec![
        endpoint("10.0.0.1", &[("version", "v1")]),
        endpoint("10.0.0.2", &[("version", "v2")]),
        endpoint("10.0.0.3", &[("version", "v1"), ("track", "canary")]),
        endpoint("10.0.0.4", &[]),
    ]);
    let mut rule = versions_rule();
    rule.subsets.push(subset("canary", &[("version", "v1"), ("track", "canary")]));
    // Subsets select on the augmented labels too, as in Istio.
    rule.subsets.push(subset("here", &[("topology.istio.io/cluster", "cluster1")]));
    let mut c1 = cluster("cluster1", vec![hello]);
    c1.destination_rules = vec![rule];
    let clusters = view(&mesh(vec![c1]), &gateway("cluster1", &[]));
    let table = [
        ("", &["10.0.0.1:15000", "10.0.0.2:15000", "10.0.0.3:15000", "10.0.0.4:15000"][..]),
        ("v1", &["10.0.0.1:15000", "10.0.0.3:15000"]),
        ("v2", &["10.0.0.2:15000"]),
        ("canary", &["10.0.0.3:15000"]),
        ("here", &["10.0.0.1:15000", "10.0.0.2:15000", "10.0.0.3:15000", "10.0.0.4:15000"]),
    ];
    for (subset, expected) in table {
        assert_eq!(addresses(&clusters[&key(5000, subset)]), expected, "{subset}");
    }
}

#[test]
fn a_gateway_applies_the_destination_rules_of_its_own_cluster() {
    let hello = || helloworld(vec![endpoint("10.0.0.1", &[("version", "v1")])]);
    let mut c2 = cluster("cluster2", vec![hello()]);
    c2.destination_rules = vec![versions_rule()];
    let mesh = mesh(vec![cluster("cluster1", vec![hello()]), c2]);
    let subsets = |cluster_id| view(&mesh, &gateway(cluster_id, &[])).into_keys().collect::<Vec<_>>();
    assert_eq!(subsets("cluster1"), [key(5000, "")]);
    assert_eq!(subsets("cluster2"), [key(5000, ""), key(5000, "v1"), key(5000, "v2")]);
    assert_eq!(subsets("unknown"), [key(5000, "")]);
}

#[test]
fn export_to_and_host_precedence_reach_the_view() {
    let mut private = versions_rule();
    private.export_to = vec![".".to_owned()];
    let mut wildcard = versions_rule();
    wildcard.name = "catch-all".to_owned();
    wildcard.namespace = "istio-system".to_owned();
    wildcard.host = "*.local".to_owned();
    wildcard.subsets = vec![subset("any", &[])];
    let mut c1 = cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.1", &[])])]);
    c1.destination_rules = vec![private, wildcard];
    let names: Vec<_> = view(&mesh(vec![c1]), &gateway("cluster1", &[])).into_keys().collect();
    // The service's own rule is private to `sample`: the root namespace's catch-all applies.
    assert_eq!(names, [key(5000, ""), key(5000, "any")]);
}

#[test]
fn subset_policies_merge_over_the_rule_policy() {
    let lb = |simple: i32| LoadBalancerSettings { lb_policy: Some(LbPolicy::Simple(simple)), ..Default::default() };
    let outlier = OutlierDetection { max_ejection_percent: 100, ..Default::default() };
    let mut rule = versions_rule();
    rule.traffic_policy =
        Some(TrafficPolicy { load_balancer: Some(lb(2)), outlier_detection: Some(outlier), ..Default::default() });
    rule.subsets[0].traffic_policy = Some(TrafficPolicy { load_balancer: Some(lb(4)), ..Default::default() });
    let mut c1 = cluster("cluster1", vec![helloworld(vec![])]);
    c1.destination_rules = vec![rule.clone()];
    let clusters = view(&mesh(vec![c1]), &gateway("cluster1", &[]));
    assert_eq!(clusters[&key(5000, "")].traffic_policy, rule.traffic_policy);
    assert_eq!(clusters[&key(5000, "v2")].traffic_policy, rule.traffic_policy);
    let v1 = clusters[&key(5000, "v1")].traffic_policy.clone().unwrap();
    assert_eq!((v1.load_balancer, v1.outlier_detection), (Some(lb(4)), Some(outlier)));
    // Without a rule, no policy: the gateway's defaults apply.
    let clusters = view(&mesh(vec![cluster("cluster1", vec![helloworld(vec![])])]), &gateway("cluster1", &[]));
    assert_eq!(clusters[&key(5000, "")].traffic_policy, None);
}

#[test]
fn cluster_local_hosts_keep_only_the_gateway_cluster_endpoints() {
    let in_cluster = |id: &str, ip: &str| {
        let services = [("kube-dns", "kube-system"), ("kubernetes", "default"), ("helloworld", "sample")]
            .map(|(name, namespace)| service(name, namespace, vec![endpoint(ip, &[])]));
        cluster(id, services.into())
    };
    let mesh = mesh(vec![in_cluster("cluster1", "10.1.0.1"), in_cluster("cluster2", "10.2.0.1")]);
    let clusters = view(&mesh, &gateway("cluster1", &[]));
    let table = [
        ("kube-dns.kube-system", &["10.1.0.1:15000"][..]),
        ("kubernetes.default", &["10.1.0.1:15000"]),
        ("helloworld.sample", &["10.1.0.1:15000", "10.2.0.1:15000"]),
    ];
    for (service, expected) in table {
        assert_eq!(addresses(&clusters[&format!("outbound_.5000_._.{service}.svc.cluster.local")]), expected);
    }
}

#[test]
fn one_hostname_in_two_clusters_is_one_service() {
    let mut in_2 = helloworld(vec![endpoint("10.0.0.9", &[]), endpoint("10.0.0.10", &[])]);
    in_2.ports.push(ServicePort { name: String::new(), port: 9000, protocol: Protocol::Tcp });
    in_2.endpoints[0].target_ports.insert(9000, 19000);
    let mesh = mesh(vec![
        cluster("cluster2", vec![in_2]),
        cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.1", &[])])]),
    ]);
    let clusters = view(&mesh, &gateway("cluster1", &[]));
    assert_eq!(clusters.keys().cloned().collect::<Vec<_>>(), [key(5000, ""), key(9000, "")]);
    let merged = &clusters[&key(5000, "")];
    // Sorted by address, numerically.
    assert_eq!(addresses(merged), ["10.0.0.1:15000", "10.0.0.9:15000", "10.0.0.10:15000"]);
    let cluster_ids: Vec<_> = merged.endpoints.iter().map(|e| e.cluster_id.as_str()).collect();
    assert_eq!(cluster_ids, ["cluster1", "cluster2", "cluster2"]);
    assert_eq!(addresses(&clusters[&key(9000, "")]), ["10.0.0.9:19000"]);
}

#[test]
fn endpoints_carry_locality_weight_workload_and_istio_topology_labels() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        let mut all: BTreeMap<_, _> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        all.insert(TLS_MODE_LABEL.to_owned(), "istio".to_owned());
        all.insert("topology.istio.io/cluster".to_owned(), "cluster1".to_owned());
        all
    };
    // (locality, node, network, own labels, expected labels)
    let table = [
        (
            "us-east1/us-east1-b/rack1",
            "node1",
            "network1",
            &[("app", "hello")][..],
            labels(&[
                ("app", "hello"),
                ("topology.kubernetes.io/region", "us-east1"),
                ("topology.kubernetes.io/zone", "us-east1-b"),
                ("topology.istio.io/subzone", "rack1"),
                ("kubernetes.io/hostname", "node1"),
                ("topology.istio.io/network", "network1"),
            ]),
        ),
        ("us-east1", "", "", &[], labels(&[("topology.kubernetes.io/region", "us-east1")])),
        ("", "", "", &[], labels(&[])),
        // The pod's own network label is kept.
        (
            "",
            "",
            "network1",
            &[("topology.istio.io/network", "mine")],
            labels(&[("topology.istio.io/network", "mine")]),
        ),
    ];
    for (locality, node, network, own, expected) in table {
        let pod = EndpointModel {
            locality: locality.to_owned(),
            node_name: node.to_owned(),
            network: network.to_owned(),
            workload_name: "helloworld-v1-5d9f7c8b4-x2x7k".to_owned(),
            ..endpoint("10.0.0.1", own)
        };
        let clusters = view(&mesh(vec![cluster("cluster1", vec![helloworld(vec![pod])])]), &gateway("cluster1", &[]));
        let sent = &clusters[&key(5000, "")].endpoints[0];
        assert_eq!(sent.labels, expected, "{locality:?}");
        assert_eq!((sent.locality.as_str(), sent.weight, sent.cluster_id.as_str()), (locality, 1, "cluster1"));
        assert_eq!(sent.workload_name, "helloworld-v1-5d9f7c8b4-x2x7k");
    }
}

#[test]
fn workload_names_are_the_pod_owners() {
    let table = [
        ("helloworld-v1-5d9f7c8b4-x2x7k", &[("pod-template-hash", "5d9f7c8b4")][..], "helloworld-v1"),
        ("web-0", &[("statefulset.kubernetes.io/pod-name", "web-0")], "web"),
        ("web-12", &[("statefulset.kubernetes.io/pod-name", "web-12")], "web"),
        ("bare-pod", &[], "bare-pod"),
        // Labels that do not fit the name leave it alone.
        ("helloworld", &[("pod-template-hash", "5d9f7c8b4")], "helloworld"),
        ("web-x", &[("statefulset.kubernetes.io/pod-name", "web-x")], "web-x"),
        ("", &[], ""),
    ];
    for (pod, labels, expected) in table {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        assert_eq!(workload_name(pod, &labels), expected, "{pod}");
    }
}

#[test]
fn ipv6_endpoints_are_bracketed() {
    let hello = helloworld(vec![endpoint("fd00::1", &[]), endpoint("10.0.0.1", &[])]);
    let clusters = view(&mesh(vec![cluster("cluster1", vec![hello])]), &gateway("cluster1", &[]));
    assert_eq!(addresses(&clusters[&key(5000, "")]), ["10.0.0.1:15000", "[fd00::1]:15000"]);
}

#[test]
fn the_view_does_not_depend_on_input_order() {
    let pods = vec![endpoint("10.0.0.2", &[("version", "v1")]), endpoint("10.0.0.1", &[("version", "v2")])];
    let mut reversed = pods.clone();
    reversed.reverse();
    let build = |pods| {
        let mut c1 = cluster("cluster1", vec![helloworld(pods)]);
        c1.destination_rules = vec![versions_rule()];
        view(&mesh(vec![c1]), &gateway("cluster1", &[]))
    };
    assert_eq!(build(pods), build(reversed));
}

#[test]
fn cluster_local_hosts_are_recognised_by_domain() {
    let table = [
        ("kube-dns.kube-system.svc.cluster.local", "cluster.local", true),
        ("kubernetes.default.svc.cluster.local", "cluster.local", true),
        ("kubernetes.default.svc.example.org", "example.org", true),
        ("kube-dns.kube-system.svc.cluster.local", "example.org", false),
        ("kubernetes.sample.svc.cluster.local", "cluster.local", false),
        ("helloworld.sample.svc.cluster.local", "cluster.local", false),
    ];
    for (host, domain, expected) in table {
        assert_eq!(is_cluster_local(host, domain), expected, "{host} {domain}");
    }
}

#[test]
fn a_change_names_the_services_it_touches_and_the_view_follows_it_alone() {
    let reviews = || service("reviews", "sample", vec![endpoint("10.0.1.1", &[("version", "v1")])]);
    let mut one = cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.1", &[("version", "v1")])]), reviews()]);
    one.destination_rules = vec![versions_rule()];
    let two = Arc::new(cluster("cluster2", vec![helloworld(vec![endpoint("10.1.0.1", &[("version", "v2")])])]));
    let before = MeshModel {
        clusters: [("cluster1".into(), Arc::new(one.clone())), ("cluster2".into(), Arc::clone(&two))].into(),
    };
    assert_eq!(changed_hosts(&before, &before), Some(BTreeSet::new()), "shared clusters cost nothing");

    // One endpoint of helloworld in cluster1 changes: only helloworld is named.
    let mut changed = one.clone();
    Arc::make_mut(&mut changed.services[0]).endpoints[0].ready = false;
    let after = MeshModel { clusters: [("cluster1".into(), Arc::new(changed)), ("cluster2".into(), two)].into() };
    let hosts = changed_hosts(&before, &after).unwrap();
    assert_eq!(hosts, BTreeSet::from([HOST.to_owned()]));

    // The view updated for that service alone equals the view computed whole; the changed clusters are named.
    let gateway = gateway("cluster1", &[]);
    let options = ViewOptions::default();
    let mut kept = GatewayView::default();
    let mut held = kept.rebuild(&before, &gateway, &options);
    let changed = kept.update(&after, &ServiceIndex::new(&after), &gateway, &options, &hosts);
    assert_eq!(changed.keys().cloned().collect::<Vec<_>>(), [key(5000, ""), key(5000, "v1"), key(5000, "v2")]);
    apply(&mut held, changed);
    assert_eq!(held, view(&after, &gateway));

    // A DestinationRule change reaches every service: nothing is known, everything is recomputed.
    let mut ruled = one;
    ruled.destination_rules.clear();
    let ruled = MeshModel {
        clusters: [("cluster1".into(), Arc::new(ruled)), ("cluster2".into(), Arc::clone(&after.clusters["cluster2"]))]
            .into(),
    };
    assert_eq!(changed_hosts(&after, &ruled), None);
    // A service that goes away is named, and its clusters leave the view.
    let mut gone = (*after.clusters["cluster1"]).clone();
    gone.services.truncate(1);
    let gone = MeshModel {
        clusters: [("cluster1".into(), Arc::new(gone)), ("cluster2".into(), Arc::clone(&after.clusters["cluster2"]))]
            .into(),
    };
    let hosts = changed_hosts(&after, &gone).unwrap();
    assert_eq!(hosts, BTreeSet::from(["reviews.sample.svc.cluster.local".to_owned()]));
    let changed = kept.update(&gone, &ServiceIndex::new(&gone), &gateway, &options, &hosts);
    let reviews = "outbound_.5000_._.reviews.sample.svc.cluster.local".to_owned();
    assert_eq!(changed, BTreeMap::from([(reviews, None)]), "named as gone");
    apply(&mut held, changed);
    assert_eq!(held, view(&gone, &gateway));
}

/// Applies a view update to the whole view, as the resource builder does.
fn apply(view: &mut BTreeMap<String, Cluster>, changed: BTreeMap<String, Option<Cluster>>) {
    for (name, cluster) in changed {
        match cluster {
            Some(cluster) => view.insert(name, cluster),
            None => view.remove(&name),
        };
    }
}

#[test]
fn a_service_added_beside_another_clusters_one_is_found_by_the_index_and_the_view_follows() {
    let reviews = || service("reviews", "sample", vec![endpoint("10.0.1.1", &[])]);
    let one = cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.1", &[])]), reviews()]);
    let two = cluster("cluster2", vec![reviews()]);
    let first = crate::server::MeshVersion::whole(mesh(vec![one, two]), 1);
    let gateway = gateway("cluster1", &[]);
    let options = ViewOptions::default();
    let mut kept = GatewayView::default();
    let mut held = kept.rebuild(&first.mesh, &gateway, &options);
    let mut follow = |version: &crate::server::MeshVersion| {
        let hosts = version.changed_hosts.as_deref().expect("the changes are known");
        apply(&mut held, kept.update(&version.mesh, &version.services, &gateway, &options, hosts));
        assert_eq!(held, view(&version.mesh, &gateway));
        (hosts.clone(), held[&key(5000, "")].endpoints.iter().map(|e| e.address.clone()).collect::<Vec<_>>())
    };

    // helloworld comes to cluster2, ahead of reviews: cluster2's services move.
    let mut added = first.mesh.clone();
    let services = &mut Arc::make_mut(added.clusters.get_mut("cluster2").unwrap()).services;
    services.insert(0, Arc::new(helloworld(vec![endpoint("10.1.0.1", &[])])));
    let second = first.next(added, std::time::Instant::now());
    let (hosts, addresses) = follow(&second);
    assert_eq!((hosts, addresses), (BTreeSet::from([HOST.to_owned()]), strings(&["10.0.0.1:15000", "10.1.0.1:15000"])));

    // Its endpoint in cluster2 changes, places kept: found there by the index carried over.
    let mut changed = second.mesh.clone();
    let services = &mut Arc::make_mut(changed.clusters.get_mut("cluster2").unwrap()).services;
    Arc::make_mut(&mut services[0]).endpoints[0].address = "10.1.0.2".parse().unwrap();
    let third = second.next(changed, std::time::Instant::now());
    let (hosts, addresses) = follow(&third);
    assert_eq!((hosts, addresses), (BTreeSet::from([HOST.to_owned()]), strings(&["10.0.0.1:15000", "10.1.0.2:15000"])));
}

#[test]
fn a_model_built_afresh_shares_what_did_not_change() {
    let reviews = || service("reviews", "sample", vec![endpoint("10.0.1.1", &[])]);
    let previous = mesh(vec![cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.1", &[])]), reviews()])]);
    let mut same = mesh(vec![cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.1", &[])]), reviews()])]);
    assert!(same.share_unchanged(&previous));
    assert!(Arc::ptr_eq(&same.clusters["cluster1"], &previous.clusters["cluster1"]));

    let mut next = mesh(vec![cluster("cluster1", vec![helloworld(vec![endpoint("10.0.0.2", &[])]), reviews()])]);
    assert!(!next.share_unchanged(&previous));
    let (before, after) = (&previous.clusters["cluster1"].services, &next.clusters["cluster1"].services);
    assert!(Arc::ptr_eq(&before[1], &after[1]), "reviews is shared");
    assert!(!Arc::ptr_eq(&before[0], &after[0]));
    assert_eq!(changed_hosts(&previous, &next), Some(BTreeSet::from([HOST.to_owned()])));
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}
