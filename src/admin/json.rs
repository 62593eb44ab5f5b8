//! The `/json` endpoint's protojson shapes, as envoyproxy/ratelimit speaks them: camelCase or
//! snake_case field names in, camelCase out, enums by name, durations as `"1.5s"`, default
//! values omitted; HTTP 429 when over limit.

use axum::http::StatusCode;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, rate_limit::Unit};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde::Deserialize;
use serde_json::{Map, Value, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    domain: String,
    #[serde(default)]
    descriptors: Vec<JsonDescriptor>,
    #[serde(default, alias = "hitsAddend")]
    hits_addend: Option<U64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDescriptor {
    #[serde(default)]
    entries: Vec<JsonEntry>,
    #[serde(default)]
    limit: Option<JsonOverride>,
    #[serde(default, alias = "hitsAddend")]
    hits_addend: Option<U64>,
    #[serde(default, alias = "isNegativeHits")]
    is_negative_hits: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOverride {
    #[serde(alias = "requestsPerUnit")]
    requests_per_unit: u32,
    unit: String,
}

/// protojson writes 64-bit integers as strings and accepts numbers too.
#[derive(Deserialize)]
#[serde(untagged)]
enum U64 {
    Num(u64),
    Str(String),
}

impl U64 {
    fn get(&self) -> Result<u64, String> {
        match self {
            U64::Num(n) => Ok(*n),
            U64::Str(s) => s.parse().map_err(|_| format!("not an integer: {s:?}")),
        }
    }
}

pub fn parse_request(body: &[u8]) -> Result<RateLimitRequest, String> {
    let r: JsonRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let hits_addend = match &r.hits_addend {
        Some(h) => u32::try_from(h.get()?).map_err(|_| "hitsAddend exceeds uint32".to_string())?,
        None => 0,
    };
    let mut descriptors = Vec::with_capacity(r.descriptors.len());
    for d in r.descriptors {
        let limit = match d.limit {
            Some(o) => Some(RateLimitOverride {
                requests_per_unit: o.requests_per_unit,
                unit: Unit::from_str_name(&o.unit.to_ascii_uppercase())
                    .ok_or_else(|| format!("unknown unit {:?}", o.unit))?
                    as i32,
            }),
            None => None,
        };
        descriptors.push(RateLimitDescriptor {
            entries: d
                .entries
                .into_iter()
                .map(|e| Entry {
                    key: e.key,
                    value: e.value,
                })
                .collect(),
            limit,
            hits_addend: match &d.hits_addend {
                Some(h) => Some(UInt64Value { value: h.get()? }),
                None => None,
            },
            is_negative_hits: d.is_negative_hits,
        });
    }
    Ok(RateLimitRequest {
        domain: r.domain,
        descriptors,
        hits_addend,
    })
}

pub fn http_status(resp: &RateLimitResponse) -> StatusCode {
    match Code::try_from(resp.overall_code) {
        Ok(Code::OverLimit) => StatusCode::TOO_MANY_REQUESTS,
        Ok(Code::Ok) => StatusCode::OK,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn render_response(resp: &RateLimitResponse) -> String {
    let code_name = |c: i32| Code::try_from(c).unwrap_or(Code::Unknown).as_str_name();
    let statuses: Vec<Value> = resp
        .statuses
        .iter()
        .map(|s| {
            let mut m = Map::new();
            m.insert("code".into(), json!(code_name(s.code)));
            if let Some(l) = &s.current_limit {
                let mut lm = Map::new();
                if !l.name.is_empty() {
                    lm.insert("name".into(), json!(l.name));
                }
                if l.requests_per_unit != 0 {
                    lm.insert("requestsPerUnit".into(), json!(l.requests_per_unit));
                }
                let unit = Unit::try_from(l.unit).unwrap_or(Unit::Unknown);
                lm.insert("unit".into(), json!(unit.as_str_name()));
                m.insert("currentLimit".into(), Value::Object(lm));
            }
            if s.limit_remaining != 0 {
                m.insert("limitRemaining".into(), json!(s.limit_remaining));
            }
            if let Some(d) = &s.duration_until_reset {
                m.insert("durationUntilReset".into(), json!(duration(d)));
            }
            Value::Object(m)
        })
        .collect();
    let mut m = Map::new();
    m.insert("overallCode".into(), json!(code_name(resp.overall_code)));
    if !statuses.is_empty() {
        m.insert("statuses".into(), Value::Array(statuses));
    }
    Value::Object(m).to_string()
}

/// protojson's Duration: seconds with 0, 3, 6 or 9 fractional digits and an `s`.
fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> String {
    if d.nanos == 0 {
        format!("{}s", d.seconds)
    } else if d.nanos % 1_000_000 == 0 {
        format!("{}.{:03}s", d.seconds, d.nanos / 1_000_000)
    } else if d.nanos % 1_000 == 0 {
        format!("{}.{:06}s", d.seconds, d.nanos / 1_000)
    } else {
        format!("{}.{:09}s", d.seconds, d.nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_references_curl_example() {
        let r = parse_request(
            br#"{"domain": "dummy", "descriptors": [{"entries": [{"key": "perday"}]}]}"#,
        )
        .expect("valid");
        assert_eq!(r.domain, "dummy");
        assert_eq!(r.descriptors[0].entries[0].key, "perday");
        assert_eq!(r.descriptors[0].entries[0].value, "");
    }

    #[test]
    fn accepts_camel_and_snake_case_and_string_uint64() {
        let r = parse_request(
            br#"{"domain":"d","hitsAddend":3,"descriptors":[{"entries":[{"key":"k","value":"v"}],"hits_addend":"7"}]}"#,
        )
        .expect("valid");
        assert_eq!(r.hits_addend, 3);
        assert_eq!(
            r.descriptors[0].hits_addend.as_ref().map(|h| h.value),
            Some(7)
        );
    }

    #[test]
    fn rejects_garbage_with_a_message() {
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(br#"{"domain":"d","bogus":1}"#).is_err());
        assert!(parse_request(br#"{"domain":"d","hitsAddend":99999999999}"#).is_err());
        assert!(
            parse_request(br#"{"domain":"d","descriptors":[{"entries":[],"limit":{"requestsPerUnit":1,"unit":"fortnight"}}]}"#)
                .is_err()
        );
    }

    #[test]
    fn durations_render_like_protojson() {
        let d = |seconds, nanos| {
            duration(&envoy_types::pb::google::protobuf::Duration { seconds, nanos })
        };
        assert_eq!(d(52, 0), "52s");
        assert_eq!(d(1, 500_000_000), "1.500s");
        assert_eq!(d(0, 1_000), "0.000001s");
        assert_eq!(d(0, 1), "0.000000001s");
    }
}
