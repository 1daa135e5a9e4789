//! The cache directory on disk:
//!
//! ```text
//! CACHE/format       "reservoir-cache <version>": what wrote the rest
//! CACHE/lock         flock()ed by the one process that owns the directory; holds its pid
//! CACHE/index        the cache index journal
//! CACHE/meta/        metadata journals, one per source
//! CACHE/data/XX/     cached files, named <content key>-<generation>, fanned out by key
//! ```

use std::path::{Path, PathBuf};

use super::{CacheError, ContentKey, FS_BLOCK};
use crate::lockfile::{self, LockError, LockFile};

/// Bump when the on-disk format changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_FILE: &str = "format";
const LOCK_FILE: &str = "lock";
pub const INDEX_FILE: &str = "index";
pub const METADATA_DIR: &str = "meta";
pub const DATA_DIR: &str = "data";
const FANOUT: usize = 256;
/// The free space a cache wants on its file system: below it, the cache gives back its
/// coldest files at start (see [`super::Cache::open`]); a file system smaller than this is
/// refused.
pub const MINIMUM_FREE: u64 = 16 << 20;

/// What [`prepare`] found.
pub struct Prepared {
    pub lock: CacheLock,
    /// The directory held another format (or lost its marker) and was moved aside.
    pub set_aside: bool,
}

/// Held for as long as the process owns the cache directory.
pub struct CacheLock {
    _lock: LockFile,
}

/// Disk bytes the directory structure itself occupies.
pub fn fixed_overhead() -> u64 {
    (FANOUT as u64 + 4) * FS_BLOCK + 2 * FS_BLOCK
}

fn io_error(dir: &Path, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError {
    let dir = dir.to_path_buf();
    let what = what.into();
    move |cause| CacheError::Io { dir, what, cause }
}

/// Creates the directory structure, takes the lock and sets aside contents of another format.
pub fn prepare(dir: &Path) -> Result<Prepared, CacheError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir, "create the directory"))?;
    let lock = take_lock(dir)?;
    check_size(dir)?;
    let set_aside = check_format(dir)?;
    for sub in [METADATA_DIR, DATA_DIR] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(io_error(dir, format!("create {sub}/")))?;
    }
    let data = dir.join(DATA_DIR);
    for fan in 0..FANOUT {
        let path = data.join(format!("{fan:02x}"));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(dir, format!("create {}", path.display()))(e)),
        }
    }
    Ok(Prepared { lock, set_aside })
}

fn take_lock(dir: &Path) -> Result<CacheLock, CacheError> {
    match lockfile::take(&dir.join(LOCK_FILE)) {
        Ok(lock) => Ok(CacheLock { _lock: lock }),
        Err(LockError::Held { holder }) => Err(CacheError::Locked {
            dir: dir.to_path_buf(),
            holder,
        }),
        Err(LockError::Io { what, cause }) => Err(io_error(dir, what)(cause)),
    }
}

/// A file system too small to ever hold a cache is a setting to fix; one that is merely full
/// (other files, or a cache that filled it) is not: the cache starts and makes room.
fn check_size(dir: &Path) -> Result<(), CacheError> {
    let stat =
        nix::sys::statvfs::statvfs(dir).map_err(|e| io_error(dir, "read its size")(e.into()))?;
    let total = stat.blocks() as u64 * stat.fragment_size() as u64;
    if total < MINIMUM_FREE {
        return Err(CacheError::TooSmall {
            dir: dir.to_path_buf(),
            total,
            needed: MINIMUM_FREE,
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still take on the directory's file system.
pub fn free_space(dir: &Path) -> Result<u64, CacheError> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| io_error(dir, "read its free space")(e.into()))?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// Reads the format marker; a cache written in another format is moved aside (next to the
/// cache directory when possible, else removed), never read.
fn check_format(dir: &Path) -> Result<bool, CacheError> {
    let marker = dir.join(FORMAT_FILE);
    let expected = format!("reservoir-cache {FORMAT_VERSION}\n");
    let found = match std::fs::read_to_string(&marker) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(dir, "read the format marker")(e)),
    };
    let set = match found {
        Some(text) if text == expected => return Ok(false),
        Some(text) => set_aside(dir, text.trim()).map(|()| true)?,
        None if dir.join(INDEX_FILE).exists() => set_aside(dir, "unknown").map(|()| true)?,
        None => false,
    };
    std::fs::write(&marker, expected).map_err(io_error(dir, "write the format marker"))?;
    Ok(set)
}

fn set_aside(dir: &Path, found: &str) -> Result<(), CacheError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    let aside = dir.with_file_name(format!("{name}.set-aside-{stamp}"));
    let moved = std::fs::create_dir(&aside).is_ok()
        && [FORMAT_FILE, INDEX_FILE, METADATA_DIR, DATA_DIR]
            .iter()
            .filter(|part| dir.join(part).exists())
            .all(|part| std::fs::rename(dir.join(part), aside.join(part)).is_ok());
    if moved {
        tracing::warn!(
            dir = %dir.display(),
            found,
            expected = FORMAT_VERSION,
            moved_to = %aside.display(),
            "cache directory holds another cache format; moved it aside and starting empty"
        );
        return Ok(());
    }
    for part in [INDEX_FILE, FORMAT_FILE] {
        let _ = std::fs::remove_file(dir.join(part));
    }
    for part in [METADATA_DIR, DATA_DIR] {
        let path = dir.join(part);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_error(dir, format!("remove {part}/")))?;
        }
    }
    tracing::warn!(
        dir = %dir.display(),
        found,
        expected = FORMAT_VERSION,
        "cache directory held another cache format and could not be moved aside; removed it"
    );
    Ok(())
}

pub fn data_path(data_dir: &Path, key: ContentKey, generation: u64) -> PathBuf {
    let name = format!("{key}-{generation:x}");
    data_dir.join(&name[..2]).join(name)
}

fn parse_data_name(name: &str) -> Option<(ContentKey, u64)> {
    let (key, generation) = name.split_once('-')?;
    if key.len() != 32 {
        return None;
    }
    Some((
        ContentKey(u128::from_str_radix(key, 16).ok()?),
        u64::from_str_radix(generation, 16).ok()?,
    ))
}

/// A file found under `data/`, with its key and generation when the name is one we write.
pub type DataFile = (PathBuf, Option<(ContentKey, u64)>);

/// Every file under `data/`.
pub fn list_data_files(data_dir: &Path) -> Result<Vec<DataFile>, CacheError> {
    let mut files = Vec::new();
    let fans = std::fs::read_dir(data_dir).map_err(io_error(data_dir, "list data/"))?;
    for fan in fans {
        let fan = fan.map_err(io_error(data_dir, "list data/"))?;
        if !fan.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let entries = std::fs::read_dir(fan.path()).map_err(io_error(data_dir, "list data/"))?;
        for entry in entries {
            let entry = entry.map_err(io_error(data_dir, "list data/"))?;
            let parsed = entry.file_name().to_str().and_then(parse_data_name);
            files.push((entry.path(), parsed));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_names_round_trip() {
        let key = ContentKey(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let path = data_path(Path::new("/c/data"), key, 0x2a);
        assert_eq!(
            path,
            Path::new("/c/data/01/0123456789abcdef0011223344556677-2a")
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_data_name(name), Some((key, 0x2a)));
        assert_eq!(parse_data_name("junk"), None);
        assert_eq!(parse_data_name("0123-1"), None);
    }

    #[test]
    fn a_second_owner_is_refused_and_another_format_is_set_aside() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache");
        let prepared = prepare(&dir).unwrap();
        assert!(!prepared.set_aside);
        match prepare(&dir) {
            Err(CacheError::Locked { holder, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()))
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a second owner was let in"),
        }
        drop(prepared);

        std::fs::write(dir.join(FORMAT_FILE), "reservoir-cache 999\n").unwrap();
        std::fs::write(dir.join(INDEX_FILE), "old index").unwrap();
        assert!(prepare(&dir).unwrap().set_aside);
        assert!(!dir.join(INDEX_FILE).exists());
        assert_eq!(
            std::fs::read_to_string(dir.join(FORMAT_FILE)).unwrap(),
            format!("reservoir-cache {FORMAT_VERSION}\n")
        );
        let aside: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("cache.set-aside-"))
            .collect();
        assert_eq!(aside.len(), 1);
        let kept = parent.path().join(&aside[0]);
        assert_eq!(
            std::fs::read_to_string(kept.join(INDEX_FILE)).unwrap(),
            "old index"
        );
    }
}
