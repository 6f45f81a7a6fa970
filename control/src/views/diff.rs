//! Versions and the delta: what to send a gateway so that it holds a view, given what it has ACKed.

use std::collections::BTreeMap;

use std::hash::Hasher;

use crossgate_proto::Cluster;
use prost::Message;

/// What a gateway is sent: the clusters it lacks or holds at another version, and the names it holds that
/// are gone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// (name, version, cluster), in name order.
    pub changed: Vec<(String, String, Cluster)>,
    /// In name order.
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// A version that changes when the cluster does and is the same in every process of one build (a gateway
/// reconnecting to another replica of the control service resends the versions it holds): std's SipHash
/// with its fixed keys (not a `RandomState`) over the prost encoding, which is canonical because the
/// generated maps are ordered. A build whose hash differs only makes its gateways fetch everything once.
pub fn cluster_version(cluster: &Cluster) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(&cluster.encode_to_vec());
    format!("{:016x}", hasher.finish())
}

/// The delta that takes a gateway from the versions it has ACKed to `next`.
pub fn diff(acked: &BTreeMap<String, String>, next: &BTreeMap<String, Cluster>) -> Delta {
    let changed = next
        .iter()
        .filter_map(|(name, cluster)| {
            let version = cluster_version(cluster);
            (acked.get(name) != Some(&version)).then(|| (name.clone(), version, cluster.clone()))
        })
        .collect();
    let removed = acked.keys().filter(|name| !next.contains_key(*name)).cloned().collect();
    Delta { changed, removed }
}

#[cfg(test)]
mod tests {
    use crossgate_proto::Endpoint;

    use super::*;

    fn cluster(name: &str, addresses: &[&str]) -> Cluster {
        Cluster {
            name: name.to_owned(),
            endpoints: addresses
                .iter()
                .map(|a| Endpoint {
                    address: (*a).to_owned(),
                    labels: [("b", "2"), ("a", "1")].map(|(k, v)| (k.to_owned(), v.to_owned())).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn view(clusters: &[Cluster]) -> BTreeMap<String, Cluster> {
        clusters.iter().map(|c| (c.name.clone(), c.clone())).collect()
    }

    fn acked(view: &BTreeMap<String, Cluster>) -> BTreeMap<String, String> {
        view.iter().map(|(name, c)| (name.clone(), cluster_version(c))).collect()
    }

    #[test]
    fn versions_are_stable_and_follow_the_content() {
        let a = cluster("a", &["10.0.0.1:80"]);
        // Labels inserted in another order encode the same.
        let mut same = a.clone();
        same.endpoints[0].labels = [("a", "1"), ("b", "2")].map(|(k, v)| (k.to_owned(), v.to_owned())).into();
        assert_eq!(cluster_version(&a), cluster_version(&same));
        // Not seeded per hasher, as a RandomState is.
        assert_eq!(cluster_version(&cluster("a", &["10.0.0.1:80"])), cluster_version(&a));
        let mut other = a.clone();
        other.endpoints[0].health = 3;
        assert_ne!(cluster_version(&a), cluster_version(&other));
    }

    #[test]
    fn the_delta_holds_what_changed_and_what_went() {
        let before =
            view(&[cluster("same", &["10.0.0.1:80"]), cluster("edit", &["10.0.0.2:80"]), cluster("gone", &[])]);
        let after = view(&[
            cluster("same", &["10.0.0.1:80"]),
            cluster("edit", &["10.0.0.3:80"]),
            cluster("new", &["10.0.0.4:80"]),
        ]);
        let delta = diff(&acked(&before), &after);
        let changed: Vec<_> =
            delta.changed.iter().map(|(name, version, c)| (name.as_str(), version.clone(), c)).collect();
        assert_eq!(
            changed,
            [
                ("edit", cluster_version(&after["edit"]), &after["edit"]),
                ("new", cluster_version(&after["new"]), &after["new"]),
            ]
        );
        assert_eq!(delta.removed, ["gone"]);
        // Once ACKed, nothing is resent.
        assert!(diff(&acked(&after), &after).is_empty());
        // A gateway that holds nothing gets everything.
        assert_eq!(diff(&BTreeMap::new(), &after).changed.len(), 3);
        // A version the gateway reports that is not ours (another replica, an older build) is replaced.
        let mut stale = acked(&after);
        stale.insert("same".to_owned(), "0".to_owned());
        let names: Vec<_> = diff(&stale, &after).changed.into_iter().map(|(name, ..)| name).collect();
        assert_eq!(names, ["same"]);
    }
}
