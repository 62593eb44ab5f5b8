//! One watched resource: its spec decoded by the config decoder, the last good version kept
//! through invalid updates, and the status the sidecar wants it to show.
//!
//! Pure (no I/O, clock passed in), so every status decision is tested without a server.

use crate::config::{ConfigErrors, DescriptorConfig, DomainConfig};
use crate::lists::{EntrySource, ListEntry};
use crate::runtime::live::Admission;
use kube::api::DynamicObject;
use serde_json::{Value, json};

/// Which of our two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    RateLimitPolicy,
    AccessList,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::AccessList => "AccessList",
        }
    }
}

/// What a resource decodes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Domain(DomainConfig),
    Lists {
        allow: Vec<ListEntry>,
        block: Vec<ListEntry>,
    },
}

/// A resource as last seen, with what the sidecar made of it.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub created: String,
    /// `status` as last seen on the object.
    pub seen_status: Value,
    /// Why the newest generation was refused, if it was.
    pub invalid: Option<String>,
    /// The newest valid content: what is in force (an invalid update keeps the previous one).
    pub good: Option<Content>,
}

impl Tracked {
    /// Whether `other` is this object with the same spec (only its status or metadata moved).
    pub fn same_spec(&self, other: &Tracked) -> bool {
        self.uid == other.uid && self.generation.is_some() && self.generation == other.generation
    }

    /// `Kind ns/name`: how messages, logs and the merge name this resource.
    pub fn source(&self) -> String {
        format!("{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }

    /// Decodes `obj`; `previous` (the same object as seen before) lends its last good
    /// content when this generation is invalid.
    pub fn from_object(kind: Kind, obj: &DynamicObject, previous: Option<&Tracked>) -> Tracked {
        let meta = &obj.metadata;
        let mut t = Tracked {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            generation: meta.generation,
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            seen_status: obj.data.get("status").cloned().unwrap_or(Value::Null),
            invalid: None,
            good: None,
        };
        // Kubernetes bumps `generation` on every spec change of a resource with a status
        // subresource: the same uid and generation mean the same spec, so status-only
        // updates (our own writes among them) are not decoded again.
        if let Some(p) = previous.filter(|p| p.same_spec(&t)) {
            t.invalid = p.invalid.clone();
            t.good = p.good.clone();
            return t;
        }
        match decode(kind, &t.source(), obj.data.get("spec")) {
            Ok(content) => t.good = Some(content),
            Err(message) => {
                t.invalid = Some(message);
                // A recreated object (new uid) starts over: its predecessor's rules are gone.
                t.good = previous
                    .filter(|p| p.uid == t.uid)
                    .and_then(|p| p.good.clone());
            }
        }
        t
    }

    /// The status this resource should show, given what the merge made of it.
    pub fn desired_status(&self, admission: Option<&Admission>) -> Value {
        let (ok, reason, message) = match (&self.invalid, admission) {
            (Some(why), _) => {
                let kept = if self.good.is_some() {
                    " (the previously accepted generation stays in force)"
                } else {
                    ""
                };
                (false, "Invalid", format!("{why}{kept}"))
            }
            (None, Some(Admission::Conflict(why))) => (false, "DomainConflict", why.clone()),
            (None, _) => (true, "Accepted", self.accepted_message()),
        };
        let mut status = json!({
            "observedGeneration": self.generation,
            "conditions": [{
                "type": "Accepted",
                "status": if ok { "True" } else { "False" },
                "reason": reason,
                "message": message,
                "observedGeneration": self.generation,
            }],
        });
        let in_force = !matches!(admission, Some(Admission::Conflict(_)));
        match (&self.good, in_force) {
            (Some(Content::Domain(d)), true) => {
                status["rules"] = json!(count_rules(&d.descriptors))
            }
            (Some(Content::Domain(_)), false) | (None, _) if self.kind == Kind::RateLimitPolicy => {
                status["rules"] = json!(0)
            }
            (Some(Content::Lists { allow, block }), _) => {
                status["allow"] = json!(allow.len());
                status["block"] = json!(block.len());
            }
            (None, _) => {
                status["allow"] = json!(0);
                status["block"] = json!(0);
            }
            _ => {}
        }
        status
    }

    fn accepted_message(&self) -> String {
        match &self.good {
            Some(Content::Domain(d)) => format!(
                "in force as domain {:?} ({} rules)",
                d.domain,
                count_rules(&d.descriptors)
            ),
            Some(Content::Lists { allow, block }) => format!(
                "in force: {} allow and {} block entries",
                allow.len(),
                block.len()
            ),
            None => String::new(),
        }
    }
}

/// Whether `seen` already says what `desired` says; the transition time is not compared.
pub fn status_matches(seen: &Value, desired: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(conds) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conds {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(seen) == strip(desired)
}

/// Adds `lastTransitionTime`: kept from `seen` when the condition's status did not change.
pub fn with_transition_time(seen: &Value, mut desired: Value, now: &str) -> Value {
    let seen_cond = seen
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"));
    if let Some(conds) = desired.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            let time = match seen_cond {
                Some(s) if s["status"] == c["status"] && s["lastTransitionTime"].is_string() => {
                    s["lastTransitionTime"].clone()
                }
                _ => json!(now),
            };
            c["lastTransitionTime"] = time;
        }
    }
    desired
}

/// What `config validate-resources` says of one document.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestReport {
    pub file: std::path::PathBuf,
    /// `RateLimitPolicy ns/name`, or `document N` when it is not one of ours.
    pub resource: String,
    /// `Ok(what it would do)`, `Ok(None)` for documents of other kinds, `Err(why not)`.
    pub outcome: Result<Option<String>, String>,
}

/// Checks manifests (multi-document YAML, as `kubectl apply -f` takes them) the way the
/// watcher would: each resource's spec through the config decoder, then domain conflicts
/// among them and with `file` (the file configuration), earlier documents taking precedence.
pub fn validate_manifests(
    files: &[(std::path::PathBuf, String)],
    file: Option<&crate::config::Config>,
) -> Vec<ManifestReport> {
    use crate::runtime::live::{ExternalDomain, admissions_for};
    let mut reports = Vec::new();
    let mut tracked: Vec<(usize, Tracked)> = Vec::new();
    for (path, text) in files {
        let docs = match crate::config::yaml::documents(text) {
            Ok(docs) => docs,
            Err(e) => {
                reports.push(ManifestReport {
                    file: path.clone(),
                    resource: "file".into(),
                    outcome: Err(format!("invalid YAML: {e}")),
                });
                continue;
            }
        };
        for (i, doc) in docs.into_iter().enumerate() {
            let resource = format!("document {}", i + 1);
            let kind = match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
                (Some("ratethrottle.io/v1alpha1"), Some("RateLimitPolicy")) => {
                    Kind::RateLimitPolicy
                }
                (Some("ratethrottle.io/v1alpha1"), Some("AccessList")) => Kind::AccessList,
                (_, kind) => {
                    if !doc.is_null() {
                        let name = doc["metadata"]["name"].as_str();
                        let resource = match (kind, name) {
                            (Some(k), Some(n)) => format!("{resource} ({k} {n})"),
                            _ => resource,
                        };
                        reports.push(ManifestReport {
                            file: path.clone(),
                            resource,
                            outcome: Ok(None),
                        });
                    }
                    continue;
                }
            };
            let mut doc = doc;
            if doc["metadata"]["namespace"].is_null() && doc["metadata"].is_object() {
                // kubectl fills in the context's namespace.
                doc["metadata"]["namespace"] = Value::from("default");
            }
            let obj = match serde_json::from_value::<DynamicObject>(doc) {
                Ok(obj) if obj.metadata.name.as_deref().is_some_and(|n| !n.is_empty()) => obj,
                Ok(_) => {
                    reports.push(ManifestReport {
                        file: path.clone(),
                        resource,
                        outcome: Err("metadata.name: required".into()),
                    });
                    continue;
                }
                Err(e) => {
                    reports.push(ManifestReport {
                        file: path.clone(),
                        resource,
                        outcome: Err(format!("not a Kubernetes object: {e}")),
                    });
                    continue;
                }
            };
            let t = Tracked::from_object(kind, &obj, None);
            reports.push(ManifestReport {
                file: path.clone(),
                resource: t.source(),
                outcome: Ok(None),
            });
            tracked.push((reports.len() - 1, t));
        }
    }
    let external: Vec<ExternalDomain> = tracked
        .iter()
        .enumerate()
        .filter_map(|(order, (_, t))| match &t.good {
            Some(Content::Domain(d)) if t.invalid.is_none() => Some(ExternalDomain {
                source: t.source(),
                precedence: format!("{order:08}"),
                domain: d.clone(),
            }),
            _ => None,
        })
        .collect();
    let admissions = admissions_for(file, &external);
    for (at, t) in tracked {
        let status = t.desired_status(admissions.get(&t.source()));
        let condition = &status["conditions"][0];
        let message = condition["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        reports[at].outcome = if condition["status"] == "True" {
            Ok(Some(message))
        } else {
            Err(message)
        };
    }
    reports
}

fn decode(kind: Kind, source: &str, spec: Option<&Value>) -> Result<Content, String> {
    let spec = match spec {
        Some(v) if v.is_object() => v,
        Some(Value::Null) | None => return Err("spec: required".into()),
        Some(_) => return Err("spec: expected a mapping".into()),
    };
    // JSON is YAML: the spec goes through the file decoder unchanged.
    let text = serde_json::to_string(spec).map_err(|e| format!("spec: {e}"))?;
    match kind {
        Kind::RateLimitPolicy => crate::config::parse_domain(source, &text)
            .map(Content::Domain)
            .map_err(|e| describe(&e)),
        Kind::AccessList => crate::config::parse_lists(source, &text)
            .map(|l| {
                let named = |list: &[crate::config::authz::ListEntryConfig]| {
                    let mut entries =
                        crate::runtime::blocklist::declared_entries(list, EntrySource::Kubernetes);
                    for e in &mut entries {
                        if e.reason.is_empty() {
                            e.reason = source.to_string();
                        }
                    }
                    entries
                };
                Content::Lists {
                    allow: named(&l.allow),
                    block: named(&l.block),
                }
            })
            .map_err(|e| describe(&e)),
    }
}

/// `spec.key: message; …` — positions in the JSON text mean nothing to a `kubectl` user.
fn describe(errors: &ConfigErrors) -> String {
    let mut parts: Vec<String> = errors
        .iter()
        .map(|e| {
            if e.key.is_empty() {
                format!("spec: {}", e.message)
            } else {
                format!("spec.{}: {}", e.key, e.message)
            }
        })
        .collect();
    parts.dedup();
    // Status messages are for humans at a terminal; Kubernetes caps them at 32 KiB.
    let mut text = parts.join("; ");
    if text.len() > 4096 {
        let mut cut = 4096;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" …");
    }
    text
}

fn count_rules(ds: &[DescriptorConfig]) -> usize {
    ds.iter()
        .map(|d| usize::from(!d.limits.is_empty()) + count_rules(&d.descriptors))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, generation: i64, uid: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "ratethrottle.io/v1alpha1",
            "kind": kind,
            "metadata": {
                "name": "n", "namespace": "ns", "uid": uid, "generation": generation,
                "creationTimestamp": "2026-01-02T03:04:05Z"
            },
            "spec": spec,
        }))
        .unwrap()
    }

    fn policy(generation: i64, uid: &str, spec: Value) -> DynamicObject {
        object("RateLimitPolicy", generation, uid, spec)
    }

    #[test]
    fn a_pasted_domain_file_is_accepted_with_its_rule_count() {
        let spec = json!({"domain": "api", "descriptors": [
            {"key": "path", "value": 5, "rate_limit": {"unit": "second", "requests_per_unit": 10},
             "descriptors": [{"key": "user", "rate_limit": {"unit": "minute", "requests_per_unit": 1}}]},
            {"key": "whitelisted"}
        ]});
        let t = Tracked::from_object(Kind::RateLimitPolicy, &policy(1, "u", spec), None);
        assert_eq!(t.source(), "RateLimitPolicy ns/n");
        assert_eq!(t.created, "2026-01-02T03:04:05Z");
        let Some(Content::Domain(d)) = &t.good else {
            panic!("{t:?}")
        };
        // An integer value (int-or-string in the schema) matches as its text.
        assert_eq!(d.descriptors[0].value.as_deref(), Some("5"));
        let s = t.desired_status(Some(&Admission::Accepted));
        assert_eq!(s["rules"], 2);
        assert_eq!(s["observedGeneration"], 1);
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["conditions"][0]["reason"], "Accepted");
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_version_and_says_why() {
        let good = json!({"domain": "api", "descriptors": [
            {"key": "k", "rate_limit": {"unit": "second", "requests_per_unit": 1}}]});
        let bad = json!({"domain": "api", "descriptors": [
            {"key": "k", "rate_limit": {"unit": "fortnight", "requests_per_unit": 1}},
            {"key": "k2", "rate_limit": {"unit": "second", "requests_per_unit": 1}, "extra": 1}]});
        let v1 = Tracked::from_object(Kind::RateLimitPolicy, &policy(1, "u", good), None);
        let v2 = Tracked::from_object(
            Kind::RateLimitPolicy,
            &policy(2, "u", bad.clone()),
            Some(&v1),
        );
        assert_eq!(v2.good, v1.good);
        let s = v2.desired_status(None);
        let c = &s["conditions"][0];
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("Invalid"))
        );
        let m = c["message"].as_str().unwrap();
        assert!(
            m.contains("spec.descriptors[0].rate_limit.unit: unknown unit \"fortnight\""),
            "{m}"
        );
        assert!(m.contains("spec.descriptors[1]"), "{m}");
        assert!(m.ends_with("stays in force)"), "{m}");
        assert_eq!(s["observedGeneration"], 2);
        assert_eq!(s["rules"], 1);
        // Deleted and recreated under the same name: nothing to fall back to.
        let fresh =
            Tracked::from_object(Kind::RateLimitPolicy, &policy(1, "other", bad), Some(&v1));
        assert_eq!(fresh.good, None);
        assert_eq!(fresh.desired_status(None)["rules"], 0);
    }

    #[test]
    fn missing_or_odd_specs_are_invalid_not_errors() {
        for spec in [
            Value::Null,
            json!([1]),
            json!({"descriptors": []}),
            json!({"domain": "d", "settings": {}}),
        ] {
            let t =
                Tracked::from_object(Kind::RateLimitPolicy, &policy(1, "u", spec.clone()), None);
            assert!(t.invalid.is_some(), "{spec}");
            assert!(t.good.is_none());
        }
    }

    #[test]
    fn conflicts_are_reported_and_count_no_rules() {
        let spec = json!({"domain": "api", "descriptors": [
            {"key": "k", "rate_limit": {"unit": "second", "requests_per_unit": 1}}]});
        let t = Tracked::from_object(Kind::RateLimitPolicy, &policy(3, "u", spec), None);
        let s = t.desired_status(Some(&Admission::Conflict("taken".into())));
        assert_eq!(s["conditions"][0]["reason"], "DomainConflict");
        assert_eq!(s["conditions"][0]["message"], "taken");
        assert_eq!(s["rules"], 0);
    }

    #[test]
    fn access_lists_decode_like_the_settings_file() {
        let spec = json!({
            "allow": ["10.0.0.0/8", {"value": "user:alice", "reason": "ops"}],
            "block": [{"value": "203.0.113.7", "code": "abuse", "expires": "2030-01-01T00:00:00Z"}]
        });
        let t = Tracked::from_object(Kind::AccessList, &object("AccessList", 1, "u", spec), None);
        let Some(Content::Lists { allow, block }) = &t.good else {
            panic!("{t:?}")
        };
        assert_eq!(allow.len(), 2);
        assert_eq!(allow[0].reason, "AccessList ns/n");
        assert_eq!(allow[1].reason, "ops");
        assert_eq!(block[0].expires_at_ms, Some(1_893_456_000_000));
        assert_eq!(block[0].source, EntrySource::Kubernetes);
        let s = t.desired_status(None);
        assert_eq!(
            (s["allow"].as_u64(), s["block"].as_u64()),
            (Some(2), Some(1))
        );

        let bad = json!({"block": [{"value": "10.0.0.1/8"}, {"value": "x", "code": "Bad Code"}]});
        let t = Tracked::from_object(Kind::AccessList, &object("AccessList", 2, "u", bad), None);
        let m = t.invalid.unwrap();
        assert!(
            m.contains("spec.block[0].value: \"10.0.0.1/8\" has host bits set"),
            "{m}"
        );
        assert!(m.contains("spec.block[1].code"), "{m}");
    }

    #[test]
    fn manifests_are_checked_like_the_watcher_would() {
        let text = r#"
apiVersion: ratethrottle.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: a, namespace: ns}
spec:
  domain: d
  descriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1}}]
---
apiVersion: ratethrottle.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: b}
spec: {domain: d}
---
apiVersion: ratethrottle.io/v1alpha1
kind: AccessList
metadata: {name: c, namespace: ns}
spec: {block: ["10.0.0.1/8"]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: ratethrottle.io/v1alpha1
kind: RateLimitPolicy
metadata: {namespace: ns}
spec: {domain: e}
"#;
        let r = validate_manifests(&[("m.yaml".into(), text.into())], None);
        let outcomes: Vec<(&str, bool)> = r
            .iter()
            .map(|r| (r.resource.as_str(), r.outcome.is_ok()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("RateLimitPolicy ns/a", true),
                ("RateLimitPolicy default/b", false),
                ("AccessList ns/c", false),
                ("document 4 (ConfigMap x)", true),
                ("document 5", false),
            ]
        );
        assert!(
            r[1].outcome
                .as_ref()
                .unwrap_err()
                .contains("already defined by RateLimitPolicy ns/a")
        );
        assert!(r[2].outcome.as_ref().unwrap_err().contains("spec.block[0]"));
        assert_eq!(r[3].outcome, Ok(None));
        assert_eq!(r[4].outcome, Err("metadata.name: required".into()));
        let bad = validate_manifests(&[("x.yaml".into(), "a: [".into())], None);
        assert!(
            bad[0]
                .outcome
                .as_ref()
                .unwrap_err()
                .starts_with("invalid YAML")
        );
    }

    #[test]
    fn status_comparison_ignores_only_the_transition_time() {
        let t = Tracked::from_object(
            Kind::AccessList,
            &object("AccessList", 1, "u", json!({"allow": ["1.2.3.4"]})),
            None,
        );
        let desired = t.desired_status(None);
        let written = with_transition_time(&Value::Null, desired.clone(), "2026-01-01T00:00:00Z");
        assert!(status_matches(&written, &desired));
        // Same condition status: the old transition time stays.
        let again = with_transition_time(&written, desired.clone(), "2027-01-01T00:00:00Z");
        assert_eq!(
            again["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        let mut other = desired.clone();
        other["observedGeneration"] = json!(2);
        assert!(!status_matches(&written, &other));
        assert!(!status_matches(&Value::Null, &desired));
    }
}
