//! Istio's topology labels and localities (`pkg/model/labels.go`, `pilot/pkg/serviceregistry/util/label`):
//! the keys `failoverPriority` compares, and `region/zone/subzone` with Istio's matching and `AugmentLabels`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The pod label that marks a workload able to take Istio mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// `region/zone/subzone`; any part may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("locality {0:?} has more than three '/'-separated parts (region/zone/subzone)")]
pub struct LocalityError(pub String);

impl FromStr for Locality {
    type Err = LocalityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        let mut next = || parts.next().unwrap_or("").to_owned();
        let locality = Locality { region: next(), zone: next(), subzone: next() };
        if parts.next().is_some() {
            return Err(LocalityError(s.to_owned()));
        }
        Ok(locality)
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

impl Locality {
    /// Istio's `util.LocalityMatch`: `pattern` is `region[/zone[/subzone]]`, where `*` matches anything and
    /// a missing zone or subzone matches any. The region must be given (or `*`).
    pub fn matches(&self, pattern: &str) -> bool {
        let mut parts = pattern.split('/');
        let region = parts.next().unwrap_or("");
        let zone = parts.next().unwrap_or("");
        let subzone = parts.next().unwrap_or("");
        let part = |rule: &str, own: &str, optional: bool| rule == "*" || (optional && rule.is_empty()) || rule == own;
        part(region, &self.region, false) && part(zone, &self.zone, true) && part(subzone, &self.subzone, true)
    }

    /// Istio's `AugmentLabels` for the locality: its non-empty parts overwrite the topology labels.
    pub fn augment(&self, labels: &mut BTreeMap<String, String>) {
        for (key, value) in [(REGION_LABEL, &self.region), (ZONE_LABEL, &self.zone), (SUBZONE_LABEL, &self.subzone)] {
            if !value.is_empty() {
                labels.insert(key.to_owned(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_parses_partial_forms() {
        let l: Locality = "us-east1/us-east1-b".parse().unwrap();
        assert_eq!((l.region.as_str(), l.zone.as_str(), l.subzone.as_str()), ("us-east1", "us-east1-b", ""));
        assert_eq!("".parse::<Locality>().unwrap(), Locality::default());
        assert!("a/b/c/d".parse::<Locality>().is_err());
        assert_eq!(l.to_string(), "us-east1/us-east1-b/");
    }

    #[test]
    fn locality_match_follows_istio() {
        let l: Locality = "us-east/us-east-1a/rack1".parse().unwrap();
        for (pattern, expected) in [
            ("us-east", true),
            ("us-east/*", true),
            ("us-east/us-east-1a", true),
            ("us-east/us-east-1a/rack1", true),
            ("us-east/us-east-1b", false),
            ("*", true),
            ("us-west/*", false),
            ("", false),
        ] {
            assert_eq!(l.matches(pattern), expected, "{pattern}");
        }
    }

    #[test]
    fn locality_labels_overwrite_as_istio_does() {
        let mut labels = BTreeMap::from([(REGION_LABEL.to_owned(), "stale".to_owned())]);
        "r1/z1".parse::<Locality>().unwrap().augment(&mut labels);
        assert_eq!(labels[REGION_LABEL], "r1");
        assert_eq!(labels[ZONE_LABEL], "z1");
        assert!(!labels.contains_key(SUBZONE_LABEL));
    }
}
