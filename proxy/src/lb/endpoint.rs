//! What the lb is given: endpoints with their locality and labels, and the gateway's own identity.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::outlier::HostOutlier;
use super::settings::LbConfigError;

/// Label keys Istio adds to endpoints and proxies (`AugmentLabels`); `failoverPriority` compares them.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// `region/zone/subzone`; any part may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl FromStr for Locality {
    type Err = LbConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        let mut next = || parts.next().unwrap_or("").to_owned();
        let locality = Locality { region: next(), zone: next(), subzone: next() };
        if parts.next().is_some() {
            return Err(LbConfigError::Locality(s.to_owned()));
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

    /// Istio's `AugmentLabels`: the locality's non-empty parts overwrite the topology labels.
    pub fn augment(&self, labels: &mut BTreeMap<String, String>) {
        for (key, value) in [(REGION_LABEL, &self.region), (ZONE_LABEL, &self.zone), (SUBZONE_LABEL, &self.subzone)] {
            if !value.is_empty() {
                labels.insert(key.to_owned(), value.clone());
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Counted in the priority's size but takes traffic only in panic, as Envoy does.
    Unhealthy,
    /// Terminating: keeps its open connections, takes no new ones, and is not counted at all.
    Draining,
}

/// One endpoint as configured: where to connect and what the lb may weigh.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    pub locality: Locality,
    /// At least 1.
    pub weight: u32,
    /// As sent by the control service; the lb adds the locality labels itself (see [`Locality::augment`]).
    pub labels: BTreeMap<String, String>,
    pub health: Health,
}

/// How `failoverPriority` treats `topology.istio.io/network` as its first key; the Istio releases differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NetworkFailover {
    /// Istio 1.31 (PR #60829): the network is preferred, not required. Other-network endpoints are still ordered
    /// by the remaining keys, after every same-network endpoint.
    #[default]
    Istio131,
    /// Istio ≤ 1.30: an other-network endpoint gets the lowest priority, whatever its other labels.
    Istio130,
}

impl std::str::FromStr for NetworkFailover {
    type Err = String;

    /// By the Istio release whose behaviour to follow: `1.31` or `1.30`.
    fn from_str(release: &str) -> Result<Self, Self::Err> {
        match release {
            "1.31" => Ok(NetworkFailover::Istio131),
            "1.30" => Ok(NetworkFailover::Istio130),
            other => Err(format!("{other:?} is not an Istio release with its own failover rule (1.30 or 1.31)")),
        }
    }
}

/// Who is balancing: the gateway's own locality and labels, against which priorities are computed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayIdentity {
    pub locality: Locality,
    /// The gateway pod's labels (e.g. `topology.istio.io/network`); locality labels are added from `locality`.
    pub labels: BTreeMap<String, String>,
    pub network_failover: NetworkFailover,
}

impl GatewayIdentity {
    pub fn new(locality: Locality, mut labels: BTreeMap<String, String>) -> Self {
        locality.augment(&mut labels);
        GatewayIdentity { locality, labels, network_failover: NetworkFailover::default() }
    }
}

/// Per-host state that survives configuration reloads: open connections and the outlier detector's view.
#[derive(Debug, Default)]
pub struct HostState {
    pub(super) active: AtomicU64,
    pub(super) outlier: HostOutlier,
}

impl HostState {
    /// Connections currently open to this host.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether outlier detection has ejected this host.
    pub fn ejected(&self) -> bool {
        self.outlier.is_ejected()
    }

    /// The outlier detector's ejection-time multiplier: how many ejections in a row it remembers.
    pub fn ejection_multiplier(&self) -> u32 {
        self.outlier.multiplier()
    }
}

#[derive(Debug)]
pub struct Host {
    pub spec: EndpointSpec,
    pub state: Arc<HostState>,
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
