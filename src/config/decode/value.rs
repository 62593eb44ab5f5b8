//! Reading one key: the `FromYaml` trait and the scalar types it reads, the accessors every
//! section decoder uses (`field`, `field_with`, `required`, `section`, `set`), and the
//! readers that keep the reference's (Go yaml.v2) spelling of strings, booleans and integers.
//! A section then reads each key in a line or two; type errors, checks and missing keys are
//! all reported at the right node with the key's path.

use saphyr::{MarkedYaml, Scalar, YamlData};

use super::{Decoder, child, data, index, is_null, parse_duration, suggest};
use crate::limiter::{NANOS_PER_SECOND, Nanos};

/// YAML 1.1 booleans, which the reference's parser accepts and YAML 1.2 reads as strings.
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// One key of a mapping, after unknown keys were reported.
pub(super) struct Field<'n, 'i> {
    name: String,
    pub(super) key: &'n MarkedYaml<'i>,
    pub(super) value: &'n MarkedYaml<'i>,
}

/// The known keys of one mapping.
pub(super) struct Fields<'n, 'i> {
    pub(super) node: &'n MarkedYaml<'i>,
    pub(super) path: String,
    list: Vec<Field<'n, 'i>>,
}

impl<'n, 'i> Fields<'n, 'i> {
    /// The field, null or not.
    pub(super) fn raw(&self, name: &str) -> Option<&Field<'n, 'i>> {
        self.list.iter().find(|f| f.name == name)
    }

    /// The field, unless absent or null (null means absent, as in the reference).
    pub(super) fn get(&self, name: &str) -> Option<&Field<'n, 'i>> {
        self.raw(name).filter(|f| !is_null(f.value))
    }

    pub(super) fn path(&self, name: &str) -> String {
        child(&self.path, name)
    }
}

/// A value one YAML node can hold. `decode` reports a wrong type or an unknown name at the
/// node, under its key path, and gives `None`. Checks of the value itself go through
/// [`Decoder::field_with`], which reports them at the value too.
pub(super) trait FromYaml: Sized {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self>;
}

impl FromYaml for String {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        d.string(node, path)
    }
}

impl FromYaml for bool {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        d.boolean(node, path)
    }
}

impl FromYaml for f64 {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        d.float(node, path)
    }
}

impl FromYaml for u32 {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        let n = d.uint(node, path, u64::from(u32::MAX))?;
        u32::try_from(n).ok()
    }
}

impl FromYaml for usize {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        let n = d.uint(node, path, u64::try_from(usize::MAX).unwrap_or(u64::MAX))?;
        usize::try_from(n).ok()
    }
}

/// An integer from 0 to `MAX`; a larger one is a type error that names the range.
pub(super) struct UpTo<const MAX: u64>(pub(super) u64);

impl<const MAX: u64> FromYaml for UpTo<MAX> {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        d.uint(node, path, MAX).map(UpTo)
    }
}

/// A duration (whole seconds, or numbers with unit ms, s, m, h or d), in nanoseconds.
pub(super) struct Duration(pub(super) Nanos);

impl FromYaml for Duration {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        d.duration(node, path).map(Duration)
    }
}

/// A value written as one of a few names. An unknown name is reported as
/// `unknown WHAT "x" (did you mean "y"? expected one of NAMES)`.
pub(super) trait Named: Sized {
    const WHAT: &'static str;
    const NAMES: &'static [&'static str];
    /// Whether an unknown name is told the closest valid one ("did you mean").
    const HINT: bool = true;
    fn parse_name(s: &str) -> Option<Self>;
}

impl<T: Named> FromYaml for T {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        let s = d.string(node, path)?;
        d.named(node, path, &s)
    }
}

/// Keeps `slot` (its `Default`) unless `value` is `Some`: how a section applies one key.
pub(super) fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// The check of counts and durations that must not be zero.
pub(super) fn nonzero<T: Default + PartialEq>(v: T) -> Result<T, String> {
    if v == T::default() {
        Err("must be greater than 0".into())
    } else {
        Ok(v)
    }
}

/// The check of strings that must not be empty.
pub(super) fn non_empty(v: String) -> Result<String, String> {
    if v.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(v)
    }
}

impl Decoder<'_> {
    /// `name` under `f` read by `read` (a reader or a section decoder), unless absent or
    /// null: null means absent, as in the reference.
    pub(super) fn field_by<T>(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        read: impl FnOnce(&mut Self, &MarkedYaml<'_>, &str) -> T,
    ) -> Option<T> {
        let field = f.get(name)?;
        Some(read(self, field.value, &f.path(name)))
    }

    /// `name` under `f` as a `T`, unless absent or null.
    pub(super) fn field<T: FromYaml>(&mut self, f: &Fields<'_, '_>, name: &str) -> Option<T> {
        self.field_by(f, name, T::decode).flatten()
    }

    /// `name` under `f` as a `T`, then through `check`, whose refusal is reported at the
    /// value with the key's path.
    pub(super) fn field_with<T: FromYaml, U>(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        check: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        self.field_by(f, name, |d, node, path| d.value_with(node, path, check))
            .flatten()
    }

    /// `node` as a `T`, then through `check`, whose refusal is reported at `node`.
    pub(super) fn value_with<T: FromYaml, U>(
        &mut self,
        node: &MarkedYaml<'_>,
        path: &str,
        check: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        match check(T::decode(self, node, path)?) {
            Ok(v) => Some(v),
            Err(why) => {
                self.error(node, path, why);
                None
            }
        }
    }

    /// Like [`Self::field`], but an absent (or null) key is reported at the mapping.
    pub(super) fn required<T: FromYaml>(&mut self, f: &Fields<'_, '_>, name: &str) -> Option<T> {
        self.required_with(f, name, Ok)
    }

    /// Like [`Self::field_with`], but an absent (or null) key is reported at the mapping.
    pub(super) fn required_with<T: FromYaml, U>(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        check: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        if f.get(name).is_none() {
            self.missing(f, name);
        }
        self.field_with(f, name, check)
    }

    pub(super) fn missing(&mut self, f: &Fields<'_, '_>, name: &str) {
        self.error(f.node, &f.path, format!("missing required key {name:?}"));
    }

    /// The known keys of the mapping under `name`, unless absent or null.
    pub(super) fn section<'n, 'i>(
        &mut self,
        f: &Fields<'n, 'i>,
        name: &str,
        keys: &[&str],
    ) -> Option<Fields<'n, 'i>> {
        let field = f.get(name)?;
        self.mapping(field.value, &f.path(name), keys)
    }

    /// Reports `message` at the value of `name` under `f`, if present: a check across keys.
    pub(super) fn error_at(&mut self, f: &Fields<'_, '_>, name: &str, message: impl Into<String>) {
        if let Some(field) = f.get(name) {
            self.error(field.value, &f.path(name), message);
        }
    }

    /// Reports `message` at the key `name` of `f`, if present: the key should not be there.
    pub(super) fn error_at_key(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        message: impl Into<String>,
    ) {
        if let Some(field) = f.get(name) {
            self.error(field.key, &f.path(name), message);
        }
    }

    /// `name` under `f` as a duration in milliseconds; zero only when `zero_ok`.
    pub(super) fn field_ms(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        zero_ok: bool,
    ) -> Option<u64> {
        self.field_with(f, name, |Duration(d)| match d / 1_000_000 {
            0 if !zero_ok => Err("must be at least 1ms".to_string()),
            ms => Ok(ms),
        })
    }

    /// `name` under `f` as an integer from `min` to `max` (which fits a `T`).
    pub(super) fn field_uint<T: TryFrom<u64>>(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        min: u64,
        max: u64,
    ) -> Option<T> {
        let field = f.get(name)?;
        let p = f.path(name);
        let v = self.uint(field.value, &p, max)?;
        match T::try_from(v) {
            Ok(n) if v >= min => Some(n),
            _ => {
                let why = format!("must be from {min} to {max}, found {v}");
                self.error(field.value, &p, why);
                None
            }
        }
    }

    /// `name` under `f` as a number from `min` to `max`.
    pub(super) fn field_float(
        &mut self,
        f: &Fields<'_, '_>,
        name: &str,
        min: f64,
        max: f64,
    ) -> Option<f64> {
        self.field_with(f, name, |v: f64| {
            if (min..=max).contains(&v) {
                Ok(v)
            } else {
                Err(format!("must be from {min} to {max}, found {v}"))
            }
        })
    }

    /// A boolean key that is false unless given.
    pub(super) fn flag(&mut self, f: &Fields<'_, '_>, name: &str) -> bool {
        self.field(f, name).unwrap_or(false)
    }

    /// `s`, read from `node`, as one of `T`'s names; an unknown name is reported with the
    /// valid ones.
    pub(super) fn named<T: Named>(
        &mut self,
        node: &MarkedYaml<'_>,
        path: &str,
        s: &str,
    ) -> Option<T> {
        let parsed = T::parse_name(s);
        if parsed.is_none() {
            let hint = match suggest(s, T::NAMES) {
                Some(close) if T::HINT => format!("did you mean {close:?}? "),
                _ => String::new(),
            };
            let names = T::NAMES.join(", ");
            let what = T::WHAT;
            self.error(
                node,
                path,
                format!("unknown {what} {s:?} ({hint}expected one of {names})"),
            );
        }
        parsed
    }

    /// The known keys of a mapping; reports the node if it is no mapping, and every unknown
    /// key (with the closest valid one when it looks like a typo).
    pub(super) fn mapping<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n, 'i>> {
        let YamlData::Mapping(map) = data(node) else {
            self.expected(node, path, "a mapping");
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

    pub(super) fn sequence<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        path: &str,
        what: &str,
    ) -> Option<&'n [MarkedYaml<'i>]> {
        match data(node) {
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.expected(node, path, what);
                None
            }
        }
    }

    /// The items of a list with their key paths; anything but a list is reported as not
    /// `what`.
    pub(super) fn items<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        path: &str,
        what: &str,
    ) -> Option<Vec<(&'n MarkedYaml<'i>, String)>> {
        let items = self.sequence(node, path, what)?;
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| (item, index(path, i)))
                .collect(),
        )
    }

    /// The items of the list under `name`, unless absent or null (see [`Self::items`]).
    pub(super) fn field_items<'n, 'i>(
        &mut self,
        f: &Fields<'n, 'i>,
        name: &str,
        what: &str,
    ) -> Option<Vec<(&'n MarkedYaml<'i>, String)>> {
        let field = f.get(name)?;
        self.items(field.value, &f.path(name), what)
    }

    pub(super) fn string(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<String> {
        match data(node) {
            YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
            YamlData::Value(Scalar::Null) => Some(String::new()),
            // Like the reference, any scalar is taken verbatim for a string field.
            YamlData::Value(_) => Some(self.raw_text(node)),
            _ => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<bool> {
        let parsed = match data(node) {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            YamlData::Value(Scalar::String(s)) if !self.is_quoted(node) => yaml11_bool(s),
            _ => None,
        };
        if parsed.is_none() {
            self.expected(node, path, "true or false");
        }
        parsed
    }

    /// A non-negative integer up to `max`. Plain `1_000` is accepted, as the reference does.
    pub(super) fn uint(&mut self, node: &MarkedYaml<'_>, path: &str, max: u64) -> Option<u64> {
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
                self.expected(node, path, &format!("an integer from 0 to {max}"));
                None
            }
        }
    }

    pub(super) fn float(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<f64> {
        match data(node) {
            #[allow(clippy::cast_precision_loss)] // config-sized integers are exact
            YamlData::Value(Scalar::Integer(i)) => Some(*i as f64),
            YamlData::Value(Scalar::FloatingPoint(f)) if f.is_finite() => Some(f.into_inner()),
            _ => {
                self.expected(node, path, "a number");
                None
            }
        }
    }

    pub(super) fn duration(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<Nanos> {
        let parsed = match data(node) {
            YamlData::Value(Scalar::Integer(i)) => u64::try_from(*i)
                .ok()
                .and_then(|s| s.checked_mul(NANOS_PER_SECOND)),
            YamlData::Value(Scalar::String(s)) => parse_duration(s),
            _ => None,
        };
        if parsed.is_none() {
            let what = "a duration: whole seconds or a number with unit ms, s, m, h or d \
                        (like 500ms, 30s, 5m, 1h)";
            self.expected(node, path, what);
        }
        parsed
    }
}
