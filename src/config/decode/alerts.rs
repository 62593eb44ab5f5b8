//! Decoding the settings file's `alerts:` block, with the same positions, key paths and
//! "did you mean" as the rest of the file. A sink URL written in the file is checked here;
//! `env:`/`file:` references are checked when the server resolves them.

use super::value::{Named, set};
use super::{Decoder, is_null};
use crate::config::alerts::{
    AlertKind, AlertSettings, DEFAULT_SIGNATURE_HEADER, SecretRef, Severity, SinkConfig, SinkType,
    check_sink_url,
};
use saphyr::MarkedYaml;

const ALERTS_KEYS: &[&str] = &[
    "enabled",
    "queue_size",
    "timeout",
    "deadline",
    "dead_after",
    "sinks",
    "kinds",
    "labels",
];
const SINK_KEYS: &[&str] = &[
    "name",
    "type",
    "url",
    "hmac_key",
    "signature_header",
    "min_severity",
];
const KIND_KEYS: &[&str] = &["enabled", "threshold", "window", "cooldown", "severity"];

fn kind_names() -> Vec<&'static str> {
    AlertKind::ALL.iter().map(|k| k.name()).collect()
}

impl Named for SinkType {
    const WHAT: &'static str = "sink type";
    const NAMES: &'static [&'static str] = SinkType::NAMES;
    fn parse_name(s: &str) -> Option<Self> {
        match s {
            "webhook" => Some(SinkType::Webhook),
            "slack" => Some(SinkType::Slack),
            "alertmanager" => Some(SinkType::Alertmanager),
            _ => None,
        }
    }
}

impl Named for Severity {
    const WHAT: &'static str = "severity";
    const NAMES: &'static [&'static str] = Severity::NAMES;
    fn parse_name(s: &str) -> Option<Self> {
        Severity::parse(s)
    }
}

/// A sink's name: 1-64 letters, digits, - or _.
fn sink_name(v: String) -> Result<String, String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if v.is_empty() || v.len() > 64 || !v.chars().all(ok) {
        Err("must be 1-64 letters, digits, - or _".into())
    } else {
        Ok(v)
    }
}

impl Decoder<'_> {
    pub(super) fn alerts(&mut self, node: &MarkedYaml<'_>, path: &str) -> AlertSettings {
        let mut a = AlertSettings::default();
        if is_null(node) {
            self.error(node, path, "needs at least one sink under sinks");
            return a;
        }
        let Some(f) = self.mapping(node, path, ALERTS_KEYS) else {
            return a;
        };
        set(&mut a.enabled, self.field(&f, "enabled"));
        let queue_size = self.field_uint(&f, "queue_size", 1, 1 << 20);
        set(&mut a.queue_size, queue_size);
        set(&mut a.timeout_ms, self.field_ms(&f, "timeout", false));
        set(&mut a.deadline_ms, self.field_ms(&f, "deadline", false));
        let dead_after = self.field_uint(&f, "dead_after", 1, 1000);
        set(&mut a.dead_after, dead_after);
        if a.enabled && f.get("sinks").is_none() {
            self.error(node, path, "needs at least one sink under sinks");
        }
        if let Some(items) = self.field_items(&f, "sinks", "a list of sinks") {
            if items.is_empty() {
                self.error_at(&f, "sinks", "needs at least one sink");
            }
            for (item, p) in items {
                let Some(s) = self.sink(item, &p) else {
                    continue;
                };
                if a.sinks.iter().any(|o| o.name == s.name) {
                    let why = format!("duplicate sink name {:?} (set name)", s.name);
                    self.error(item, &p, why);
                } else {
                    a.sinks.push(s);
                }
            }
        }
        if let Some(k) = self.section(&f, "kinds", &kind_names()) {
            for kind in AlertKind::ALL {
                if let Some(t) = self.section(&k, kind.name(), KIND_KEYS) {
                    let c = &mut a.kinds[kind.index()];
                    set(&mut c.enabled, self.field(&t, "enabled"));
                    let threshold = self.field_uint(&t, "threshold", 1, 1 << 40);
                    set(&mut c.threshold, threshold);
                    set(&mut c.window_ms, self.field_ms(&t, "window", true));
                    set(&mut c.cooldown_ms, self.field_ms(&t, "cooldown", true));
                    set(&mut c.severity, self.field(&t, "severity"));
                }
            }
        }
        if let Some(field) = f.get("labels") {
            let p = f.path("labels");
            if let saphyr::YamlData::Mapping(map) = super::data(field.value) {
                for (k, v) in map.iter() {
                    let name = self.string(k, &p).unwrap_or_default();
                    let kp = super::child(&p, &name);
                    let valid = name
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        self.error(
                            k,
                            &kp,
                            "a label name is letters, digits and _, not starting with a digit",
                        );
                        continue;
                    }
                    if let Some(value) = self.string(v, &kp) {
                        a.labels.push((name, value));
                    }
                }
            } else {
                self.expected(field.value, &p, "a mapping of label names to values");
            }
        }
        a
    }

    fn sink(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<SinkConfig> {
        let f = self.mapping(node, path, SINK_KEYS)?;
        let kind: Option<SinkType> = match f.get("type") {
            None => {
                self.error(
                    node,
                    path,
                    format!("needs type ({})", SinkType::NAMES.join(", ")),
                );
                None
            }
            Some(field) => {
                // A type that is no string at all ends the sink here; an unknown name does not.
                let v: String = self.field(&f, "type")?;
                self.named(field.value, &f.path("type"), &v)
            }
        };
        if f.get("url").is_none() {
            self.error(node, path, "needs url (a URL, env:NAME or file:/path)");
        }
        let url = self.field_by(&f, "url", |d, n, p| d.secret(n, p, true));
        if kind.is_some_and(|k| k != SinkType::Webhook) {
            self.error_at_key(&f, "hmac_key", "only a webhook sink signs its body");
        }
        let hmac_key = self
            .field_by(&f, "hmac_key", |d, n, p| d.secret(n, p, false))
            .flatten();
        let signature_header = match f.get("signature_header") {
            Some(field) => {
                let v: String = self.field(&f, "signature_header")?;
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    let why = "a header name is letters, digits and -";
                    self.error(field.value, &f.path("signature_header"), why);
                }
                v.to_ascii_lowercase()
            }
            None => DEFAULT_SIGNATURE_HEADER.to_string(),
        };
        let min_severity = self.field(&f, "min_severity").unwrap_or(Severity::Info);
        let kind = kind?;
        let name = match f.get("name") {
            Some(_) => self.field_with(&f, "name", sink_name)?,
            None => kind.name().to_string(),
        };
        Some(SinkConfig {
            name,
            kind,
            url: url.flatten()?,
            hmac_key,
            signature_header,
            min_severity,
        })
    }

    /// A literal, `env:NAME` or `file:/path`; a literal URL is checked now.
    fn secret(&mut self, node: &MarkedYaml<'_>, path: &str, is_url: bool) -> Option<SecretRef> {
        let v = self.string(node, path)?;
        let r = SecretRef::parse(&v);
        let problem = match &r {
            SecretRef::Literal(s) if s.is_empty() => Some("must not be empty".to_string()),
            SecretRef::Literal(s) if is_url => check_sink_url(s).err(),
            SecretRef::Env(n)
                if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Some(format!(
                    "env:{n:?} needs a variable name (letters, digits, _)"
                ))
            }
            SecretRef::File(p) if p.as_os_str().is_empty() => {
                Some("file: needs a path".to_string())
            }
            _ => None,
        };
        match problem {
            Some(why) => {
                self.error(node, path, why);
                None
            }
            None => Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode_file;
    use crate::config::alerts::{AlertKind, SecretRef, Severity, SinkType};
    use std::path::Path;

    fn decode(text: &str) -> super::super::FileOutput {
        decode_file(Path::new("s.yaml"), text)
    }

    fn errors(text: &str) -> Vec<(String, String)> {
        decode(text)
            .errors
            .into_iter()
            .map(|e| (e.key, e.message))
            .collect()
    }

    #[test]
    fn a_full_block_decodes() {
        let out = decode(
            "alerts:\n  queue_size: 16\n  timeout: 2s\n  deadline: 10s\n  dead_after: 2\n  \
             labels: {cluster: eu-1}\n  sinks:\n    - type: webhook\n      url: http://127.0.0.1:9/h\n      \
             hmac_key: env:HOOK_KEY\n      signature_header: X-Sig\n    - type: slack\n      \
             url: file:/run/secrets/slack\n      min_severity: critical\n    - {type: alertmanager, url: 'http://am:9093'}\n  \
             kinds:\n    anomaly_decision: {threshold: 5, window: 1m, cooldown: 10m, severity: critical}\n    \
             storage_recovered: {enabled: false}\n",
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let (a, loc) = &out.alerts[0];
        assert_eq!(loc.key, "alerts");
        assert_eq!(
            (a.queue_size, a.timeout_ms, a.deadline_ms, a.dead_after),
            (16, 2000, 10_000, 2)
        );
        assert_eq!(a.labels, vec![("cluster".into(), "eu-1".into())]);
        assert_eq!(a.sinks.len(), 3);
        assert_eq!(a.sinks[0].kind, SinkType::Webhook);
        assert_eq!(a.sinks[0].hmac_key, Some(SecretRef::Env("HOOK_KEY".into())));
        assert_eq!(a.sinks[0].signature_header, "x-sig");
        assert_eq!(a.sinks[1].url, SecretRef::File("/run/secrets/slack".into()));
        assert_eq!(a.sinks[1].min_severity, Severity::Critical);
        assert_eq!(a.sinks[2].name, "alertmanager");
        let k = a.kind(AlertKind::AnomalyDecision);
        assert_eq!(
            (k.threshold, k.window_ms, k.cooldown_ms, k.severity),
            (5, 60_000, 600_000, Severity::Critical)
        );
        assert!(!a.kind(AlertKind::StorageRecovered).enabled);
        assert_eq!(
            *a.kind(AlertKind::ViolationRate),
            AlertKind::ViolationRate.defaults()
        );
    }

    #[test]
    fn bad_values_are_errors_with_their_key_path() {
        let e = errors(concat!(
            "alerts:\n",
            "  queue_sise: 5\n",
            "  sinks:\n",
            "    - type: webhok\n",
            "      url: http://x\n",
            "    - type: slack\n",
            "      url: 'hooks.slack.com/services/x'\n",
            "    - type: alertmanager\n",
            "      url: http://am:9093\n",
            "      hmac_key: k\n",
            "    - type: webhook\n",
            "      url: 'env:'\n",
            "    - type: webhook\n",
            "  kinds:\n",
            "    anomaly_decisions: {}\n",
            "    violation_rate: {threshold: 0, severity: loud, cooldwn: 1m}\n",
        ));
        let has = |key: &str, needle: &str| {
            assert!(
                e.iter().any(|(k, m)| k == key && m.contains(needle)),
                "no {key}: {needle} in {e:#?}"
            );
        };
        has("alerts.queue_sise", "did you mean \"queue_size\"?");
        has("alerts.sinks[0].type", "did you mean \"webhook\"?");
        has("alerts.sinks[1].url", "is not a URL");
        has("alerts.sinks[2].hmac_key", "only a webhook sink signs");
        has("alerts.sinks[3].url", "needs a variable name");
        has("alerts.sinks[4]", "needs url");
        has(
            "alerts.kinds.anomaly_decisions",
            "did you mean \"anomaly_decision\"?",
        );
        has("alerts.kinds.violation_rate.threshold", "must be from 1 to");
        has(
            "alerts.kinds.violation_rate.severity",
            "expected one of info",
        );
        has(
            "alerts.kinds.violation_rate.cooldwn",
            "did you mean \"cooldown\"?",
        );
        assert_eq!(e.len(), 10, "{e:#?}");
        let e = errors("alerts:\n");
        assert_eq!(e[0].0, "alerts");
        assert!(e[0].1.contains("at least one sink"), "{e:?}");
        let e = errors("alerts: [1]\n");
        assert!(e[0].1.contains("expected a mapping"), "{e:?}");
        let e = errors(
            "alerts:\n  sinks:\n    - {type: slack, url: 'http://a'}\n    - {type: slack, url: 'http://b'}\n",
        );
        assert!(
            e.iter()
                .any(|(k, m)| k == "alerts.sinks[1]" && m.contains("duplicate sink name")),
            "{e:?}"
        );
    }
}
