//! Writing capacities into the config file: the check, before any load,
//! that it can be replaced, and the atomic replace itself.

use crate::config_edit::{self, Edit};
use crate::config_file;
use crate::error::ProberError;
use anyhow::Context;
use serde_json::{Map, Value};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Applies the edits to the file as it is now (re-read, in case someone
/// edited it while we measured) and replaces it atomically; or creates it.
pub fn write_capacities(
    path: &Path,
    edits: &[Edit],
    top: &Map<String, Value>,
) -> anyhow::Result<()> {
    let shown = path.display();
    let text = if path.exists() {
        let current = std::fs::read_to_string(path).with_context(|| format!("reading {shown}"))?;
        // It must still be a valid config: never write over a file that broke meanwhile.
        config_file::parse_text(&shown.to_string(), &current)?;
        config_edit::apply(&current, edits).map_err(|e| {
            anyhow::anyhow!("could not write the capacities into {shown} safely: {e}")
        })?
    } else {
        config_edit::new_document(top, edits)
            .map_err(|e| anyhow::anyhow!("could not create {shown}: {e}"))?
    };
    // Checked again: it may have changed while we measured. Not a usage
    // error any more, since the load has run.
    check_writable(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    replace_file(path, &text).with_context(|| format!("writing {shown}"))
}

/// Checks, before any load, that `path` can be replaced: it is not
/// read-only, and its directory takes the new file (the replace is a rename
/// from there). Root ignores permission bits, so the mode is checked too.
pub fn check_writable(path: &Path) -> Result<(), ProberError> {
    let shown = path.display();
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Ok(meta) = std::fs::metadata(&real) {
        if meta.mode() & 0o222 == 0 {
            return Err(ProberError::Usage(format!(
                "{shown} is read-only (mode {:o}): the prober would replace it; make it writable \
                 (chmod u+w) or pass --dry-run",
                meta.mode() & 0o7777
            )));
        }
        // Opening for writing without truncating asks the kernel the real
        // question (uid, groups, ACLs, read-only mounts) and changes nothing.
        if std::fs::OpenOptions::new().write(true).open(&real).is_err() {
            return Err(ProberError::Usage(format!(
                "{shown}: permission denied (owned by uid {}); nothing was measured",
                meta.uid()
            )));
        }
        let euid = effective_uid();
        if euid != 0 && meta.uid() != euid {
            return Err(ProberError::Usage(format!(
                "{shown} is owned by uid {}: replacing it would make it yours (uid {euid}); \
                 run as its owner or as root",
                meta.uid()
            )));
        }
    }
    let dir = parent_dir(&real);
    if !dir.is_dir() {
        return Err(ProberError::Usage(format!(
            "{shown}: directory {} does not exist",
            dir.display()
        )));
    }
    // The replace creates a temporary file there; so does this check, and
    // removes it at once.
    if tempfile::Builder::new()
        .prefix(".sluice-prober-check.")
        .tempfile_in(&dir)
        .is_err()
    {
        return Err(ProberError::Usage(format!(
            "{shown}: cannot write in {} (permission denied), and the file is replaced by a new \
             one from there; nothing was measured",
            dir.display()
        )));
    }
    Ok(())
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `text` to `path` by renaming a temporary file from the same
/// directory over it, keeping the old file's permissions and owner: readers
/// see the old file or the new one, never half of one.
pub fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Through a symlink, replace the file it points to, not the link.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = parent_dir(&real);
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sluice.yaml".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    let old = std::fs::metadata(&real).ok();
    if let Some(m) = &old {
        let new = tmp.as_file().metadata()?;
        if (new.uid(), new.gid()) != (m.uid(), m.gid()) {
            // Only root can give a file away; anyone else was stopped by
            // check_writable, so a failure here is a real one.
            std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid()))?;
        }
    }
    let perms = match &old {
        Some(m) => m.permissions(),
        None => std::fs::Permissions::from_mode(0o644),
    };
    std::fs::set_permissions(tmp.path(), perms)?;
    tmp.persist(&real).map_err(|e| e.error)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_keeps_permissions_and_follows_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.yaml");
        std::fs::write(&real, "a: 1\n").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("sluice.yaml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        replace_file(&link, "a: 2\n").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "a: 2\n");
        let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn replace_keeps_the_owner() {
        if effective_uid() != 0 {
            return; // only root can make a file someone else's
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sluice.yaml");
        std::fs::write(&p, "a: 1\n").unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        replace_file(&p, "a: 2\n").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a: 2\n");
    }

    #[test]
    fn read_only_files_and_missing_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sluice.yaml");
        std::fs::write(&p, "a: 1\n").unwrap();
        assert!(check_writable(&p).is_ok());
        // The check leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = check_writable(&p).unwrap_err();
        assert!(e.to_string().contains("is read-only (mode 444)"), "{e}");
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        let e = check_writable(&dir.path().join("no/such.yaml")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
