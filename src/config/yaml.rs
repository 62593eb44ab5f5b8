//! The one YAML stack (saphyr) for what is not a settings file: multi-document manifests read
//! as JSON values (`config validate-resources`), and JSON values written as YAML (the
//! generated CRDs). Settings files and resource specs go through the marked decoder in
//! `decode`, which is the same parser with positions.
//!
//! Must not touch: the model (this is values in, values out).

use saphyr::{LoadableYamlNode, Mapping, Scalar, Yaml, YamlEmitter};
use serde_json::{Map, Number, Value};
use std::borrow::Cow;

/// Every document of `text` as a JSON value (an empty document is `null`). Keys must be
/// scalars; a non-finite float or a non-scalar key is an error naming it.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    let docs = Yaml::load_from_str(text).map_err(|e| e.to_string())?;
    docs.iter().map(to_json).collect()
}

fn to_json(node: &Yaml<'_>) -> Result<Value, String> {
    Ok(match node {
        Yaml::Value(s) => scalar(s)?,
        Yaml::Representation(text, _, _) => scalar(&Scalar::parse_from_cow(text.clone()))?,
        Yaml::Sequence(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(key(k)?, to_json(v)?);
            }
            Value::Object(out)
        }
        Yaml::Tagged(_, inner) => to_json(inner)?,
        Yaml::Alias(_) => return Err("an alias that does not resolve".into()),
        Yaml::BadValue => return Err("a value that is not valid YAML".into()),
    })
}

fn scalar(s: &Scalar<'_>) -> Result<Value, String> {
    Ok(match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::from(*i),
        Scalar::FloatingPoint(f) => Number::from_f64(f.into_inner())
            .map(Value::Number)
            .ok_or_else(|| format!("{} has no JSON form", f.into_inner()))?,
        Scalar::String(s) => Value::String(s.to_string()),
    })
}

/// A mapping key as JSON has them: text (numbers and booleans spelled out, as kubectl does).
fn key(k: &Yaml<'_>) -> Result<String, String> {
    match k {
        Yaml::Value(Scalar::String(s)) => Ok(s.to_string()),
        Yaml::Value(Scalar::Integer(i)) => Ok(i.to_string()),
        Yaml::Value(Scalar::Boolean(b)) => Ok(b.to_string()),
        Yaml::Value(Scalar::FloatingPoint(f)) => Ok(f.to_string()),
        Yaml::Value(Scalar::Null) => Ok("null".into()),
        Yaml::Tagged(_, inner) => key(inner),
        other => Err(format!("a mapping key must be a scalar, not {other:?}")),
    }
}

/// `value` as one YAML document (`---` first, a final line break), keys in the value's order,
/// multi-line strings as literal blocks. Reading it back with [`documents`] gives `value`
/// (integers beyond i64, which saphyr reads as floats, excepted).
pub fn to_yaml(value: &Value) -> Result<String, String> {
    let node = from_json(value);
    let mut out = String::new();
    let mut emitter = YamlEmitter::new(&mut out);
    emitter.multiline(true);
    emitter.dump(&node).map_err(|e| e.to_string())?;
    out.push('\n');
    Ok(out)
}

fn from_json(value: &Value) -> Yaml<'_> {
    match value {
        Value::Null => Yaml::Value(Scalar::Null),
        Value::Bool(b) => Yaml::Value(Scalar::Boolean(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Value(Scalar::Integer(i)),
            // u64 beyond i64 and floats: the YAML core schema reads the text back as a number
            // (`{:?}` keeps the `.0` of a whole float, so it stays a float).
            None => Yaml::Value(Scalar::parse_from_cow(Cow::Owned(match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:?}"),
                _ => n.to_string(),
            }))),
        },
        Value::String(s) => Yaml::Value(Scalar::String(Cow::Borrowed(s))),
        Value::Array(items) => Yaml::Sequence(items.iter().map(from_json).collect()),
        Value::Object(map) => {
            let mut m = Mapping::new();
            for (k, v) in map {
                m.insert(Yaml::Value(Scalar::String(Cow::Borrowed(k))), from_json(v));
            }
            Yaml::Mapping(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_yaml() {
        let v = json!({
            "apiVersion": "v1",
            "description": "first line\nsecond line: with a colon\n",
            "looks_like": ["true", "null", "1.5", "0x10", "", " padded ", "- dash", "#hash", "a: b"],
            "numbers": [0, -3, 1.5, 2.0, 1e-9, i64::MIN, i64::MAX],
            "nested": {"empty_map": {}, "empty_list": [], "null": null, "yes": true},
            "unicode": "é ✓ \u{1F600}",
        });
        let text = to_yaml(&v).unwrap();
        assert!(text.starts_with("---\n"), "{text}");
        assert!(
            text.contains("|"),
            "multi-line strings are literal blocks: {text}"
        );
        assert_eq!(documents(&text).unwrap(), vec![v], "{text}");
    }

    #[test]
    fn manifests_read_like_kubectl_reads_them() {
        let docs = documents(
            "apiVersion: v1\nkind: A\nmetadata: {name: x}\n---\n# empty\n---\nbase: &b {k: 1}\nuse: *b\n",
        )
        .unwrap();
        assert_eq!(docs[0]["metadata"]["name"], "x");
        assert_eq!(docs.last().unwrap()["use"], json!({"k": 1}));
        assert!(documents("a: [1, 2\n").is_err());
        assert!(documents("? [a, b]\n: c\n").is_err());
    }
}
