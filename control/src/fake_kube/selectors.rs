//! Label and field selectors, parsed the way kube-apiserver parses them and matched against stored JSON.

use serde_json::Value;

/// Which objects a list or watch sees: its namespace (from the path) and its selectors (from the query).
#[derive(Debug, Default)]
pub(super) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        self.labels.matches(&meta["labels"]) && self.fields.matches(obj)
    }
}

#[derive(Debug, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

/// `labelSelector`: comma-separated requirements, all of which must hold.
#[derive(Debug, Default, PartialEq)]
pub(super) struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        split_top_level(s)
            .into_iter()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(parse_label_req)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// `labels` is the object's `metadata.labels` (null when absent).
    pub fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Eq(k, v) => get(k) == Some(v),
            // As in apimachinery: `!=` and `notin` also match objects without the label.
            LabelReq::NotEq(k, v) => get(k) != Some(v),
            LabelReq::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Gt(k, n) => get(k).and_then(|l| l.parse::<i64>().ok()).is_some_and(|l| l > *n),
            LabelReq::Lt(k, n) => get(k).and_then(|l| l.parse::<i64>().ok()).is_some_and(|l| l < *n),
        })
    }
}

/// Splits on commas outside parentheses: `a in (x,y),b` is two requirements.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_label_req(req: &str) -> Result<LabelReq, String> {
    if let Some(key) = req.strip_prefix('!') {
        return Ok(LabelReq::NotExists(label_key(key.trim(), req)?));
    }
    let key_end = req.find(|c: char| c.is_whitespace() || "=!<>(".contains(c)).unwrap_or(req.len());
    let key = label_key(&req[..key_end], req)?;
    let rest = req[key_end..].trim_start();
    let value = |v: &str| v.trim().to_owned();
    Ok(if rest.is_empty() {
        LabelReq::Exists(key)
    } else if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        LabelReq::Eq(key, value(v))
    } else if let Some(v) = rest.strip_prefix("!=") {
        LabelReq::NotEq(key, value(v))
    } else if let Some(v) = rest.strip_prefix('>') {
        LabelReq::Gt(key, v.trim().parse().map_err(|_| format!("invalid label selector {req:?}: not an integer"))?)
    } else if let Some(v) = rest.strip_prefix('<') {
        LabelReq::Lt(key, v.trim().parse().map_err(|_| format!("invalid label selector {req:?}: not an integer"))?)
    } else if let Some(set) = rest.strip_prefix("notin") {
        LabelReq::NotIn(key, value_set(set, req)?)
    } else if let Some(set) = rest.strip_prefix("in") {
        LabelReq::In(key, value_set(set, req)?)
    } else {
        return Err(format!("invalid label selector {req:?}: unknown operator"));
    })
}

fn label_key(key: &str, req: &str) -> Result<String, String> {
    if key.is_empty() {
        return Err(format!("invalid label selector {req:?}: empty key"));
    }
    Ok(key.to_owned())
}

fn value_set(set: &str, req: &str) -> Result<Vec<String>, String> {
    let inner = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("invalid label selector {req:?}: expected a parenthesised set"))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

#[derive(Debug, PartialEq)]
struct FieldReq {
    path: Vec<String>,
    value: String,
    negate: bool,
}

/// `fieldSelector`: comma-separated `path=value`, `path==value` or `path!=value`, all of which must hold. The path is
/// any dotted JSON path (`metadata.name`, `spec.nodeName`, `status.phase`); a missing field reads as "", like an
/// unset string field on the real server.
#[derive(Debug, Default, PartialEq)]
pub(super) struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        split_unescaped(s, ',')
            .into_iter()
            .filter(|r| !r.trim().is_empty())
            .map(|req| {
                let (path, value, negate) = if let Some((p, v)) = split_once_unescaped(req, "!=") {
                    (p, v, true)
                } else if let Some((p, v)) = split_once_unescaped(req, "==").or_else(|| split_once_unescaped(req, "="))
                {
                    (p, v, false)
                } else {
                    return Err(format!("invalid field selector {req:?}: expected =, == or !="));
                };
                let path = path.trim();
                if path.is_empty() {
                    return Err(format!("invalid field selector {req:?}: empty field"));
                }
                Ok(FieldReq { path: path.split('.').map(str::to_owned).collect(), value: unescape(value), negate })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|req| {
            let field = req.path.iter().try_fold(obj, |v, seg| v.get(seg));
            let text = match field {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (text == req.value) != req.negate
        })
    }
}

/// Field selector values escape `\`, `,` and `=` with a backslash (apimachinery `fields.EscapeValue`).
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut start, mut escaped) = (Vec::new(), 0, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == sep => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn split_once_unescaped<'a>(s: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if s[i..].starts_with(op) {
            return Some((&s[..i], &s[i + op.len()..]));
        }
    }
    None
}

fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(sel: &str, obj_labels: Value) -> bool {
        LabelSelector::parse(sel).unwrap().matches(&obj_labels)
    }

    #[test]
    fn label_operators() {
        let l = json!({"app": "web", "tier": "front", "n": "5"});
        assert!(labels("app=web", l.clone()));
        assert!(labels("app==web", l.clone()));
        assert!(!labels("app!=web", l.clone()));
        assert!(labels("missing!=x", l.clone()), "!= matches objects without the label");
        assert!(labels("app in (api, web),tier", l.clone()));
        assert!(!labels("app notin (web)", l.clone()));
        assert!(labels("missing notin (web)", l.clone()));
        assert!(labels("!missing", l.clone()));
        assert!(!labels("!app", l.clone()));
        assert!(labels("n>4,n<6", l.clone()));
        assert!(labels("", l.clone()));
        assert!(!labels("app=web,tier=back", l));
        assert!(!labels("app", Value::Null));
        assert!(labels("istio/multiCluster=true", json!({"istio/multiCluster": "true"})));
    }

    #[test]
    fn label_parse_errors() {
        for bad in ["=x", "app in web", "app ~ x", "n>x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(m("metadata.name=p,metadata.namespace==ns"));
        assert!(m("spec.nodeName=n1"));
        assert!(m("status.phase!=Failed"));
        assert!(!m("status.phase!=Running"));
        assert!(m("spec.missing="), "a missing field reads as empty");
        assert!(FieldSelector::parse(r"metadata.name=a\,b").unwrap().matches(&json!({"metadata": {"name": "a,b"}})));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
