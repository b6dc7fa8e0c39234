//! Writing capacities back into `sluice.yaml` as targeted text edits, so that
//! every comment, blank line, key order and quoting style the user chose stays
//! as it was.
//!
//! Only the lines that change are touched: an endpoint's `capacity:` line is
//! rewritten in place, or inserted after the endpoint's last setting; an
//! endpoint given on the command line is appended to `endpoints:`. The edited
//! text is then parsed again and compared with the document we meant to
//! produce; on any difference the edit is refused with a message saying what
//! to add by hand, and the file is left alone. Block-style YAML (the usual
//! kind) is edited; flow style is edited only for a one-line endpoint like
//! `/embed: {match: prefix}`.

use serde_json::{Map, Value};
use std::fmt::Write as _;

/// A change to make to the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Set `endpoints.<path>.capacity`, with a trailing comment.
    SetCapacity {
        path: String,
        capacity: u32,
        note: String,
    },
    /// Add `endpoints.<path>` with these settings (capacity included, if any),
    /// the note going on its `capacity:` line.
    AddEndpoint {
        path: String,
        settings: Map<String, Value>,
        note: String,
    },
}

impl Edit {
    pub fn path(&self) -> &str {
        match self {
            Edit::SetCapacity { path, .. } | Edit::AddEndpoint { path, .. } => path,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error(
        "line {line}: {what} is written in flow style; sluice-prober edits block-style YAML only"
    )]
    FlowStyle { line: usize, what: String },
    #[error("the edited text would not mean what was intended ({0})")]
    Mismatch(String),
    #[error("the edited text does not parse: {0}")]
    Unparsable(String),
}

/// One physical line of the file.
#[derive(Debug, Clone)]
struct Line<'a> {
    /// Byte offset of the line's start in the text.
    start: usize,
    /// The line without its line break.
    text: &'a str,
    indent: usize,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
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

fn scan(text: &str) -> Vec<Line<'_>> {
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
fn strip_comment(value: &str) -> &str {
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

fn inline_value<'a>(line: &Line<'a>) -> &'a str {
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
fn children(lines: &[Line], idx: usize) -> (usize, usize) {
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
fn find_child(lines: &[Line], range: (usize, usize), key: &str) -> (Option<usize>, Option<usize>) {
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

fn top_level(lines: &[Line]) -> (usize, usize) {
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

/// Text edits expressed as byte ranges of the original, applied back to front.
struct Splices(Vec<(usize, usize, String)>);

impl Splices {
    fn apply(mut self, text: &str) -> String {
        self.0.sort_by_key(|s| std::cmp::Reverse(s.0));
        let mut out = text.to_string();
        for (from, to, with) in self.0 {
            out.replace_range(from..to, &with);
        }
        out
    }
}

fn newline_of(text: &str) -> &'static str {
    if text.contains("\r\n") {
        "\r\n"
    } else {
        "\n"
    }
}

/// The file's indentation step: the smallest indent of any key line, or 2.
fn indent_unit(lines: &[Line]) -> usize {
    lines
        .iter()
        .filter(|l| matches!(l.kind, Kind::Key { .. }) && l.indent > 0)
        .map(|l| l.indent)
        .min()
        .unwrap_or(2)
}

/// Byte offset just past the line at `idx` (after its line break), inserting
/// a line break first if the file's last line has none.
fn after_line(text: &str, lines: &[Line], idx: usize, nl: &str) -> (usize, String) {
    let line = &lines[idx];
    let end = line.start + line.text.len();
    let rest = &text[end..];
    if rest.starts_with("\r\n") {
        (end + 2, String::new())
    } else if rest.starts_with('\n') {
        (end + 1, String::new())
    } else {
        (end, nl.to_string())
    }
}

/// A key as YAML: plain when that is unambiguous, JSON-quoted otherwise.
fn yaml_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._~-".contains(c))
        && !key.starts_with('-')
        && !matches!(
            key,
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
        );
    if plain {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

/// A value as YAML: JSON is YAML's flow style, so JSON text is always right.
fn yaml_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().all(|c| c.is_ascii_alphanumeric()) && !s.is_empty() => {
            yaml_key(s)
        }
        other => other.to_string(),
    }
}

fn capacity_text(capacity: u32, note: &str) -> String {
    if note.is_empty() {
        format!("capacity: {capacity}")
    } else {
        format!("capacity: {capacity}  # {note}")
    }
}

/// Lines for a new endpoint at `indent`, children at `indent + unit`.
fn endpoint_block(
    path: &str,
    settings: &Map<String, Value>,
    note: &str,
    indent: usize,
    unit: usize,
    nl: &str,
) -> String {
    let pad = " ".repeat(indent);
    let child = " ".repeat(indent + unit);
    let mut s = format!("{pad}{}:{nl}", yaml_key(path));
    for (k, v) in settings {
        match (k.as_str(), v) {
            ("capacity", Value::Number(n)) => {
                let _ = write!(
                    s,
                    "{child}{}{nl}",
                    capacity_text(n.as_u64().unwrap_or(0) as u32, note)
                );
            }
            (_, Value::Object(m)) if !m.is_empty() && k == "headers" => {
                let _ = write!(s, "{child}{}:{nl}", yaml_key(k));
                for (hk, hv) in m {
                    let _ = write!(s, "{child}{}{}: {}{nl}", " ".repeat(unit), yaml_key(hk), hv);
                }
            }
            _ => {
                let _ = write!(s, "{child}{}: {}{nl}", yaml_key(k), yaml_value(v));
            }
        }
    }
    s
}

/// Applies one edit to the text.
fn apply_one(text: &str, edit: &Edit) -> Result<String, EditError> {
    let lines = scan(text);
    let nl = newline_of(text);
    let unit = indent_unit(&lines);
    let mut splices: Vec<(usize, usize, String)> = Vec::new();
    let (endpoints_idx, top_indent) = find_child(&lines, top_level(&lines), "endpoints");
    let top_indent = top_indent.unwrap_or(0);

    let Some(ep_idx) = endpoints_idx else {
        // No `endpoints:` at all: append it at the end of the document.
        let Edit::AddEndpoint {
            path,
            settings,
            note,
        } = edit
        else {
            return Err(EditError::Mismatch(format!(
                "endpoints.{}: not in the file",
                edit.path()
            )));
        };
        let mut block = String::new();
        if !text.is_empty() && !text.ends_with('\n') {
            block.push_str(nl);
        }
        let _ = write!(block, "{}endpoints:{nl}", " ".repeat(top_indent));
        block.push_str(&endpoint_block(
            path,
            settings,
            note,
            top_indent + unit,
            unit,
            nl,
        ));
        splices.push((text.len(), text.len(), block));
        return Ok(Splices(splices).apply(text));
    };
    let ep_line = &lines[ep_idx];
    let ep_value = inline_value(ep_line);
    if !ep_value.is_empty() && !matches!(ep_value, "null" | "~" | "{}") {
        return Err(EditError::FlowStyle {
            line: ep_idx + 1,
            what: "endpoints".into(),
        });
    }
    if !ep_value.is_empty() {
        // `endpoints: {}` or `endpoints: null`: drop the inline value.
        let Kind::Key { value_at, .. } = ep_line.kind else {
            unreachable!()
        };
        let from = ep_line.start + value_at;
        let value_start = from + ep_line.text[value_at..].find(ep_value).unwrap_or(0);
        splices.push((from, value_start + ep_value.len(), String::new()));
    }
    let ep_children = children(&lines, ep_idx);
    let (endpoint_idx, level) = find_child(&lines, ep_children, edit.path());
    let level = level.unwrap_or(ep_line.indent + unit);

    match (edit, endpoint_idx) {
        (
            Edit::AddEndpoint {
                path,
                settings,
                note,
            },
            None,
        ) => {
            let last = ep_children.1 - 1;
            let (at, prefix) = after_line(text, &lines, last, nl);
            let block = endpoint_block(path, settings, note, level, unit, nl);
            splices.push((at, at, format!("{prefix}{block}")));
        }
        (Edit::AddEndpoint { path, .. }, Some(_)) => {
            return Err(EditError::Mismatch(format!(
                "endpoints.{path}: already in the file"
            )));
        }
        (Edit::SetCapacity { path, .. }, None) => {
            return Err(EditError::Mismatch(format!(
                "endpoints.{path}: not in the file"
            )));
        }
        (
            Edit::SetCapacity {
                path,
                capacity,
                note,
            },
            Some(idx),
        ) => {
            let line = &lines[idx];
            let Kind::Key { value_at, .. } = line.kind else {
                unreachable!()
            };
            let value = inline_value(line);
            let value_from = line.start + value_at;
            let value_to = line.start + line.text.len();
            if value.starts_with('{') {
                // One-line flow mapping: `/embed: {match: prefix}`.
                let rest = &line.text[value_at..];
                let flow = strip_comment(rest);
                let close = flow.rfind('}').ok_or(EditError::FlowStyle {
                    line: idx + 1,
                    what: format!("endpoints.{path}"),
                })?;
                let inner = flow[flow.find('{').unwrap_or(0) + 1..close].trim();
                if let Some(cap_at) = find_flow_capacity(flow) {
                    let (from, to) = cap_at;
                    splices.push((value_from + from, value_from + to, capacity.to_string()));
                } else {
                    let sep = if inner.is_empty() { "" } else { ", " };
                    splices.push((
                        value_from + close,
                        value_from + close,
                        format!("{sep}capacity: {capacity}"),
                    ));
                }
            } else if value.is_empty() || matches!(value, "null" | "~") {
                let block = children(&lines, idx);
                let (cap_idx, child_level) = find_child(&lines, block, "capacity");
                let child_level = child_level.unwrap_or(line.indent + unit);
                if !value.is_empty() {
                    let value_start = value_from + line.text[value_at..].find(value).unwrap_or(0);
                    splices.push((value_from, value_start + value.len(), String::new()));
                }
                match cap_idx {
                    Some(c) => {
                        let cl = &lines[c];
                        let key_from = cl.start + cl.indent;
                        splices.push((
                            key_from,
                            cl.start + cl.text.len(),
                            capacity_text(*capacity, note),
                        ));
                    }
                    None => {
                        let last = block.1 - 1;
                        let (at, prefix) = after_line(text, &lines, last, nl);
                        splices.push((
                            at,
                            at,
                            format!(
                                "{prefix}{}{}{nl}",
                                " ".repeat(child_level),
                                capacity_text(*capacity, note)
                            ),
                        ));
                    }
                }
            } else if value == "{}" {
                splices.push((
                    value_from,
                    value_to,
                    format!(" {{capacity: {capacity}}}  # {note}"),
                ));
            } else {
                return Err(EditError::FlowStyle {
                    line: idx + 1,
                    what: format!("endpoints.{path}"),
                });
            }
        }
    }
    Ok(Splices(splices).apply(text))
}

/// Byte range of the number after `capacity:` inside a one-line flow mapping.
fn find_flow_capacity(flow: &str) -> Option<(usize, usize)> {
    let mut search = 0;
    while let Some(at) = flow[search..].find("capacity") {
        let at = search + at;
        let before = flow[..at].trim_end();
        let after = &flow[at + "capacity".len()..];
        let after_trim = after.trim_start();
        if (before.ends_with('{') || before.ends_with(',')) && after_trim.starts_with(':') {
            let num_area = &after_trim[1..];
            let lead = num_area.len() - num_area.trim_start().len();
            let digits = num_area[lead..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '+'))
                .unwrap_or(num_area.len() - lead);
            let from = flow.len() - num_area.len() + lead;
            return Some((from, from + digits));
        }
        search = at + 1;
    }
    None
}

/// Parses YAML text into the JSON form every part of Sluice reads.
pub fn parse(text: &str) -> Result<Value, yaml_serde::Error> {
    let yaml: yaml_serde::Value = yaml_serde::from_str(text)?;
    Ok(to_json(yaml))
}

/// YAML to JSON: scalar keys become strings (`200: x` → `"200"`), tags are
/// dropped, and non-finite floats become null (JSON has none).
pub fn to_json(v: yaml_serde::Value) -> Value {
    use yaml_serde::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        Y::Null => "null".to_string(),
                        other => match to_json(other) {
                            Value::String(s) => s,
                            j => j.to_string(),
                        },
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => to_json(t.value),
    }
}

/// What the document should be after `edits`.
fn intended(original: &Value, edits: &[Edit]) -> Value {
    let mut doc = original.clone();
    if !doc.is_object() {
        doc = Value::Object(Map::new());
    }
    let root = doc.as_object_mut().expect("made an object above");
    let endpoints = root
        .entry("endpoints")
        .or_insert_with(|| Value::Object(Map::new()));
    if !endpoints.is_object() {
        *endpoints = Value::Object(Map::new());
    }
    let endpoints = endpoints.as_object_mut().expect("made an object above");
    for edit in edits {
        match edit {
            Edit::SetCapacity { path, capacity, .. } => {
                let ep = endpoints
                    .entry(path.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !ep.is_object() {
                    *ep = Value::Object(Map::new());
                }
                ep.as_object_mut()
                    .expect("made an object above")
                    .insert("capacity".into(), Value::from(*capacity));
            }
            Edit::AddEndpoint { path, settings, .. } => {
                endpoints.insert(path.clone(), Value::Object(settings.clone()));
            }
        }
    }
    doc
}

/// Applies `edits` to `text` and checks that the result parses to exactly
/// the intended document (comments and layout aside).
pub fn apply(text: &str, edits: &[Edit]) -> Result<String, EditError> {
    let original = if text.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        parse(text).map_err(|e| EditError::Unparsable(e.to_string()))?
    };
    let mut out = text.to_string();
    for edit in edits {
        out = apply_one(&out, edit)?;
    }
    let got = parse(&out).map_err(|e| EditError::Unparsable(e.to_string()))?;
    let want = intended(&original, edits);
    if got != want {
        let what = edits
            .iter()
            .map(|e| format!("endpoints.{}", e.path()))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(EditError::Mismatch(format!("after editing {what}")));
    }
    Ok(out)
}

/// The text of a new `sluice.yaml` holding `top` keys and these endpoints.
pub fn new_document(top: &Map<String, Value>, edits: &[Edit]) -> Result<String, EditError> {
    let mut text = String::from(
        "# sluice.yaml, created by sluice-prober from its command line.\n\
         # The prober writes each endpoint's capacity; edit the rest freely.\n",
    );
    for (k, v) in top {
        let _ = writeln!(text, "{}: {}", yaml_key(k), yaml_value(v));
    }
    text.push_str("endpoints:\n");
    apply(&text, edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(path: &str, capacity: u32) -> Edit {
        Edit::SetCapacity {
            path: path.into(),
            capacity,
            note: "sluice-prober: test".into(),
        }
    }

    const DOC: &str = "\
# Demo service
service: demo                  # namespace
queue_timeout: 30
error_threshold: 0.05
storage: { type: redis, url: \"redis://127.0.0.1:6379\" }
endpoints:
  # the model
  /predict:
    method: POST               # prober: how to call it
    headers: { Content-Type: application/json }
    body:
      input: \"sample\"
    queue_timeout: 120
  \"/embed\":
    match: prefix
  /health:
  /score: {match: prefix}
  /text:
    body: |
      line one
      # not a comment
  /fixed:
    capacity: 10   # set by hand

# trailing
ui: { enable: true }
";

    #[test]
    fn inserts_capacity_after_the_last_setting() {
        let out = apply(DOC, &[set("/predict", 37)]).unwrap();
        assert!(
            out.contains(
                "    queue_timeout: 120\n    capacity: 37  # sluice-prober: test\n  \"/embed\":"
            ),
            "{out}"
        );
        // Everything else is byte for byte the same.
        assert_eq!(
            out.replace("    capacity: 37  # sluice-prober: test\n", ""),
            DOC
        );
    }

    #[test]
    fn replaces_an_existing_capacity_in_place() {
        let out = apply(DOC, &[set("/fixed", 12)]).unwrap();
        assert_eq!(
            out,
            DOC.replace(
                "    capacity: 10   # set by hand",
                "    capacity: 12  # sluice-prober: test"
            )
        );
    }

    #[test]
    fn quoted_null_flow_and_block_scalar_endpoints() {
        let out = apply(
            DOC,
            &[
                set("/embed", 4),
                set("/health", 5),
                set("/score", 6),
                set("/text", 7),
            ],
        )
        .unwrap();
        assert!(
            out.contains(
                "  \"/embed\":\n    match: prefix\n    capacity: 4  # sluice-prober: test\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("  /health:\n    capacity: 5  # sluice-prober: test\n"),
            "{out}"
        );
        assert!(
            out.contains("  /score: {match: prefix, capacity: 6}\n"),
            "{out}"
        );
        assert!(
            out.contains("      # not a comment\n    capacity: 7  # sluice-prober: test\n"),
            "{out}"
        );
        let v = parse(&out).unwrap();
        assert_eq!(
            v["endpoints"]["/text"]["body"],
            "line one\n# not a comment\n"
        );
        assert_eq!(v["ui"], json!({"enable": true}));
    }

    #[test]
    fn flow_capacity_is_replaced() {
        let text = "endpoints:\n  /a: {capacity: 3, match: prefix}   # hi\n";
        let out = apply(text, &[set("/a", 9)]).unwrap();
        assert_eq!(
            out,
            "endpoints:\n  /a: {capacity: 9, match: prefix}   # hi\n"
        );
    }

    #[test]
    fn four_space_indent_crlf_and_no_final_newline() {
        let text = "service: x\r\nendpoints:\r\n    /a:\r\n        method: GET";
        let out = apply(text, &[set("/a", 2)]).unwrap();
        assert_eq!(
            out,
            "service: x\r\nendpoints:\r\n    /a:\r\n        method: GET\r\n        capacity: 2  # sluice-prober: test\r\n"
        );
    }

    #[test]
    fn adds_an_endpoint_from_flags() {
        let mut settings = Map::new();
        settings.insert("method".into(), json!("POST"));
        settings.insert(
            "headers".into(),
            json!({"Content-Type": "application/json"}),
        );
        settings.insert("body".into(), json!({"input": "a: b # c"}));
        settings.insert("capacity".into(), json!(8));
        let add = Edit::AddEndpoint {
            path: "/new one".into(),
            settings,
            note: "n".into(),
        };
        let out = apply(DOC, std::slice::from_ref(&add)).unwrap();
        assert!(out.contains(
            "    capacity: 10   # set by hand\n  \"/new one\":\n    method: POST\n    headers:\n      Content-Type: \"application/json\"\n    body: {\"input\":\"a: b # c\"}\n    capacity: 8  # n\n\n# trailing\n"
        ), "{out}");
        // Into a file without endpoints, and into a new one.
        let out = apply("service: s\n", std::slice::from_ref(&add)).unwrap();
        assert!(
            out.starts_with("service: s\nendpoints:\n  \"/new one\":\n"),
            "{out}"
        );
        let mut top = Map::new();
        top.insert("service".into(), json!("demo"));
        top.insert("latency_threshold_ms".into(), json!(30));
        let out = new_document(&top, &[add]).unwrap();
        let v = parse(&out).unwrap();
        assert_eq!(v["service"], "demo");
        assert_eq!(v["latency_threshold_ms"], 30);
        assert_eq!(v["endpoints"]["/new one"]["capacity"], 8);
    }

    #[test]
    fn refuses_flow_style_endpoints() {
        let text = "endpoints: {/a: {method: GET}}\n";
        let err = apply(text, &[set("/a", 1)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 1: endpoints is written in flow style; sluice-prober edits block-style YAML only"
        );
    }

    #[test]
    fn refuses_what_it_cannot_verify() {
        // An anchor and alias: the edit lands, but the alias copies the old
        // mapping, so the document would differ from the intent elsewhere.
        let text = "endpoints:\n  /a: &x\n    method: GET\n  /b: *x\n";
        let out = apply(text, &[set("/a", 3)]);
        match out {
            Ok(t) => {
                let v = parse(&t).unwrap();
                assert_eq!(v["endpoints"]["/a"]["capacity"], 3);
                assert!(v["endpoints"]["/b"].get("capacity").is_none());
            }
            Err(e) => assert!(matches!(
                e,
                EditError::Mismatch(_) | EditError::FlowStyle { .. }
            )),
        }
    }

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
