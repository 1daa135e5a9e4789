//! The index: which files are cached, in memory behind the node's lock, and how it persists
//! through the index journal (replayed at start, reconciled with the data files on disk, and
//! rewritten from a snapshot when it has grown).

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

use serde::{Deserialize, Serialize};

use super::blocks::BlockMap;
use super::owners::{OwnerState, OwnerTag};
use super::policy::{Rank, Sketch};
use super::{ContentKey, Damage, FS_BLOCK, PER_FILE_OVERHEAD, Result, is_valid_block_size, layout};

/// Persistent index records.
#[derive(Serialize, Deserialize)]
pub(super) enum IndexRecord {
    Admitted {
        key: ContentKey,
        generation: u64,
        size: u64,
        block_size: u32,
    },
    Stored {
        key: ContentKey,
        generation: u64,
        block: u32,
        checksum: u64,
    },
    /// A block failed verification and was dropped.
    Dropped {
        key: ContentKey,
        generation: u64,
        block: u32,
    },
    Evicted {
        key: ContentKey,
        generation: u64,
    },
    /// Snapshot form of a whole file.
    Entry {
        key: ContentKey,
        generation: u64,
        size: u64,
        block_size: u32,
        blocks: Vec<(u32, u64)>,
    },
    // Records of files with an owner other than the default. New variants go last: postcard
    // numbers them by position, so indexes written before owners existed still read, and the
    // default owner (`reservoir mount`) still writes only the records above.
    /// `Admitted`, by `owner`.
    AdmittedBy {
        key: ContentKey,
        generation: u64,
        size: u64,
        block_size: u32,
        owner: OwnerTag,
    },
    /// `Entry`, owned by `owner`.
    EntryOf {
        key: ContentKey,
        generation: u64,
        size: u64,
        block_size: u32,
        blocks: Vec<(u32, u64)>,
        owner: OwnerTag,
    },
    /// The file now belongs to `owner` (adopted after its owner went away).
    Owned {
        key: ContentKey,
        generation: u64,
        owner: OwnerTag,
    },
}

impl IndexRecord {
    /// The record of a file just admitted.
    pub(super) fn admitted(
        key: ContentKey,
        generation: u64,
        size: u64,
        block_size: u32,
        owner: OwnerTag,
    ) -> Self {
        if owner == OwnerTag::DEFAULT {
            IndexRecord::Admitted {
                key,
                generation,
                size,
                block_size,
            }
        } else {
            IndexRecord::AdmittedBy {
                key,
                generation,
                size,
                block_size,
                owner,
            }
        }
    }
}

/// One cached version of a file, as the node's books hold it. Its blocks are behind a lock of
/// their own, shared with the leases on it.
pub(super) struct CachedFile {
    pub generation: u64,
    pub size: u64,
    pub block_size: u32,
    /// Disk bytes the file may occupy (charged to its owner and the node).
    pub budget: u64,
    pub rank: Rank,
    pub owner: OwnerTag,
    pub blocks: Arc<BlockMap>,
}

/// The node's books: every cached file, who owns it, the admission sketch. Behind the node's
/// lock, which every open takes: nothing done under it waits for the disk.
pub(super) struct Index {
    pub files: HashMap<ContentKey, CachedFile>,
    pub sketch: Sketch,
    /// Every owner that has files or a view, with its files in eviction order.
    pub owners: HashMap<OwnerTag, OwnerState>,
    /// The clock of eviction ranks (shared by all owners' orders).
    pub clock: u64,
    /// Sum of the budgets of all files.
    pub data_bytes: u64,
    pub next_generation: u64,
    /// Data files of files removed under the lock, unlinked once it is released.
    pub doomed: Vec<PathBuf>,
}

impl Index {
    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// The node lock. The data files of files removed while it is held are unlinked after it is
/// released: one admission may evict thousands of files, and every open waits on this lock.
/// (The paths are never reused: a re-admitted file gets a new generation.)
pub(super) struct IndexGuard<'a> {
    index: Option<MutexGuard<'a, Index>>,
}

impl<'a> IndexGuard<'a> {
    pub fn new(index: MutexGuard<'a, Index>) -> Self {
        IndexGuard { index: Some(index) }
    }
}

impl Deref for IndexGuard<'_> {
    type Target = Index;

    fn deref(&self) -> &Index {
        self.index.as_deref().expect("held until dropped")
    }
}

impl DerefMut for IndexGuard<'_> {
    fn deref_mut(&mut self) -> &mut Index {
        self.index.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for IndexGuard<'_> {
    fn drop(&mut self) {
        let Some(mut index) = self.index.take() else {
            return;
        };
        let doomed = std::mem::take(&mut index.doomed);
        drop(index);
        for path in doomed {
            // Unlink, never truncate: a reader holding the file (passthrough) keeps its bytes.
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "cannot remove an evicted cache file");
            }
        }
    }
}

/// The index as a snapshot: one record per file. Lazy, so that [`crate::journal::Journal::snapshot`]
/// reads the files after it has taken the journal's buffer (call it with the node lock held).
pub(super) fn snapshot_records(index: &Index) -> impl Iterator<Item = IndexRecord> + '_ {
    index.files.iter().map(|(key, file)| {
        let blocks = file.blocks.stored();
        if file.owner == OwnerTag::DEFAULT {
            IndexRecord::Entry {
                key: *key,
                generation: file.generation,
                size: file.size,
                block_size: file.block_size,
                blocks,
            }
        } else {
            IndexRecord::EntryOf {
                key: *key,
                generation: file.generation,
                size: file.size,
                block_size: file.block_size,
                blocks,
                owner: file.owner,
            }
        }
    })
}

/// A file as the journal describes it, before it joins the books.
pub(super) struct Replayed {
    pub generation: u64,
    pub size: u64,
    pub block_size: u32,
    pub checksums: Box<[Option<u64>]>,
    pub owner: OwnerTag,
}

impl Replayed {
    fn new(generation: u64, size: u64, block_size: u32, owner: OwnerTag) -> Self {
        Replayed {
            generation,
            size,
            block_size,
            checksums: vec![None; block_count(size, block_size)].into_boxed_slice(),
            owner,
        }
    }

    fn snapshot(
        generation: u64,
        size: u64,
        block_size: u32,
        blocks: Vec<(u32, u64)>,
        owner: OwnerTag,
    ) -> Self {
        let mut file = Replayed::new(generation, size, block_size, owner);
        for (block, checksum) in blocks {
            if let Some(slot) = file.checksums.get_mut(block as usize) {
                *slot = Some(checksum);
            }
        }
        file
    }
}

/// Whether a file the journal describes is one the cache could have admitted: a block size it
/// accepts, and a size within `capacity` (a file bigger than the cache is never admitted). A
/// record that is not (damage that kept its checksum, or another version's bug) is skipped:
/// replaying it would divide by a zero block size or allocate a checksum slot per block of
/// an impossible file.
fn admissible(size: u64, block_size: u32, capacity: u64) -> bool {
    let ok = is_valid_block_size(block_size) && size <= capacity;
    if !ok {
        tracing::warn!(
            size,
            block_size,
            capacity,
            "the cache index describes a file it could not hold; skipping the record"
        );
    }
    ok
}

/// Applies one record of the journal, for a cache of `capacity` bytes.
pub(super) fn replay(
    files: &mut HashMap<ContentKey, Replayed>,
    record: IndexRecord,
    capacity: u64,
) {
    let current = |file: &Replayed, generation: u64| file.generation == generation;
    match record {
        IndexRecord::Admitted {
            size, block_size, ..
        }
        | IndexRecord::AdmittedBy {
            size, block_size, ..
        }
        | IndexRecord::Entry {
            size, block_size, ..
        }
        | IndexRecord::EntryOf {
            size, block_size, ..
        } if !admissible(size, block_size, capacity) => {}
        IndexRecord::Admitted {
            key,
            generation,
            size,
            block_size,
        } => {
            let file = Replayed::new(generation, size, block_size, OwnerTag::DEFAULT);
            files.insert(key, file);
        }
        IndexRecord::AdmittedBy {
            key,
            generation,
            size,
            block_size,
            owner,
        } => {
            files.insert(key, Replayed::new(generation, size, block_size, owner));
        }
        IndexRecord::Entry {
            key,
            generation,
            size,
            block_size,
            blocks,
        } => {
            let file = Replayed::snapshot(generation, size, block_size, blocks, OwnerTag::DEFAULT);
            files.insert(key, file);
        }
        IndexRecord::EntryOf {
            key,
            generation,
            size,
            block_size,
            blocks,
            owner,
        } => {
            let file = Replayed::snapshot(generation, size, block_size, blocks, owner);
            files.insert(key, file);
        }
        IndexRecord::Owned {
            key,
            generation,
            owner,
        } => {
            if let Some(file) = files.get_mut(&key).filter(|f| current(f, generation)) {
                file.owner = owner;
            }
        }
        IndexRecord::Stored {
            key,
            generation,
            block,
            checksum,
        } => {
            if let Some(file) = files.get_mut(&key).filter(|f| current(f, generation))
                && let Some(slot) = file.checksums.get_mut(block as usize)
            {
                *slot = Some(checksum);
            }
        }
        IndexRecord::Dropped {
            key,
            generation,
            block,
        } => {
            if let Some(file) = files.get_mut(&key).filter(|f| current(f, generation))
                && let Some(slot) = file.checksums.get_mut(block as usize)
            {
                *slot = None;
            }
        }
        IndexRecord::Evicted { key, generation } => {
            if files.get(&key).is_some_and(|f| current(f, generation)) {
                files.remove(&key);
            }
        }
    }
}

/// Removes data files the index does not know (a crash between creating a file and recording
/// it, or an index cut short by damage) and index entries whose file is gone, and brings each
/// data file back to its file's size: bytes past it would reach a passthrough reader, and
/// blocks past a shortened end are forgotten rather than read as holes.
pub(super) fn reconcile_with_disk(
    data_dir: &Path,
    files: &mut HashMap<ContentKey, Replayed>,
    damage: &mut Damage,
) -> Result<()> {
    let on_disk = layout::list_data_files(data_dir)?;
    let mut seen = HashSet::new();
    for (path, parsed) in on_disk {
        let known = parsed.and_then(|(key, generation)| {
            let file = files.get_mut(&key).filter(|f| f.generation == generation)?;
            seen.insert(key).then_some((key, file))
        });
        let Some((key, file)) = known else {
            tracing::debug!(path = %path.display(), "removing cache file the index does not know");
            let _ = std::fs::remove_file(&path);
            damage.unknown_files_removed += 1;
            continue;
        };
        match restore_size(&path, file) {
            Ok(None) => {}
            Ok(Some(dropped)) => {
                tracing::warn!(path = %path.display(), size = file.size, blocks_dropped = dropped, "cached file had the wrong length; cut back to its size");
                damage.resized_files += 1;
                damage.blocks_dropped += dropped;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "cannot check a cached file; dropping it");
                let _ = std::fs::remove_file(&path);
                seen.remove(&key);
            }
        }
    }
    let listed = files.len();
    files.retain(|key, _| seen.contains(key));
    damage.missing_files += (listed - files.len()) as u64;
    Ok(())
}

/// Sets a data file's length back to its file's size if it differs; `Some(blocks dropped)`
/// when it did.
fn restore_size(path: &Path, file: &mut Replayed) -> std::io::Result<Option<u64>> {
    let len = std::fs::symlink_metadata(path)?.len();
    if len == file.size {
        return Ok(None);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(file.size)?;
    let block_size = u64::from(file.block_size);
    let mut dropped = 0;
    for (block, checksum) in file.checksums.iter_mut().enumerate() {
        let end = (block as u64 + 1).saturating_mul(block_size).min(file.size);
        if end > len && checksum.take().is_some() {
            dropped += 1;
        }
    }
    Ok(Some(dropped))
}

pub(super) fn block_count(size: u64, block_size: u32) -> usize {
    size.div_ceil(u64::from(block_size)) as usize
}

/// Disk bytes a cached file of `size` may occupy.
pub(super) fn budget(size: u64) -> u64 {
    size.div_ceil(FS_BLOCK) * FS_BLOCK + PER_FILE_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `cache_files` fuzz target: an index record (with a valid checksum) naming
    /// a block size of 0 made the replay divide by zero, so the cache never opened again; a
    /// huge size would have allocated a checksum slot for each of its blocks.
    #[test]
    fn records_of_files_the_cache_could_not_hold_are_skipped() {
        let capacity = 64 << 20;
        let admitted = |key: u128, size: u64, block_size: u32| IndexRecord::Admitted {
            key: ContentKey(key),
            generation: 1,
            size,
            block_size,
        };
        let mut files = HashMap::new();
        for record in [
            admitted(1, 10_000, 0),
            admitted(2, 10_000, 4095),
            admitted(3, 10_000, 3 << 12),
            admitted(4, 10_000, 128 << 20),
            admitted(5, u64::MAX, 4096),
            admitted(6, capacity + 1, 1 << 20),
            IndexRecord::Entry {
                key: ContentKey(7),
                generation: 1,
                size: u64::MAX,
                block_size: 0,
                blocks: vec![(0, 1)],
            },
            admitted(8, 10_000, 4096),
            admitted(9, capacity, 64 << 20),
        ] {
            replay(&mut files, record, capacity);
        }
        let mut kept: Vec<u128> = files.keys().map(|k| k.0).collect();
        kept.sort();
        assert_eq!(kept, [8, 9]);
        assert_eq!(files[&ContentKey(8)].checksums.len(), 3);
    }
}
