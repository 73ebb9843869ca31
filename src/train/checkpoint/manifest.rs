//! `manifest.json`: the name, size and SHA-256 of every other file of a checkpoint, written
//! last. A checkpoint whose files do not match it (a crash mid-write on a file system that
//! reorders writes, a truncated copy, a deleted file) is not resumed from.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Entry {
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, Entry>,
}

fn entry(path: &Path) -> Result<Entry> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Entry { bytes, sha256 })
}

/// Records every file now in `dir` (the manifest must be the last file written).
pub fn write(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST && e.path().is_file() {
            files.insert(name, entry(&e.path())?);
        }
    }
    std::fs::write(
        dir.join(MANIFEST),
        serde_json::to_vec_pretty(&Manifest { files })?,
    )?;
    Ok(())
}

/// Checks that every file the manifest lists is present with its size and hash.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "checkpoint {} has no manifest (torn or incomplete)",
            dir.display()
        )
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("checkpoint {}: unreadable manifest", dir.display()))?;
    for (name, want) in &m.files {
        let file = dir.join(name);
        let meta = std::fs::metadata(&file)
            .with_context(|| format!("checkpoint {}: {name} is missing", dir.display()))?;
        if meta.len() != want.bytes {
            bail!(
                "checkpoint {}: {name} has {} bytes, the manifest says {}",
                dir.display(),
                meta.len(),
                want.bytes
            );
        }
        if entry(&file)?.sha256 != want.sha256 {
            bail!(
                "checkpoint {}: {name} does not match its SHA-256",
                dir.display()
            );
        }
    }
    Ok(())
}
