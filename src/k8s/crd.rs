//! The custom resources, as Rust types: the single source of the CRDs' schemas.
//!
//! `RateLimitPolicy.spec` is an envoyproxy/ratelimit domain file (snake_case keys, as the
//! reference's YAML), so a domain file pasted under `spec:` is a valid resource.
//! `AccessList.spec` uses the keys of the settings file's `authz.lists` entries.
//!
//! The types only describe the schema and the status the sidecar writes. The watcher does
//! not deserialize specs into them: it hands the raw spec to `config`'s decoder, so what a
//! resource may hold is checked by exactly the code that checks files, and one odd object
//! cannot break the list/watch stream for all others.

// kube's `printcolumn(type_ = ...)` repeats a key per column, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// One rate limit domain, as a resource.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "ratethrottle.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    shortname = "rlp",
    category = "ratethrottle",
    namespaced,
    status = "RateLimitPolicyStatus",
    doc = "One rate limit domain in the envoyproxy/ratelimit format: a domain file pasted under spec.",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Rules",
        type_ = "integer",
        description = "Descriptors with a limit",
        json_path = ".status.rules"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Accepted\")].message"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct RateLimitPolicySpec {
    /// The domain Envoy names in its rate limit requests; unique across file and resources.
    #[schemars(length(min = 1))]
    pub domain: String,
    /// The descriptor tree, as in an envoyproxy/ratelimit domain file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "descriptors_schema")]
    pub descriptors: Vec<DescriptorSpec>,
}

/// One descriptor node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct DescriptorSpec {
    /// The descriptor entry key to match.
    #[schemars(length(min = 1))]
    pub key: String,
    /// The value to match; absent or empty matches any value; `*` is a wildcard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<IntOrString>,
    /// The limit applied when a request matches here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Several limits at once (all must admit); instead of `rate_limit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitSpec>,
    /// Count and report, never reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detailed_metric: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_to_metric: Option<bool>,
    /// Every value matching this wildcard shares one counter (envoyproxy/ratelimit's
    /// `share_threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_threshold: Option<bool>,
    /// Nested descriptors, matched against the request's next entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "descriptors_schema")]
    pub descriptors: Vec<DescriptorSpec>,
}

/// One limit.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct RateLimitSpec {
    /// second, minute, hour, day, week, month or year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_unit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlimited: Option<bool>,
    /// The name other limits' `replaces` refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<ReplacesSpec>,
    /// fixed_window, sliding_window_log, sliding_window_counter, token_bucket, leaky_bucket
    /// or gcra; the settings' default_algorithm when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Bucket capacity (token_bucket, leaky_bucket, gcra).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// After a rejection the key stays over limit this long (`30s`, `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_duration: Option<String>,
    /// Scale the limit by the caller's trust (adaptive limits; needs `anomaly:` in the
    /// settings file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveSpec>,
}

/// `adaptive` of a limit: trust 0 → `min_factor`, a new caller → `initial_factor` (default
/// 1), full trust → `max_factor`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct AdaptiveSpec {
    pub min_factor: f64,
    pub max_factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_factor: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct ReplacesSpec {
    pub name: String,
}

/// What the sidecar says of a `RateLimitPolicy`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Descriptors with at least one limit in the version in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
    /// `Accepted`: True when this generation is in force; False with reason `Invalid` or
    /// `DomainConflict` and the message saying why (the previous accepted version, if any,
    /// stays in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Allow and block entries, as a resource.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "ratethrottle.io",
    version = "v1alpha1",
    kind = "AccessList",
    plural = "accesslists",
    shortname = "acl",
    category = "ratethrottle",
    namespaced,
    status = "AccessListStatus",
    doc = "Allow and block entries (addresses, CIDRs, identities) for the ext_authz service.",
    printcolumn(name = "Allow", type_ = "integer", json_path = ".status.allow"),
    printcolumn(name = "Block", type_ = "integer", json_path = ".status.block"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Accepted\")].message"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AccessListSpec {
    /// Always let these through (before limits and the block list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AccessEntrySpec>,
    /// Always reject these with 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block: Vec<AccessEntrySpec>,
}

/// One entry; the same keys as the settings file's `authz.lists` entries.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct AccessEntrySpec {
    /// An address (`203.0.113.7`), a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or an identity
    /// (`user:alice`, `api_key:…`).
    #[schemars(length(min = 1))]
    pub value: String,
    /// Why, for operators (never shown to callers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Public reason code in the 403 body (a-z, 0-9, `_`, `-`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_-]{1,64}$"))]
    pub code: Option<String>,
    /// When the entry stops applying (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Time>,
}

/// What the sidecar says of an `AccessList`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessListStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Allow entries in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<u32>,
    /// Block entries in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Nesting levels the schema spells out. Kubernetes' structural schemas cannot refer to
/// themselves, so deeper levels are kept as-is (`x-kubernetes-preserve-unknown-fields`) and
/// checked by the sidecar's decoder alone; real trees are 1-4 levels deep.
const SCHEMA_DEPTH: u32 = 8;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// The schema of a `descriptors` list: the derived schema of `DescriptorSpec`, inlined level
/// by level (calling `json_schema` directly, not `subschema_for`, which would emit a `$ref`
/// for the recursion) down to `SCHEMA_DEPTH`.
fn descriptors_schema(generator: &mut SchemaGenerator) -> Schema {
    let depth = DEPTH.with(Cell::get);
    let items = if depth >= SCHEMA_DEPTH {
        json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
    } else {
        DEPTH.with(|d| d.set(depth + 1));
        let schema = <DescriptorSpec as JsonSchema>::json_schema(generator);
        DEPTH.with(|d| d.set(depth));
        schema
    };
    json_schema!({ "type": "array", "items": items })
}

/// The CustomResourceDefinitions, one YAML document each, in a stable order.
pub fn crds() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    vec![
        ("ratelimitpolicies.ratethrottle.io", RateLimitPolicy::crd()),
        ("accesslists.ratethrottle.io", AccessList::crd()),
    ]
}

/// `crd` as the YAML files committed under `k8s/crds/` and the chart's `crds/` (keys sorted,
/// as its JSON form has them).
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, String> {
    let value = serde_json::to_value(crd).map_err(|e| e.to_string())?;
    let body = crate::config::yaml::to_yaml(&value)?;
    Ok(format!(
        "# Generated by `ratethrottle crd` from src/k8s/crd.rs. Do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRDs are exactly what the types generate: no hand-edited drift.
    /// Regenerate with `cargo run -- crd --out-dir k8s/crds` (and the chart's `crds/`).
    #[test]
    fn committed_crds_equal_the_generated_ones() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["k8s/crds", "charts/ratethrottle/crds"] {
            for (name, crd) in crds() {
                let path = root.join(dir).join(format!("{name}.yaml"));
                let committed = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(
                    committed == crd_yaml(&crd).unwrap(),
                    "{} differs from `ratethrottle crd`; regenerate it with \
                     `cargo run -- crd --out-dir {dir}`",
                    path.display()
                );
            }
        }
    }

    /// The YAML written is the CRD: read back, it is the CRD's JSON form exactly.
    #[test]
    fn generated_crds_read_back_as_their_json() {
        for (name, crd) in crds() {
            let text = crd_yaml(&crd).unwrap();
            let docs = crate::config::yaml::documents(&text).unwrap();
            assert_eq!(docs, vec![serde_json::to_value(&crd).unwrap()], "{name}");
        }
    }

    #[test]
    fn schemas_are_structural_and_nest_descriptors() {
        let crd = serde_json::to_value(RateLimitPolicy::crd()).unwrap();
        let text = crd.to_string();
        assert!(!text.contains("$ref"), "structural schemas cannot use $ref");
        let mut node =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut depth = 0;
        while let Some(items) = node["properties"]["descriptors"].get("items") {
            depth += 1;
            node = items;
        }
        assert_eq!(depth, SCHEMA_DEPTH + 1);
        assert_eq!(node["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(
            crd["spec"]["versions"][0]["subresources"]["status"],
            serde_json::json!({})
        );
    }
}
