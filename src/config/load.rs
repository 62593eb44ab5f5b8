//! Finding and reading configuration files, and the checks that span files.
//!
//! `load` accepts what envoyproxy/ratelimit deployments mount: one file, or a directory of
//! `*.yaml`/`*.yml` files such as a Kubernetes ConfigMap volume (whose entries are symlinks
//! into a `..data` directory). Reading is all-or-nothing: a `Config` comes back only when
//! every file is valid, otherwise every problem found is returned at once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use super::alerts::AlertSettings;
use super::anomaly::AnomalySettings;
use super::authz::{AuthzConfig, ListsConfig};
use super::decode::{Loc, decode_domain_doc, decode_file, decode_lists_doc, uses_burst};
use super::error::{ConfigError, ConfigErrors};
use super::model::{Config, DomainConfig, Settings};
use super::otel::TracingSettings;

/// Loads the configuration at `path`: one YAML file, or every regular file directly inside
/// the directory whose name ends in `.yaml` or `.yml` and does not start with `.`, in file
/// name order (symlinks followed, subdirectories such as `..data` not entered).
///
/// A directory without YAML files is valid and has no domains: the service then answers
/// every request as unknown-domain, like the reference with an empty runtime directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    for file in config_files(path, &mut errors) {
        match fs::read(&file) {
            Ok(bytes) => sources.push((file, bytes)),
            Err(e) => errors.push(ConfigError::file(&file, format!("cannot read file: {e}"))),
        }
    }
    assemble(sources, errors)
}

/// Loads configuration text as if it were one file named `source_name`: the same rules as
/// `load` without touching the file system (tests, and configs that come from elsewhere).
pub fn parse_str(source_name: &str, text: &str) -> Result<Config, ConfigErrors> {
    assemble(
        vec![(PathBuf::from(source_name), text.as_bytes().to_vec())],
        Vec::new(),
    )
}

/// Decodes `text` (YAML or JSON) as exactly one domain document, as a `RateLimitPolicy`'s
/// spec: the checks of a domain file, not those that need the other files (duplicate domains,
/// `burst` under the default algorithm), which the caller applies against the config in force.
pub fn parse_domain(source_name: &str, text: &str) -> Result<DomainConfig, ConfigErrors> {
    let (domain, errors) = decode_domain_doc(Path::new(source_name), text);
    match domain {
        Some(domain) if errors.is_empty() => Ok(domain),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Decodes `text` (YAML or JSON) as one `allow`/`block` lists document, as an `AccessList`'s
/// spec: the same entry rules as the settings file's `authz.lists`.
pub fn parse_lists(source_name: &str, text: &str) -> Result<ListsConfig, ConfigErrors> {
    let (lists, errors) = decode_lists_doc(Path::new(source_name), text);
    match lists {
        Some(lists) if errors.is_empty() => Ok(lists),
        _ => Err(ConfigErrors(errors)),
    }
}

/// The files `load` reads for `path`, reporting what cannot be listed or inspected.
fn config_files(path: &Path, errors: &mut Vec<ConfigError>) -> Vec<PathBuf> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            errors.push(ConfigError::file(path, format!("cannot read: {e}")));
            return Vec::new();
        }
    };
    if meta.is_file() {
        return vec![path.to_path_buf()];
    }
    if !meta.is_dir() {
        errors.push(ConfigError::file(path, "not a file or a directory"));
        return Vec::new();
    }
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(ConfigError::file(
                path,
                format!("cannot list directory: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut named: Vec<(OsString, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                errors.push(ConfigError::file(
                    path,
                    format!("cannot list directory: {e}"),
                ));
                continue;
            }
        };
        let name = entry.file_name();
        let bytes = name.as_encoded_bytes();
        let yaml = bytes.ends_with(b".yaml") || bytes.ends_with(b".yml");
        if !yaml || bytes.starts_with(b".") {
            continue;
        }
        let file = entry.path();
        // `fs::metadata` follows symlinks: a ConfigMap entry is a link to a regular file.
        match fs::metadata(&file) {
            Ok(meta) if meta.is_file() => named.push((name, file)),
            Ok(_) => {} // a directory (or other) that happens to be named *.yaml
            Err(e) => errors.push(ConfigError::file(&file, format!("cannot read: {e}"))),
        }
    }
    named.sort();
    named.into_iter().map(|(_, file)| file).collect()
}

/// Decodes every source and applies the checks that need all of them.
fn assemble(
    sources: Vec<(PathBuf, Vec<u8>)>,
    mut errors: Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let version = digest(&sources);
    let mut settings: Option<(Settings, PathBuf, Loc)> = None;
    let mut domains = Vec::new();
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    let mut bursts_on_default: Vec<(PathBuf, Loc)> = Vec::new();
    let mut authz: Option<(AuthzConfig, PathBuf, Loc)> = None;
    let mut anomaly: Option<(AnomalySettings, PathBuf, Loc)> = None;
    let mut alerts: Option<(AlertSettings, PathBuf, Loc)> = None;
    let mut tracing: Option<(TracingSettings, PathBuf, Loc)> = None;

    for (file, bytes) in &sources {
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                errors.push(utf8_error(file, bytes, e.valid_up_to()));
                continue;
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if is_blank(text) {
            errors.push(ConfigError::file(file, EMPTY_FILE));
            continue;
        }
        let out = decode_file(file, text);
        errors.extend(out.errors);
        for (block, loc) in out.settings {
            match &settings {
                None => settings = Some((block, file.clone(), loc)),
                Some((_, first_file, first)) => errors.push(located(
                    file,
                    loc,
                    format!(
                        "only one settings block is allowed; the first is at {}:{}",
                        first_file.display(),
                        first.line
                    ),
                )),
            }
        }
        for (block, loc) in out.authz {
            match &authz {
                None => authz = Some((block, file.clone(), loc)),
                Some((_, first_file, first)) => errors.push(located(
                    file,
                    loc,
                    format!(
                        "only one authz block is allowed; the first is at {}:{}",
                        first_file.display(),
                        first.line
                    ),
                )),
            }
        }
        for (block, loc) in out.anomaly {
            match &anomaly {
                None => anomaly = Some((block, file.clone(), loc)),
                Some((_, first_file, first)) => errors.push(located(
                    file,
                    loc,
                    format!(
                        "only one anomaly block is allowed; the first is at {}:{}",
                        first_file.display(),
                        first.line
                    ),
                )),
            }
        }
        for (block, loc) in out.alerts {
            match &alerts {
                None => alerts = Some((block, file.clone(), loc)),
                Some((_, first_file, first)) => errors.push(located(
                    file,
                    loc,
                    format!(
                        "only one alerts block is allowed; the first is at {}:{}",
                        first_file.display(),
                        first.line
                    ),
                )),
            }
        }
        for (block, loc) in out.tracing {
            match &tracing {
                None => tracing = Some((block, file.clone(), loc)),
                Some((_, first_file, first)) => errors.push(located(
                    file,
                    loc,
                    format!(
                        "only one tracing block is allowed; the first is at {}:{}",
                        first_file.display(),
                        first.line
                    ),
                )),
            }
        }
        for (domain, loc) in out.domains {
            if let Some((first_file, first_line)) = seen.get(&domain.domain) {
                let message = format!(
                    "duplicate domain {:?}: already defined at {}:{first_line}",
                    domain.domain,
                    first_file.display()
                );
                errors.push(located(file, loc, message));
            } else {
                seen.insert(domain.domain.clone(), (file.clone(), loc.line));
                domains.push(domain);
            }
        }
        bursts_on_default.extend(
            out.bursts_on_default
                .into_iter()
                .map(|loc| (file.clone(), loc)),
        );
    }

    let settings = settings.map(|(s, _, _)| s).unwrap_or_default();
    if !uses_burst(settings.default_algorithm) {
        for (file, loc) in bursts_on_default {
            let message = format!(
                "only applies to token_bucket, leaky_bucket and gcra, and this limit uses the \
                 default algorithm {} (set algorithm on the limit)",
                settings.default_algorithm.as_str()
            );
            errors.push(located(&file, loc, message));
        }
    }

    if let Some((a, file, loc)) = &authz
        && !a.policies.is_empty()
        && !seen.contains_key(&a.domain)
    {
        let message = format!(
            "policies count in domain {:?}, which no file defines (add it under domains, or \
             set authz.domain)",
            a.domain
        );
        let mut loc = loc.clone();
        loc.key.push_str(".domain");
        errors.push(located(file, loc, message));
    }

    if !errors.is_empty() {
        // Directory files are read in name order, so path order is reading order.
        errors.sort_by(|a, b| {
            (&a.file, a.line, a.column, &a.key, &a.message)
                .cmp(&(&b.file, b.line, b.column, &b.key, &b.message))
        });
        // Aliases and merge keys can make one bad node reported from several places.
        errors.dedup();
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        settings,
        domains,
        authz: authz.map(|(a, _, _)| a),
        anomaly: anomaly.map(|(a, _, _)| a).filter(|a| a.enabled),
        alerts: alerts.map(|(a, _, _)| a).filter(|a| a.enabled),
        tracing: tracing.map(|(t, _, _)| t).filter(|t| t.enabled),
        files: sources.into_iter().map(|(file, _)| file).collect(),
        version,
    })
}

/// Why an empty file is refused rather than read as "no rules": a file caught between
/// truncate and write (`cat > f`, `cp`) looks exactly like this, and loading it would drop
/// every limit it held. envoyproxy/ratelimit refuses such a file too (a domain is required).
pub const EMPTY_FILE: &str = "empty file (no YAML document): refused, because a file being \
     rewritten in place looks the same; delete the file or give it content";

/// Nothing but whitespace, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

fn located(file: &Path, loc: Loc, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: loc.line,
        column: loc.column,
        key: loc.key,
        message,
    }
}

fn utf8_error(file: &Path, bytes: &[u8], valid_up_to: usize) -> ConfigError {
    let (line, column) = crate::text::line_column(bytes, valid_up_to);
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        key: String::new(),
        message: "the file is not valid UTF-8".into(),
    }
}

/// FNV-1a 64 over each file's name and contents (length-prefixed, so no two different
/// inputs are merely re-split). Names, not full paths: the same files mounted at another
/// place have the same version.
fn digest(sources: &[(PathBuf, Vec<u8>)]) -> String {
    let mut hash = crate::digest::Fnv64::new();
    for (file, bytes) in sources {
        let name = file.file_name().unwrap_or(file.as_os_str());
        for part in [name.as_encoded_bytes(), bytes.as_slice()] {
            hash.write_u64(part.len() as u64);
            hash.write(part);
        }
    }
    format!("{:016x}", hash.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DescriptorConfig, RateLimitConfig};
    use crate::limiter::{Algorithm, NANOS_PER_SECOND, RejectedHits, Unit};

    fn ok(text: &str) -> Config {
        match parse_str("rl.yaml", text) {
            Ok(config) => config,
            Err(e) => panic!("unexpected errors:\n{e}"),
        }
    }

    fn err(text: &str) -> Vec<ConfigError> {
        match parse_str("rl.yaml", text) {
            Ok(config) => panic!("expected errors, loaded {config:#?}"),
            Err(e) => e.0,
        }
    }

    /// `file:line:col: key: message` lines, which is what an operator sees.
    fn err_lines(text: &str) -> Vec<String> {
        err(text).iter().map(ToString::to_string).collect()
    }

    fn limit(unit: Unit, requests_per_unit: u32, line: usize) -> RateLimitConfig {
        RateLimitConfig {
            unit: Some(unit),
            requests_per_unit,
            unlimited: false,
            name: None,
            replaces: vec![],
            algorithm: None,
            burst: None,
            block_duration: None,
            adaptive: None,
            line,
        }
    }

    fn descriptor(key: &str, value: Option<&str>, line: usize) -> DescriptorConfig {
        DescriptorConfig {
            key: key.into(),
            value: value.map(Into::into),
            limits: vec![],
            shadow_mode: false,
            detailed_metric: false,
            value_to_metric: false,
            share_threshold: false,
            descriptors: vec![],
            line,
        }
    }

    // ---- The reference's README examples load unchanged. ----

    #[test]
    fn reference_example_mongo_cps() {
        let c = ok("domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: second
      requests_per_unit: 500

  - key: database
    value: default
    rate_limit:
      unit: second
      requests_per_unit: 500
");
        assert_eq!(c.domains.len(), 1);
        let d = &c.domains[0];
        assert_eq!(d.domain, "mongo_cps");
        assert_eq!(d.file, PathBuf::from("rl.yaml"));
        let mut users = descriptor("database", Some("users"), 3);
        users.limits = vec![limit(Unit::Second, 500, 5)];
        let mut default = descriptor("database", Some("default"), 9);
        default.limits = vec![limit(Unit::Second, 500, 11)];
        assert_eq!(d.descriptors, vec![users, default]);
        assert_eq!(c.settings, Settings::default());
        assert_eq!(c.files, vec![PathBuf::from("rl.yaml")]);
    }

    #[test]
    fn reference_example_messaging_nested() {
        let c = ok("domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
");
        let mut to_number = descriptor("to_number", None, 7);
        to_number.limits = vec![limit(Unit::Day, 5, 8)];
        let mut marketing = descriptor("message_type", Some("marketing"), 4);
        marketing.descriptors = vec![to_number];
        let mut any_number = descriptor("to_number", None, 13);
        any_number.limits = vec![limit(Unit::Day, 100, 14)];
        assert_eq!(c.domains[0].descriptors, vec![marketing, any_number]);
    }

    #[test]
    fn reference_examples_blacklist_unlimited_shadow_replaces_detailed_wildcard() {
        let c = ok("domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
---
domain: internal
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true

  - key: azure
    rate_limit:
      unit: minute
      requests_per_unit: 100
---
domain: example6
descriptors:
  - key: service
    descriptors:
      - key: user
        value: user-a
        rate_limit:
          requests_per_unit: 10
          unit: second
        shadow_mode: true
      - key: user
        value: user-b
        rate_limit:
          requests_per_unit: 20
          unit: second
---
domain: example7
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
---
domain: example8
descriptors:
  - key: key1
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 10
  - key: key1
    value: value1
    rate_limit:
      unit: minute
      requests_per_unit: 20
---
domain: example9
descriptors:
  - key: key1
    value: value*
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: path
    value: /api/*/users/*
    value_to_metric: true
    rate_limit:
      unit: Week
      requests_per_unit: 20
");
        let names: Vec<&str> = c.domains.iter().map(|d| d.domain.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "edge_proxy_per_ip",
                "internal",
                "example6",
                "example7",
                "example8",
                "example9"
            ]
        );
        let blacklist = &c.domains[0].descriptors[1];
        assert_eq!(blacklist.value.as_deref(), Some("50.0.0.5"));
        assert_eq!(blacklist.limits[0].requests_per_unit, 0);

        let ldap = &c.domains[1].descriptors[0].limits[0];
        assert!(ldap.unlimited);
        assert_eq!((ldap.unit, ldap.requests_per_unit), (None, 0));

        let users = &c.domains[2].descriptors[0].descriptors;
        assert!(users[0].shadow_mode && !users[1].shadow_mode);

        let specific = &c.domains[3].descriptors[0].descriptors[0].limits[0];
        assert_eq!(specific.name.as_deref(), Some("specific_limit"));
        let replacing = &c.domains[3].descriptors[1].descriptors[0].limits[0];
        assert_eq!(replacing.replaces, vec!["specific_limit".to_string()]);

        assert!(c.domains[4].descriptors[0].detailed_metric);

        let wild = &c.domains[5].descriptors;
        assert_eq!(wild[0].value.as_deref(), Some("value*"));
        assert_eq!(wild[1].value.as_deref(), Some("/api/*/users/*"));
        assert!(wild[1].value_to_metric);
        assert_eq!(wild[1].limits[0].unit, Some(Unit::Week));
    }

    // ---- Extensions. ----

    #[test]
    fn rate_limits_list_and_extensions() {
        let c = ok("settings:
  default_algorithm: token_bucket
---
domain: api
descriptors:
  - key: user
    rate_limits:
      - {unit: second, requests_per_unit: 10, burst: 20}
      - unit: day
        requests_per_unit: 10000
        algorithm: sliding_window
        block_duration: 1h
      - {unit: minute, requests_per_unit: 5, algorithm: leaky_bucket, block_duration: 90}
");
        assert_eq!(c.settings.default_algorithm, Algorithm::TokenBucket);
        let limits = &c.domains[0].descriptors[0].limits;
        assert_eq!(limits.len(), 3);
        assert_eq!(limits[0].burst, Some(20));
        assert_eq!(limits[0].algorithm, None);
        assert_eq!(limits[0].line, 8);
        assert_eq!(limits[1].algorithm, Some(Algorithm::SlidingWindowLog));
        assert_eq!(limits[1].block_duration, Some(3_600 * NANOS_PER_SECOND));
        assert_eq!(limits[1].line, 9);
        assert_eq!(limits[2].algorithm, Some(Algorithm::LeakyBucket));
        assert_eq!(limits[2].block_duration, Some(90 * NANOS_PER_SECOND));
    }

    #[test]
    fn units_are_case_insensitive() {
        let c = ok("domain: d
descriptors:
  - {key: a, rate_limit: {unit: SECOND, requests_per_unit: 1}}
  - {key: b, rate_limit: {unit: Minute, requests_per_unit: 1}}
  - {key: c, rate_limit: {unit: hOuR, requests_per_unit: 1}}
  - {key: d, rate_limit: {unit: day, requests_per_unit: 1}}
  - {key: e, rate_limit: {unit: MONTH, requests_per_unit: 1}}
  - {key: f, rate_limit: {unit: Year, requests_per_unit: 1}}
");
        let units: Vec<Option<Unit>> = c.domains[0]
            .descriptors
            .iter()
            .map(|d| d.limits[0].unit)
            .collect();
        assert_eq!(
            units,
            [
                Unit::Second,
                Unit::Minute,
                Unit::Hour,
                Unit::Day,
                Unit::Month,
                Unit::Year
            ]
            .map(Some)
        );
    }

    // ---- Errors: each with its position and key path. ----

    #[test]
    fn unknown_unit_in_nested_descriptor() {
        assert_eq!(
            err_lines(
                "domain: d
descriptors:
  - key: a
  - key: b
    descriptors:
      - key: c
        rate_limit:
          unit: sekond
          requests_per_unit: 5
"
            ),
            vec![
                "rl.yaml:8:17: descriptors[1].descriptors[0].rate_limit.unit: unknown unit \
                 \"sekond\" (expected one of second, minute, hour, day, week, month, year)"
            ]
        );
    }

    #[test]
    fn every_error_of_a_file_is_reported() {
        assert_eq!(
            err_lines(
                "domain: d
descriptors:
  - key: a
    rate_limit:
      unit: fortnight
      requests_per_unit: -3
    shadow_mode: sometimes
  - key: ''
  - key: b
    valeu: x
    rate_limit:
      requests_per_unit: 1
  - key: a
  - value: v
"
            ),
            vec![
                "rl.yaml:5:13: descriptors[0].rate_limit.unit: unknown unit \"fortnight\" \
                 (expected one of second, minute, hour, day, week, month, year)",
                "rl.yaml:6:26: descriptors[0].rate_limit.requests_per_unit: expected an integer \
                 from 0 to 4294967295, found -3",
                "rl.yaml:7:18: descriptors[0].shadow_mode: expected true or false, found \
                 \"sometimes\"",
                "rl.yaml:8:10: descriptors[1].key: must not be empty",
                "rl.yaml:10:5: descriptors[2].valeu: unknown key \"valeu\" (did you mean \
                 \"value\"?)",
                "rl.yaml:12:7: descriptors[2].rate_limit: missing required key \"unit\"",
                "rl.yaml:13:5: descriptors[3]: duplicate descriptor (key \"a\", no value); the \
                 first one is at line 3",
                "rl.yaml:14:5: descriptors[4]: missing required key \"key\"",
            ]
        );
    }

    #[test]
    fn errors_in_every_document_and_settings_are_reported() {
        assert_eq!(
            err_lines(
                "settings:
  default_algorithm: leaky
  max_keys: -1
---
domain: one
descriptors:
  - key: a
    rate_limits: {unit: second, requests_per_unit: 1}
---
domain: two
descriptors:
  - key: b
    rate_limits:
      - {unit: second, requests_per_unit: 1, burst: 0, algorithm: token_bucket}
      - {unit: second, requests_per_unit: 1, block_duration: soon}
"
            ),
            vec![
                "rl.yaml:2:22: settings.default_algorithm: unknown algorithm \"leaky\" (expected \
                 one of fixed_window, sliding_window_log, sliding_window_counter, token_bucket, \
                 leaky_bucket, gcra, sliding_window, sliding_counter)",
                "rl.yaml:3:13: settings.max_keys: expected an integer from 0 to \
                 18446744073709551615, found -1",
                "rl.yaml:8:18: descriptors[0].rate_limits: expected a list of rate limits, found \
                 a mapping",
                "rl.yaml:14:53: descriptors[0].rate_limits[0].burst: must be greater than 0",
                "rl.yaml:15:62: descriptors[0].rate_limits[1].block_duration: expected a \
                 duration: whole seconds or a number with unit ms, s, m, h or d (like 500ms, \
                 30s, 5m, 1h), found \"soon\"",
            ]
        );
    }

    #[test]
    fn domain_must_be_present_and_non_empty() {
        assert_eq!(
            err_lines("descriptors: []\n"),
            vec!["rl.yaml:1:1: missing required key \"domain\""]
        );
        assert_eq!(
            err_lines("domain: ''\n"),
            vec!["rl.yaml:1:9: domain: must not be empty"]
        );
        assert_eq!(
            err_lines("domain:\ndescriptors: []\n"),
            vec!["rl.yaml:1:1: domain: must not be empty"]
        );
        assert_eq!(
            err_lines("domian: d\n"),
            vec![
                "rl.yaml:1:1: missing required key \"domain\"",
                "rl.yaml:1:1: domian: unknown key \"domian\" (did you mean \"domain\"?)",
            ]
        );
    }

    #[test]
    fn duplicate_siblings_but_not_cousins() {
        ok("domain: d
descriptors:
  - key: a
    value: x
    descriptors: [{key: k}]
  - key: a
    value: y
    descriptors: [{key: k}]
  - key: a
  - key: b
    value: x
");
        assert_eq!(
            err_lines(
                "domain: d
descriptors:
  - key: a
    descriptors:
      - {key: k, value: v}
      - {key: k, value: w}
      - {key: k, value: v}
  - {key: a, value: ''}
"
            ),
            vec![
                "rl.yaml:7:9: descriptors[0].descriptors[2]: duplicate descriptor (key \"k\", \
                 value \"v\"); the first one is at line 5",
                "rl.yaml:8:5: descriptors[1]: duplicate descriptor (key \"a\", no value); the \
                 first one is at line 3",
            ]
        );
    }

    #[test]
    fn unlimited_rules() {
        assert_eq!(
            err_lines(
                "domain: d
descriptors:
  - key: a
    rate_limit:
      unlimited: true
      unit: second
      requests_per_unit: 5
      algorithm: gcra
      name: ok_to_name
  - key: b
    rate_limits:
      - unlimited: true
"
            ),
            vec![
                "rl.yaml:6:7: descriptors[0].rate_limit.unit: must not be set when unlimited \
                 is true",
                "rl.yaml:7:7: descriptors[0].rate_limit.requests_per_unit: must not be set when \
                 unlimited is true",
                "rl.yaml:8:7: descriptors[0].rate_limit.algorithm: must not be set when \
                 unlimited is true",
                "rl.yaml:12:9: descriptors[1].rate_limits[0]: missing required key \
                 \"requests_per_unit\"",
                "rl.yaml:12:9: descriptors[1].rate_limits[0]: missing required key \"unit\"",
                "rl.yaml:12:9: descriptors[1].rate_limits[0].unlimited: not allowed in \
                 rate_limits: an unlimited descriptor takes a single rate_limit",
            ]
        );
        let c = ok("domain: d
descriptors:
  - key: a
    rate_limit: {unlimited: false, unit: second, requests_per_unit: 1}
  - key: b
    rate_limit: {unlimited: true, name: free}
");
        assert!(!c.domains[0].descriptors[0].limits[0].unlimited);
        assert_eq!(
            c.domains[0].descriptors[1].limits[0].name.as_deref(),
            Some("free")
        );
    }

    #[test]
    fn rate_limit_and_rate_limits_are_exclusive() {
        assert_eq!(
            err_lines(
                "domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1}
    rate_limits:
      - {unit: day, requests_per_unit: 100}
"
            ),
            vec![
                "rl.yaml:5:5: descriptors[0].rate_limits: rate_limit and rate_limits are \
                 mutually exclusive: put every limit in rate_limits"
            ]
        );
    }

    #[test]
    fn replaces_rules() {
        let c = ok("domain: d
descriptors:
  - key: a
    rate_limit:
      unit: second
      requests_per_unit: 1
      name: mine
      replaces: [{name: nobody_has_this_name}, {name: other}]
");
        assert_eq!(
            c.domains[0].descriptors[0].limits[0].replaces,
            vec!["nobody_has_this_name".to_string(), "other".to_string()]
        );
        assert_eq!(
            err_lines(
                "domain: d
descriptors:
  - key: a
    rate_limit:
      unit: second
      requests_per_unit: 1
      name: mine
      replaces:
        - name: ''
        - {}
        - name: mine
        - nam: x
        - name: [x]
"
            ),
            vec![
                "rl.yaml:9:17: descriptors[0].rate_limit.replaces[0].name: must not be empty",
                "rl.yaml:10:11: descriptors[0].rate_limit.replaces[1]: missing required key \
                 \"name\"",
                "rl.yaml:11:17: descriptors[0].rate_limit.replaces[2].name: a limit cannot \
                 replace itself (\"mine\" is its own name)",
                "rl.yaml:12:11: descriptors[0].rate_limit.replaces[3]: missing required key \
                 \"name\"",
                "rl.yaml:12:11: descriptors[0].rate_limit.replaces[3].nam: unknown key \"nam\" \
                 (did you mean \"name\"?)",
                "rl.yaml:13:17: descriptors[0].rate_limit.replaces[4].name: expected a string, \
                 found a list",
            ]
        );
    }

    #[test]
    fn yaml_syntax_error_reports_position() {
        let e = err("domain: d\ndescriptors:\n  - key: a\n   bad: indentation\n");
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_string(),
            "rl.yaml:4:4: invalid YAML: while parsing a block collection, did not find \
             expected '-' indicator"
        );
    }

    #[test]
    fn burst_against_the_default_algorithm() {
        let rules = "domain: d
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 1, burst: 5}
";
        assert_eq!(
            err_lines(rules),
            vec![
                "rl.yaml:4:54: descriptors[0].rate_limit.burst: only applies to token_bucket, \
                 leaky_bucket and gcra, and this limit uses the default algorithm fixed_window \
                 (set algorithm on the limit)"
            ]
        );
        let c = ok(&format!(
            "{rules}---\nsettings: {{default_algorithm: gcra}}\n"
        ));
        assert_eq!(c.domains[0].descriptors[0].limits[0].burst, Some(5));
        assert_eq!(
            c.domains[0].descriptors[0].limits[0].effective_algorithm(&c.settings),
            Algorithm::Gcra
        );
    }

    // ---- Settings files. ----

    #[test]
    fn settings_file_with_domains() {
        let c = ok("settings:
  default_algorithm: sliding_window_counter
  count_rejected_hits: true
  near_limit_ratio: 0.9
  max_keys: 5000
  grpc_addr: 127.0.0.1:8081
  admin_addr: 127.0.0.1:8080
  storage: memory
domains:
  - domain: foo
    descriptors:
      - key: k
        rate_limit: {unit: second, requests_per_unit: 1}
  - domain: bar
");
        let s = &c.settings;
        assert_eq!(s.default_algorithm, Algorithm::SlidingWindowCounter);
        assert_eq!(s.rejected_hits, RejectedHits::Counted);
        assert_eq!(s.near_limit_ratio, 0.9);
        assert_eq!(s.max_keys, 5000);
        assert_eq!(s.grpc_addr.as_deref(), Some("127.0.0.1:8081"));
        assert_eq!(s.admin_addr.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(s.storage.as_deref(), Some("memory"));
        let names: Vec<&str> = c.domains.iter().map(|d| d.domain.as_str()).collect();
        assert_eq!(names, vec!["foo", "bar"]);
        assert_eq!(c.domains[0].descriptors[0].line, 12);

        let only_domains = ok("domains: [{domain: x}]\n");
        assert_eq!(only_domains.settings, Settings::default());
    }

    #[test]
    fn at_most_one_settings_block() {
        assert_eq!(
            err_lines("settings: {max_keys: 1}\n---\nsettings: {max_keys: 2}\n"),
            vec![
                "rl.yaml:3:1: settings: only one settings block is allowed; the first is at \
                 rl.yaml:1"
            ]
        );
    }

    #[test]
    fn duplicate_domain_within_a_file() {
        assert_eq!(
            err_lines("domain: a\n---\ndomains:\n  - domain: b\n  - domain: a\n"),
            vec![
                "rl.yaml:5:13: domains[1].domain: duplicate domain \"a\": already defined at \
                 rl.yaml:1"
            ]
        );
    }

    #[test]
    fn version_is_stable_and_content_sensitive() {
        let a = ok("domain: a\n");
        let again = ok("domain: a\n");
        let b = ok("domain: b\n");
        assert_eq!(a.version, again.version);
        assert_ne!(a.version, b.version);
        assert_eq!(a.version.len(), 16);
        assert!(a.version.chars().all(|c| c.is_ascii_hexdigit()));
        let renamed = parse_str("other.yaml", "domain: a\n");
        assert_ne!(renamed.map(|c| c.version).ok(), Some(a.version.clone()));
        // Only the file name counts, not where the file is mounted.
        let moved = parse_str("/somewhere/else/rl.yaml", "domain: a\n");
        assert_eq!(moved.map(|c| c.version).ok(), Some(a.version));
    }

    #[test]
    fn config_serializes_for_the_admin_endpoint() {
        let c = ok("domain: d
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: sliding_counter}
");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["settings"]["default_algorithm"], "fixed_window");
        assert_eq!(json["files"], serde_json::json!(["rl.yaml"]));
        let limit = &json["domains"][0]["descriptors"][0]["limits"][0];
        assert_eq!(limit["unit"], "minute");
        assert_eq!(limit["algorithm"], "sliding_window_counter");
        assert_eq!(json["domains"][0]["file"], "rl.yaml");
        assert_eq!(json["version"], c.version.as_str());
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let c = ok("\u{feff}domain: bom\n");
        assert_eq!(c.domains[0].domain, "bom");
    }

    // ---- Files and directories. ----

    #[cfg(unix)]
    fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }

    fn write(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn configmap_layout() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let data = root.join("..2024_05_01_10_00_00.123");
        fs::create_dir(&data).unwrap();
        write(&data.join("b.yaml"), "domain: b\n");
        write(&data.join("a.yml"), "domain: a\n");
        write(&data.join("notes.txt"), "not yaml");
        symlink("..2024_05_01_10_00_00.123", root.join("..data"));
        symlink("..data/b.yaml", root.join("b.yaml"));
        symlink("..data/a.yml", root.join("a.yml"));
        symlink("..data/notes.txt", root.join("notes.txt"));
        // Ignored: dotfiles, non-YAML names, subdirectories (not recursive).
        write(&root.join(".hidden.yaml"), "domain: hidden\n");
        write(&root.join("README"), "domain: readme\n");
        fs::create_dir(root.join("sub")).unwrap();
        write(&root.join("sub").join("c.yaml"), "domain: c\n");
        fs::create_dir(root.join("dir.yaml")).unwrap();

        let c = load(root).unwrap();
        let names: Vec<&str> = c.domains.iter().map(|d| d.domain.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(c.files, vec![root.join("a.yml"), root.join("b.yaml")]);
        assert_eq!(c.domains[0].file, root.join("a.yml"));

        // Same content reached through another mount point: same version.
        let again = load(root).unwrap();
        assert_eq!(again.version, c.version);
        write(&data.join("a.yml"), "domain: a2\n");
        assert_ne!(load(root).unwrap().version, c.version);
    }

    #[test]
    fn duplicate_domain_across_files_names_both() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("one.yaml"), "domain: shared\n");
        write(
            &dir.path().join("two.yaml"),
            "# comment\ndomain: shared\ndescriptors: []\n",
        );
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.0.len(), 1);
        let one = dir.path().join("one.yaml");
        assert_eq!(e.0[0].file, dir.path().join("two.yaml"));
        assert_eq!((e.0[0].line, e.0[0].column), (2, 9));
        assert_eq!(
            e.0[0].message,
            format!(
                "duplicate domain \"shared\": already defined at {}:1",
                one.display()
            )
        );
    }

    #[test]
    fn settings_and_errors_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        write(
            &p("00-settings.yaml"),
            "settings:\n  default_algorithm: gcra\n",
        );
        write(
            &p("10-api.yaml"),
            "domain: api\ndescriptors:\n  - {key: k, rate_limit: {unit: second, requests_per_unit: 1, burst: 4}}\n",
        );
        let c = load(dir.path()).unwrap();
        assert_eq!(c.settings.default_algorithm, Algorithm::Gcra);
        assert_eq!(c.files, vec![p("00-settings.yaml"), p("10-api.yaml")]);

        write(&p("20-more.yaml"), "settings: {}\n");
        write(&p("15-bad.yaml"), "domain: bad\nextra: 1\n");
        let e = load(dir.path()).unwrap_err();
        let got: Vec<(PathBuf, usize)> = e.0.iter().map(|e| (e.file.clone(), e.line)).collect();
        assert_eq!(got, vec![(p("15-bad.yaml"), 2), (p("20-more.yaml"), 1)]);
        assert!(e.0[1].message.contains("00-settings.yaml:1"), "{}", e.0[1]);
    }

    #[test]
    fn an_empty_directory_is_valid_but_empty_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path()).unwrap();
        assert!(c.domains.is_empty() && c.files.is_empty());
        assert_eq!(c.settings, Settings::default());
        write(&dir.path().join("empty.yaml"), "");
        write(
            &dir.path().join("comments.yaml"),
            "\u{feff}# nothing yet\n---\n  \r\n",
        );
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(
            e.0.iter().all(|e| e.message == EMPTY_FILE && e.line == 0),
            "{e}"
        );
        write(&dir.path().join("empty.yaml"), "domain: x\n");
        write(
            &dir.path().join("comments.yaml"),
            "# a comment\nsettings: {}\n",
        );
        assert_eq!(load(dir.path()).unwrap().domains.len(), 1);
    }

    #[test]
    fn a_single_file_of_any_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ratethrottle.conf");
        write(&file, "domain: x\n");
        let c = load(&file).unwrap();
        assert_eq!(c.domains[0].domain, "x");
        assert_eq!(c.files, vec![file]);
    }

    #[test]
    fn missing_and_unreadable_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = load(&missing).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].file, missing);
        assert_eq!((e.0[0].line, e.0[0].key.as_str()), (0, ""));
        assert!(e.0[0].message.starts_with("cannot read: "), "{}", e.0[0]);
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read", missing.display())),
            "{e}"
        );

        let bad = dir.path().join("latin1.yaml");
        fs::write(&bad, b"domain: ok\n# caf\xe9\n").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert_eq!(
            (e.0[0].line, e.0[0].column, e.0[0].message.as_str()),
            (2, 6, "the file is not valid UTF-8")
        );
    }

    #[cfg(unix)]
    #[test]
    fn broken_symlink_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("good.yaml"), "domain: good\n");
        symlink("..data/gone.yaml", dir.path().join("gone.yaml"));
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].file, dir.path().join("gone.yaml"));
        assert!(e.0[0].message.starts_with("cannot read: "), "{}", e.0[0]);
    }
}
