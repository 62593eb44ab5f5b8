//! Decoding the settings file's `tracing:` block onto `TracingSettings`, with the same
//! positions, key paths and "did you mean" as the rest of the file. `tracing:` with nothing
//! under it turns export on with every default.

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

impl Decoder<'_> {
    pub(super) fn tracing(&mut self, node: &MarkedYaml<'_>, path: &str) -> TracingSettings {
        let mut t = TracingSettings::default();
        if is_null(node) {
            return t;
        }
        let Some(f) = self.mapping(node, path, TRACING_KEYS) else {
            return t;
        };
        if let Some(field) = f.get("enabled")
            && let Some(b) = self.boolean(field.value, &f.path("enabled"))
        {
            t.enabled = b;
        }
        t.record_values = self.flag(&f, "record_values");
        if let Some(field) = f.get("endpoint") {
            let p = f.path("endpoint");
            if let Some(v) = self.string(field.value, &p) {
                match check_endpoint(&v) {
                    Ok(()) => t.endpoint = Some(v),
                    Err(e) => self.error(field.value, &p, e),
                }
            }
        }
        if let Some(field) = f.get("service_name") {
            let p = f.path("service_name");
            match self.string(field.value, &p) {
                Some(v) if v.is_empty() || v.chars().any(char::is_control) => {
                    self.error(field.value, &p, "must be non-empty, no control characters")
                }
                Some(v) => t.service_name = Some(v),
                None => {}
            }
        }
        if let Some(field) = f.get("sampler") {
            let p = f.path("sampler");
            if let Some(v) = self.string(field.value, &p) {
                match SamplerKind::parse(&v) {
                    Some(k) => t.sampler = k,
                    None => {
                        let hint = match super::suggest(&v, SamplerKind::NAMES) {
                            Some(s) => format!("did you mean {s:?}? "),
                            None => String::new(),
                        };
                        self.error(
                            field.value,
                            &p,
                            format!(
                                "unknown sampler {v:?} ({hint}expected one of {})",
                                SamplerKind::NAMES.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        if let Some(field) = f.get("sample_ratio") {
            let p = f.path("sample_ratio");
            if let Some(v) = self.float(field.value, &p) {
                if (0.0..=1.0).contains(&v) {
                    t.sample_ratio = v;
                } else {
                    self.error(field.value, &p, format!("must be from 0 to 1, found {v}"));
                }
            }
        }
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
                let found = self.describe(field.value);
                self.error(
                    field.value,
                    &p,
                    format!("expected a mapping of attribute names to values, found {found}"),
                );
            }
        }
        if let Some(n) = self.field_uint(&f, "queue_size", 1, 1 << 20) {
            t.queue_size = n as usize;
        }
        if let Some(n) = self.field_uint(&f, "batch_size", 1, 1 << 16) {
            t.batch_size = n as usize;
        }
        if let Some(v) = self.field_ms(&f, "flush_interval", false) {
            t.flush_interval_ms = v;
        }
        if let Some(v) = self.field_ms(&f, "export_timeout", false) {
            t.export_timeout_ms = v;
        }
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
