//! The GraphQL executable-document parser: a lexer and a recursive-descent parser for
//! operations, fragments, inline fragments, arguments, variables and directives, keeping only
//! what the analysis needs (field names, list-argument multipliers, selections, spreads).
//! Type-system definitions are refused; syntax errors carry GraphQL-style positions; nesting
//! is bounded (`MAX_NESTING`), so no input can exhaust the stack.

use super::{GraphqlError, MAX_NESTING};
use std::collections::HashMap;

// ---- The document ----

#[derive(Debug)]
pub(super) enum Selection<'a> {
    Field {
        name: &'a str,
        multiplier: Multiplier<'a>,
        children: Vec<Selection<'a>>,
    },
    Spread(&'a str),
    Inline(Vec<Selection<'a>>),
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Multiplier<'a> {
    One,
    Literal(u64),
    Variable(&'a str),
}

#[derive(Debug)]
pub(super) struct Operation<'a> {
    pub name: Option<&'a str>,
    pub selection: Vec<Selection<'a>>,
}

#[derive(Debug)]
pub(super) struct Document<'a> {
    pub operations: Vec<Operation<'a>>,
    pub fragments: HashMap<&'a str, Vec<Selection<'a>>>,
}

// ---- Lexer and parser ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Punct(u8),
    Spread,
    Name(&'a str),
    Int(&'a str),
    Float,
    Str,
    Eof,
}

impl Tok<'_> {
    fn describe(&self) -> String {
        match self {
            Tok::Punct(c) => format!("\"{}\"", *c as char),
            Tok::Spread => "\"...\"".into(),
            Tok::Name(n) => format!("Name \"{n}\""),
            Tok::Int(i) => format!("Int \"{i}\""),
            Tok::Float => "Float".into(),
            Tok::Str => "String".into(),
            Tok::Eof => "<EOF>".into(),
        }
    }
}

pub(super) struct Parser<'a> {
    src: &'a str,
    /// Arguments whose integer value multiplies a field's cost.
    list_args: &'a [String],
    pos: usize,
    tok: Tok<'a>,
    tok_start: usize,
    nesting: usize,
}

type PResult<T> = Result<T, GraphqlError>;

impl<'a> Parser<'a> {
    pub fn new(src: &'a str, list_args: &'a [String]) -> Parser<'a> {
        Parser {
            src,
            list_args,
            pos: 0,
            tok: Tok::Eof,
            tok_start: 0,
            nesting: 0,
        }
    }

    fn error_at(&self, offset: usize, message: String) -> GraphqlError {
        let (line, column) = crate::text::line_column(self.src.as_bytes(), offset);
        GraphqlError {
            message: format!("Syntax Error: {message}"),
            location: Some((line, column)),
            code: "GRAPHQL_PARSE_FAILED",
        }
    }

    fn unexpected(&self, wanted: &str) -> GraphqlError {
        self.error_at(
            self.tok_start,
            format!("Expected {wanted}, found {}.", self.tok.describe()),
        )
    }

    /// Moves to the next token.
    fn advance(&mut self) -> PResult<()> {
        let b = self.src.as_bytes();
        // Skip ignored tokens: whitespace, commas, line terminators, BOM, comments.
        loop {
            match b.get(self.pos) {
                Some(b' ' | b'\t' | b'\n' | b'\r' | b',') => self.pos += 1,
                Some(b'#') => {
                    while let Some(&c) = b.get(self.pos) {
                        if c == b'\n' || c == b'\r' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                Some(0xEF) if b.get(self.pos..self.pos + 3) == Some(&[0xEF, 0xBB, 0xBF]) => {
                    self.pos += 3
                }
                _ => break,
            }
        }
        self.tok_start = self.pos;
        let Some(&c) = b.get(self.pos) else {
            self.tok = Tok::Eof;
            return Ok(());
        };
        self.tok = match c {
            b'!' | b'$' | b'&' | b'(' | b')' | b':' | b'=' | b'@' | b'[' | b']' | b'{' | b'|'
            | b'}' => {
                self.pos += 1;
                Tok::Punct(c)
            }
            b'.' => {
                if b.get(self.pos..self.pos + 3) == Some(b"...") {
                    self.pos += 3;
                    Tok::Spread
                } else {
                    return Err(self.error_at(self.pos, "Unexpected \".\".".into()));
                }
            }
            b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                let start = self.pos;
                while matches!(
                    b.get(self.pos),
                    Some(b'_' | b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9')
                ) {
                    self.pos += 1;
                }
                Tok::Name(&self.src[start..self.pos])
            }
            b'-' | b'0'..=b'9' => self.number()?,
            b'"' => {
                self.string()?;
                Tok::Str
            }
            _ => {
                let ch = self
                    .src
                    .get(self.pos..)
                    .and_then(|r| r.chars().next())
                    .unwrap_or('?');
                return Err(self.error_at(self.pos, format!("Unexpected character {ch:?}.")));
            }
        };
        Ok(())
    }

    fn digits(&mut self) -> usize {
        let b = self.src.as_bytes();
        let start = self.pos;
        while matches!(b.get(self.pos), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> PResult<Tok<'a>> {
        let b = self.src.as_bytes();
        let start = self.pos;
        if b.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        if self.digits() == 0 {
            return Err(self.error_at(start, "Invalid number, expected digit.".into()));
        }
        if b.get(int_start) == Some(&b'0') && self.pos - int_start > 1 {
            return Err(self.error_at(start, "Invalid number, unexpected digit after 0.".into()));
        }
        let mut float = false;
        if b.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            float = true;
            if self.digits() == 0 {
                return Err(self.error_at(start, "Invalid number, expected digit.".into()));
            }
        }
        if matches!(b.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            float = true;
            if matches!(b.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error_at(start, "Invalid number, expected digit.".into()));
            }
        }
        if matches!(
            b.get(self.pos),
            Some(b'_' | b'a'..=b'z' | b'A'..=b'Z' | b'.')
        ) {
            return Err(self.error_at(self.pos, "Invalid number.".into()));
        }
        Ok(if float {
            Tok::Float
        } else {
            Tok::Int(&self.src[start..self.pos])
        })
    }

    fn string(&mut self) -> PResult<()> {
        let b = self.src.as_bytes();
        let start = self.pos;
        if b.get(self.pos..self.pos + 3) == Some(b"\"\"\"") {
            self.pos += 3;
            loop {
                match b.get(self.pos) {
                    None => return Err(self.error_at(start, "Unterminated string.".into())),
                    Some(b'\\') if b.get(self.pos + 1..self.pos + 4) == Some(b"\"\"\"") => {
                        self.pos += 4
                    }
                    Some(b'"') if b.get(self.pos..self.pos + 3) == Some(b"\"\"\"") => {
                        self.pos += 3;
                        return Ok(());
                    }
                    Some(_) => self.pos += 1,
                }
            }
        }
        self.pos += 1;
        loop {
            match b.get(self.pos) {
                None | Some(b'\n' | b'\r') => {
                    return Err(self.error_at(start, "Unterminated string.".into()));
                }
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => match b.get(self.pos + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
                    Some(b'u') => {
                        let hex = b.get(self.pos + 2..self.pos + 6);
                        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                            return Err(
                                self.error_at(self.pos, "Invalid Unicode escape sequence.".into())
                            );
                        }
                        self.pos += 6;
                    }
                    _ => {
                        return Err(
                            self.error_at(self.pos, "Invalid character escape sequence.".into())
                        );
                    }
                },
                Some(_) => self.pos += 1,
            }
        }
    }

    fn expect(&mut self, c: u8) -> PResult<()> {
        if self.tok == Tok::Punct(c) {
            self.advance()
        } else {
            Err(self.unexpected(&format!("\"{}\"", c as char)))
        }
    }

    fn name(&mut self) -> PResult<&'a str> {
        match self.tok {
            Tok::Name(n) => {
                self.advance()?;
                Ok(n)
            }
            _ => Err(self.unexpected("Name")),
        }
    }

    fn enter(&mut self) -> PResult<()> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(self.error_at(self.tok_start, "Document nesting is too deep.".into()));
        }
        Ok(())
    }

    pub fn document(mut self) -> PResult<Document<'a>> {
        self.advance()?;
        let mut doc = Document {
            operations: Vec::new(),
            fragments: HashMap::new(),
        };
        if self.tok == Tok::Eof {
            return Err(self.unexpected("a query"));
        }
        while self.tok != Tok::Eof {
            match self.tok {
                Tok::Punct(b'{') => doc.operations.push(Operation {
                    name: None,
                    selection: self.selection_set()?,
                }),
                Tok::Name("query" | "mutation" | "subscription") => {
                    self.advance()?;
                    let name = match self.tok {
                        Tok::Name(n) => {
                            self.advance()?;
                            Some(n)
                        }
                        _ => None,
                    };
                    if self.tok == Tok::Punct(b'(') {
                        self.variable_definitions()?;
                    }
                    self.directives()?;
                    doc.operations.push(Operation {
                        name,
                        selection: self.selection_set()?,
                    });
                }
                Tok::Name("fragment") => {
                    self.advance()?;
                    let at = self.tok_start;
                    let name = self.name()?;
                    if name == "on" {
                        return Err(self.error_at(at, "Unexpected Name \"on\".".into()));
                    }
                    match self.tok {
                        Tok::Name("on") => self.advance()?,
                        _ => return Err(self.unexpected("\"on\"")),
                    }
                    self.name()?;
                    self.directives()?;
                    let set = self.selection_set()?;
                    if doc.fragments.insert(name, set).is_some() {
                        return Err(GraphqlError {
                            message: format!("There can be only one fragment named \"{name}\"."),
                            location: None,
                            code: "GRAPHQL_VALIDATION_FAILED",
                        });
                    }
                }
                Tok::Name(_) => {
                    return Err(self.error_at(
                        self.tok_start,
                        format!(
                            "Unexpected {} (only queries, mutations, subscriptions and fragments \
                             can be executed).",
                            self.tok.describe()
                        ),
                    ));
                }
                _ => return Err(self.unexpected("a definition")),
            }
        }
        Ok(doc)
    }

    fn selection_set(&mut self) -> PResult<Vec<Selection<'a>>> {
        self.enter()?;
        self.expect(b'{')?;
        let mut out = Vec::new();
        while self.tok != Tok::Punct(b'}') {
            out.push(self.selection()?);
        }
        if out.is_empty() {
            return Err(self.unexpected("Name"));
        }
        self.advance()?;
        self.nesting -= 1;
        Ok(out)
    }

    fn selection(&mut self) -> PResult<Selection<'a>> {
        if self.tok == Tok::Spread {
            self.advance()?;
            return match self.tok {
                Tok::Name(n) if n != "on" => {
                    self.advance()?;
                    self.directives()?;
                    Ok(Selection::Spread(n))
                }
                Tok::Name(_) => {
                    self.advance()?;
                    self.name()?;
                    self.directives()?;
                    Ok(Selection::Inline(self.selection_set()?))
                }
                _ => {
                    self.directives()?;
                    Ok(Selection::Inline(self.selection_set()?))
                }
            };
        }
        let mut name = self.name()?;
        if self.tok == Tok::Punct(b':') {
            self.advance()?;
            name = self.name()?;
        }
        let mut multiplier = Multiplier::One;
        if self.tok == Tok::Punct(b'(') {
            multiplier = self.arguments()?;
        }
        self.directives()?;
        let children = if self.tok == Tok::Punct(b'{') {
            self.selection_set()?
        } else {
            Vec::new()
        };
        Ok(Selection::Field {
            name,
            multiplier,
            children,
        })
    }

    /// Field arguments; returns the multiplier from the largest list argument.
    fn arguments(&mut self) -> PResult<Multiplier<'a>> {
        self.expect(b'(')?;
        let mut m = Multiplier::One;
        if self.tok == Tok::Punct(b')') {
            return Err(self.unexpected("Name"));
        }
        while self.tok != Tok::Punct(b')') {
            let name = self.name()?;
            self.expect(b':')?;
            let list_arg = self.list_argument(name);
            match (list_arg, self.tok) {
                (true, Tok::Int(i)) => {
                    let n =
                        i.parse::<u64>()
                            .unwrap_or(if i.starts_with('-') { 0 } else { u64::MAX });
                    m = match m {
                        Multiplier::Literal(old) => Multiplier::Literal(old.max(n)),
                        _ => Multiplier::Literal(n),
                    };
                    self.advance()?;
                }
                (true, Tok::Punct(b'$')) => {
                    self.advance()?;
                    let var = self.name()?;
                    if matches!(m, Multiplier::One) {
                        m = Multiplier::Variable(var);
                    }
                }
                _ => self.value()?,
            }
        }
        self.advance()?;
        Ok(m)
    }

    fn list_argument(&self, name: &str) -> bool {
        self.list_args.iter().any(|a| a == name)
    }

    fn value(&mut self) -> PResult<()> {
        match self.tok {
            Tok::Punct(b'$') => {
                self.advance()?;
                self.name()?;
            }
            Tok::Int(_) | Tok::Float | Tok::Str | Tok::Name(_) => self.advance()?,
            Tok::Punct(b'[') => {
                self.enter()?;
                self.advance()?;
                while self.tok != Tok::Punct(b']') {
                    if self.tok == Tok::Eof {
                        return Err(self.unexpected("\"]\""));
                    }
                    self.value()?;
                }
                self.advance()?;
                self.nesting -= 1;
            }
            Tok::Punct(b'{') => {
                self.enter()?;
                self.advance()?;
                while self.tok != Tok::Punct(b'}') {
                    self.name()?;
                    self.expect(b':')?;
                    self.value()?;
                }
                self.advance()?;
                self.nesting -= 1;
            }
            _ => return Err(self.unexpected("a value")),
        }
        Ok(())
    }

    fn directives(&mut self) -> PResult<()> {
        while self.tok == Tok::Punct(b'@') {
            self.advance()?;
            self.name()?;
            if self.tok == Tok::Punct(b'(') {
                self.arguments()?;
            }
        }
        Ok(())
    }

    fn variable_definitions(&mut self) -> PResult<()> {
        self.expect(b'(')?;
        if self.tok == Tok::Punct(b')') {
            return Err(self.unexpected("\"$\""));
        }
        while self.tok != Tok::Punct(b')') {
            self.expect(b'$')?;
            self.name()?;
            self.expect(b':')?;
            self.type_ref()?;
            if self.tok == Tok::Punct(b'=') {
                self.advance()?;
                self.value()?;
            }
            self.directives()?;
        }
        self.advance()
    }

    fn type_ref(&mut self) -> PResult<()> {
        if self.tok == Tok::Punct(b'[') {
            self.enter()?;
            self.advance()?;
            self.type_ref()?;
            self.expect(b']')?;
            self.nesting -= 1;
        } else {
            self.name()?;
        }
        if self.tok == Tok::Punct(b'!') {
            self.advance()?;
        }
        Ok(())
    }
}
