//! Stage 4, GraphQL: how deep and how expensive a query is, before it reaches the server.
//!
//! Owns: reading the query out of a request (JSON `{"query", "variables", "operationName"}`,
//! a JSON batch, `application/graphql`, or a GET `?query=`), a parser for GraphQL executable
//! documents (operations, fragments, inline fragments, arguments, variables, directives —
//! type-system definitions are refused), and the analysis: depth counted through fragment
//! spreads and inline fragments (a spread does not reset the depth, which is how the seed
//! library was bypassed), and complexity — every field costs its weight, and a field with a
//! list argument (`first`, `limit`, ...) multiplies the cost of its selection by the
//! argument's value (a literal, or the request's variable). Fragments are analysed once
//! each (memoised) and cycles are errors, so hostile documents cost linear time; nesting is
//! bounded, so no input can exhaust the stack.
//!
//! Must not touch: limits (the complexity is charged by the caller as the hits of the
//! cost-budget descriptor) and answers beyond the GraphQL-style error it describes.

mod parse;

use super::request::RequestView;
use crate::config::authz::GraphqlConfig;
use parse::{Multiplier, Operation, Parser, Selection};
use std::collections::HashMap;

/// Deeper syntactic nesting than this is refused before anything recurses further.
pub(crate) const MAX_NESTING: usize = 256;

/// Why a query is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphqlError {
    pub message: String,
    /// 1-based position in the query text, when the error has one.
    pub location: Option<(usize, usize)>,
    /// `extensions.code`: GRAPHQL_PARSE_FAILED, BAD_REQUEST, QUERY_TOO_DEEP, QUERY_TOO_COMPLEX.
    pub code: &'static str,
}

impl GraphqlError {
    fn bad_request(message: impl Into<String>) -> GraphqlError {
        GraphqlError {
            message: message.into(),
            location: None,
            code: "BAD_REQUEST",
        }
    }

    /// The body a GraphQL client understands: `{"errors":[{message, locations, extensions}]}`.
    pub fn to_json(&self) -> String {
        let mut e = serde_json::json!({
            "message": self.message,
            "extensions": {"code": self.code},
        });
        if let Some((line, column)) = self.location {
            e["locations"] = serde_json::json!([{"line": line, "column": column}]);
        }
        serde_json::json!({ "errors": [e] }).to_string()
    }
}

/// What a query costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Analysis {
    pub depth: u32,
    pub complexity: u64,
}

/// Compiled `authz.graphql`.
#[derive(Debug)]
pub struct GraphqlGuard {
    paths: Vec<String>,
    pub max_depth: u32,
    pub max_complexity: u64,
    default_cost: u64,
    costs: HashMap<String, u64>,
    list_arguments: Vec<String>,
    default_list_size: u64,
    max_body_bytes: usize,
}

impl GraphqlGuard {
    pub fn new(c: &GraphqlConfig) -> GraphqlGuard {
        GraphqlGuard {
            paths: c.paths.clone(),
            max_depth: c.max_depth,
            max_complexity: c.max_complexity,
            default_cost: c.default_field_cost,
            costs: c.field_costs.iter().cloned().collect(),
            list_arguments: c.list_arguments.clone(),
            default_list_size: c.default_list_size,
            max_body_bytes: c.max_body_bytes,
        }
    }

    /// Whether `req` goes to a GraphQL endpoint (POST, or GET with a `query` parameter).
    pub fn applies(&self, req: &RequestView<'_>) -> bool {
        self.paths.iter().any(|p| p == req.path)
            && (req.method == "POST" || (req.method == "GET" && req.query_param("query").is_some()))
    }

    /// Reads, parses and analyses the request's query, and enforces the maximums.
    pub fn check(&self, req: &RequestView<'_>) -> Result<Analysis, GraphqlError> {
        let a = self.analyse_request(req)?;
        if a.depth > self.max_depth {
            return Err(GraphqlError {
                message: format!(
                    "Query depth {} exceeds the maximum of {}.",
                    a.depth, self.max_depth
                ),
                location: None,
                code: "QUERY_TOO_DEEP",
            });
        }
        if a.complexity > self.max_complexity {
            return Err(GraphqlError {
                message: format!(
                    "Query complexity {} exceeds the maximum of {}.",
                    a.complexity, self.max_complexity
                ),
                location: None,
                code: "QUERY_TOO_COMPLEX",
            });
        }
        Ok(a)
    }

    fn analyse_request(&self, req: &RequestView<'_>) -> Result<Analysis, GraphqlError> {
        if req.method == "GET" {
            let query = percent_decode(req.query_param("query").unwrap_or_default());
            let variables = req
                .query_param("variables")
                .map(|v| serde_json::from_str(&percent_decode(v)))
                .transpose()
                .map_err(|_| GraphqlError::bad_request("Variables are invalid JSON."))?;
            let op = req.query_param("operationName").map(percent_decode);
            return self.analyse(&query, variables.as_ref(), op.as_deref());
        }
        if req.body_truncated() {
            return Err(GraphqlError::bad_request(format!(
                "The request body is larger than the proxy buffers ({} bytes analysed at most).",
                self.max_body_bytes
            )));
        }
        let body = req
            .body()
            .map_err(|_| GraphqlError::bad_request("The request body is not UTF-8."))?;
        if body.len() > self.max_body_bytes {
            return Err(GraphqlError::bad_request(format!(
                "The request body exceeds {} bytes.",
                self.max_body_bytes
            )));
        }
        if body.trim().is_empty() {
            return Err(GraphqlError::bad_request(
                "Must provide query string (is the proxy sending the body? set with_request_body).",
            ));
        }
        let content_type = req.header("content-type").unwrap_or_default();
        if content_type.starts_with("application/graphql") {
            return self.analyse(body, None, None);
        }
        let json: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| GraphqlError::bad_request(format!("Body is not valid JSON: {e}.")))?;
        match &json {
            serde_json::Value::Array(batch) if !batch.is_empty() => {
                let mut total = Analysis {
                    depth: 0,
                    complexity: 0,
                };
                for item in batch {
                    let a = self.analyse_json(item)?;
                    total.depth = total.depth.max(a.depth);
                    total.complexity = total.complexity.saturating_add(a.complexity);
                }
                Ok(total)
            }
            other => self.analyse_json(other),
        }
    }

    fn analyse_json(&self, v: &serde_json::Value) -> Result<Analysis, GraphqlError> {
        let Some(query) = v.get("query").and_then(|q| q.as_str()) else {
            return Err(GraphqlError::bad_request("Must provide query string."));
        };
        let op = v.get("operationName").and_then(|o| o.as_str());
        self.analyse(query, v.get("variables"), op)
    }

    /// Parses and analyses one document.
    pub fn analyse(
        &self,
        query: &str,
        variables: Option<&serde_json::Value>,
        operation: Option<&str>,
    ) -> Result<Analysis, GraphqlError> {
        let doc = Parser::new(query, &self.list_arguments).document()?;
        let ops: Vec<&Operation<'_>> = match operation {
            Some(name) => {
                let op = doc.operations.iter().find(|o| o.name == Some(name));
                vec![op.ok_or_else(|| {
                    GraphqlError::bad_request(format!("Unknown operation named \"{name}\"."))
                })?]
            }
            // Several operations and no name: the server refuses it, but take the worst.
            None => doc.operations.iter().collect(),
        };
        if ops.is_empty() {
            return Err(GraphqlError::bad_request("The document has no operation."));
        }
        let mut analyser = Analyser {
            guard: self,
            fragments: &doc.fragments,
            variables,
            memo: HashMap::new(),
            stack: 0,
        };
        let mut out = Analysis {
            depth: 0,
            complexity: 0,
        };
        for op in ops {
            let (d, c) = analyser.set(&op.selection)?;
            out.depth = out.depth.max(d);
            out.complexity = out.complexity.max(c);
        }
        Ok(out)
    }
}

/// `%XX` and `+` decoding of a query parameter (invalid escapes are kept as written, as the
/// percent-encoding crate does).
fn percent_decode(s: &str) -> String {
    // `+` is a space in a query string; `%2B` (a real plus) is decoded after, so it stays one.
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

// ---- Analysis ----

#[derive(Clone, Copy)]
enum Memo {
    Visiting,
    Done(u32, u64),
}

struct Analyser<'g, 'd, 'a> {
    guard: &'g GraphqlGuard,
    fragments: &'d HashMap<&'a str, Vec<Selection<'a>>>,
    variables: Option<&'d serde_json::Value>,
    memo: HashMap<&'a str, Memo>,
    stack: usize,
}

impl<'a> Analyser<'_, '_, 'a> {
    /// (depth, complexity) of a selection set.
    fn set(&mut self, set: &[Selection<'a>]) -> Result<(u32, u64), GraphqlError> {
        self.stack += 1;
        if self.stack > MAX_NESTING * 2 {
            return Err(GraphqlError::bad_request("Query nesting is too deep."));
        }
        let mut depth = 0u32;
        let mut complexity = 0u64;
        for s in set {
            let (d, c) = match s {
                Selection::Field {
                    name,
                    multiplier,
                    children,
                } => {
                    let (cd, cc) = if children.is_empty() {
                        (0, 0)
                    } else {
                        self.set(children)?
                    };
                    let cost = match self.guard.costs.get(*name) {
                        Some(c) => *c,
                        None if name.starts_with("__") => 0,
                        None => self.guard.default_cost,
                    };
                    let m = self.multiplier(*multiplier);
                    (cd + 1, m.saturating_mul(cost.saturating_add(cc)))
                }
                Selection::Spread(name) => self.fragment(name)?,
                Selection::Inline(children) => self.set(children)?,
            };
            depth = depth.max(d);
            complexity = complexity.saturating_add(c);
        }
        self.stack -= 1;
        Ok((depth, complexity))
    }

    fn fragment(&mut self, name: &'a str) -> Result<(u32, u64), GraphqlError> {
        match self.memo.get(name) {
            Some(Memo::Done(d, c)) => return Ok((*d, *c)),
            Some(Memo::Visiting) => {
                return Err(GraphqlError {
                    message: format!("Cannot spread fragment \"{name}\" within itself."),
                    location: None,
                    code: "GRAPHQL_VALIDATION_FAILED",
                });
            }
            None => {}
        }
        let fragments = self.fragments;
        let Some(set) = fragments.get(name) else {
            return Err(GraphqlError {
                message: format!("Unknown fragment \"{name}\"."),
                location: None,
                code: "GRAPHQL_VALIDATION_FAILED",
            });
        };
        self.memo.insert(name, Memo::Visiting);
        let r = self.set(set)?;
        self.memo.insert(name, Memo::Done(r.0, r.1));
        Ok(r)
    }

    fn multiplier(&self, m: Multiplier<'_>) -> u64 {
        match m {
            Multiplier::One => 1,
            Multiplier::Literal(n) => n.max(1),
            Multiplier::Variable(v) => self
                .variables
                .and_then(|vars| vars.get(v))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(self.guard.default_list_size)
                .max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> GraphqlGuard {
        GraphqlGuard::new(&GraphqlConfig {
            max_depth: 4,
            max_complexity: 100,
            field_costs: vec![("expensive".into(), 10)],
            ..GraphqlConfig::default()
        })
    }

    fn analyse(q: &str) -> Result<Analysis, GraphqlError> {
        guard().analyse(q, None, None)
    }

    fn depth(q: &str) -> u32 {
        analyse(q).unwrap_or_else(|e| panic!("{q}: {e:?}")).depth
    }

    fn complexity(q: &str) -> u64 {
        analyse(q)
            .unwrap_or_else(|e| panic!("{q}: {e:?}"))
            .complexity
    }

    #[test]
    fn depth_counts_fields() {
        assert_eq!(depth("{ a }"), 1);
        assert_eq!(depth("{ a { b { c } } d }"), 3);
        assert_eq!(depth("query Q($id: ID!) { user(id: $id) { name } }"), 2);
    }

    #[test]
    fn depth_goes_through_fragments_and_inline_fragments() {
        // The seed library restarted counting at each fragment: this was depth 2 + 2.
        let q = "query { a { ...F } } fragment F on A { b { ...G } } fragment G on B { c { d } }";
        assert_eq!(depth(q), 4);
        let q = "{ a { ... on A { b { ... { c { d { e } } } } } } }";
        assert_eq!(depth(q), 5);
        // Order of definitions does not matter; fragments are analysed once each.
        let q = "fragment G on B { c { d } } query { a { ...F } } fragment F on A { b { ...G } }";
        assert_eq!(depth(q), 4);
    }

    #[test]
    fn complexity_weights_fields_and_multiplies_by_list_arguments() {
        assert_eq!(complexity("{ a b c }"), 3);
        assert_eq!(complexity("{ expensive }"), 10);
        assert_eq!(complexity("{ __typename a }"), 1);
        // users(first: 10) { id name } = 10 × (1 + 2)
        assert_eq!(complexity("{ users(first: 10) { id name } }"), 30);
        // Nested lists multiply.
        assert_eq!(
            complexity("{ users(first: 10) { friends(limit: 5) { name } } }"),
            10 * (1 + 5 * (1 + 1))
        );
        // Through a fragment the multiplier still applies.
        assert_eq!(
            complexity("{ users(first: 10) { ...U } } fragment U on User { id name }"),
            30
        );
        // Variables: the request's value, or the default list size when unset.
        let g = guard();
        let vars = serde_json::json!({"n": 7});
        let q = "query($n: Int) { users(first: $n) { id } }";
        assert_eq!(g.analyse(q, Some(&vars), None).unwrap().complexity, 14);
        assert_eq!(g.analyse(q, None, None).unwrap().complexity, 20);
    }

    #[test]
    fn check_enforces_maximums() {
        let g = guard();
        let req_ok = g.analyse("{ a { b { c { d } } } }", None, None).unwrap();
        assert_eq!(req_ok.depth, 4);
        let too_deep = "{ a { ...F } } fragment F on A { b { c { d { e } } } }";
        let a = g.analyse(too_deep, None, None).unwrap();
        assert!(a.depth > g.max_depth);
        let huge = "{ users(first: 1000000) { id } }";
        assert!(g.analyse(huge, None, None).unwrap().complexity > g.max_complexity);
    }

    #[test]
    fn malformed_documents_are_errors_with_positions() {
        let e = analyse("{ a { b }").unwrap_err();
        assert_eq!(e.code, "GRAPHQL_PARSE_FAILED");
        assert!(
            e.message
                .starts_with("Syntax Error: Expected Name, found <EOF>"),
            "{}",
            e.message
        );
        assert_eq!(e.location, Some((1, 10)));
        let e = analyse("query {\n  a(x: ) \n}").unwrap_err();
        assert_eq!(e.location, Some((2, 8)));
        for bad in [
            "",
            "   ",
            "{}",
            "{ a(: 1) }",
            "{ a \"unterminated }",
            "{ a(x: 01) }",
            "{ ... }",
            "type Query { a: Int }",
            "fragment on on A { a }",
            "{ a } }",
            "query ($a: [Int) { a }",
            "{ a @ }",
            "\u{0}",
            "{ a(x: \"\\q\") }",
        ] {
            assert!(analyse(bad).is_err(), "{bad:?} parsed");
        }
        let e = analyse("{ ...F }").unwrap_err();
        assert_eq!(e.message, "Unknown fragment \"F\".");
        let e = analyse("{ ...F } fragment F on A { ...G } fragment G on A { ...F }").unwrap_err();
        assert!(e.message.contains("within itself"), "{}", e.message);
        let body = e.to_json();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["errors"][0]["message"].is_string());
    }

    #[test]
    fn valid_syntax_corners_parse() {
        let q = r#"
            # a comment
            query Q($a: [Int!]! = [1, 2], $b: In = {x: "y", z: [true, null, ENUM]}) @dir(x: 1.5e3) {
              alias: field(arg: """block "quoted" string""", other: "esc\"aped\u00e9", n: -0) @skip(if: false)
              ... on T @include(if: true) { x }
              ...F @dir
            }
            mutation M { m }
            subscription S { s }
            fragment F on T { y }
        "#;
        let a = guard().analyse(q, None, Some("Q")).unwrap();
        assert_eq!(a.depth, 1);
        assert!(guard().analyse(q, None, Some("Nope")).is_err());
    }

    #[test]
    fn hostile_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}{}", "{ a ".repeat(100_000), "}".repeat(100_000));
        let e = analyse(&deep).unwrap_err();
        assert!(e.message.contains("too deep"), "{}", e.message);
        let deep_value = format!(
            "{{ a(x: {}1{}) }}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(analyse(&deep_value).is_err());
        // A long chain of fragments that each spread the next.
        let mut q = String::from("{ ...F0 }");
        for i in 0..5_000 {
            q.push_str(&format!(" fragment F{i} on A {{ a ...F{} }}", i + 1));
        }
        q.push_str(" fragment F5000 on A { z }");
        assert!(analyse(&q).is_err());
        // Fan-out: each fragment spreads the next twice: 2^60 visits unmemoised (the test
        // would never end), one per fragment memoised.
        let mut q = String::from("{ ...F0 }");
        for i in 0..60 {
            q.push_str(&format!(
                " fragment F{i} on A {{ a {{ ...F{n} }} b {{ ...F{n} }} }}",
                n = i + 1
            ));
        }
        q.push_str(" fragment F60 on A { z }");
        let a = analyse(&q).unwrap();
        assert_eq!(a.depth, 61);
        assert!(a.complexity > 1 << 60, "{}", a.complexity);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%7B+a+%7D"), "{ a }");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
