//! The match tree of one domain.

use super::{Rule, Wildcard};
use std::collections::HashMap;
use std::sync::Arc;

type FastMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// A request descriptor entry, as the matcher sees it. Implemented for the gRPC type so
/// matching reads the request in place, without copying it.
pub trait Entry {
    fn key(&self) -> &str;
    fn value(&self) -> &str;
}

impl Entry for (&str, &str) {
    fn key(&self) -> &str {
        self.0
    }
    fn value(&self) -> &str {
        self.1
    }
}

/// One node of the descriptor tree: the rule at this depth and the children by key.
#[derive(Debug, Default)]
pub struct DescriptorMatcher {
    rule: Option<Arc<Rule>>,
    children: FastMap<KeyGroup>,
}

/// All config nodes under one key, in the order they are tried.
#[derive(Debug, Default)]
struct KeyGroup {
    exact: FastMap<DescriptorMatcher>,
    /// In config order: the first matching pattern wins, as in the reference.
    wildcards: Vec<(Wildcard, DescriptorMatcher)>,
    key_only: Option<Box<DescriptorMatcher>>,
}

impl DescriptorMatcher {
    pub(super) fn with_rule(rule: Option<Arc<Rule>>) -> Self {
        DescriptorMatcher {
            rule,
            children: FastMap::default(),
        }
    }

    pub(super) fn insert(&mut self, key: &str, value: Option<&str>, node: DescriptorMatcher) {
        let group = self.children.entry(key.into()).or_default();
        match value {
            None => group.key_only = Some(Box::new(node)),
            Some(v) => match Wildcard::parse(v) {
                Some(w) => group.wildcards.push((w, node)),
                None => {
                    group.exact.insert(v.into(), node);
                }
            },
        }
    }

    /// The rule for a request descriptor. A rule applies only at the descriptor's own depth:
    /// `[a, b]` never matches a rule on `a` alone, nor one on `a, b, c`. Exact values win
    /// over wildcards, wildcards over key-only nodes; there is no backtracking, so an exact
    /// node without a limit whitelists its value even when a key-only sibling has one.
    pub fn find<E: Entry>(&self, entries: &[E]) -> Option<&Arc<Rule>> {
        let (last, parents) = entries.split_last()?;
        let mut node = self;
        for e in parents {
            node = node.child(e)?;
        }
        node.child(last)?.rule.as_ref()
    }

    #[inline]
    fn child<E: Entry>(&self, e: &E) -> Option<&DescriptorMatcher> {
        let group = self.children.get(e.key())?;
        let value = e.value();
        group
            .exact
            .get(value)
            .or_else(|| {
                group
                    .wildcards
                    .iter()
                    .find(|(w, _)| w.matches(value))
                    .map(|(_, n)| n)
            })
            .or(group.key_only.as_deref())
    }

    /// Every rule in the tree (for the admin view and tests).
    pub fn rules(&self) -> Vec<&Arc<Rule>> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Arc<Rule>>) {
        if let Some(r) = &self.rule {
            out.push(r);
        }
        for g in self.children.values() {
            for n in g.exact.values() {
                n.collect(out);
            }
            for (_, n) in &g.wildcards {
                n.collect(out);
            }
            if let Some(n) = &g.key_only {
                n.collect(out);
            }
        }
    }
}
