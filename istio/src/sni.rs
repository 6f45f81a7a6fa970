//! The SNI an Istio sidecar sends to an east-west gateway, `outbound_.PORT_.SUBSET_.HOST`
//! (`model.BuildSubsetKey` / `ParseSubsetKey`), and the ALPNs its AUTO_PASSTHROUGH filter chains match.

use std::fmt;

/// The ALPN protocols an Istio sidecar offers on its mTLS connections (`allIstioMtlsALPNs`). Envoy's
/// AUTO_PASSTHROUGH filter chains match only these.
pub const ISTIO_MTLS_ALPNS: [&[u8]; 5] =
    [b"istio", b"istio-peer-exchange", b"istio-http/1.0", b"istio-http/1.1", b"istio-h2"];

pub fn is_istio_alpn(protocol: &[u8]) -> bool {
    ISTIO_MTLS_ALPNS.contains(&protocol)
}

/// A parsed `outbound_.<port>_.<subset>_.<host>` key (`model.ParseSubsetKey`). The empty subset is written
/// as nothing between its separators: `outbound_.9080_._.reviews.default.svc.cluster.local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SniKey<'a> {
    pub port: u16,
    pub subset: &'a str,
    pub host: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("does not start with \"outbound_.\" (an Istio key is outbound_.<port>_.<subset>_.<host>)")]
    NotOutbound,
    #[error("has no port and subset fields (an Istio key is outbound_.<port>_.<subset>_.<host>)")]
    MissingFields,
    #[error("has a port that is not a number from 1 to 65535")]
    BadPort,
    #[error("has an empty or malformed host")]
    BadHost,
}

impl<'a> SniKey<'a> {
    pub fn parse(sni: &'a str) -> Result<Self, KeyError> {
        const SEPARATOR: &str = "_.";
        let rest = sni.strip_prefix("outbound_.").ok_or(KeyError::NotOutbound)?;
        let (port, rest) = rest.split_once(SEPARATOR).ok_or(KeyError::MissingFields)?;
        let (subset, host) = rest.split_once(SEPARATOR).ok_or(KeyError::MissingFields)?;
        let port: u16 = port.parse().map_err(|_| KeyError::BadPort)?;
        if port == 0 {
            return Err(KeyError::BadPort);
        }
        // Like ParseSubsetKey: a host that still holds the separator cannot be told apart from the fields.
        if host.is_empty() || host.contains(SEPARATOR) || host.starts_with('.') || host.ends_with('.') {
            return Err(KeyError::BadHost);
        }
        Ok(SniKey { port, subset, host })
    }
}

impl fmt::Display for SniKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outbound_.{}_.{}_.{}", self.port, self.subset, self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_as_istio_builds_them() {
        let key = SniKey::parse("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(key, SniKey { port: 9080, subset: "", host: "reviews.default.svc.cluster.local" });
        assert_eq!(key.to_string(), "outbound_.9080_._.reviews.default.svc.cluster.local");
        let key = SniKey::parse("outbound_.9080_.v1_.reviews.default.svc.cluster.local").unwrap();
        assert_eq!((key.port, key.subset), (9080, "v1"));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_reason() {
        let cases = [
            ("inbound_.9080_._.reviews", KeyError::NotOutbound),
            ("reviews.default.svc.cluster.local", KeyError::NotOutbound),
            ("outbound|9080||reviews", KeyError::NotOutbound),
            ("outbound_.9080", KeyError::MissingFields),
            ("outbound_.9080_.v1", KeyError::MissingFields),
            ("outbound_.http_._.reviews", KeyError::BadPort),
            ("outbound_.0_._.reviews", KeyError::BadPort),
            ("outbound_.70000_._.reviews", KeyError::BadPort),
            ("outbound_.9080_._.", KeyError::BadHost),
            ("outbound_.9080_.v1_.a_.b", KeyError::BadHost),
        ];
        for (sni, expected) in cases {
            assert_eq!(SniKey::parse(sni), Err(expected), "{sni}");
        }
    }

    #[test]
    fn only_istio_mtls_alpns_match() {
        for alpn in ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"] {
            assert!(is_istio_alpn(alpn.as_bytes()));
        }
        for alpn in ["h2", "http/1.1", "istio-h3", ""] {
            assert!(!is_istio_alpn(alpn.as_bytes()));
        }
    }
}
