//! Configuration errors with their position, so an operator can fix every problem of a
//! file in one pass instead of one per reload.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in the configuration, located as precisely as the input allows.
///
/// Displays as `file:line:column: key: message`; the position is left out when `line` is 0
/// (the problem concerns a whole file, e.g. it cannot be read) and the key when it is empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", Prefix::new(.file, *.line, *.column, .key))]
pub struct ConfigError {
    /// The file (or `parse_str` source name) the problem is in.
    pub file: PathBuf,
    /// 1-based line of the offending key or value; 0 when the error has no position.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value; 0 when unknown.
    pub column: usize,
    /// Path of the offending key inside the document, like `descriptors[0].rate_limit.unit`;
    /// empty when the problem is not about one key (syntax errors, unreadable files).
    pub key: String,
    /// What is wrong, and when possible what would be right.
    pub message: String,
}

impl ConfigError {
    /// An error about a whole file (missing, unreadable, ...), without a position.
    pub(crate) fn file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: message.into(),
        }
    }
}

/// The `file:line:column: key: ` part of a `ConfigError`'s message.
struct Prefix<'a> {
    file: &'a Path,
    line: usize,
    column: usize,
    key: &'a str,
}

impl<'a> Prefix<'a> {
    fn new(file: &'a Path, line: usize, column: usize, key: &'a str) -> Self {
        Prefix {
            file,
            line,
            column,
            key,
        }
    }
}

impl fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        Ok(())
    }
}

/// Every problem found in one load: loading never stops at the first one.
///
/// Displays one error per line, sorted by file, then position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The errors, in display order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// Iterates the errors in display order (to log or print them one by one).
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// How many problems were found (for summaries like "3 error(s)").
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for an `Err` from `load`; here for completeness.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

struct Lines<'a>(&'a [ConfigError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: usize, column: usize, key: &str) -> ConfigError {
        ConfigError {
            file: PathBuf::from("rl/mongo.yaml"),
            line,
            column,
            key: key.into(),
            message: "unknown unit \"sekond\"".into(),
        }
    }

    #[test]
    fn displays_file_position_key_and_message() {
        assert_eq!(
            err(4, 13, "descriptors[0].rate_limit.unit").to_string(),
            "rl/mongo.yaml:4:13: descriptors[0].rate_limit.unit: unknown unit \"sekond\""
        );
    }

    #[test]
    fn omits_empty_key_and_missing_position() {
        assert_eq!(
            err(2, 1, "").to_string(),
            "rl/mongo.yaml:2:1: unknown unit \"sekond\""
        );
        let whole_file = ConfigError::file(Path::new("/x.yaml"), "cannot read: gone");
        assert_eq!(whole_file.to_string(), "/x.yaml: cannot read: gone");
    }

    #[test]
    fn errors_display_one_per_line() {
        let errors = ConfigErrors(vec![err(1, 1, "a"), err(2, 3, "b")]);
        assert_eq!(
            errors.to_string(),
            "rl/mongo.yaml:1:1: a: unknown unit \"sekond\"\n\
             rl/mongo.yaml:2:3: b: unknown unit \"sekond\""
        );
        assert_eq!(errors.errors().len(), 2);
        assert_eq!((errors.len(), errors.is_empty()), (2, false));
        assert_eq!(errors.iter().count(), (&errors).into_iter().count());
        let as_std: &dyn std::error::Error = &errors;
        assert!(as_std.source().is_none());
    }
}
