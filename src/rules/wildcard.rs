//! Wildcard descriptor values: `foo*`, `*bar`, `a*b*c`.

/// A value pattern with one or more `*`, each matching any (possibly empty) run of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    prefix: Box<str>,
    middle: Box<[Box<str>]>,
    suffix: Box<str>,
}

impl Wildcard {
    /// `None` when `pattern` has no `*` (it is an exact value).
    pub fn parse(pattern: &str) -> Option<Wildcard> {
        let mut parts: Vec<&str> = pattern.split('*').collect();
        if parts.len() < 2 {
            return None;
        }
        let suffix = parts.pop().unwrap_or_default();
        let prefix = parts.remove(0);
        Some(Wildcard {
            prefix: prefix.into(),
            middle: parts
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(Into::into)
                .collect(),
            suffix: suffix.into(),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        if value.len() < self.prefix.len() + self.suffix.len() {
            return false;
        }
        let Some(rest) = value.strip_prefix(&*self.prefix) else {
            return false;
        };
        let Some(mut rest) = rest.strip_suffix(&*self.suffix) else {
            return false;
        };
        for part in self.middle.iter() {
            match rest.find(&**part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Wildcard;

    fn m(p: &str, v: &str) -> bool {
        Wildcard::parse(p).expect("pattern has a star").matches(v)
    }

    #[test]
    fn prefix_suffix_and_middle() {
        assert!(m("foo*", "foo"));
        assert!(m("foo*", "foobar"));
        assert!(!m("foo*", "fo"));
        assert!(!m("foo*", "xfoo"));
        assert!(m("*bar", "foobar"));
        assert!(!m("*bar", "barx"));
        assert!(m("/api/*/users", "/api/v1/users"));
        assert!(!m("/api/*/users", "/api/v1/user"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "acb"));
        assert!(m("*", ""));
        assert!(m("*", "anything"));
    }

    #[test]
    fn prefix_and_suffix_may_not_overlap() {
        assert!(!m("ab*ba", "aba"));
        assert!(m("ab*ba", "abba"));
    }

    #[test]
    fn exact_values_are_not_wildcards() {
        assert!(Wildcard::parse("plain").is_none());
    }
}
