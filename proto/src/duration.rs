//! `google.protobuf.Duration` with the YAML/JSON form Istio users write: Go durations (`300ms`, `1h30m`,
//! `5m`) as well as the proto3 JSON form (`1.5s`). It encodes on the wire exactly as the well-known type.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl ::prost::Name for Duration {
    const NAME: &'static str = "Duration";
    const PACKAGE: &'static str = "google.protobuf";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration (write e.g. 300ms, 10s, 5m, 1h30m)")]
    Syntax(String),
    #[error("{0:?} is out of range")]
    Range(String),
    #[error("{0} is negative")]
    Negative(String),
}

impl Duration {
    pub fn from_nanos(total: i128) -> Option<Duration> {
        let seconds = i64::try_from(total / 1_000_000_000).ok()?;
        Some(Duration { seconds, nanos: (total % 1_000_000_000) as i32 })
    }

    fn total_nanos(self) -> i128 {
        i128::from(self.seconds) * 1_000_000_000 + i128::from(self.nanos)
    }
}

impl std::str::FromStr for Duration {
    type Err = DurationError;

    /// Go's `time.ParseDuration` grammar: an optional sign, then number-unit pairs, with decimals allowed;
    /// units ns, us (or µs), ms, s, m, h. A bare `0` is zero.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || DurationError::Syntax(text.to_owned());
        let (negative, mut rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        if rest == "0" {
            return Ok(Duration::default());
        }
        if rest.is_empty() {
            return Err(syntax());
        }
        let mut total: i128 = 0;
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(syntax)?;
            let (number, after) = rest.split_at(number_len);
            let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let unit_nanos: i128 = match unit {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(syntax()),
            };
            let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
            if (whole.is_empty() && fraction.is_empty()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            let whole: i128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| syntax())? };
            let mut part = whole.checked_mul(unit_nanos).ok_or_else(|| DurationError::Range(text.to_owned()))?;
            let mut scale = unit_nanos;
            for digit in fraction.bytes() {
                scale /= 10;
                part += i128::from(digit - b'0') * scale;
            }
            total = total.checked_add(part).ok_or_else(|| DurationError::Range(text.to_owned()))?;
            rest = after;
        }
        Duration::from_nanos(if negative { -total } else { total }).ok_or_else(|| DurationError::Range(text.to_owned()))
    }
}

impl fmt::Display for Duration {
    /// The proto3 JSON form: seconds with up to nine decimals, e.g. `1.500s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total_nanos();
        let sign = if total < 0 { "-" } else { "" };
        let (seconds, nanos) = (total.abs() / 1_000_000_000, total.abs() % 1_000_000_000);
        if nanos == 0 {
            write!(f, "{sign}{seconds}s")
        } else {
            let fraction = format!("{nanos:09}");
            write!(f, "{sign}{seconds}.{}s", fraction.trim_end_matches('0'))
        }
    }
}

impl TryFrom<Duration> for std::time::Duration {
    type Error = DurationError;

    fn try_from(value: Duration) -> Result<Self, Self::Error> {
        let total = value.total_nanos();
        if total < 0 {
            return Err(DurationError::Negative(value.to_string()));
        }
        Ok(std::time::Duration::new(value.seconds.unsigned_abs(), value.nanos.unsigned_abs()))
    }
}

impl From<std::time::Duration> for Duration {
    fn from(value: std::time::Duration) -> Self {
        Duration { seconds: value.as_secs() as i64, nanos: value.subsec_nanos() as i32 }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 300ms, 10s, 5m or 1h30m")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nanos(text: &str) -> i128 {
        text.parse::<Duration>().unwrap().total_nanos()
    }

    #[test]
    fn go_and_proto_forms_parse() {
        assert_eq!(nanos("300ms"), 300_000_000);
        assert_eq!(nanos("1h30m"), 5_400_000_000_000);
        assert_eq!(nanos("1.5s"), 1_500_000_000);
        assert_eq!(nanos("0.000000001s"), 1);
        assert_eq!(nanos("0"), 0);
        assert_eq!(nanos("0s"), 0);
        assert_eq!(nanos("2us"), 2_000);
        assert_eq!(nanos("-1.5s"), -1_500_000_000);
        assert_eq!(nanos(".5m"), 30_000_000_000);
    }

    #[test]
    fn nonsense_is_refused() {
        for text in ["", "10", "1x", "s", "1h-1m", "1..5s", "ms5", "-"] {
            assert!(text.parse::<Duration>().is_err(), "{text:?}");
        }
    }

    #[test]
    fn display_is_the_proto3_form_and_round_trips() {
        for text in ["300ms", "1h", "1.5s", "-2s", "0s"] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }
        assert_eq!("300ms".parse::<Duration>().unwrap().to_string(), "0.3s");
        assert!(std::time::Duration::try_from("-1s".parse::<Duration>().unwrap()).is_err());
    }
}
