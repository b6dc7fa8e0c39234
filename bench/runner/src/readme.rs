//! bench/README.md holds the last output of every benchmark, one section
//! each between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`. A run
//! rewrites its own section and keeps the rest of the file.

use crate::machine;
use anyhow::{bail, Context};
use clap::Args;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

/// bench/README.md of this checkout, wherever the benchmark is run from.
pub fn path() -> PathBuf {
    // bench/runner's parent is bench/.
    let runner = Path::new(env!("CARGO_MANIFEST_DIR"));
    runner.parent().unwrap_or(runner).join("README.md")
}

/// `doc` with section `name` holding `body`; a section not there yet is
/// appended at the end.
pub fn replace_section(doc: &str, name: &str, body: &str) -> String {
    let open = format!("<!-- bench:{name} -->");
    let close = format!("<!-- /bench:{name} -->");
    let body = body.trim_matches('\n');
    if let Some(start) = doc.find(&open) {
        let inner = start + open.len();
        if let Some(end) = doc[inner..].find(&close) {
            let end = inner + end;
            return format!("{}\n{body}\n{}", &doc[..inner], &doc[end..]);
        }
    }
    let before = doc.trim_end_matches('\n');
    let gap = if before.is_empty() { "" } else { "\n\n" };
    format!("{before}{gap}{open}\n{body}\n{close}\n")
}

/// Rewrites section `name` of the file at `path` (created if missing).
/// The new file is written beside it and renamed over it, so an
/// interrupted run leaves the old file whole.
pub fn write_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = replace_section(&doc, name, body);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".README.md.")
        .tempfile_in(dir)
        .with_context(|| format!("writing in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Prints a benchmark's output and puts it into its section of
/// bench/README.md.
pub fn publish(name: &str, body: &str) -> anyhow::Result<()> {
    print!("{body}");
    let path = path();
    write_section(&path, name, body)?;
    eprintln!("written to the {name} section of {}", path.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct SectionOpts {
    /// The section: prober, soak, ...
    pub name: String,
    /// The command that printed the output, for the line above it.
    #[arg(long)]
    pub command: String,
    /// Keep the output from the first line starting with this (cargo
    /// test's own lines come before a test's report).
    #[arg(long)]
    pub from: Option<String>,
}

pub fn section_from_stdin(o: &SectionOpts) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let Some(report) = select(&input, o.from.as_deref()) else {
        bail!(
            "no line starting with {:?} in the output: bench/README.md left as it was",
            o.from.as_deref().unwrap_or("")
        );
    };
    publish(
        &o.name,
        &format!(
            "{}\n\n{}\n",
            machine::header(&o.command),
            paragraphs(report)
        ),
    )
}

/// Plain text as markdown: a blank line between lines that are not rows of
/// one table, so each stays a line of its own (the soak prints lines, not
/// paragraphs, and its table right under one).
fn paragraphs(text: &str) -> String {
    let mut out = String::new();
    let mut prev: Option<&str> = None;
    for line in text.lines() {
        if let Some(p) = prev {
            let same_table = p.starts_with('|') && line.starts_with('|');
            if !p.trim().is_empty() && !line.trim().is_empty() && !same_table {
                out.push('\n');
            }
            out.push('\n');
        }
        out.push_str(line);
        prev = Some(line);
    }
    out
}

/// The report in a program's output: from the first line starting with
/// `from` up to libtest's verdict (`test name ... ok`), trimmed.
fn select<'a>(output: &'a str, from: Option<&str>) -> Option<&'a str> {
    let start = match from {
        None => 0,
        Some(f) => {
            let mut at = 0;
            loop {
                let line = &output[at..];
                if line.starts_with(f) {
                    break at;
                }
                at += line.find('\n')? + 1;
            }
        }
    };
    let rest = &output[start..];
    let end = rest
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| rest[i..].starts_with("test "))
        .unwrap_or(rest.len());
    Some(rest[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Benchmarks\n\nintro\n\n<!-- bench:filter -->\nold filter\n<!-- /bench:filter -->\n\nbetween\n\n<!-- bench:sync -->\nold sync\n<!-- /bench:sync -->\n\nend\n";

    #[test]
    fn a_section_is_replaced_and_the_rest_kept() {
        let out = replace_section(DOC, "filter", "new\nfilter\n");
        assert_eq!(out, DOC.replace("old filter", "new\nfilter"));
        let out = replace_section(&out, "sync", "\nnew sync\n\n");
        assert_eq!(
            out,
            DOC.replace("old filter", "new\nfilter")
                .replace("old sync", "new sync")
        );
        // Rewriting with the same body changes nothing.
        assert_eq!(replace_section(&out, "sync", "new sync"), out);
    }

    #[test]
    fn a_missing_section_is_appended() {
        let out = replace_section(DOC, "soak", "soak figures");
        assert_eq!(
            out,
            format!("{DOC}\n<!-- bench:soak -->\nsoak figures\n<!-- /bench:soak -->\n")
        );
        assert_eq!(
            replace_section("", "soak", "x"),
            "<!-- bench:soak -->\nx\n<!-- /bench:soak -->\n"
        );
        // An opening marker without its end is not trusted: append.
        let broken = "<!-- bench:soak -->\nhalf\n";
        assert!(replace_section(broken, "soak", "x")
            .ends_with("half\n\n<!-- bench:soak -->\nx\n<!-- /bench:soak -->\n"));
    }

    #[test]
    fn names_do_not_match_each_other() {
        let doc = "<!-- bench:filter-x -->\na\n<!-- /bench:filter-x -->\n";
        let out = replace_section(doc, "filter", "b");
        assert!(out.starts_with(doc), "{out}");
    }

    #[test]
    fn a_report_is_cut_out_of_cargo_test_output() {
        let out = "running 1 test\nwarm-up\n\nsoak: 60 s\n| a |\nRSS: 1 MB\ntest soak ... ok\n\ntest result: ok.\n";
        assert_eq!(
            select(out, Some("soak: ")),
            Some("soak: 60 s\n| a |\nRSS: 1 MB")
        );
        assert_eq!(select(out, Some("nothing")), None);
        assert_eq!(select("### a\n| b |\n", None), Some("### a\n| b |"));
    }

    #[test]
    fn lines_become_paragraphs_and_tables_stay_whole() {
        assert_eq!(
            paragraphs("soak: 60 s\n| a |\n|---|\n| 1 |\nRSS: 1 MB\nVMs: 6"),
            "soak: 60 s\n\n| a |\n|---|\n| 1 |\n\nRSS: 1 MB\n\nVMs: 6"
        );
        let already = "### a\n\n| b |\n|---|\n\nCommand: x";
        assert_eq!(paragraphs(already), already);
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("README.md");
        std::fs::write(&p, DOC).unwrap();
        write_section(&p, "filter", "new filter").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            DOC.replace("old filter", "new filter")
        );
        // No temporary file left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let fresh = dir.path().join("new.md");
        write_section(&fresh, "soak", "s").unwrap();
        assert_eq!(
            std::fs::read_to_string(&fresh).unwrap(),
            "<!-- bench:soak -->\ns\n<!-- /bench:soak -->\n"
        );
    }
}
