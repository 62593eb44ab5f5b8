//! Decoding the settings file's `alerts:` block, with the same positions, key paths and
//! "did you mean" as the rest of the file. A sink URL written in the file is checked here;
//! `env:`/`file:` references are checked when the server resolves them.

use super::{Decoder, Fields, index, is_null, suggest};
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
        if let Some(field) = f.get("enabled")
            && let Some(b) = self.boolean(field.value, &f.path("enabled"))
        {
            a.enabled = b;
        }
        if let Some(n) = self.field_uint(&f, "queue_size", 1, 1 << 20) {
            a.queue_size = n as usize;
        }
        if let Some(v) = self.field_ms(&f, "timeout", false) {
            a.timeout_ms = v;
        }
        if let Some(v) = self.field_ms(&f, "deadline", false) {
            a.deadline_ms = v;
        }
        if let Some(n) = self.field_uint(&f, "dead_after", 1, 1000) {
            a.dead_after = n as u32;
        }
        match f.get("sinks") {
            Some(field) => {
                let p = f.path("sinks");
                if let Some(items) = self.sequence(field.value, &p, "a list of sinks") {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(s) = self.sink(item, &index(&p, i)) {
                            if a.sinks.iter().any(|o| o.name == s.name) {
                                self.error(
                                    item,
                                    &index(&p, i),
                                    format!("duplicate sink name {:?} (set name)", s.name),
                                );
                            } else {
                                a.sinks.push(s);
                            }
                        }
                    }
                    if items.is_empty() {
                        self.error(field.value, &p, "needs at least one sink");
                    }
                }
            }
            None if a.enabled => self.error(node, path, "needs at least one sink under sinks"),
            None => {}
        }
        if let Some(field) = f.get("kinds") {
            let p = f.path("kinds");
            let names = kind_names();
            if let Some(k) = self.mapping(field.value, &p, &names) {
                for kind in AlertKind::ALL {
                    if let Some(field) = k.get(kind.name())
                        && let Some(t) = self.mapping(field.value, &k.path(kind.name()), KIND_KEYS)
                    {
                        let c = &mut a.kinds[kind.index()];
                        if let Some(field) = t.get("enabled")
                            && let Some(b) = self.boolean(field.value, &t.path("enabled"))
                        {
                            c.enabled = b;
                        }
                        if let Some(n) = self.field_uint(&t, "threshold", 1, 1 << 40) {
                            c.threshold = n;
                        }
                        if let Some(v) = self.field_ms(&t, "window", true) {
                            c.window_ms = v;
                        }
                        if let Some(v) = self.field_ms(&t, "cooldown", true) {
                            c.cooldown_ms = v;
                        }
                        if let Some(s) = self.severity(&t, "severity") {
                            c.severity = s;
                        }
                    }
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
                let found = self.describe(field.value);
                self.error(
                    field.value,
                    &p,
                    format!("expected a mapping of label names to values, found {found}"),
                );
            }
        }
        a
    }

    fn sink(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<SinkConfig> {
        let f = self.mapping(node, path, SINK_KEYS)?;
        let kind = match f.get("type") {
            None => {
                self.error(
                    node,
                    path,
                    format!("needs type ({})", SinkType::NAMES.join(", ")),
                );
                None
            }
            Some(field) => {
                let p = f.path("type");
                let v = self.string(field.value, &p)?;
                match v.as_str() {
                    "webhook" => Some(SinkType::Webhook),
                    "slack" => Some(SinkType::Slack),
                    "alertmanager" => Some(SinkType::Alertmanager),
                    _ => {
                        let hint = match suggest(&v, SinkType::NAMES) {
                            Some(s) => format!("did you mean {s:?}? "),
                            None => String::new(),
                        };
                        self.error(
                            field.value,
                            &p,
                            format!(
                                "unknown sink type {v:?} ({hint}expected one of {})",
                                SinkType::NAMES.join(", ")
                            ),
                        );
                        None
                    }
                }
            }
        };
        let url = match f.get("url") {
            None => {
                self.error(node, path, "needs url (a URL, env:NAME or file:/path)");
                None
            }
            Some(field) => self.secret(field.value, &f.path("url"), true),
        };
        let hmac_key = match f.get("hmac_key") {
            Some(field) => {
                if kind.is_some_and(|k| k != SinkType::Webhook) {
                    self.error(
                        field.key,
                        &f.path("hmac_key"),
                        "only a webhook sink signs its body",
                    );
                }
                self.secret(field.value, &f.path("hmac_key"), false)
            }
            None => None,
        };
        let signature_header = match f.get("signature_header") {
            Some(field) => {
                let p = f.path("signature_header");
                let v = self.string(field.value, &p)?;
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    self.error(field.value, &p, "a header name is letters, digits and -");
                }
                v.to_ascii_lowercase()
            }
            None => DEFAULT_SIGNATURE_HEADER.to_string(),
        };
        let min_severity = self.severity(&f, "min_severity").unwrap_or(Severity::Info);
        let kind = kind?;
        let name = match f.get("name") {
            Some(field) => {
                let p = f.path("name");
                let v = self.string(field.value, &p)?;
                if v.is_empty()
                    || v.len() > 64
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    self.error(field.value, &p, "must be 1-64 letters, digits, - or _");
                    return None;
                }
                v
            }
            None => kind.name().to_string(),
        };
        Some(SinkConfig {
            name,
            kind,
            url: url?,
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

    fn severity(&mut self, f: &Fields<'_, '_>, name: &str) -> Option<Severity> {
        let field = f.get(name)?;
        let p = f.path(name);
        let v = self.string(field.value, &p)?;
        let s = Severity::parse(&v);
        if s.is_none() {
            let hint = match suggest(&v, Severity::NAMES) {
                Some(s) => format!("did you mean {s:?}? "),
                None => String::new(),
            };
            self.error(
                field.value,
                &p,
                format!(
                    "unknown severity {v:?} ({hint}expected one of {})",
                    Severity::NAMES.join(", ")
                ),
            );
        }
        s
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
