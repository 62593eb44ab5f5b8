//! Decoding the settings file's `tracing:` block onto `TracingSettings`, with the same
//! positions, key paths and "did you mean" as the rest of the file. `tracing:` with nothing
//! under it turns export on with every default.

use super::value::{Named, set};
use super::{Decoder, child, data, is_null};
use crate::config::otel::{SamplerKind, TracingSettings, check_endpoint};
use saphyr::{MarkedYaml, YamlData};

const TRACING_KEYS: &[&str] = &[
    "enabled",
    "endpoint",
    "service_name",
    "sampler",
    "sample_ratio",
    "resource_attributes",
    "queue_size",
    "batch_size",
    "flush_interval",
    "export_timeout",
    "record_values",
];

impl Named for SamplerKind {
    const WHAT: &'static str = "sampler";
    const NAMES: &'static [&'static str] = SamplerKind::NAMES;
    fn parse_name(s: &str) -> Option<Self> {
        SamplerKind::parse(s)
    }
}

/// A service name: non-empty, no control characters.
fn service_name(v: String) -> Result<String, String> {
    if v.is_empty() || v.chars().any(char::is_control) {
        Err("must be non-empty, no control characters".into())
    } else {
        Ok(v)
    }
}

impl Decoder<'_> {
    pub(super) fn tracing(&mut self, node: &MarkedYaml<'_>, path: &str) -> TracingSettings {
        let mut t = TracingSettings::default();
        if is_null(node) {
            return t;
        }
        let Some(f) = self.mapping(node, path, TRACING_KEYS) else {
            return t;
        };
        set(&mut t.enabled, self.field(&f, "enabled"));
        t.record_values = self.flag(&f, "record_values");
        t.endpoint = self.field_with(&f, "endpoint", |v: String| check_endpoint(&v).map(|()| v));
        t.service_name = self.field_with(&f, "service_name", service_name);
        set(&mut t.sampler, self.field(&f, "sampler"));
        let ratio = |v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(format!("must be from 0 to 1, found {v}"))
            }
        };
        let sample_ratio = self.field_with(&f, "sample_ratio", ratio);
        set(&mut t.sample_ratio, sample_ratio);
        if let Some(field) = f.get("resource_attributes") {
            let p = f.path("resource_attributes");
            if let YamlData::Mapping(map) = data(field.value) {
                for (k, v) in map.iter() {
                    let Some(key) = self.string(k, &p) else {
                        continue;
                    };
                    let kp = child(&p, &key);
                    if key.is_empty() {
                        self.error(k, &kp, "attribute names must not be empty");
                        continue;
                    }
                    if let Some(value) = self.string(v, &kp) {
                        t.resource_attributes.insert(key, value);
                    }
                }
            } else {
                self.expected(field.value, &p, "a mapping of attribute names to values");
            }
        }
        let queue_size = self.field_uint(&f, "queue_size", 1, 1 << 20);
        set(&mut t.queue_size, queue_size);
        let batch_size = self.field_uint(&f, "batch_size", 1, 1 << 16);
        set(&mut t.batch_size, batch_size);
        let flush_interval = self.field_ms(&f, "flush_interval", false);
        set(&mut t.flush_interval_ms, flush_interval);
        let export_timeout = self.field_ms(&f, "export_timeout", false);
        set(&mut t.export_timeout_ms, export_timeout);
        t
    }
}

#[cfg(test)]
mod tests {
    use crate::config::otel::SamplerKind;
    use crate::config::parse_str;

    fn errors(text: &str) -> Vec<(String, String)> {
        match parse_str("t.yaml", text) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .iter()
                .map(|e| (e.key.clone(), e.message.clone()))
                .collect(),
        }
    }

    #[test]
    fn block_decodes() {
        let c = parse_str(
            "t.yaml",
            "tracing:\n  endpoint: http://collector:4317\n  service_name: rl\n  sampler: parentbased_traceidratio\n  sample_ratio: 0.25\n  resource_attributes: {deployment.environment: prod}\n  queue_size: 64\n  batch_size: 8\n  flush_interval: 100ms\n  export_timeout: 2s\n  record_values: true\n",
        )
        .unwrap();
        let t = c.tracing.unwrap();
        assert_eq!(t.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(t.service_name.as_deref(), Some("rl"));
        assert_eq!(t.sampler, SamplerKind::ParentbasedTraceIdRatio);
        assert_eq!(t.sample_ratio, 0.25);
        assert_eq!(t.resource_attributes["deployment.environment"], "prod");
        assert_eq!((t.queue_size, t.batch_size), (64, 8));
        assert_eq!((t.flush_interval_ms, t.export_timeout_ms), (100, 2000));
        assert!(t.record_values);
        assert!(parse_str("t.yaml", "tracing:\n").unwrap().tracing.is_some());
        assert!(
            parse_str("t.yaml", "tracing: {enabled: false}\n")
                .unwrap()
                .tracing
                .is_none()
        );
        assert!(
            parse_str("t.yaml", "settings: {}\n")
                .unwrap()
                .tracing
                .is_none()
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = errors(
            "tracing:\n  endpoint: collector:4317\n  sample_ratio: 1.5\n  sampler: parentbased_traceidratoi\n  samplr: x\n",
        );
        let keys: Vec<&str> = e.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"tracing.endpoint"), "{e:?}");
        assert!(keys.contains(&"tracing.sample_ratio"), "{e:?}");
        assert!(keys.contains(&"tracing.sampler"), "{e:?}");
        assert!(keys.contains(&"tracing.samplr"), "{e:?}");
        assert!(
            e.iter()
                .any(|(_, m)| m.contains("did you mean \"parentbased_traceidratio\"")),
            "{e:?}"
        );
        let e = errors("tracing:\n  resource_attributes: [a]\n");
        assert_eq!(e[0].0, "tracing.resource_attributes", "{e:?}");
    }
}
