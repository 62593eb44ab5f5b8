//! Positions in text, as people count them: 1-based line and column, the column in
//! characters (not bytes), for every error message that points into a file or a document.
//!
//! Must not touch: anything else (a leaf).

/// The 1-based line and column of byte `offset` in `text` (clamped to the end; an offset
/// inside a multi-byte character counts from the text before that character).
pub fn line_column(text: &[u8], offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or_default();
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let last = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    // Characters = bytes that do not continue a UTF-8 sequence (invalid bytes count once).
    let column = before[last..].iter().filter(|&&b| b & 0xC0 != 0x80).count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn lines_and_character_columns() {
        assert_eq!(line_column(b"abc", 0), (1, 1));
        assert_eq!(line_column(b"abc", 2), (1, 3));
        assert_eq!(line_column(b"a\nbc", 3), (2, 2));
        assert_eq!(line_column("é\nzoë x".as_bytes(), 8), (2, 5));
        assert_eq!(line_column(b"a\r\nb", 3), (2, 1));
        assert_eq!(line_column(b"ab", 99), (1, 3));
        assert_eq!(line_column(b"", 0), (1, 1));
    }
}
