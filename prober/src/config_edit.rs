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
//! `/embed: {match: prefix}`. Which line holds what comes from `yaml_lines`.
//!
//! Why not a lossless YAML editor: yaml-edit 0.3 keeps layout as well, but
//! cannot add a trailing comment, and the `# sluice-prober: …` note on the
//! `capacity:` line is how a later run tells a measured capacity from one
//! set by hand (and reads back its p99, rate and time).

use crate::yaml_lines::{
    children, find_child, indent_unit, inline_value, scan, strip_comment, top_level, Kind, Line,
};
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
    /// Set `endpoints.<path>.instance_capacity` to this map (address to
    /// capacity), written as one flow-style line, replacing what was there.
    SetInstanceCapacity {
        path: String,
        capacities: std::collections::BTreeMap<String, u32>,
    },
}

impl Edit {
    pub fn path(&self) -> &str {
        match self {
            Edit::SetCapacity { path, .. }
            | Edit::AddEndpoint { path, .. }
            | Edit::SetInstanceCapacity { path, .. } => path,
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

/// Text edits expressed as byte ranges of the original, applied back to front.
#[derive(Default)]
struct Splices(Vec<(usize, usize, String)>);

impl Splices {
    /// Replaces bytes `from..to` of the original with `with`.
    fn push(&mut self, from: usize, to: usize, with: String) {
        self.0.push((from, to, with));
    }

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

/// `instance_capacity: {"127.0.0.1:8001": 2, ...}`: JSON is YAML's flow
/// style, and the addresses need quotes (they hold colons).
fn instance_capacity_text(capacities: &std::collections::BTreeMap<String, u32>) -> String {
    let map: Map<String, Value> = capacities
        .iter()
        .map(|(a, c)| (a.clone(), Value::from(*c)))
        .collect();
    let text = serde_json::to_string(&Value::Object(map)).expect("a map serializes");
    format!(
        "instance_capacity: {}",
        text.replace("\":", "\": ").replace(",\"", ", \"")
    )
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
    let file = Scanned::new(text);
    let mut splices = Splices::default();
    match find_child(&file.lines, top_level(&file.lines), "endpoints") {
        (Some(endpoints), _) => file.edit_endpoints(endpoints, edit, &mut splices)?,
        (None, top_indent) => file.append_endpoints(edit, top_indent.unwrap_or(0), &mut splices)?,
    }
    Ok(splices.apply(text))
}

/// The text being edited, scanned into lines, and the habits an edit follows.
struct Scanned<'a> {
    text: &'a str,
    lines: Vec<Line<'a>>,
    /// The file's line break.
    nl: &'static str,
    /// The file's indentation step.
    unit: usize,
}

impl<'a> Scanned<'a> {
    fn new(text: &'a str) -> Scanned<'a> {
        let lines = scan(text);
        Scanned {
            text,
            nl: newline_of(text),
            unit: indent_unit(&lines),
            lines,
        }
    }

    /// No `endpoints:` at all: appends it, holding the new endpoint, at the
    /// end of the document.
    fn append_endpoints(
        &self,
        edit: &Edit,
        top_indent: usize,
        splices: &mut Splices,
    ) -> Result<(), EditError> {
        let Edit::AddEndpoint {
            path,
            settings,
            note,
        } = edit
        else {
            return Err(not_in_file(edit.path()));
        };
        let (text, nl, unit) = (self.text, self.nl, self.unit);
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
        splices.push(text.len(), text.len(), block);
        Ok(())
    }

    /// Applies `edit` under the `endpoints:` line at `endpoints`.
    fn edit_endpoints(
        &self,
        endpoints: usize,
        edit: &Edit,
        splices: &mut Splices,
    ) -> Result<(), EditError> {
        let ep_line = &self.lines[endpoints];
        match inline_value(ep_line) {
            "" => {}
            // `endpoints: {}` or `endpoints: null`: the block takes its place.
            "null" | "~" | "{}" => self.drop_inline_value(ep_line, splices),
            _ => {
                return Err(EditError::FlowStyle {
                    line: endpoints + 1,
                    what: "endpoints".into(),
                })
            }
        }
        let block = children(&self.lines, endpoints);
        let (found, level) = find_child(&self.lines, block, edit.path());
        match (edit, found) {
            (
                Edit::AddEndpoint {
                    path,
                    settings,
                    note,
                },
                None,
            ) => {
                let level = level.unwrap_or(ep_line.indent + self.unit);
                let (at, prefix) = self.after_line(block.1 - 1);
                let new = endpoint_block(path, settings, note, level, self.unit, self.nl);
                splices.push(at, at, format!("{prefix}{new}"));
                Ok(())
            }
            (Edit::AddEndpoint { path, .. }, Some(_)) => Err(EditError::Mismatch(format!(
                "endpoints.{path}: already in the file"
            ))),
            (Edit::SetCapacity { path, .. } | Edit::SetInstanceCapacity { path, .. }, None) => {
                Err(not_in_file(path))
            }
            (Edit::SetInstanceCapacity { path, capacities }, Some(idx)) => {
                if !matches!(inline_value(&self.lines[idx]), "" | "null" | "~") {
                    return Err(EditError::FlowStyle {
                        line: idx + 1,
                        what: format!("endpoints.{path}"),
                    });
                }
                self.set_block_child(
                    idx,
                    "instance_capacity",
                    &instance_capacity_text(capacities),
                    splices,
                );
                Ok(())
            }
            (
                Edit::SetCapacity {
                    path,
                    capacity,
                    note,
                },
                Some(idx),
            ) => self.set_capacity(idx, path, *capacity, note, splices),
        }
    }

    /// Sets the capacity of the endpoint whose key is on line `idx`.
    fn set_capacity(
        &self,
        idx: usize,
        path: &str,
        capacity: u32,
        note: &str,
        splices: &mut Splices,
    ) -> Result<(), EditError> {
        let flow_style = || EditError::FlowStyle {
            line: idx + 1,
            what: format!("endpoints.{path}"),
        };
        match inline_value(&self.lines[idx]) {
            // One-line flow mapping: `/embed: {match: prefix}`.
            v if v.starts_with('{') => self
                .set_flow_capacity(idx, capacity, splices)
                .ok_or_else(flow_style),
            "" | "null" | "~" => {
                self.set_block_capacity(idx, capacity, note, splices);
                Ok(())
            }
            _ => Err(flow_style()),
        }
    }

    /// Sets `capacity` inside the one-line flow mapping on line `idx`;
    /// `None` if the mapping does not close on that line.
    fn set_flow_capacity(&self, idx: usize, capacity: u32, splices: &mut Splices) -> Option<()> {
        let line = &self.lines[idx];
        let Kind::Key { value_at, .. } = line.kind else {
            unreachable!("an endpoint is found by its key")
        };
        let value_from = line.start + value_at;
        let flow = strip_comment(&line.text[value_at..]);
        let close = flow.rfind('}')?;
        let inner = flow[flow.find('{').unwrap_or(0) + 1..close].trim();
        if let Some((from, to)) = find_flow_capacity(flow) {
            splices.push(value_from + from, value_from + to, capacity.to_string());
        } else {
            let sep = if inner.is_empty() { "" } else { ", " };
            let at = value_from + close;
            splices.push(at, at, format!("{sep}capacity: {capacity}"));
        }
        Some(())
    }

    /// Rewrites the `capacity:` line under the endpoint on line `idx`, or adds
    /// one after its last setting.
    fn set_block_capacity(&self, idx: usize, capacity: u32, note: &str, splices: &mut Splices) {
        let line = &self.lines[idx];
        let block = children(&self.lines, idx);
        let (existing, child_level) = find_child(&self.lines, block, "capacity");
        let child_level = child_level.unwrap_or(line.indent + self.unit);
        if !inline_value(line).is_empty() {
            // `/health: null`: the settings block takes its place.
            self.drop_inline_value(line, splices);
        }
        let new_line = capacity_text(capacity, note);
        match existing {
            Some(c) => {
                let old = &self.lines[c];
                splices.push(old.start + old.indent, old.start + old.text.len(), new_line);
            }
            None => {
                let (at, prefix) = self.after_line(block.1 - 1);
                let pad = " ".repeat(child_level);
                splices.push(at, at, format!("{prefix}{pad}{new_line}{}", self.nl));
            }
        }
    }

    /// Replaces the child `key` (its line and any lines under it) of the
    /// endpoint on line `idx` with `new_line`, or adds it after the last
    /// setting.
    fn set_block_child(&self, idx: usize, key: &str, new_line: &str, splices: &mut Splices) {
        let line = &self.lines[idx];
        let block = children(&self.lines, idx);
        let (existing, child_level) = find_child(&self.lines, block, key);
        let child_level = child_level.unwrap_or(line.indent + self.unit);
        if !inline_value(line).is_empty() {
            self.drop_inline_value(line, splices);
        }
        match existing {
            Some(c) => {
                let old = &self.lines[c];
                let last = &self.lines[children(&self.lines, c).1.max(c + 1) - 1];
                splices.push(
                    old.start + old.indent,
                    last.start + last.text.len(),
                    new_line.to_string(),
                );
            }
            None => {
                let (at, prefix) = self.after_line(block.1 - 1);
                let pad = " ".repeat(child_level);
                splices.push(at, at, format!("{prefix}{pad}{new_line}{}", self.nl));
            }
        }
    }

    /// Removes the inline value of a key line (`null` in `/a: null`), keeping
    /// any comment after it.
    fn drop_inline_value(&self, line: &Line, splices: &mut Splices) {
        let Kind::Key { value_at, .. } = line.kind else {
            unreachable!("only key lines have an inline value")
        };
        let value = inline_value(line);
        let from = line.start + value_at;
        let value_start = from + line.text[value_at..].find(value).unwrap_or(0);
        splices.push(from, value_start + value.len(), String::new());
    }

    /// Byte offset just past the line at `idx` (after its line break), and a
    /// line break to insert first if the file's last line has none.
    fn after_line(&self, idx: usize) -> (usize, String) {
        let line = &self.lines[idx];
        let end = line.start + line.text.len();
        let rest = &self.text[end..];
        if rest.starts_with("\r\n") {
            (end + 2, String::new())
        } else if rest.starts_with('\n') {
            (end + 1, String::new())
        } else {
            (end, self.nl.to_string())
        }
    }
}

fn not_in_file(path: &str) -> EditError {
    EditError::Mismatch(format!("endpoints.{path}: not in the file"))
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
pub use sluice_core::config::yaml::parse;

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
            Edit::SetInstanceCapacity { path, capacities } => {
                let ep = endpoints
                    .entry(path.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !ep.is_object() {
                    *ep = Value::Object(Map::new());
                }
                let map: Map<String, Value> = capacities
                    .iter()
                    .map(|(a, c)| (a.clone(), Value::from(*c)))
                    .collect();
                ep.as_object_mut()
                    .expect("made an object above")
                    .insert("instance_capacity".into(), Value::Object(map));
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
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn set(path: &str, capacity: u32) -> Edit {
        Edit::SetCapacity {
            path: path.into(),
            capacity,
            note: "sluice-prober: test".into(),
        }
    }

    pub(crate) const DOC: &str = "\
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
    fn sets_and_replaces_instance_capacity() {
        let text = "instances:\n  hosts: [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nendpoints:\n  /p:\n    capacity: 4  # mine\n  /q:\n    capacity: 1\n";
        let first = Edit::SetInstanceCapacity {
            path: "/p".into(),
            capacities: [
                ("127.0.0.1:1".to_string(), 2),
                ("127.0.0.1:2".to_string(), 8),
            ]
            .into_iter()
            .collect(),
        };
        let out = apply(text, &[first]).unwrap();
        assert_eq!(
            out,
            "instances:\n  hosts: [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nendpoints:\n  /p:\n    capacity: 4  # mine\n    instance_capacity: {\"127.0.0.1:1\": 2, \"127.0.0.1:2\": 8}\n  /q:\n    capacity: 1\n"
        );
        // A block-style value is replaced whole, lines under it included.
        let block = out.replace(
            "    instance_capacity: {\"127.0.0.1:1\": 2, \"127.0.0.1:2\": 8}\n",
            "    instance_capacity:\n      \"127.0.0.1:1\": 2\n      \"127.0.0.1:2\": 8\n",
        );
        let again = Edit::SetInstanceCapacity {
            path: "/p".into(),
            capacities: [("127.0.0.1:1".to_string(), 3)].into_iter().collect(),
        };
        let out = apply(&block, &[again]).unwrap();
        assert!(
            out.contains("    instance_capacity: {\"127.0.0.1:1\": 3}\n  /q:\n"),
            "{out}"
        );
    }
}
