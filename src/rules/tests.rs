//! Matching on the compiled tree alone (the engine tests cover the answers built on it).

use super::*;
use crate::config::parse_str;

fn compile(yaml: &str) -> RuleSet {
    let config = parse_str("t.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    RuleSet::compile(&config, &StatsRegistry::default())
}

fn find<'a>(rs: &'a RuleSet, domain: &str, entries: &[(&str, &str)]) -> Option<&'a Arc<Rule>> {
    rs.domain(domain)?.find(entries)
}

const TREE: &str = r#"
domain: d
descriptors:
  - key: a
    value: "x*"
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: a
    value: "xy*"
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: a
    value: ""
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: a
    value: "v"
    descriptors:
      - key: b
        rate_limit: {unit: minute, requests_per_unit: 4}
"#;

#[test]
fn wildcards_are_tried_in_config_order() {
    let rs = compile(TREE);
    // `xyz` matches both patterns; the first in the file wins.
    let r = find(&rs, "d", &[("a", "xyz")]).expect("rule");
    assert_eq!(r.limits[0].limit.requests_per_unit, 1);
}

#[test]
fn an_empty_config_value_is_key_only_like_the_reference() {
    let rs = compile(TREE);
    let r = find(&rs, "d", &[("a", "anything")]).expect("rule");
    assert_eq!(r.limits[0].limit.requests_per_unit, 3);
}

#[test]
fn stat_keys_follow_the_reference() {
    let rs = compile(TREE);
    let r = find(&rs, "d", &[("a", "v"), ("b", "1")]).expect("rule");
    assert_eq!(&*r.stat_key, "d.a_v.b");
    let r = find(&rs, "d", &[("a", "q")]).expect("rule");
    assert_eq!(&*r.stat_key, "d.a");
}

#[test]
fn a_node_without_limit_matches_nothing_at_its_depth() {
    let rs = compile(TREE);
    assert!(find(&rs, "d", &[("a", "v")]).is_none());
    assert!(find(&rs, "d", &[]).is_none());
    assert!(find(&rs, "nope", &[("a", "v")]).is_none());
}

#[test]
fn fingerprints_are_stable_across_compiles_and_change_with_the_limit() {
    let a = compile(TREE);
    let b = compile(TREE);
    let fa = find(&a, "d", &[("a", "xyz")]).expect("rule").limits[0].fingerprint;
    let fb = find(&b, "d", &[("a", "xyz")]).expect("rule").limits[0].fingerprint;
    assert_eq!(fa, fb);
    let c = compile(&TREE.replacen("requests_per_unit: 1}", "requests_per_unit: 9}", 1));
    let fc = find(&c, "d", &[("a", "xyz")]).expect("rule").limits[0].fingerprint;
    assert_ne!(fa, fc);
}

#[test]
fn counter_keys_separate_values_and_entry_boundaries() {
    let k = |e: &[(&str, &str)]| counter_key(1, e.iter().copied());
    assert_ne!(k(&[("a", "b")]), k(&[("a", "c")]));
    assert_ne!(k(&[("ab", "c")]), k(&[("a", "bc")]));
    assert_ne!(k(&[("a", "b"), ("c", "d")]), k(&[("a", "bc"), ("", "d")]));
    assert_eq!(k(&[("a", "b")]), k(&[("a", "b")]));
    assert_ne!(
        counter_key(1, [("a", "b")].into_iter()),
        counter_key(2, [("a", "b")].into_iter())
    );
}
