//! The data directory's layout: `layout.toml` (shard count and generation), where each shard's
//! journal lives, and which files are leftovers of another generation.
//!
//! Contract: plain file operations on the main thread, before any shard starts (`weir serve`)
//! or by `weir data reshard`; the caller holds the directory's lock (`weir.lock`). It owns the
//! format of `layout.toml` and the paths of the shard journals; it decides nothing about their
//! contents.
//!
//! A layout is (shards, generation). Generation 0 keeps the first layout's paths (`shard-N/`,
//! layout format 1, which every weir reads), so directories made before resharding existed stay
//! as they are; generation G > 0 keeps its journals under `gen-G/shard-N/` and is recorded with
//! layout format 2, so a broker that knows only format 1 refuses it instead of starting empty
//! beside it. `layout.toml` is replaced only whole (written to `layout.toml.tmp`, fsynced,
//! renamed, the directory fsynced): whichever generation it names is the directory's data, and
//! every other generation's files are leftovers (`remove_leftovers`) of a reshard that either
//! did not finish (the new generation) or did (the old one).
//!
//! Faults handled: an unreadable or unknown `layout.toml` is an error naming the file and key;
//! every I/O error names the path.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The data directory's record of how it was laid out.
pub const LAYOUT_FILE: &str = "layout.toml";
/// Where a new layout is written before it replaces `LAYOUT_FILE`.
const LAYOUT_TMP: &str = "layout.toml.tmp";
/// The layout format of generation 0 (no `generation` key): every weir reads it.
pub const LAYOUT_FORMAT_FIRST: u32 = 1;
/// The layout format of a resharded directory (`generation` > 0, journals under `gen-G/`).
pub const LAYOUT_FORMAT_GENERATIONS: u32 = 2;

/// What `layout.toml` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub shards: usize,
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LayoutError {
    let what = what.into();
    move |source| LayoutError::Io { what, source }
}

/// The directory of generation `generation`'s journals: the data directory itself for 0.
pub fn generation_dir(data_dir: &Path, generation: u64) -> PathBuf {
    if generation == 0 {
        data_dir.to_path_buf()
    } else {
        data_dir.join(format!("gen-{generation}"))
    }
}

/// Shard `shard`'s journal directory in generation `generation`.
pub fn shard_dir(data_dir: &Path, generation: u64, shard: usize) -> PathBuf {
    generation_dir(data_dir, generation).join(format!("shard-{shard}"))
}

/// The layout `layout.toml` records, or `None` for a directory without one (a new directory).
pub fn read_layout(data_dir: &Path) -> Result<Option<Layout>, LayoutError> {
    let path = data_dir.join(LAYOUT_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LayoutError::Io {
                what: format!("reading {}", path.display()),
                source: e,
            })
        }
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| LayoutError::Invalid(format!("{LAYOUT_FILE} is unreadable: {e}")))?;
    let get = |key: &str| table.get(key).and_then(toml::Value::as_integer);
    let (Some(format), Some(shards)) = (get("format"), get("shards")) else {
        return Err(LayoutError::Invalid(format!(
            "{LAYOUT_FILE} lacks `format` or `shards`"
        )));
    };
    let generation = match format {
        f if f == i64::from(LAYOUT_FORMAT_FIRST) => 0,
        f if f == i64::from(LAYOUT_FORMAT_GENERATIONS) => match get("generation") {
            Some(g) if g > 0 => g as u64,
            _ => {
                return Err(LayoutError::Invalid(format!(
                    "{LAYOUT_FILE}: format {format} needs `generation` above 0"
                )))
            }
        },
        _ => {
            return Err(LayoutError::Invalid(format!(
                "layout format {format}; this broker reads formats {LAYOUT_FORMAT_FIRST} and \
                 {LAYOUT_FORMAT_GENERATIONS}"
            )))
        }
    };
    if shards < 1 {
        return Err(LayoutError::Invalid(format!(
            "{LAYOUT_FILE}: `shards` is {shards}, at least 1 expected"
        )));
    }
    Ok(Some(Layout {
        shards: shards as usize,
        generation,
    }))
}

/// Replaces `layout.toml` atomically: a crash leaves either the old file or the new one.
pub fn write_layout(data_dir: &Path, layout: Layout, version: &str) -> Result<(), LayoutError> {
    stage_layout(data_dir, layout, version)?;
    replace_layout(data_dir)
}

/// Writes and fsyncs `layout` as `layout.toml.tmp` beside the current file (step one of
/// `write_layout`; until `replace_layout`, the current file stands).
pub fn stage_layout(data_dir: &Path, layout: Layout, version: &str) -> Result<(), LayoutError> {
    let mut text = format!("# written by weir {version}; do not edit\n");
    if layout.generation == 0 {
        text += &format!(
            "format = {LAYOUT_FORMAT_FIRST}\nshards = {}\n",
            layout.shards
        );
    } else {
        text += &format!(
            "format = {LAYOUT_FORMAT_GENERATIONS}\nshards = {}\ngeneration = {}\n",
            layout.shards, layout.generation
        );
    }
    let tmp = data_dir.join(LAYOUT_TMP);
    let mut f = fs::File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("syncing {}", tmp.display())))
}

/// Renames the fsynced `layout.toml.tmp` over `layout.toml` and fsyncs the directory (the
/// commit point of a reshard: before the rename the old layout stands, after it the new one).
pub fn replace_layout(data_dir: &Path) -> Result<(), LayoutError> {
    let tmp = data_dir.join(LAYOUT_TMP);
    fs::rename(&tmp, data_dir.join(LAYOUT_FILE))
        .map_err(io(format!("renaming {}", tmp.display())))?;
    sync_dir(data_dir)
}

/// fsync of a directory, so the names created in it (files, subdirectories) are durable.
pub fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))
}

/// Removes what belongs to no current layout: every generation's journals but `current`'s,
/// and a staged `layout.toml.tmp`. Returns the paths removed. Only names this module makes are
/// touched (`shard-N/` at the top for generation 0, `gen-G/`), nothing else in the directory.
pub fn remove_leftovers(data_dir: &Path, current: u64) -> Result<Vec<PathBuf>, LayoutError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => {
            return Err(LayoutError::Io {
                what: format!("listing {}", data_dir.display()),
                source: e,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(io(format!("listing {}", data_dir.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let leftover = if let Some(g) = name.strip_prefix("gen-") {
            g.parse::<u64>().is_ok_and(|g| g != current && g != 0)
        } else if let Some(n) = name.strip_prefix("shard-") {
            current != 0 && n.parse::<u32>().is_ok()
        } else {
            name == LAYOUT_TMP
        };
        if !leftover {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(io(format!("removing leftover {}", path.display())))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        sync_dir(data_dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_keep_their_own_paths_and_leftovers_go() {
        let dir = std::env::temp_dir().join(format!("weir-datadir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(shard_dir(&dir, 0, 0)).unwrap();
        fs::create_dir_all(shard_dir(&dir, 3, 1)).unwrap();
        assert_eq!(read_layout(&dir).unwrap(), None);
        let first = Layout {
            shards: 2,
            generation: 0,
        };
        write_layout(&dir, first, "test").unwrap();
        assert_eq!(read_layout(&dir).unwrap(), Some(first));
        // Generation 0 current: gen-3 is an unfinished reshard's.
        remove_leftovers(&dir, 0).unwrap();
        assert!(dir.join("shard-0").is_dir() && !dir.join("gen-3").exists());
        let next = Layout {
            shards: 3,
            generation: 1,
        };
        fs::create_dir_all(shard_dir(&dir, 1, 2)).unwrap();
        write_layout(&dir, next, "test").unwrap();
        assert_eq!(read_layout(&dir).unwrap(), Some(next));
        remove_leftovers(&dir, 1).unwrap();
        assert!(!dir.join("shard-0").exists() && dir.join("gen-1/shard-2").is_dir());
        fs::write(dir.join(LAYOUT_FILE), "format = 2\nshards = 2\n").unwrap();
        let err = read_layout(&dir).unwrap_err().to_string();
        assert!(err.contains("needs `generation`"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
