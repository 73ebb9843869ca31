//! Crash-safe writes: a file or a directory is built under a temporary name, fsync'd, renamed
//! into place and its parent directory fsync'd, so after a crash or power loss a reader sees
//! either the old version or the complete new one. On error the temporary is removed, so a full
//! disk leaves nothing half-written behind.

use anyhow::{Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The temporary sibling a write goes through (`name.partial`).
fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Flushes a file's data (or a directory's entries) to stable storage.
pub fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_path(p),
        _ => sync_path(Path::new(".")),
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial(path);
    let written = std::fs::write(&tmp, bytes)
        .with_context(|| format!("writing {}", path.display()))
        .and_then(|()| sync_path(&tmp))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Builds the directory `dir` with `fill` (given the temporary directory to write into) and
/// puts it in place of any old `dir`, atomically and durably.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = partial(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let built = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| fill(&tmp))
        .and_then(|()| sync_tree(&tmp));
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {}", tmp.display()))?;
    sync_parent(dir)
}

/// fsyncs every file directly in `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            sync_path(&path)?;
        }
    }
    sync_path(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_neither_the_temporary_nor_a_new_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("step-1");
        let err = write_dir(&dir, |d| {
            std::fs::write(d.join("a"), b"x")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        write_dir(&dir, |d| Ok(std::fs::write(d.join("a"), b"y")?)).unwrap();
        write_dir(&dir, |d| Ok(std::fs::write(d.join("b"), b"z")?)).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["b"]);
        write_file(&tmp.path().join("m.csv"), b"1,2\n").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("m.csv")).unwrap(), b"1,2\n");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    }
}
