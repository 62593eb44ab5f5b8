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
//!
//! Each section (settings and domains here; `authz`, `anomaly`, `alerts`, `tracing` in their
//! own files) reads its keys through `value`: one `field`/`field_with`/`required` call per key,
//! into a model whose `Default` holds the defaults.

mod alerts;
mod anomaly;
mod authz;
mod otel;
mod value;

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
use value::{Duration, Fields, Named, UpTo, non_empty, nonzero, set};

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
                d.expected(doc, "", "a mapping");
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

impl Named for Unit {
    const WHAT: &'static str = "unit";
    const NAMES: &'static [&'static str] = &Unit::NAMES;
    const HINT: bool = false;
    fn parse_name(s: &str) -> Option<Self> {
        Unit::parse(s)
    }
}

impl Named for Algorithm {
    const WHAT: &'static str = "algorithm";
    const NAMES: &'static [&'static str] = &Algorithm::NAMES;
    fn parse_name(s: &str) -> Option<Self> {
        Algorithm::parse(s)
    }
}

impl Named for FailureMode {
    const WHAT: &'static str = "failure mode";
    const NAMES: &'static [&'static str] = &["allow", "deny", "local"];
    const HINT: bool = false;
    fn parse_name(s: &str) -> Option<Self> {
        FailureMode::parse(s)
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

    /// Reports that `node` is not `what`: "expected `what`, found" and how it looks.
    fn expected(&mut self, node: &MarkedYaml<'_>, path: &str, what: &str) {
        let found = self.describe(node);
        self.error(node, path, format!("expected {what}, found {found}"));
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
                self.expected(
                    doc,
                    "",
                    "a mapping with \"domain\" (a domain file) or \"settings\"/\"domains\" \
                     (a settings file)",
                );
            }
        }
    }

    fn settings_document(&mut self, doc: &MarkedYaml<'_>) {
        let Some(f) = self.mapping(doc, "", SETTINGS_DOC_KEYS) else {
            return;
        };
        if f.get("settings").is_some()
            && let Some(settings) = self.block(&f, "settings", Self::settings)
        {
            self.out.settings.push(settings);
        }
        if let Some(authz) = self.block(&f, "authz", Self::authz) {
            self.out.authz.push(authz);
        }
        if let Some(anomaly) = self.block(&f, "anomaly", Self::anomaly) {
            self.out.anomaly.push(anomaly);
        }
        if let Some(alerts) = self.block(&f, "alerts", Self::alerts) {
            self.out.alerts.push(alerts);
        }
        if let Some(tracing) = self.block(&f, "tracing", Self::tracing) {
            self.out.tracing.push(tracing);
        }
        let domains = self.field_items(&f, "domains", "a list of domains");
        for (item, path) in domains.unwrap_or_default() {
            if let Some(domain) = self.domain(item, &path) {
                self.out.domains.push(domain);
            }
        }
    }

    /// A top-level block of a settings document (null included: `anomaly:` alone means
    /// "on, with defaults"), with the location of its key.
    fn block<T>(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        read: impl FnOnce(&mut Self, &MarkedYaml<'_>, &str) -> T,
    ) -> Option<(T, Loc)> {
        let field = f.raw(name)?;
        let path = f.path(name);
        Some((read(self, field.value, &path), Self::loc(field.key, path)))
    }

    fn settings(&mut self, node: &MarkedYaml<'_>, path: &str) -> Settings {
        let mut s = Settings::default();
        let Some(f) = self.mapping(node, path, SETTINGS_KEYS) else {
            return s;
        };
        let default_algorithm = self.field(&f, "default_algorithm");
        set(&mut s.default_algorithm, default_algorithm);
        if self.field(&f, "count_rejected_hits") == Some(true) {
            s.rejected_hits = RejectedHits::Counted;
        }
        // The message shows the ratio as written (`0`, `.5`), not as parsed.
        let written = f
            .get("near_limit_ratio")
            .map(|x| self.describe(x.value))
            .unwrap_or_default();
        let ratio = |r: f64| {
            if r > 0.0 && r <= 1.0 {
                Ok(r)
            } else {
                Err(format!(
                    "must be greater than 0 and at most 1, found {written}"
                ))
            }
        };
        let near_limit_ratio = self.field_with(&f, "near_limit_ratio", ratio);
        set(&mut s.near_limit_ratio, near_limit_ratio);
        set(&mut s.max_keys, self.field_with(&f, "max_keys", nonzero));
        for (name, slot) in [
            ("grpc_addr", &mut s.grpc_addr),
            ("admin_addr", &mut s.admin_addr),
            ("storage", &mut s.storage),
            ("admin_token", &mut s.admin_token),
        ] {
            let check = |v: String| {
                let v = non_empty(v)?;
                if name == "storage" && v != "memory" {
                    super::storage_url::RedisUrl::parse(&v).map_err(|e| e.to_string())?;
                }
                Ok(v)
            };
            *slot = self.field_with(&f, name, check);
        }
        let redis = self.field_by(&f, "redis", Self::redis_settings);
        set(&mut s.redis, redis);
        s
    }

    fn redis_settings(&mut self, node: &MarkedYaml<'_>, path: &str) -> RedisSettings {
        let mut r = RedisSettings::default();
        let Some(f) = self.mapping(node, path, REDIS_KEYS) else {
            return r;
        };
        set(&mut r.prefix, self.field(&f, "prefix"));
        let timeout = self.field_with(&f, "timeout", |Duration(d)| nonzero(d));
        set(&mut r.timeout, timeout);
        set(&mut r.failure_mode, self.field(&f, "failure_mode"));
        set(&mut r.local_cache, self.field(&f, "local_cache"));
        r.cached_flush_interval =
            self.field_with(&f, "cached_flush_interval", |Duration(d)| nonzero(d));
        let pool = |UpTo::<64>(n)| match n {
            0 => Err("must be between 1 and 64".to_string()),
            n => Ok(n as usize),
        };
        set(&mut r.pool_size, self.field_with(&f, "pool_size", pool));
        r
    }

    /// A domain mapping (a whole domain file, or one item of a settings file's `domains`).
    fn domain(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<(DomainConfig, Loc)> {
        let f = self.mapping(node, path, DOMAIN_KEYS)?;
        let domain = self.required_string(&f, "domain");
        let descriptors = self
            .field_by(&f, "descriptors", Self::descriptors)
            .unwrap_or_default();
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
            self.missing(f, name);
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
        let items = self
            .items(node, path, "a list of descriptors")
            .unwrap_or_default();
        let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
        for (item, item_path) in items {
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
        let value = self.field(&f, "value").filter(|v: &String| !v.is_empty());
        let mut limits = Vec::new();
        if f.get("rate_limit").is_some() {
            self.error_at_key(
                &f,
                "rate_limits",
                "rate_limit and rate_limits are mutually exclusive: put every limit in rate_limits",
            );
        }
        if let Some(field) = f.get("rate_limit") {
            let line = field.key.span.start.line();
            limits.extend(self.rate_limit(field.value, &f.path("rate_limit"), false, line));
        }
        let list = self.field_items(&f, "rate_limits", "a list of rate limits");
        for (item, item_path) in list.unwrap_or_default() {
            let line = item.span.start.line();
            limits.extend(self.rate_limit(item, &item_path, true, line));
        }
        let shadow_mode = self.flag(&f, "shadow_mode");
        let detailed_metric = self.flag(&f, "detailed_metric");
        let value_to_metric = self.flag(&f, "value_to_metric");
        let share_threshold = self.flag(&f, "share_threshold");
        if share_threshold && !value.as_deref().is_some_and(|v| v.contains('*')) {
            self.error_at_key(
                &f,
                "share_threshold",
                "share_threshold can only be used with a wildcard value (one with `*`)",
            );
        }
        let descriptors = self
            .field_by(&f, "descriptors", Self::descriptors)
            .unwrap_or_default();
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
        let unlimited = if in_list && f.get("unlimited").is_some() {
            let why =
                "not allowed in rate_limits: an unlimited descriptor takes a single rate_limit";
            self.error_at_key(&f, "unlimited", why);
            false
        } else {
            self.flag(&f, "unlimited")
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
                self.error_at_key(&f, name, "must not be set when unlimited is true");
            }
        } else {
            unit = self.required(&f, "unit");
            requests_per_unit = self.required(&f, "requests_per_unit").unwrap_or(0);
        }
        let name = self.field(&f, "name").filter(|n: &String| !n.is_empty());
        let replaces = self
            .field_by(&f, "replaces", |d, node, p| {
                d.replaces(node, p, name.as_deref())
            })
            .unwrap_or_default();
        let (mut algorithm, mut burst, mut block_duration, mut adaptive) = (None, None, None, None);
        if !unlimited {
            adaptive = self.field_by(&f, "adaptive", Self::adaptive).flatten();
            algorithm = self.field(&f, "algorithm");
            burst = self.burst(&f, algorithm);
            block_duration = self.field(&f, "block_duration").map(|Duration(d)| d);
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
        let factor = |v: f64| {
            if v > 0.0 && v <= MAX_ADAPTIVE_FACTOR {
                Ok(v)
            } else {
                let max = MAX_ADAPTIVE_FACTOR;
                Err(format!(
                    "must be greater than 0 and at most {max}, found {v}"
                ))
            }
        };
        let min = self.field_with(&f, "min_factor", factor);
        let max = self.field_with(&f, "max_factor", factor);
        let initial = self.field_with(&f, "initial_factor", factor);
        for name in ["min_factor", "max_factor"] {
            if f.get(name).is_none() {
                self.missing(&f, name);
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
            (Some(i), Some(_)) if !(min..=max).contains(&i) => {
                self.error_at(
                    &f,
                    "initial_factor",
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

    /// `burst` under `f`, which only a bucket algorithm takes; with no algorithm, `load`
    /// checks it against the default one.
    fn burst(&mut self, f: &Fields<'_, '_>, algorithm: Option<Algorithm>) -> Option<u32> {
        let n = self.field_with(f, "burst", nonzero)?;
        match algorithm {
            Some(a) if !uses_burst(a) => {
                let why = format!(
                    "only applies to token_bucket, leaky_bucket and gcra, not {}",
                    a.as_str()
                );
                self.error_at_key(f, "burst", why);
                None
            }
            Some(_) => Some(n),
            // An invalid algorithm was already reported; don't pile up.
            None if f.get("algorithm").is_some() => Some(n),
            None => {
                let key = f.get("burst")?.key;
                self.out
                    .bursts_on_default
                    .push(Self::loc(key, f.path("burst")));
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
        let items = self
            .items(node, path, "a list of {name: ...}")
            .unwrap_or_default();
        for (item, item_path) in items {
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

    /// The messages the shared readers build (`Named` with and without a hint, `UpTo` and its
    /// check, a zero `Duration`, a missing required key), each at its node with its key path:
    /// the other tests match most of these loosely or not at all.
    #[test]
    fn shared_readers_keep_their_messages_and_positions() {
        let all = errors(
            "settings:\n  redis:\n    timeout: 0\n    failure_mode: alow\n    pool_size: 0\n\
             ---\nsettings:\n  redis: {pool_size: 65}\n---\nanomaly: {volume_from: chek}\n\
             ---\ndomain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: secnd, \
             requests_per_unit: 1}\n  - key: b\n    rate_limit: {requests_per_unit: 1}\n",
        );
        let want = vec![
            (3, 14, "settings.redis.timeout", "must be greater than 0"),
            (
                4,
                19,
                "settings.redis.failure_mode",
                "unknown failure mode \"alow\" (expected one of allow, deny, local)",
            ),
            (
                5,
                16,
                "settings.redis.pool_size",
                "must be between 1 and 64",
            ),
            (
                8,
                22,
                "settings.redis.pool_size",
                "expected an integer from 0 to 64, found 65",
            ),
            (
                10,
                24,
                "anomaly.volume_from",
                "unknown source \"chek\" (did you mean \"check\"? expected one of check, \
                 should_rate_limit, access_log)",
            ),
            (
                15,
                24,
                "descriptors[0].rate_limit.unit",
                "unknown unit \"secnd\" (expected one of second, minute, hour, day, week, month, \
                 year)",
            ),
            (
                17,
                17,
                "descriptors[1].rate_limit",
                "missing required key \"unit\"",
            ),
        ];
        let got: Vec<(usize, usize, &str, &str)> = all
            .iter()
            .map(|(l, c, k, m)| (*l, *c, k.as_str(), m.as_str()))
            .collect();
        assert_eq!(got, want);
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
            suggest("tokenbucket", &Algorithm::NAMES),
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
