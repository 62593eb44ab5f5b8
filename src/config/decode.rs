//! A hand decoder from saphyr's marked YAML tree to the model.
//!
//! Not serde, on purpose: every node keeps its line and column, and a problem in one key
//! does not stop the walk, so one pass reports every error of a file. Checks that need
//! more than one file (duplicate domains, the single settings block, `burst` against the
//! default algorithm) are left to `load`, which sees all files.
//!
//! Scalars follow the reference (Go yaml.v2) where YAML 1.1 and 1.2 differ and a config
//! written for it would otherwise break: string fields take any scalar verbatim
//! (`value: 0800` stays `"0800"`), booleans accept `yes`/`no`/`on`/`off`, integers accept
//! `1_000`, null means "absent", and `<<` merge keys work.

mod alerts;
mod anomaly;
mod authz;
mod otel;

use std::cell::OnceCell;
use std::collections::HashMap;
use std::path::Path;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::alerts::AlertSettings;
use super::anomaly::AnomalySettings;
use super::authz::AuthzConfig;
use super::error::ConfigError;
use super::model::{
    DescriptorConfig, DomainConfig, FailureMode, RateLimitConfig, RedisSettings, Settings,
};
use super::otel::TracingSettings;
use crate::anomaly::Adaptive;
use crate::limiter::{Algorithm, NANOS_PER_SECOND, Nanos, RejectedHits, Unit};

/// Where something was found, for errors that are raised later (by `load`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loc {
    pub line: usize,
    pub column: usize,
    pub key: String,
}

/// Everything one file holds, plus the problems found in it.
#[derive(Debug, Default)]
pub(crate) struct FileOutput {
    /// Every `settings` block of the file (more than one is an error `load` reports).
    pub settings: Vec<(Settings, Loc)>,
    /// Domains, with the location of their `domain` value.
    pub domains: Vec<(DomainConfig, Loc)>,
    /// `burst` keys on limits without an explicit algorithm: valid only if the default
    /// algorithm, known once all files are read, is a bucket.
    pub bursts_on_default: Vec<Loc>,
    /// Every `authz` block of the file (more than one in all files is an error).
    pub authz: Vec<(AuthzConfig, Loc)>,
    /// Every `anomaly` block of the file (more than one in all files is an error).
    pub anomaly: Vec<(AnomalySettings, Loc)>,
    /// Every `alerts` block of the file (more than one in all files is an error).
    pub alerts: Vec<(AlertSettings, Loc)>,
    /// Every `tracing` block of the file (more than one in all files is an error).
    pub tracing: Vec<(TracingSettings, Loc)>,
    pub errors: Vec<ConfigError>,
}

const DOMAIN_KEYS: &[&str] = &["domain", "descriptors"];
const SETTINGS_DOC_KEYS: &[&str] = &[
    "settings", "domains", "authz", "anomaly", "alerts", "tracing",
];
const DESCRIPTOR_KEYS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "rate_limits",
    "shadow_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "descriptors",
];
const RATE_LIMIT_KEYS: &[&str] = &[
    "unit",
    "requests_per_unit",
    "unlimited",
    "name",
    "replaces",
    "algorithm",
    "burst",
    "block_duration",
    "adaptive",
];
const ADAPTIVE_KEYS: &[&str] = &["min_factor", "max_factor", "initial_factor"];
/// The widest scaling an adaptive limit may ask for, either way.
const MAX_ADAPTIVE_FACTOR: f64 = 64.0;
const REPLACES_KEYS: &[&str] = &["name"];
const SETTINGS_KEYS: &[&str] = &[
    "default_algorithm",
    "count_rejected_hits",
    "near_limit_ratio",
    "max_keys",
    "grpc_addr",
    "admin_addr",
    "storage",
    "redis",
    "admin_token",
];
const REDIS_KEYS: &[&str] = &[
    "prefix",
    "timeout",
    "failure_mode",
    "local_cache",
    "pool_size",
    "cached_flush_interval",
];
const UNITS: [Unit; 7] = [
    Unit::Second,
    Unit::Minute,
    Unit::Hour,
    Unit::Day,
    Unit::Week,
    Unit::Month,
    Unit::Year,
];

/// Parses and decodes one file's text. Never fails: problems land in `errors`.
pub(crate) fn decode_file(file: &Path, text: &str) -> FileOutput {
    let mut d = Decoder::new(file, text);
    match MarkedYaml::load_from_str(text) {
        Ok(docs) => {
            for doc in &docs {
                d.document(doc);
            }
        }
        Err(e) => d.out.errors.push(yaml_error(file, &e)),
    }
    d.out
}

fn yaml_error(file: &Path, e: &saphyr::ScanError) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: e.marker().line(),
        column: e.marker().col() + 1,
        key: String::new(),
        message: format!("invalid YAML: {}", e.info()),
    }
}

/// Decodes text holding exactly one mapping document with `root`: what a custom resource's
/// spec is. The same decoder as files, so a resource is held to the same rules.
fn decode_single<T>(
    file: &Path,
    text: &str,
    root: impl FnOnce(&mut Decoder<'_>, &MarkedYaml<'_>) -> Option<T>,
) -> (Option<T>, Vec<ConfigError>) {
    let mut d = Decoder::new(file, text);
    let value = match MarkedYaml::load_from_str(text) {
        Ok(docs) => match docs.as_slice() {
            [doc] if matches!(data(doc), YamlData::Mapping(_)) => root(&mut d, doc),
            [doc] => {
                let found = d.describe(doc);
                d.error(doc, "", format!("expected a mapping, found {found}"));
                None
            }
            _ => {
                d.out
                    .errors
                    .push(ConfigError::file(file, "expected one document"));
                None
            }
        },
        Err(e) => {
            d.out.errors.push(yaml_error(file, &e));
            None
        }
    };
    (value, d.out.errors)
}

/// One domain document (`domain` + `descriptors`) and nothing else.
pub(crate) fn decode_domain_doc(
    file: &Path,
    text: &str,
) -> (Option<DomainConfig>, Vec<ConfigError>) {
    decode_single(file, text, |d, doc| {
        d.domain(doc, "").map(|(domain, _)| domain)
    })
}

/// One `allow`/`block` lists document, as the settings file's `authz.lists`.
pub(crate) fn decode_lists_doc(
    file: &Path,
    text: &str,
) -> (Option<super::authz::ListsConfig>, Vec<ConfigError>) {
    decode_single(file, text, |d, doc| Some(d.lists(doc, "")))
}

/// Whether `algorithm` has a bucket whose capacity `burst` sets.
pub fn uses_burst(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::TokenBucket | Algorithm::LeakyBucket | Algorithm::Gcra
    )
}

/// Parses `block_duration`-style strings: one or more `<integer><unit>` with unit
/// ms, s, m, h or d (`500ms`, `30s`, `1h30m`); a bare integer is seconds.
pub(crate) fn parse_duration(s: &str) -> Option<Nanos> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().ok()?.checked_mul(NANOS_PER_SECOND);
    }
    let mut rest = s;
    let mut total: Nanos = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let per_unit: u64 = match &rest[..letters] {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SECOND,
            "m" => 60 * NANOS_PER_SECOND,
            "h" => 3_600 * NANOS_PER_SECOND,
            "d" => 86_400 * NANOS_PER_SECOND,
            _ => return None,
        };
        rest = &rest[letters..];
        total = total.checked_add(n.checked_mul(per_unit)?)?;
    }
    Some(total)
}

/// Levenshtein distance over characters, case-insensitive.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The closest candidate within edit distance 2, if any (the first one on ties).
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// The node's data with user tags (`!foo`) looked through.
fn data<'n, 'i>(node: &'n MarkedYaml<'i>) -> &'n YamlData<'i, MarkedYaml<'i>> {
    let mut d = &node.data;
    while let YamlData::Tagged(_, inner) = d {
        d = &inner.data;
    }
    d
}

fn is_null(node: &MarkedYaml<'_>) -> bool {
    matches!(data(node), YamlData::Value(Scalar::Null))
}

/// YAML 1.1 booleans, which the reference's parser accepts and YAML 1.2 reads as strings.
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// One key of a mapping, after unknown keys were reported.
struct Field<'n, 'i> {
    name: String,
    key: &'n MarkedYaml<'i>,
    value: &'n MarkedYaml<'i>,
}

/// The known keys of one mapping.
struct Fields<'n, 'i> {
    node: &'n MarkedYaml<'i>,
    path: String,
    list: Vec<Field<'n, 'i>>,
}

impl<'n, 'i> Fields<'n, 'i> {
    /// The field, null or not.
    fn raw(&self, name: &str) -> Option<&Field<'n, 'i>> {
        self.list.iter().find(|f| f.name == name)
    }

    /// The field, unless absent or null (null means absent, as in the reference).
    fn get(&self, name: &str) -> Option<&Field<'n, 'i>> {
        self.raw(name).filter(|f| !is_null(f.value))
    }

    fn path(&self, name: &str) -> String {
        child(&self.path, name)
    }
}

struct Decoder<'t> {
    file: &'t Path,
    text: &'t str,
    ascii: bool,
    /// Byte offset of every character, built on first use and only for non-ASCII text
    /// (saphyr's markers count characters; ASCII offsets are the same either way).
    char_offsets: OnceCell<Vec<usize>>,
    out: FileOutput,
}

impl<'t> Decoder<'t> {
    fn new(file: &'t Path, text: &'t str) -> Self {
        Decoder {
            file,
            text,
            ascii: text.is_ascii(),
            char_offsets: OnceCell::new(),
            out: FileOutput::default(),
        }
    }
}

impl Decoder<'_> {
    fn pos(node: &MarkedYaml<'_>) -> (usize, usize) {
        (node.span.start.line(), node.span.start.col() + 1)
    }

    fn loc(node: &MarkedYaml<'_>, key: String) -> Loc {
        let (line, column) = Self::pos(node);
        Loc { line, column, key }
    }

    fn error(&mut self, node: &MarkedYaml<'_>, key: &str, message: impl Into<String>) {
        let (line, column) = Self::pos(node);
        self.out.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// The scalar exactly as written, so `0800` or `1.10` keep their spelling.
    fn raw_text(&self, node: &MarkedYaml<'_>) -> String {
        let formatted = || match data(node) {
            YamlData::Value(Scalar::String(s)) => s.to_string(),
            YamlData::Value(Scalar::Integer(i)) => i.to_string(),
            YamlData::Value(Scalar::FloatingPoint(f)) => f.to_string(),
            YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
            YamlData::Value(Scalar::Null) => "null".to_string(),
            _ => String::new(),
        };
        if matches!(node.data, YamlData::Tagged(..)) {
            // The span covers the tag too; the value is what matters.
            return formatted();
        }
        let start = self.byte_offset(node.span.start.index());
        let end = self.byte_offset(node.span.end.index());
        match self.text.get(start..end) {
            Some(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => formatted(),
        }
    }

    /// Whether the scalar was written in quotes (quoted words are never booleans/integers).
    fn is_quoted(&self, node: &MarkedYaml<'_>) -> bool {
        if matches!(node.data, YamlData::Tagged(..)) {
            return false;
        }
        let start = self.byte_offset(node.span.start.index());
        let first = self.text.get(start..).and_then(|rest| rest.chars().next());
        matches!(first, Some('"' | '\''))
    }

    /// The byte offset of the character at `char_index` (the text's length past its end).
    fn byte_offset(&self, char_index: usize) -> usize {
        if self.ascii {
            return char_index.min(self.text.len());
        }
        let offsets = self
            .char_offsets
            .get_or_init(|| self.text.char_indices().map(|(b, _)| b).collect());
        offsets.get(char_index).copied().unwrap_or(self.text.len())
    }

    /// How a value looks, for "expected X, found Y" messages.
    fn describe(&self, node: &MarkedYaml<'_>) -> String {
        match data(node) {
            YamlData::Mapping(_) => "a mapping".into(),
            YamlData::Sequence(_) => "a list".into(),
            YamlData::Value(Scalar::Null) => "nothing (null)".into(),
            YamlData::Value(Scalar::String(s)) => format!("{s:?}"),
            YamlData::Value(_) | YamlData::Representation(..) => self.raw_text(node),
            _ => "an invalid value".into(),
        }
    }

    fn document(&mut self, doc: &MarkedYaml<'_>) {
        match data(doc) {
            YamlData::BadValue | YamlData::Value(Scalar::Null) => {} // empty document
            YamlData::Mapping(map) => {
                let has = |name: &str| {
                    map.keys()
                        .any(|k| matches!(data(k), YamlData::Value(Scalar::String(s)) if s == name))
                };
                if !has("domain") && SETTINGS_DOC_KEYS.iter().any(|k| has(k)) {
                    self.settings_document(doc);
                } else if let Some(domain) = self.domain(doc, "") {
                    self.out.domains.push(domain);
                }
            }
            _ => {
                let found = self.describe(doc);
                self.error(
                    doc,
                    "",
                    format!(
                        "expected a mapping with \"domain\" (a domain file) or \
                         \"settings\"/\"domains\" (a settings file), found {found}"
                    ),
                );
            }
        }
    }

    fn settings_document(&mut self, doc: &MarkedYaml<'_>) {
        let Some(f) = self.mapping(doc, "", SETTINGS_DOC_KEYS) else {
            return;
        };
        if let Some(field) = f.get("settings") {
            let settings = self.settings(field.value, &f.path("settings"));
            let loc = Self::loc(field.key, f.path("settings"));
            self.out.settings.push((settings, loc));
        }
        if let Some(field) = f.raw("authz") {
            let authz = self.authz(field.value, &f.path("authz"));
            let loc = Self::loc(field.key, f.path("authz"));
            self.out.authz.push((authz, loc));
        }
        if let Some(field) = f.raw("anomaly") {
            let anomaly = self.anomaly(field.value, &f.path("anomaly"));
            let loc = Self::loc(field.key, f.path("anomaly"));
            self.out.anomaly.push((anomaly, loc));
        }
        if let Some(field) = f.raw("alerts") {
            let alerts = self.alerts(field.value, &f.path("alerts"));
            let loc = Self::loc(field.key, f.path("alerts"));
            self.out.alerts.push((alerts, loc));
        }
        if let Some(field) = f.raw("tracing") {
            let tracing = self.tracing(field.value, &f.path("tracing"));
            let loc = Self::loc(field.key, f.path("tracing"));
            self.out.tracing.push((tracing, loc));
        }
        if let Some(field) = f.get("domains") {
            let path = f.path("domains");
            if let Some(items) = self.sequence(field.value, &path, "a list of domains") {
                for (i, item) in items.iter().enumerate() {
                    if let Some(domain) = self.domain(item, &index(&path, i)) {
                        self.out.domains.push(domain);
                    }
                }
            }
        }
    }

    fn settings(&mut self, node: &MarkedYaml<'_>, path: &str) -> Settings {
        let mut s = Settings::default();
        let Some(f) = self.mapping(node, path, SETTINGS_KEYS) else {
            return s;
        };
        if let Some(field) = f.get("default_algorithm")
            && let Some(a) = self.algorithm(field.value, &f.path("default_algorithm"))
        {
            s.default_algorithm = a;
        }
        if let Some(field) = f.get("count_rejected_hits")
            && self.boolean(field.value, &f.path("count_rejected_hits")) == Some(true)
        {
            s.rejected_hits = RejectedHits::Counted;
        }
        if let Some(field) = f.get("near_limit_ratio") {
            let path = f.path("near_limit_ratio");
            if let Some(r) = self.float(field.value, &path) {
                if r > 0.0 && r <= 1.0 {
                    s.near_limit_ratio = r;
                } else {
                    let found = self.describe(field.value);
                    self.error(
                        field.value,
                        &path,
                        format!("must be greater than 0 and at most 1, found {found}"),
                    );
                }
            }
        }
        if let Some(field) = f.get("max_keys") {
            let path = f.path("max_keys");
            let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
            if let Some(n) = self.uint(field.value, &path, max) {
                match usize::try_from(n) {
                    Ok(n) if n > 0 => s.max_keys = n,
                    _ => self.error(field.value, &path, "must be greater than 0"),
                }
            }
        }
        for (name, slot) in [
            ("grpc_addr", &mut s.grpc_addr),
            ("admin_addr", &mut s.admin_addr),
            ("storage", &mut s.storage),
            ("admin_token", &mut s.admin_token),
        ] {
            if let Some(field) = f.get(name) {
                let path = f.path(name);
                match self.string(field.value, &path) {
                    Some(v) if v.is_empty() => self.error(field.value, &path, "must not be empty"),
                    Some(v) if name == "storage" && v != "memory" => {
                        match super::storage_url::RedisUrl::parse(&v) {
                            Ok(_) => *slot = Some(v),
                            Err(e) => self.error(field.value, &path, e.to_string()),
                        }
                    }
                    Some(v) => *slot = Some(v),
                    None => {}
                }
            }
        }
        if let Some(field) = f.get("redis") {
            s.redis = self.redis_settings(field.value, &f.path("redis"));
        }
        s
    }

    fn redis_settings(&mut self, node: &MarkedYaml<'_>, path: &str) -> RedisSettings {
        let mut r = RedisSettings::default();
        let Some(f) = self.mapping(node, path, REDIS_KEYS) else {
            return r;
        };
        if let Some(field) = f.get("prefix")
            && let Some(v) = self.string(field.value, &f.path("prefix"))
        {
            r.prefix = v;
        }
        if let Some(field) = f.get("timeout") {
            let path = f.path("timeout");
            match self.duration(field.value, &path) {
                Some(0) => self.error(field.value, &path, "must be greater than 0"),
                Some(d) => r.timeout = d,
                None => {}
            }
        }
        if let Some(field) = f.get("failure_mode") {
            let path = f.path("failure_mode");
            if let Some(v) = self.string(field.value, &path) {
                match FailureMode::parse(&v) {
                    Some(m) => r.failure_mode = m,
                    None => self.error(
                        field.value,
                        &path,
                        format!("unknown failure mode {v:?} (expected one of allow, deny, local)"),
                    ),
                }
            }
        }
        if let Some(field) = f.get("local_cache")
            && let Some(b) = self.boolean(field.value, &f.path("local_cache"))
        {
            r.local_cache = b;
        }
        if let Some(field) = f.get("cached_flush_interval") {
            let path = f.path("cached_flush_interval");
            match self.duration(field.value, &path) {
                Some(0) => self.error(field.value, &path, "must be greater than 0"),
                Some(d) => r.cached_flush_interval = Some(d),
                None => {}
            }
        }
        if let Some(field) = f.get("pool_size") {
            let path = f.path("pool_size");
            if let Some(n) = self.uint(field.value, &path, 64) {
                if n == 0 {
                    self.error(field.value, &path, "must be between 1 and 64");
                } else {
                    r.pool_size = n as usize;
                }
            }
        }
        r
    }

    /// A domain mapping (a whole domain file, or one item of a settings file's `domains`).
    fn domain(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<(DomainConfig, Loc)> {
        let f = self.mapping(node, path, DOMAIN_KEYS)?;
        let domain = self.required_string(&f, "domain");
        let descriptors = match f.get("descriptors") {
            Some(field) => self.descriptors(field.value, &f.path("descriptors")),
            None => Vec::new(),
        };
        let (domain, loc) = domain?;
        let config = DomainConfig {
            domain,
            descriptors,
            file: self.file.to_path_buf(),
        };
        Some((config, loc))
    }

    /// A string that must be present and non-empty (`domain`, `key`, replaces' `name`).
    fn required_string(&mut self, f: &Fields<'_, '_>, name: &str) -> Option<(String, Loc)> {
        let path = f.path(name);
        let Some(field) = f.raw(name) else {
            self.error(f.node, &f.path, format!("missing required key {name:?}"));
            return None;
        };
        let value = if is_null(field.value) {
            String::new()
        } else {
            self.string(field.value, &path)?
        };
        if value.is_empty() {
            // A null value has an empty span after the colon: point at the key instead.
            let at = if is_null(field.value) {
                field.key
            } else {
                field.value
            };
            self.error(at, &path, "must not be empty");
            return None;
        }
        Some((value, Self::loc(field.value, path)))
    }

    fn descriptors(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<DescriptorConfig> {
        let mut out = Vec::new();
        let Some(items) = self.sequence(node, path, "a list of descriptors") else {
            return out;
        };
        let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = index(path, i);
            let Some(d) = self.descriptor(item, &item_path) else {
                continue;
            };
            if !d.key.is_empty() {
                let id = (d.key.clone(), d.value.clone());
                if let Some(first) = seen.get(&id) {
                    let value = match &d.value {
                        Some(v) => format!("value {v:?}"),
                        None => "no value".to_string(),
                    };
                    self.error(
                        item,
                        &item_path,
                        format!(
                            "duplicate descriptor (key {:?}, {value}); the first one is at line {first}",
                            d.key
                        ),
                    );
                } else {
                    seen.insert(id, d.line);
                }
            }
            out.push(d);
        }
        out
    }

    fn descriptor(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<DescriptorConfig> {
        let f = self.mapping(node, path, DESCRIPTOR_KEYS)?;
        let key = self
            .required_string(&f, "key")
            .map(|(k, _)| k)
            .unwrap_or_default();
        let value = match f.get("value") {
            Some(field) => self
                .string(field.value, &f.path("value"))
                .filter(|v| !v.is_empty()),
            None => None,
        };
        let mut limits = Vec::new();
        let single = f.get("rate_limit");
        let list = f.get("rate_limits");
        if let (Some(_), Some(list)) = (single, list) {
            self.error(
                list.key,
                &f.path("rate_limits"),
                "rate_limit and rate_limits are mutually exclusive: put every limit in rate_limits",
            );
        }
        if let Some(field) = single {
            let line = field.key.span.start.line();
            limits.extend(self.rate_limit(field.value, &f.path("rate_limit"), false, line));
        }
        if let Some(field) = list {
            let list_path = f.path("rate_limits");
            if let Some(items) = self.sequence(field.value, &list_path, "a list of rate limits") {
                for (i, item) in items.iter().enumerate() {
                    let line = item.span.start.line();
                    limits.extend(self.rate_limit(item, &index(&list_path, i), true, line));
                }
            }
        }
        let shadow_mode = self.flag(&f, "shadow_mode");
        let detailed_metric = self.flag(&f, "detailed_metric");
        let value_to_metric = self.flag(&f, "value_to_metric");
        let share_threshold = self.flag(&f, "share_threshold");
        if share_threshold
            && !value.as_deref().is_some_and(|v| v.contains('*'))
            && let Some(field) = f.get("share_threshold")
        {
            {
                self.error(
                    field.key,
                    &f.path("share_threshold"),
                    "share_threshold can only be used with a wildcard value (one with `*`)",
                );
            }
        }
        let descriptors = match f.get("descriptors") {
            Some(field) => self.descriptors(field.value, &f.path("descriptors")),
            None => Vec::new(),
        };
        Some(DescriptorConfig {
            key,
            value,
            limits,
            shadow_mode,
            detailed_metric,
            value_to_metric,
            share_threshold,
            descriptors,
            line: node.span.start.line(),
        })
    }

    fn rate_limit(
        &mut self,
        node: &MarkedYaml<'_>,
        path: &str,
        in_list: bool,
        line: usize,
    ) -> Option<RateLimitConfig> {
        let f = self.mapping(node, path, RATE_LIMIT_KEYS)?;
        let unlimited = match f.get("unlimited") {
            Some(field) if in_list => {
                self.error(
                    field.key,
                    &f.path("unlimited"),
                    "not allowed in rate_limits: an unlimited descriptor takes a single rate_limit",
                );
                false
            }
            Some(field) => self
                .boolean(field.value, &f.path("unlimited"))
                .unwrap_or(false),
            None => false,
        };
        let mut unit = None;
        let mut requests_per_unit = 0;
        if unlimited {
            for name in [
                "unit",
                "requests_per_unit",
                "algorithm",
                "burst",
                "block_duration",
                "adaptive",
            ] {
                if let Some(field) = f.get(name) {
                    self.error(
                        field.key,
                        &f.path(name),
                        "must not be set when unlimited is true",
                    );
                }
            }
        } else {
            match f.get("unit") {
                Some(field) => unit = self.unit(field.value, &f.path("unit")),
                None => self.error(node, path, "missing required key \"unit\""),
            }
            match f.get("requests_per_unit") {
                Some(field) => {
                    let path = f.path("requests_per_unit");
                    requests_per_unit = self
                        .uint(field.value, &path, u64::from(u32::MAX))
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0);
                }
                None => self.error(node, path, "missing required key \"requests_per_unit\""),
            }
        }
        let name = match f.get("name") {
            Some(field) => self
                .string(field.value, &f.path("name"))
                .filter(|n| !n.is_empty()),
            None => None,
        };
        let replaces = match f.get("replaces") {
            Some(field) => self.replaces(field.value, &f.path("replaces"), name.as_deref()),
            None => Vec::new(),
        };
        let mut algorithm = None;
        let mut burst = None;
        let mut block_duration = None;
        let mut adaptive = None;
        if !unlimited {
            if let Some(field) = f.get("adaptive") {
                adaptive = self.adaptive(field.value, &f.path("adaptive"));
            }
            if let Some(field) = f.get("algorithm") {
                algorithm = self.algorithm(field.value, &f.path("algorithm"));
            }
            if let Some(field) = f.get("burst") {
                burst = self.burst(&f, field, algorithm, f.get("algorithm").is_some());
            }
            if let Some(field) = f.get("block_duration") {
                block_duration = self.duration(field.value, &f.path("block_duration"));
            }
        }
        Some(RateLimitConfig {
            unit,
            requests_per_unit,
            unlimited,
            name,
            replaces,
            algorithm,
            burst,
            block_duration,
            adaptive,
            line,
        })
    }

    /// `adaptive: {min_factor, max_factor, initial_factor}`: 0 < min ≤ initial ≤ max ≤ 64;
    /// `initial_factor` defaults to 1 (within the range).
    fn adaptive(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<Adaptive> {
        let f = self.mapping(node, path, ADAPTIVE_KEYS)?;
        let factor = |d: &mut Self, name: &str| -> Option<f64> {
            let field = f.get(name)?;
            let p = f.path(name);
            let v = d.float(field.value, &p)?;
            if !(v > 0.0 && v <= MAX_ADAPTIVE_FACTOR) {
                d.error(
                    field.value,
                    &p,
                    format!("must be greater than 0 and at most {MAX_ADAPTIVE_FACTOR}, found {v}"),
                );
                return None;
            }
            Some(v)
        };
        let min = factor(self, "min_factor");
        let max = factor(self, "max_factor");
        let initial = factor(self, "initial_factor");
        for name in ["min_factor", "max_factor"] {
            if f.get(name).is_none() {
                self.error(node, path, format!("missing required key {name:?}"));
            }
        }
        let (min, max) = (min?, max?);
        if min > max {
            self.error(
                node,
                path,
                format!("min_factor {min} is above max_factor {max}"),
            );
            return None;
        }
        let initial = match (initial, f.get("initial_factor")) {
            (Some(i), Some(field)) if !(min..=max).contains(&i) => {
                self.error(
                    field.value,
                    &f.path("initial_factor"),
                    format!("must be within min_factor {min} and max_factor {max}, found {i}"),
                );
                return None;
            }
            (Some(i), _) => i,
            (None, Some(_)) => return None,
            (None, None) => 1.0f64.clamp(min, max),
        };
        Some(Adaptive {
            min_factor: min,
            initial_factor: initial,
            max_factor: max,
        })
    }

    /// `name` under `f` as a duration in milliseconds; zero only when `zero_ok`. The section
    /// decoders (`anomaly`, `alerts`, `tracing`) read their scalar keys through these.
    fn field_ms(&mut self, f: &Fields<'_, '_>, name: &str, zero_ok: bool) -> Option<u64> {
        let field = f.get(name)?;
        let p = f.path(name);
        let v = self.duration(field.value, &p)? / 1_000_000;
        if v == 0 && !zero_ok {
            self.error(field.value, &p, "must be at least 1ms");
            return None;
        }
        Some(v)
    }

    /// `name` under `f` as an integer from `min` to `max`.
    fn field_uint(&mut self, f: &Fields<'_, '_>, name: &str, min: u64, max: u64) -> Option<u64> {
        let field = f.get(name)?;
        let p = f.path(name);
        let v = self.uint(field.value, &p, max)?;
        if v < min {
            self.error(
                field.value,
                &p,
                format!("must be from {min} to {max}, found {v}"),
            );
            return None;
        }
        Some(v)
    }

    /// `name` under `f` as a number from `min` to `max`.
    fn field_float(&mut self, f: &Fields<'_, '_>, name: &str, min: f64, max: f64) -> Option<f64> {
        let field = f.get(name)?;
        let p = f.path(name);
        let v = self.float(field.value, &p)?;
        if !(min..=max).contains(&v) {
            self.error(
                field.value,
                &p,
                format!("must be from {min} to {max}, found {v}"),
            );
            return None;
        }
        Some(v)
    }

    fn burst(
        &mut self,
        f: &Fields<'_, '_>,
        field: &Field<'_, '_>,
        algorithm: Option<Algorithm>,
        algorithm_given: bool,
    ) -> Option<u32> {
        let path = f.path("burst");
        let n = self.uint(field.value, &path, u64::from(u32::MAX))?;
        let n = u32::try_from(n).ok()?;
        if n == 0 {
            self.error(field.value, &path, "must be greater than 0");
            return None;
        }
        match algorithm {
            Some(a) if !uses_burst(a) => {
                self.error(
                    field.key,
                    &path,
                    format!(
                        "only applies to token_bucket, leaky_bucket and gcra, not {}",
                        a.as_str()
                    ),
                );
                None
            }
            Some(_) => Some(n),
            // An invalid algorithm was already reported; don't pile up.
            None if algorithm_given => Some(n),
            None => {
                self.out.bursts_on_default.push(Self::loc(field.key, path));
                Some(n)
            }
        }
    }

    fn replaces(
        &mut self,
        node: &MarkedYaml<'_>,
        path: &str,
        own_name: Option<&str>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let Some(items) = self.sequence(node, path, "a list of {name: ...}") else {
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let item_path = index(path, i);
            let Some(f) = self.mapping(item, &item_path, REPLACES_KEYS) else {
                continue;
            };
            let Some((name, loc)) = self.required_string(&f, "name") else {
                continue;
            };
            if own_name == Some(name.as_str()) {
                let message = format!("a limit cannot replace itself ({name:?} is its own name)");
                self.out.errors.push(ConfigError {
                    file: self.file.to_path_buf(),
                    line: loc.line,
                    column: loc.column,
                    key: loc.key,
                    message,
                });
                continue;
            }
            out.push(name);
        }
        out
    }

    fn flag(&mut self, f: &Fields<'_, '_>, name: &str) -> bool {
        match f.get(name) {
            Some(field) => self.boolean(field.value, &f.path(name)).unwrap_or(false),
            None => false,
        }
    }

    /// The known keys of a mapping; reports the node if it is no mapping, and every unknown
    /// key (with the closest valid one when it looks like a typo).
    fn mapping<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n, 'i>> {
        let YamlData::Mapping(map) = data(node) else {
            let found = self.describe(node);
            self.error(node, path, format!("expected a mapping, found {found}"));
            return None;
        };
        let mut list: Vec<Field<'n, 'i>> = Vec::new();
        let mut merges = Vec::new();
        for (k, v) in map.iter() {
            let name = match data(k) {
                YamlData::Value(Scalar::String(s)) => s.to_string(),
                YamlData::Value(_) => self.raw_text(k),
                _ => {
                    let found = self.describe(k);
                    self.error(k, path, format!("keys must be strings, found {found}"));
                    continue;
                }
            };
            if name == "<<" && !self.is_quoted(k) {
                merges.push(v);
            } else if allowed.contains(&name.as_str()) {
                list.push(Field {
                    name,
                    key: k,
                    value: v,
                });
            } else {
                let hint = match suggest(&name, allowed) {
                    Some(s) => format!("did you mean {s:?}?"),
                    None => format!("expected one of {}", allowed.join(", ")),
                };
                self.error(
                    k,
                    &child(path, &name),
                    format!("unknown key {name:?} ({hint})"),
                );
            }
        }
        // `<<: *anchor` merges: explicit keys win, then earlier merged mappings.
        for merge in merges {
            let sources: Vec<&'n MarkedYaml<'i>> = match data(merge) {
                YamlData::Sequence(items) => items.iter().collect(),
                _ => vec![merge],
            };
            for source in sources {
                if let Some(merged) = self.mapping(source, path, allowed) {
                    for field in merged.list {
                        if !list.iter().any(|f| f.name == field.name) {
                            list.push(field);
                        }
                    }
                }
            }
        }
        Some(Fields {
            node,
            path: path.to_string(),
            list,
        })
    }

    fn sequence<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        path: &str,
        what: &str,
    ) -> Option<&'n [MarkedYaml<'i>]> {
        match data(node) {
            YamlData::Sequence(items) => Some(items),
            _ => {
                let found = self.describe(node);
                self.error(node, path, format!("expected {what}, found {found}"));
                None
            }
        }
    }

    fn string(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<String> {
        match data(node) {
            YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
            YamlData::Value(Scalar::Null) => Some(String::new()),
            // Like the reference, any scalar is taken verbatim for a string field.
            YamlData::Value(_) => Some(self.raw_text(node)),
            _ => {
                let found = self.describe(node);
                self.error(node, path, format!("expected a string, found {found}"));
                None
            }
        }
    }

    fn boolean(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<bool> {
        let parsed = match data(node) {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            YamlData::Value(Scalar::String(s)) if !self.is_quoted(node) => yaml11_bool(s),
            _ => None,
        };
        if parsed.is_none() {
            let found = self.describe(node);
            self.error(node, path, format!("expected true or false, found {found}"));
        }
        parsed
    }

    /// A non-negative integer up to `max`. Plain `1_000` is accepted, as the reference does.
    fn uint(&mut self, node: &MarkedYaml<'_>, path: &str, max: u64) -> Option<u64> {
        let parsed = match data(node) {
            YamlData::Value(Scalar::Integer(i)) => u64::try_from(*i).ok(),
            YamlData::Value(Scalar::String(s)) if !self.is_quoted(node) => {
                let digits = s.starts_with(|c: char| c.is_ascii_digit())
                    && s.chars().all(|c| c.is_ascii_digit() || c == '_');
                if digits {
                    s.replace('_', "").parse::<u64>().ok()
                } else {
                    None
                }
            }
            _ => None,
        };
        match parsed {
            Some(n) if n <= max => Some(n),
            _ => {
                let found = self.describe(node);
                self.error(
                    node,
                    path,
                    format!("expected an integer from 0 to {max}, found {found}"),
                );
                None
            }
        }
    }

    fn float(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<f64> {
        match data(node) {
            #[allow(clippy::cast_precision_loss)] // config-sized integers are exact
            YamlData::Value(Scalar::Integer(i)) => Some(*i as f64),
            YamlData::Value(Scalar::FloatingPoint(f)) if f.is_finite() => Some(f.into_inner()),
            _ => {
                let found = self.describe(node);
                self.error(node, path, format!("expected a number, found {found}"));
                None
            }
        }
    }

    fn unit(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<Unit> {
        let s = self.string(node, path)?;
        let unit = Unit::parse(&s);
        if unit.is_none() {
            let names: Vec<&str> = UNITS.iter().map(|u| u.as_str()).collect();
            self.error(
                node,
                path,
                format!("unknown unit {s:?} (expected one of {})", names.join(", ")),
            );
        }
        unit
    }

    fn algorithm(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<Algorithm> {
        let s = self.string(node, path)?;
        let algorithm = Algorithm::parse(&s);
        if algorithm.is_none() {
            let hint = match suggest(&s, Algorithm::NAMES) {
                Some(close) => format!("did you mean {close:?}? "),
                None => String::new(),
            };
            self.error(
                node,
                path,
                format!(
                    "unknown algorithm {s:?} ({hint}expected one of {})",
                    Algorithm::NAMES.join(", ")
                ),
            );
        }
        algorithm
    }

    fn duration(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<Nanos> {
        let parsed = match data(node) {
            YamlData::Value(Scalar::Integer(i)) => u64::try_from(*i)
                .ok()
                .and_then(|s| s.checked_mul(NANOS_PER_SECOND)),
            YamlData::Value(Scalar::String(s)) => parse_duration(s),
            _ => None,
        };
        if parsed.is_none() {
            let found = self.describe(node);
            self.error(
                node,
                path,
                format!(
                    "expected a duration: whole seconds or a number with unit ms, s, m, h or d \
                     (like 500ms, 30s, 5m, 1h), found {found}"
                ),
            );
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> FileOutput {
        decode_file(Path::new("t.yaml"), text)
    }

    /// (line, column, key, message) of every error, for compact assertions.
    fn errors(text: &str) -> Vec<(usize, usize, String, String)> {
        decode(text)
            .errors
            .into_iter()
            .map(|e| (e.line, e.column, e.key, e.message))
            .collect()
    }

    fn one_error(text: &str) -> (usize, usize, String, String) {
        let mut all = errors(text);
        assert_eq!(all.len(), 1, "expected exactly one error, got {all:#?}");
        all.remove(0)
    }

    fn only_domain(text: &str) -> DomainConfig {
        let out = decode(text);
        assert!(out.errors.is_empty(), "{:#?}", out.errors);
        assert_eq!(out.domains.len(), 1);
        out.domains.into_iter().next().map(|(d, _)| d).unwrap()
    }

    #[test]
    fn adaptive_limits_decode_with_defaults_and_every_bad_value_has_its_key_path() {
        let d = only_domain(
            "domain: d\ndescriptors:\n  - key: identity\n    rate_limit: {unit: second, \
             requests_per_unit: 5, adaptive: {min_factor: 0.25, max_factor: 2}}\n",
        );
        assert_eq!(
            d.descriptors[0].limits[0].adaptive,
            Some(Adaptive {
                min_factor: 0.25,
                initial_factor: 1.0,
                max_factor: 2.0
            })
        );
        // initial_factor defaults to 1 clamped into the range.
        let d = only_domain(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, \
             requests_per_unit: 5, adaptive: {min_factor: 1.5, max_factor: 2}}\n",
        );
        assert_eq!(
            d.descriptors[0].limits[0]
                .adaptive
                .map(|a| a.initial_factor),
            Some(1.5)
        );
        let e = errors(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 5, \
             adaptive: {min_factor: 0, max_factr: 2}}\n  - key: b\n    rate_limit: {unit: second, \
             requests_per_unit: 5, adaptive: {min_factor: 3, max_factor: 2}}\n  - key: c\n    \
             rate_limit: {unit: second, requests_per_unit: 5, adaptive: {min_factor: 0.5, \
             max_factor: 100, initial_factor: 0.1}}\n  - key: e\n    rate_limit: {unlimited: true, \
             adaptive: {min_factor: 1, max_factor: 2}}\n  - key: f\n    rate_limit: {unit: second, \
             requests_per_unit: 5, adaptive: {min_factor: 0.5, max_factor: 2, initial_factor: 3}}\n  \
             - key: g\n    rate_limit: {unit: second, requests_per_unit: 5, adaptive: fast}\n",
        );
        let has = |key: &str, needle: &str| {
            assert!(
                e.iter().any(|(_, _, k, m)| k == key && m.contains(needle)),
                "no {key}: {needle} in {e:#?}"
            );
        };
        let p = "descriptors[0].rate_limit.adaptive";
        has(&format!("{p}.min_factor"), "must be greater than 0");
        has(&format!("{p}.max_factr"), "did you mean \"max_factor\"?");
        has(p, "missing required key \"max_factor\"");
        has(
            "descriptors[1].rate_limit.adaptive",
            "min_factor 3 is above max_factor 2",
        );
        has(
            "descriptors[2].rate_limit.adaptive.max_factor",
            "at most 64",
        );
        has(
            "descriptors[3].rate_limit.adaptive",
            "must not be set when unlimited is true",
        );
        has(
            "descriptors[4].rate_limit.adaptive.initial_factor",
            "must be within min_factor 0.5 and max_factor 2",
        );
        has("descriptors[5].rate_limit.adaptive", "expected a mapping");
    }

    #[test]
    fn durations() {
        let s = NANOS_PER_SECOND;
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_duration("30s"), Some(30 * s));
        assert_eq!(parse_duration("5m"), Some(300 * s));
        assert_eq!(parse_duration("1h"), Some(3_600 * s));
        assert_eq!(parse_duration("2d"), Some(172_800 * s));
        assert_eq!(parse_duration("1h30m"), Some(5_400 * s));
        assert_eq!(parse_duration("0s"), Some(0));
        assert_eq!(parse_duration("45"), Some(45 * s));
        assert_eq!(parse_duration(" 10s "), Some(10 * s));
        for bad in [
            "",
            "s",
            "5x",
            "1.5s",
            "-5s",
            "5 s",
            "5S",
            "10us",
            "h1",
            "1h-",
            "99999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration("18446744073709551615s"), None); // overflow
    }

    #[test]
    fn edit_distance_and_suggestion() {
        assert_eq!(edit_distance("unit", "unit"), 0);
        assert_eq!(edit_distance("untis", "unit"), 2);
        assert_eq!(edit_distance("Unit", "unit"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            suggest("requests_per_units", RATE_LIMIT_KEYS),
            Some("requests_per_unit")
        );
        assert_eq!(suggest("descriptor", DESCRIPTOR_KEYS), Some("descriptors"));
        assert_eq!(suggest("zzzzzz", DESCRIPTOR_KEYS), None);
        assert_eq!(
            suggest("tokenbucket", Algorithm::NAMES),
            Some("token_bucket")
        );
    }

    #[test]
    fn every_descriptor_field_decodes() {
        let d = only_domain(
            "domain: d
descriptors:
  - key: k
    value: v*
    shadow_mode: true
    detailed_metric: true
    value_to_metric: true
    rate_limit:
      unit: HOUR
      requests_per_unit: 100
      name: main
      replaces:
        - name: other
      algorithm: token_bucket
      burst: 20
      block_duration: 5m
    descriptors:
      - key: inner
",
        );
        let top = &d.descriptors[0];
        assert_eq!(top.key, "k");
        assert_eq!(top.value.as_deref(), Some("v*"));
        assert!(top.shadow_mode && top.detailed_metric && top.value_to_metric);
        assert_eq!(top.line, 3);
        let l = &top.limits[0];
        assert_eq!(l.unit, Some(Unit::Hour));
        assert_eq!(l.requests_per_unit, 100);
        assert_eq!(l.name.as_deref(), Some("main"));
        assert_eq!(l.replaces, vec!["other".to_string()]);
        assert_eq!(l.algorithm, Some(Algorithm::TokenBucket));
        assert_eq!(l.burst, Some(20));
        assert_eq!(l.block_duration, Some(300 * NANOS_PER_SECOND));
        assert_eq!(l.line, 8);
        assert_eq!(top.descriptors[0].key, "inner");
        assert_eq!(top.descriptors[0].value, None);
        assert_eq!(top.descriptors[0].line, 18);
        assert!(top.descriptors[0].limits.is_empty());
    }

    #[test]
    fn string_fields_take_scalars_verbatim() {
        let d = only_domain(
            "domain: 42
descriptors:
  - {key: status, value: 200}
  - {key: status, value: 0800}
  - {key: version, value: 1.10}
  - {key: flag, value: true}
  - {key: hex, value: 0x1F}
  - {key: 123, value: '007'}
  - {key: ip, value: 50.0.0.5}
  - {key: empty, value: ''}
  - {key: nothing, value: ~}
",
        );
        assert_eq!(d.domain, "42");
        let values: Vec<(&str, Option<&str>)> = d
            .descriptors
            .iter()
            .map(|x| (x.key.as_str(), x.value.as_deref()))
            .collect();
        assert_eq!(
            values,
            vec![
                ("status", Some("200")),
                ("status", Some("0800")),
                ("version", Some("1.10")),
                ("flag", Some("true")),
                ("hex", Some("0x1F")),
                ("123", Some("007")),
                ("ip", Some("50.0.0.5")),
                ("empty", None),
                ("nothing", None),
            ]
        );
    }

    #[test]
    fn non_ascii_text_keeps_positions_and_raw_scalars() {
        let d = only_domain("domain: café\ndescriptors:\n  - {key: ключ, value: 1.50}\n");
        assert_eq!(d.domain, "café");
        assert_eq!(d.descriptors[0].key, "ключ");
        assert_eq!(d.descriptors[0].value.as_deref(), Some("1.50"));
        let e = one_error("domain: é\ndescriptors:\n  - {key: ключ, valeu: x}\n");
        assert_eq!((e.0, e.1), (3, 17));
    }

    #[test]
    fn booleans_accept_yaml_1_1_words_but_not_quoted_strings() {
        let d = only_domain(
            "domain: d\ndescriptors:\n  - {key: a, shadow_mode: yes, detailed_metric: On}\n  - {key: b, shadow_mode: no}\n",
        );
        assert!(d.descriptors[0].shadow_mode && d.descriptors[0].detailed_metric);
        assert!(!d.descriptors[1].shadow_mode);
        let e = one_error("domain: d\ndescriptors:\n  - key: a\n    shadow_mode: \"true\"\n");
        assert_eq!(
            e,
            (
                4,
                18,
                "descriptors[0].shadow_mode".into(),
                "expected true or false, found \"true\"".into()
            )
        );
        let e = one_error("domain: d\ndescriptors:\n  - key: a\n    shadow_mode: 1\n");
        assert_eq!(e.3, "expected true or false, found 1");
        let e = one_error("domain: d\ndescriptors:\n  - key: a\n    detailed_metric: maybe\n");
        assert_eq!(e.3, "expected true or false, found \"maybe\"");
    }

    #[test]
    fn integers_are_checked() {
        let head = "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n";
        let cases = [
            ("\"500\"", "\"500\""),
            ("-1", "-1"),
            ("4294967296", "4294967296"),
            ("99999999999999999999", "99999999999999999999"),
            ("1.5", "1.5"),
            ("[1]", "a list"),
            ("ten", "\"ten\""),
        ];
        for (value, shown) in cases {
            let text = format!("{head}      requests_per_unit: {value}\n");
            let e = one_error(&text);
            assert_eq!(
                e,
                (
                    6,
                    26,
                    "descriptors[0].rate_limit.requests_per_unit".into(),
                    format!("expected an integer from 0 to 4294967295, found {shown}")
                ),
                "{value}"
            );
        }
        let ok = only_domain(&format!(
            "{head}      requests_per_unit: 1_000\n  - key: b\n    rate_limit: {{unit: day, requests_per_unit: 4294967295}}\n"
        ));
        assert_eq!(ok.descriptors[0].limits[0].requests_per_unit, 1_000);
        assert_eq!(ok.descriptors[1].limits[0].requests_per_unit, u32::MAX);
    }

    #[test]
    fn null_values_mean_absent() {
        let d = only_domain(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n    descriptors:\n    shadow_mode:\n",
        );
        assert!(d.descriptors[0].limits.is_empty());
        assert!(d.descriptors[0].descriptors.is_empty());
        assert!(!d.descriptors[0].shadow_mode);
    }

    #[test]
    fn unknown_keys_suggest_or_list() {
        let e = one_error(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      untis: second\n      unit: second\n      requests_per_unit: 1\n",
        );
        assert_eq!(
            e,
            (
                5,
                7,
                "descriptors[0].rate_limit.untis".into(),
                "unknown key \"untis\" (did you mean \"unit\"?)".into()
            )
        );
        let e = one_error("domain: d\nfoo: 1\n");
        assert_eq!(
            e,
            (
                2,
                1,
                "foo".into(),
                "unknown key \"foo\" (expected one of domain, descriptors)".into()
            )
        );
        let e = one_error("domain: d\ndescriptors:\n  - key: a\n    Value: b\n");
        assert_eq!(e.3, "unknown key \"Value\" (did you mean \"value\"?)");
    }

    #[test]
    fn merge_keys_and_aliases() {
        let d = only_domain(
            "domain: d
descriptors:
  - key: a
    rate_limit: &std
      unit: second
      requests_per_unit: 5
  - key: b
    rate_limit: *std
  - key: c
    rate_limit:
      <<: *std
      requests_per_unit: 9
",
        );
        let rpu: Vec<u32> = d
            .descriptors
            .iter()
            .map(|x| x.limits[0].requests_per_unit)
            .collect();
        assert_eq!(rpu, vec![5, 5, 9]);
        assert_eq!(d.descriptors[2].limits[0].unit, Some(Unit::Second));
    }

    #[test]
    fn user_tags_are_looked_through() {
        let d = only_domain(
            "domain: !x d\ndescriptors:\n  - key: a\n    rate_limit: !y {unit: second, requests_per_unit: !z 3}\n",
        );
        assert_eq!(d.domain, "d");
        assert_eq!(d.descriptors[0].limits[0].requests_per_unit, 3);
    }

    #[test]
    fn documents_that_are_not_mappings() {
        let e = one_error("- a\n- b\n");
        assert_eq!((e.0, e.1, e.2.as_str()), (1, 1, ""));
        assert!(e.3.contains("found a list"), "{}", e.3);
        let e = one_error("domain: d\ndescriptors:\n  key: a\n");
        assert_eq!(
            e,
            (
                3,
                3,
                "descriptors".into(),
                "expected a list of descriptors, found a mapping".into()
            )
        );
        let e = one_error("domain: d\ndescriptors:\n  - just_a_string\n");
        assert_eq!(e.2, "descriptors[0]");
        assert_eq!(e.3, "expected a mapping, found \"just_a_string\"");
        let e = one_error("domain: d\n? [a]\n: b\n");
        assert_eq!(e.3, "keys must be strings, found a list");
    }

    #[test]
    fn empty_documents_are_ignored() {
        let out = decode("");
        assert!(out.errors.is_empty() && out.domains.is_empty());
        let out = decode("# just a comment\n---\n---\ndomain: a\n---\n");
        assert!(out.errors.is_empty());
        assert_eq!(out.domains.len(), 1);
    }

    #[test]
    fn yaml_syntax_errors_have_positions() {
        let e = one_error("domain: d\ndescriptors:\n  - key: a\n    value: [x\n");
        assert_eq!(e.2, "");
        assert!(e.3.starts_with("invalid YAML: "), "{}", e.3);
        assert!(e.0 >= 4, "{e:?}");
        let e = one_error("domain: d\ndescriptors:\n  - key: a\n    key: b\n");
        assert_eq!((e.0, e.1), (4, 5));
        assert_eq!(e.3, "invalid YAML: duplicated key in mapping");
        let e = one_error("domain: d\ndescriptors:\n\t- key: a\n");
        assert_eq!((e.0, e.1), (3, 2));
        assert_eq!(
            e.3,
            "invalid YAML: tabs disallowed within this context (block indentation)"
        );
    }

    #[test]
    fn settings_are_decoded_and_checked() {
        let out = decode(
            "settings:
  default_algorithm: GCRA
  count_rejected_hits: true
  near_limit_ratio: 1
  max_keys: 10
  grpc_addr: 0.0.0.0:8081
  admin_addr: localhost:8080
  storage: memory
",
        );
        assert!(out.errors.is_empty(), "{:#?}", out.errors);
        let (s, loc) = &out.settings[0];
        assert_eq!(s.default_algorithm, Algorithm::Gcra);
        assert_eq!(s.rejected_hits, RejectedHits::Counted);
        assert_eq!(s.near_limit_ratio, 1.0);
        assert_eq!(s.max_keys, 10);
        assert_eq!(s.grpc_addr.as_deref(), Some("0.0.0.0:8081"));
        assert_eq!(s.admin_addr.as_deref(), Some("localhost:8080"));
        assert_eq!(s.storage.as_deref(), Some("memory"));
        assert_eq!((loc.line, loc.column, loc.key.as_str()), (1, 1, "settings"));

        let all = errors(
            "settings:
  default_algorithm: sliding_windw
  near_limit_ratio: 0
  max_keys: 0
  count_rejected_hits: sure
  grpc_addr: ''
  storage: [memory]
  max_key: 3
",
        );
        let got: Vec<(usize, &str)> = all.iter().map(|e| (e.0, e.2.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (8, "settings.max_key"),
                (2, "settings.default_algorithm"),
                (5, "settings.count_rejected_hits"),
                (3, "settings.near_limit_ratio"),
                (4, "settings.max_keys"),
                (6, "settings.grpc_addr"),
                (7, "settings.storage"),
            ]
        );
        assert_eq!(
            all[1].3,
            "unknown algorithm \"sliding_windw\" (did you mean \"sliding_window\"? expected one of \
             fixed_window, sliding_window_log, sliding_window_counter, token_bucket, leaky_bucket, \
             gcra, sliding_window, sliding_counter)"
        );
        assert_eq!(all[3].3, "must be greater than 0 and at most 1, found 0");
        assert_eq!(all[4].3, "must be greater than 0");
        let e = one_error("settings:\n  near_limit_ratio: 1.5\n");
        assert_eq!(e.3, "must be greater than 0 and at most 1, found 1.5");
        let e = one_error("settings:\n  near_limit_ratio: .nan\n");
        assert_eq!(e.3, "expected a number, found .nan");
    }

    #[test]
    fn settings_document_with_domains() {
        let out = decode(
            "domains:
  - domain: a
    descriptors: [{key: k}]
  - domain: b
  - descriptors: []
",
        );
        let names: Vec<&str> = out.domains.iter().map(|(d, _)| d.domain.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert!(out.settings.is_empty());
        assert_eq!(out.domains[1].1.key, "domains[1].domain");
        let e = &out.errors;
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].key.as_str()), (5, "domains[2]"));
        assert_eq!(e[0].message, "missing required key \"domain\"");
        let e = one_error("settings: {}\ndomain: x\n");
        assert_eq!(
            e.3,
            "unknown key \"settings\" (expected one of domain, descriptors)"
        );
        let e = one_error("settings: {}\ndomainz: []\n");
        assert_eq!(e.3, "unknown key \"domainz\" (did you mean \"domains\"?)");
    }

    #[test]
    fn burst_rules() {
        let limit = |extra: &str| {
            format!(
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: 5\n{extra}"
            )
        };
        let out = decode(&limit("      algorithm: leaky_bucket\n      burst: 3\n"));
        assert!(out.errors.is_empty() && out.bursts_on_default.is_empty());
        let e = one_error(&limit("      algorithm: fixed_window\n      burst: 3\n"));
        assert_eq!(
            e,
            (
                8,
                7,
                "descriptors[0].rate_limit.burst".into(),
                "only applies to token_bucket, leaky_bucket and gcra, not fixed_window".into()
            )
        );
        let e = one_error(&limit("      algorithm: sliding_counter\n      burst: 3\n"));
        assert!(e.3.ends_with("not sliding_window_counter"), "{}", e.3);
        let e = one_error(&limit("      algorithm: gcra\n      burst: 0\n"));
        assert_eq!((e.0, e.1, e.3.as_str()), (8, 14, "must be greater than 0"));
        let out = decode(&limit("      burst: 3\n"));
        assert!(out.errors.is_empty());
        assert_eq!(
            out.bursts_on_default,
            vec![Loc {
                line: 7,
                column: 7,
                key: "descriptors[0].rate_limit.burst".into()
            }]
        );
        // A bad algorithm is reported once, not again through burst.
        let e = one_error(&limit("      algorithm: bukket\n      burst: 3\n"));
        assert_eq!(e.2, "descriptors[0].rate_limit.algorithm");
    }

    #[test]
    fn block_duration_forms() {
        let with = |v: &str| {
            format!(
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {{unit: second, requests_per_unit: 1, block_duration: {v}}}\n"
            )
        };
        let get = |v: &str| only_domain(&with(v)).descriptors[0].limits[0].block_duration;
        assert_eq!(get("30"), Some(30 * NANOS_PER_SECOND));
        assert_eq!(get("0"), Some(0));
        assert_eq!(get("500ms"), Some(500_000_000));
        assert_eq!(get("\"1h\""), Some(3_600 * NANOS_PER_SECOND));
        for bad in ["-3", "1.5", "5x", "true", "[1]"] {
            let e = one_error(&with(bad));
            assert_eq!(e.2, "descriptors[0].rate_limit.block_duration", "{bad}");
            assert!(e.3.starts_with("expected a duration"), "{}", e.3);
        }
    }
}
