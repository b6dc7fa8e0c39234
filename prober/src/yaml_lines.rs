//! Reading the layout of `sluice.yaml` line by line: which line holds which
//! key, how deep it is indented, where its inline value and comment are.
//!
//! This is what lets `config_edit` change one line and leave every other
//! byte alone, and what puts a line number on each configuration error. It
//! understands block-style mappings (the usual kind of `sluice.yaml`): a key
//! per line, nesting by indentation, `#` comments, quoted keys and block
//! scalars (`body: |`). Anything else is `Kind::Other`; the callers verify
//! the result of every edit by parsing it again.

/// One physical line of the file.
#[derive(Debug, Clone)]
pub(crate) struct Line<'a> {
    /// Byte offset of the line's start in the text.
    pub(crate) start: usize,
    /// The line without its line break.
    pub(crate) text: &'a str,
    pub(crate) indent: usize,
    pub(crate) kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Blank,
    Comment,
    /// `key: value`; `value_at` is the byte offset (in `text`) just past the colon.
    Key {
        key: String,
        value_at: usize,
    },
    /// Anything else: sequence items, scalar continuation, document markers.
    Other,
}

pub(crate) fn scan(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    // Inside a block scalar (`key: |`), every line indented deeper than the
    // key is content, whatever it looks like.
    let mut scalar_parent: Option<usize> = None;
    for raw in text.split_inclusive('\n') {
        let line = raw.strip_suffix('\n').unwrap_or(raw);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = &line[indent..];
        let trimmed = content.trim();
        let kind = if trimmed.is_empty() {
            Kind::Blank
        } else if scalar_parent.is_some_and(|p| indent > p) {
            Kind::Other
        } else if trimmed.starts_with('#') {
            Kind::Comment
        } else {
            scalar_parent = None;
            match parse_key(content) {
                Some((key, used)) => {
                    let value = strip_comment(&content[used..]).trim();
                    if value.starts_with('|') || value.starts_with('>') {
                        scalar_parent = Some(indent);
                    }
                    Kind::Key {
                        key,
                        value_at: indent + used,
                    }
                }
                None => Kind::Other,
            }
        };
        out.push(Line {
            start,
            text: line,
            indent,
            kind,
        });
        start += raw.len();
    }
    out
}

/// Reads a mapping key at the start of `s`; returns it and the bytes used
/// through its colon.
fn parse_key(s: &str) -> Option<(String, usize)> {
    let first = s.chars().next()?;
    let (key, rest_at) = match first {
        '"' => {
            let mut escaped = false;
            let mut end = None;
            for (i, c) in s.char_indices().skip(1) {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end?;
            let key: String = serde_json::from_str(&s[..=end]).ok()?;
            (key, end + 1)
        }
        '\'' => {
            let mut key = String::new();
            let mut chars = s.char_indices().skip(1).peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if chars.peek().map(|p| p.1) == Some('\'') {
                        key.push('\'');
                        chars.next();
                    } else {
                        end = Some(i);
                        break;
                    }
                } else {
                    key.push(c);
                }
            }
            (key, end? + 1)
        }
        '-' if s.len() == 1 || s[1..].starts_with([' ', '\t']) => return None,
        '{' | '[' | '&' | '*' | '!' | '|' | '>' | '%' | '@' | '`' | '?' | '#' => return None,
        _ => {
            let bytes = s.as_bytes();
            let mut i = 0;
            loop {
                let colon = s[i..].find(':')? + i;
                let next = bytes.get(colon + 1);
                if next.is_none() || next == Some(&b' ') || next == Some(&b'\t') {
                    let key = s[..colon].trim_end();
                    if key.contains(" #") {
                        return None;
                    }
                    return Some((key.to_string(), colon + 1));
                }
                i = colon + 1;
            }
        }
    };
    let after = &s[rest_at..];
    let spaces = after.len() - after.trim_start_matches([' ', '\t']).len();
    let rest = &after[spaces..];
    if rest.starts_with(':') && (rest.len() == 1 || rest[1..].starts_with([' ', '\t'])) {
        Some((key, rest_at + spaces + 1))
    } else {
        None
    }
}

/// The part of an inline value before its comment (` # …`), quotes respected.
pub(crate) fn strip_comment(value: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev_space = true;
    for (i, c) in value.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return &value[..i],
            _ => {}
        }
        prev_space = c == ' ' || c == '\t';
    }
    value
}

pub(crate) fn inline_value<'a>(line: &Line<'a>) -> &'a str {
    match line.kind {
        Kind::Key { value_at, .. } => strip_comment(&line.text[value_at..]).trim(),
        _ => "",
    }
}

fn is_content(line: &Line) -> bool {
    !matches!(line.kind, Kind::Blank | Kind::Comment)
}

/// Index range of the lines under the key at `idx` (deeper indented), cut
/// after its last content line so trailing comments stay with what follows.
pub(crate) fn children(lines: &[Line], idx: usize) -> (usize, usize) {
    let parent = lines[idx].indent;
    let mut last_content = idx;
    for (i, l) in lines.iter().enumerate().skip(idx + 1) {
        // Content at or left of the parent closes the block; comments don't
        // (a commented-out line at column 0 is common inside a block).
        if is_content(l) && l.indent <= parent {
            break;
        }
        if is_content(l) {
            last_content = i;
        }
    }
    (idx + 1, last_content + 1)
}

/// The key line named `key` directly inside `range`, and the indent of that
/// level (the first key line's).
pub(crate) fn find_child(
    lines: &[Line],
    range: (usize, usize),
    key: &str,
) -> (Option<usize>, Option<usize>) {
    let level = lines[range.0..range.1]
        .iter()
        .find(|l| is_content(l))
        .map(|l| l.indent);
    let Some(level) = level else {
        return (None, None);
    };
    let found = (range.0..range.1).find(|&i| {
        lines[i].indent == level && matches!(&lines[i].kind, Kind::Key { key: k, .. } if k == key)
    });
    (found, Some(level))
}

pub(crate) fn top_level(lines: &[Line]) -> (usize, usize) {
    (0, lines.len())
}

/// 1-based line of the deepest key of `keys` found (e.g. `["endpoints",
/// "/predict", "capacity"]` gives the `capacity:` line, or the endpoint's line
/// if it has none). `None` if not even the first key is there.
pub fn locate(text: &str, keys: &[&str]) -> Option<usize> {
    let lines = scan(text);
    let mut range = top_level(&lines);
    let mut found = None;
    for key in keys {
        match find_child(&lines, range, key).0 {
            Some(i) => {
                found = Some(i + 1);
                range = children(&lines, i);
            }
            None => break,
        }
    }
    found
}

/// The trailing comment of `endpoints.<path>.capacity`, without `#`.
pub fn capacity_comment(text: &str, path: &str) -> Option<String> {
    let lines = scan(text);
    let (ep, _) = find_child(&lines, top_level(&lines), "endpoints");
    let (p, _) = find_child(&lines, children(&lines, ep?), path);
    let (c, _) = find_child(&lines, children(&lines, p?), "capacity");
    let line = &lines[c?];
    let Kind::Key { value_at, .. } = line.kind else {
        return None;
    };
    let rest = &line.text[value_at..];
    let value = strip_comment(rest);
    let comment = rest[value.len()..].trim();
    comment
        .strip_prefix('#')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
}

/// The file's indentation step: the smallest indent of any key line, or 2.
pub(crate) fn indent_unit(lines: &[Line]) -> usize {
    lines
        .iter()
        .filter(|l| matches!(l.kind, Kind::Key { .. }) && l.indent > 0)
        .map(|l| l.indent)
        .min()
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_edit::tests::DOC;

    #[test]
    fn locates_keys_for_error_messages() {
        assert_eq!(locate(DOC, &["service"]), Some(2));
        assert_eq!(
            locate(DOC, &["endpoints", "/predict", "queue_timeout"]),
            Some(13)
        );
        assert_eq!(locate(DOC, &["endpoints", "/embed", "match"]), Some(15));
        assert_eq!(locate(DOC, &["endpoints", "/fixed", "capacity"]), Some(23));
        // A key that is not there: the deepest one that is.
        assert_eq!(locate(DOC, &["endpoints", "/health", "capacity"]), Some(16));
        assert_eq!(locate(DOC, &["nope"]), None);
        assert_eq!(
            capacity_comment(DOC, "/fixed").as_deref(),
            Some("set by hand")
        );
        assert_eq!(capacity_comment(DOC, "/predict"), None);
    }

    #[test]
    fn keys_plain_and_quoted() {
        assert_eq!(parse_key("a: 1"), Some(("a".into(), 2)));
        assert_eq!(parse_key("http://x: 1"), Some(("http://x".into(), 9)));
        assert_eq!(parse_key("\"a\\\"b\" : 1"), Some(("a\"b".into(), 8)));
        assert_eq!(parse_key("'it''s':"), Some(("it's".into(), 8)));
        assert_eq!(parse_key("- a: 1"), None);
        assert_eq!(parse_key("plain text"), None);
    }
}
