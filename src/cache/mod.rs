//! Where bytes are kept: the node's SSD cache.
//!
//! One cached file is one sparse file on disk (`data/XX/<key>-<generation>`) at the same offsets
//! as the source file, so that a complete copy can be handed to the kernel for FUSE passthrough.
//! Files fill block by block; the index (which blocks are present, a checksum per block) lives
//! in memory and persists through a [`Journal`]. A cache file is never rewritten in place once
//! a block is in it: eviction unlinks it, so a reader holding it open keeps correct bytes, and a
//! re-admitted file gets a new generation and a new file.
//!
//! Disk use is accounted conservatively (every file's full size rounded up to file-system
//! blocks, plus directory and journal bytes) so that what the directory occupies never exceeds
//! the configured size. Which files stay is decided by [`policy`].
//!
//! One cache serves every volume of a node. Each file is attributed to the volume that admitted
//! it (an [`OwnerTag`], persisted in the index), and a volume may be held to a [`Quota`] inside
//! the node-wide capacity: a volume over its quota evicts among its own files, and the node
//! over its capacity evicts among everyone's, with the same scan-resistant policy. Volumes over
//! the same source share cached bytes (content keys name the source and the file version, not
//! the volume): the first volume to admit a file owns it and is charged for it; another volume
//! reading it is served from it for free. When the owner goes away (unmounted), the next volume
//! that opens the file adopts it if it fits in that volume's quota. A [`Cache`] value is one
//! owner's view of the shared cache ([`Cache::for_owner`]); the one [`Cache::open`] returns is
//! the default owner, with no quota but the capacity (`reservoir mount`).
//!
//! **Locks.** The node's books ([`index`]: which files are cached, their owners and ranks, the
//! admission sketch) are behind one lock, which every open of every volume takes to count the
//! access and take a lease. Nothing done under it waits for the disk: index records are only
//! buffered in memory ([`Journal::append`]), data files are opened and created outside it,
//! evicted files are unlinked after it is released, and the index is written, synced and
//! rewritten by [`Cache::flush`] outside it (a rewrite encodes its snapshot under it, in
//! memory). Each file's blocks have a lock of their own ([`blocks`]), shared with the leases on
//! the file: reads, stores and verification never take the node's lock, and hold no lock
//! across disk I/O.
//!
//! The parts: [`index`] (the books and their journal), [`owners`] (ownership, quotas, making
//! room), [`blocks`] (leases, reading, storing and verifying blocks), [`layout`] (the
//! directory on disk), [`policy`] (admission and eviction order).

mod blocks;
mod index;
mod layout;
mod owners;
pub mod policy;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};

use crate::journal::{Journal, JournalError};
use blocks::{BlockMap, Tally};
use index::{CachedFile, Index, IndexGuard, IndexRecord};
use policy::{Priority, Rank, Sketch};

pub use blocks::Lease;
pub use layout::CacheLock;
pub use owners::{OwnerTag, OwnerUsage, Quota};

/// File-system allocation unit assumed when accounting disk use.
const FS_BLOCK: u64 = 4096;
/// Per cached file: its share of directory entries.
const PER_FILE_OVERHEAD: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "cache directory {dir} is in use by another reservoir process ({holder}); give each process its own --cache-dir"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error("cache directory {dir}: {what}")]
    Io {
        dir: PathBuf,
        what: String,
        #[source]
        cause: std::io::Error,
    },
    #[error(
        "cache directory {dir}: its file system holds only {total} bytes in all; give the cache a file system of at least {needed} bytes"
    )]
    TooSmall {
        dir: PathBuf,
        total: u64,
        needed: u64,
    },
    #[error(
        "block {block} of cached file {key}: got {got} bytes, expected {expected} (the source file changed while it was read?)"
    )]
    BlockSize {
        key: ContentKey,
        block: u32,
        got: usize,
        expected: usize,
    },
    #[error("cache settings: {0}")]
    Config(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Identity of one version of one source file: a hash of the source identity, the file's
/// identity in the source, and its version (size, mtime, ctime).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentKey(pub u128);

impl fmt::Display for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentKey({self})")
    }
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// The most the directory may occupy, index and metadata included.
    pub capacity: u64,
    /// Fraction of `capacity` at which eviction starts.
    pub high_watermark: f64,
    /// Fraction of `capacity` at which eviction stops.
    pub low_watermark: f64,
    /// Unit of fetching and checksumming for files admitted from now on.
    pub block_size: u32,
}

/// Whether a cache may use blocks of `size` bytes: a power of two from 4 KiB to 64 MiB.
pub(super) fn is_valid_block_size(size: u32) -> bool {
    size.is_power_of_two() && (4096..=64 << 20).contains(&size)
}

impl CacheConfig {
    pub fn validate(&self) -> Result<()> {
        let fail = |why: String| Err(CacheError::Config(why));
        if !(0.0 < self.low_watermark
            && self.low_watermark < self.high_watermark
            && self.high_watermark <= 1.0)
        {
            return fail(format!(
                "watermarks must satisfy 0 < low ({}) < high ({}) <= 1",
                self.low_watermark, self.high_watermark
            ));
        }
        if !is_valid_block_size(self.block_size) {
            return fail(format!(
                "block size {} must be a power of two between 4Ki and 64Mi",
                self.block_size
            ));
        }
        let minimum = layout::fixed_overhead() + 16 * u64::from(self.block_size);
        if self.capacity < minimum {
            return fail(format!(
                "cache size {} is too small: at least {} bytes (directory overhead plus 16 blocks)",
                self.capacity, minimum
            ));
        }
        Ok(())
    }
}

/// Counters for status reports.
#[derive(Default)]
struct Counters {
    admitted: AtomicU64,
    rejected: AtomicU64,
    evicted_files: AtomicU64,
    evicted_bytes: AtomicU64,
    verify_failures: AtomicU64,
    bytes_stored: AtomicU64,
    store_failures: AtomicU64,
}

/// What the cache found wrong with its directory, and what it did about it. Found at start,
/// but for the journals of volumes (counted when a volume opens its own) and the blocks the
/// disk refused (counted as they come). Nothing found here is ever served: damaged or unknown
/// parts are dropped and fetched again from the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Damage {
    /// Bytes cut off journals (the index and the volumes' metadata) after their first torn or
    /// corrupt record. A few bytes after a crash are normal: the unflushed tail.
    pub journal_bytes_dropped: u64,
    /// Data files the index did not know, removed (a crash between creating a file and
    /// recording it, or an index cut short).
    pub unknown_files_removed: u64,
    /// Files the index listed whose data file was gone.
    pub missing_files: u64,
    /// Data files longer or shorter than their file: cut back to its size, blocks past a
    /// shortened end dropped.
    pub resized_files: u64,
    pub blocks_dropped: u64,
    /// The directory had another format marker, or none beside an index: moved aside and
    /// started empty.
    pub set_aside: u64,
    /// Files given back because the file system had less than 16 MiB free (checked at start
    /// and every second).
    pub evicted_for_space: u64,
    /// Blocks the disk did not take (full, failing): read from the source instead.
    pub store_failures: u64,
}

/// A snapshot of the cache's use, for status reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Usage {
    pub dir: PathBuf,
    pub capacity: u64,
    /// Bytes accounted against the capacity (an upper bound of what the directory occupies).
    pub used: u64,
    /// Bytes of cached file data present.
    pub data_bytes: u64,
    pub index_bytes: u64,
    pub metadata_bytes: u64,
    pub files: u64,
    pub complete_files: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub evicted_files: u64,
    pub evicted_bytes: u64,
    pub verify_failures: u64,
    #[serde(default)]
    pub damage: Damage,
    /// The part of the owner whose view reported this (volumes of a daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerUsage>,
}

/// What a lease records about its file, read under the node lock.
struct LeaseInfo {
    generation: u64,
    block_size: u32,
    complete: bool,
    verified: bool,
    blocks: Arc<BlockMap>,
}

impl LeaseInfo {
    fn of(file: &CachedFile) -> Self {
        let blocks = file.blocks.lock();
        LeaseInfo {
            generation: file.generation,
            block_size: file.block_size,
            complete: blocks.is_complete(),
            verified: blocks.all_verified(),
            blocks: file.blocks.clone(),
        }
    }

    fn lease(self, key: ContentKey, size: u64, file: Option<File>) -> Lease {
        Lease {
            key,
            generation: self.generation,
            size,
            block_size: self.block_size,
            complete: self.complete,
            verified: self.verified,
            blocks: self.blocks,
            file: file.map(OnceLock::from).unwrap_or_default(),
        }
    }
}

/// One owner's view of the node's cache. Views made by [`Cache::for_owner`] share everything
/// with the one [`Cache::open`] returned; what they admit is attributed to their owner.
pub struct Cache {
    node: Arc<SharedCache>,
    owner: OwnerTag,
    /// Names (under `meta/`) of the journals opened through this view.
    journals: Mutex<Vec<String>>,
    /// Remove those journals when the view is dropped (its volume was unmounted for good).
    discard_journals: AtomicBool,
}

/// What all views share: the node's cache.
struct SharedCache {
    config: CacheConfig,
    data_dir: PathBuf,
    _lock: CacheLock,
    /// The node lock (see the module's documentation).
    index: Mutex<Index>,
    journal: Journal<IndexRecord>,
    /// Bytes of the other journals kept in the cache directory (metadata), by file name, for
    /// accounting: open ones count live, the others at their size on disk.
    external_journals: Mutex<HashMap<String, Arc<AtomicU64>>>,
    counters: Counters,
    /// What [`Cache::open`] and the volumes' journals found; store failures are a counter.
    damage: Mutex<Damage>,
    /// Bytes present and files complete, node-wide.
    tally: Arc<Tally>,
}

impl Cache {
    /// Opens (or creates) the cache directory: takes its lock, checks the format, replays the
    /// index and removes data files the index does not know. The result is the default
    /// owner's view, bounded by the capacity alone.
    ///
    /// Damage is repaired, never served, and counted ([`Damage`]): a cut-off index forgets
    /// files (their data files are removed), data files of the wrong length are set back,
    /// missing ones are forgotten, and blocks are checked against their checksums before
    /// their first use. A file system short of free space gets the coldest files back.
    pub fn open(config: CacheConfig) -> Result<Arc<Cache>> {
        config.validate()?;
        let prepared = layout::prepare(&config.dir)?;
        let data_dir = config.dir.join(layout::DATA_DIR);
        let (journal, records) =
            Journal::<IndexRecord>::open(&config.dir.join(layout::INDEX_FILE))?;
        let mut damage = Damage {
            journal_bytes_dropped: journal.dropped_at_open(),
            set_aside: u64::from(prepared.set_aside),
            ..Damage::default()
        };

        let mut replayed = HashMap::new();
        for record in records {
            index::replay(&mut replayed, record, config.capacity);
        }
        let next_generation = replayed
            .values()
            .map(|f| f.generation + 1)
            .max()
            .unwrap_or(1);
        index::reconcile_with_disk(&data_dir, &mut replayed, &mut damage)?;

        let tally = Arc::new(Tally::default());
        let mut index = Index {
            files: HashMap::new(),
            sketch: Sketch::new(18),
            owners: HashMap::new(),
            clock: 0,
            data_bytes: 0,
            next_generation,
            doomed: Vec::new(),
        };
        index.owner_mut(OwnerTag::DEFAULT);
        for (key, found) in replayed {
            let rank = Rank {
                frequency: 0,
                last_access: index.tick(),
            };
            let budget = index::budget(found.size);
            index.charge(key, found.owner, budget, rank);
            index.data_bytes += budget;
            let owner_tally = index.owner_mut(found.owner).tally.clone();
            let blocks = BlockMap::new(
                found.size,
                found.block_size,
                Some(found.checksums),
                owner_tally,
                tally.clone(),
            );
            let file = CachedFile {
                generation: found.generation,
                size: found.size,
                block_size: found.block_size,
                budget,
                rank,
                owner: found.owner,
                blocks: Arc::new(blocks),
            };
            index.files.insert(key, file);
        }
        let (files, data_bytes) = (index.files.len(), index.data_bytes);
        let external = existing_journals(&config.dir.join(layout::METADATA_DIR));
        let node = SharedCache {
            data_dir,
            _lock: prepared.lock,
            index: Mutex::new(index),
            journal,
            external_journals: Mutex::new(external),
            counters: Counters::default(),
            damage: Mutex::new(damage),
            tally,
            config,
        };
        node.make_free_space()?;
        if let Err(e) = node.rewrite_index() {
            // The log as found is still the index; a full disk must not keep the volume down.
            tracing::warn!(error = %crate::error::Chain(&e), "cannot rewrite the cache index now; keeping its log");
        }
        tracing::debug!(
            dir = %node.config.dir.display(),
            files,
            used = data_bytes,
            capacity = node.config.capacity,
            "cache opened"
        );
        Ok(Arc::new(Cache {
            node: Arc::new(node),
            owner: OwnerTag::DEFAULT,
            journals: Mutex::new(Vec::new()),
            discard_journals: AtomicBool::new(false),
        }))
    }

    /// A view of the same cache for the owner called `name` (a volume id): what it admits is
    /// attributed to it and held to `quota` (`None`: only the node's capacity). Several views
    /// of one owner may live at once; the latest quota applies. Files the owner admitted
    /// earlier (before a restart) are its own again.
    pub fn for_owner(&self, name: &str, quota: Option<Quota>) -> Result<Arc<Cache>> {
        if let Some(quota) = &quota {
            if !(0.0 < quota.low_watermark
                && quota.low_watermark < quota.high_watermark
                && quota.high_watermark <= 1.0)
            {
                return Err(CacheError::Config(format!(
                    "volume {name}: watermarks must satisfy 0 < low ({}) < high ({}) <= 1",
                    quota.low_watermark, quota.high_watermark
                )));
            }
            let minimum = 16 * u64::from(self.node.config.block_size);
            if quota.bytes < minimum {
                return Err(CacheError::Config(format!(
                    "volume {name}: cache size {} is too small: at least {minimum} bytes (16 blocks)",
                    quota.bytes
                )));
            }
        }
        let owner = OwnerTag::of(name);
        {
            let mut index = self.node.lock_index();
            let state = index.owner_mut(owner);
            state.name = Some(name.to_string());
            state.quota = quota;
            state.views += 1;
        }
        Ok(Arc::new(Cache {
            node: self.node.clone(),
            owner,
            journals: Mutex::new(Vec::new()),
            discard_journals: AtomicBool::new(false),
        }))
    }

    /// The owner this view admits for.
    pub fn owner(&self) -> OwnerTag {
        self.owner
    }

    /// Removes the journals opened through this view once it is dropped: its volume is gone
    /// for good (unmounted), so its metadata would only take space. Its cached files stay,
    /// for whoever reads them next.
    pub fn discard_journals_on_release(&self) {
        self.discard_journals.store(true, Ordering::Relaxed);
    }

    pub fn config(&self) -> &CacheConfig {
        &self.node.config
    }

    /// Opens a journal kept in the cache directory (e.g. a volume's metadata), counting its
    /// bytes against the capacity. Each owner has its own journals: two volumes over one
    /// source keep separate metadata (and inode numbers).
    pub fn open_journal<R>(&self, name: &str) -> Result<(Journal<R>, Vec<R>)>
    where
        R: Serialize + serde::de::DeserializeOwned,
    {
        let name = if self.owner == OwnerTag::DEFAULT {
            name.to_string()
        } else {
            format!("{}-{name}", self.owner)
        };
        let path = self.node.config.dir.join(layout::METADATA_DIR).join(&name);
        let (journal, records) = Journal::open(&path)?;
        self.node.lock_damage().journal_bytes_dropped += journal.dropped_at_open();
        self.node
            .lock_external()
            .insert(name.clone(), journal.bytes_counter());
        self.journals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name);
        Ok((journal, records))
    }

    /// Counts an access to a file without opening it.
    pub fn record_access(&self, key: ContentKey) {
        self.node
            .count_access_locked(&mut self.node.lock_index(), key);
    }

    /// Returns a lease on the cached copy of `key`, admitting it if it is not cached and the
    /// policy lets it in; an [`Priority::Access`] also counts as a use of the file. `None`
    /// means: serve this file straight from the source.
    pub fn lease(&self, key: ContentKey, size: u64, priority: Priority) -> Result<Option<Lease>> {
        let node = &*self.node;
        let known = {
            let mut index = node.lock_index();
            if priority == Priority::Access {
                node.count_access_locked(&mut index, key);
            }
            match index.files.get(&key) {
                Some(file) if file.size == size => {
                    let info = LeaseInfo::of(file);
                    self.adopt_locked(&mut index, key);
                    Some(info)
                }
                Some(_) => {
                    // Same identity and version but another size: not something a source
                    // does; drop what is cached.
                    node.evict_locked(&mut index, key);
                    None
                }
                None => None,
            }
        };
        if let Some(info) = known {
            // Opened outside the lock: the path lookup may wait on the disk.
            let path = node.data_path(key, info.generation);
            match File::options().read(true).write(true).open(&path) {
                Ok(file) => return Ok(Some(info.lease(key, size, Some(file)))),
                // Admitted but nothing stored yet (the file comes with the first block), or
                // evicted meanwhile (then admitted again below).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !info.blocks.lock().is_released() {
                        return Ok(Some(info.lease(key, size, None)));
                    }
                }
                Err(cause) => {
                    return Err(self.io_error(format!("open {}", path.display()), cause));
                }
            }
        }
        self.admit(key, size, priority)
    }

    /// Admits a file that is not cached. Its data file is created with the first block
    /// stored ([`Cache::store_block`]).
    fn admit(&self, key: ContentKey, size: u64, priority: Priority) -> Result<Option<Lease>> {
        let node = &*self.node;
        let info = {
            let mut index = node.lock_index();
            if index.files.contains_key(&key) {
                // Admitted by a concurrent open: this one reads from the source.
                return Ok(None);
            }
            if !self.make_room_locked(&mut index, key, size, priority) {
                node.counters.rejected.fetch_add(1, Ordering::Relaxed);
                index.owner_mut(self.owner).rejected += 1;
                return Ok(None);
            }
            let generation = index.next_generation;
            index.next_generation += 1;
            let block_size = node.config.block_size;
            let rank = Rank {
                frequency: index.sketch.estimate(key),
                last_access: index.tick(),
            };
            node.journal.append(&IndexRecord::admitted(
                key, generation, size, block_size, self.owner,
            ))?;
            let budget = index::budget(size);
            let owner_tally = index.owner_mut(self.owner).tally.clone();
            let file = CachedFile {
                generation,
                size,
                block_size,
                budget,
                rank,
                owner: self.owner,
                blocks: Arc::new(BlockMap::new(
                    size,
                    block_size,
                    None,
                    owner_tally,
                    node.tally.clone(),
                )),
            };
            let info = LeaseInfo::of(&file);
            index.data_bytes += budget;
            index.charge(key, self.owner, budget, rank);
            index.owner_mut(self.owner).admitted += 1;
            index.files.insert(key, file);
            node.counters.admitted.fetch_add(1, Ordering::Relaxed);
            info
        };
        Ok(Some(info.lease(key, size, None)))
    }

    /// Drops a cached file (its source version changed).
    pub fn forget(&self, key: ContentKey) {
        let mut index = self.node.lock_index();
        self.node.evict_locked(&mut index, key);
    }

    /// Whether `key` is cached completely (without taking a lease).
    pub fn contains_complete(&self, key: ContentKey, size: u64) -> bool {
        let index = self.node.lock_index();
        index
            .files
            .get(&key)
            .is_some_and(|f| f.size == size && f.blocks.lock().is_complete())
    }

    /// Writes the index's buffered records out (and to stable storage with `sync`), and
    /// rewrites it from a snapshot when it has grown. The index is the node's: only the view
    /// [`Cache::open`] returned writes it (`reservoir mount`'s volume, the daemon's own
    /// flusher); the views of volumes leave it to that one, so that N volumes cost one write
    /// and one sync of the index, not N + 1. Waits for the disk without holding the node lock.
    pub fn flush(&self, sync: bool) -> Result<()> {
        if self.owner != OwnerTag::DEFAULT {
            return Ok(());
        }
        let node = &*self.node;
        node.make_free_space()?;
        if node.journal.wants_rewrite() {
            node.rewrite_index()?;
        }
        node.journal.flush(sync)?;
        Ok(())
    }

    /// The node's use of the cache, and this view's owner's part of it. Reads counters kept
    /// as files come and go: no walk over the files (`statfs` asks for it).
    pub fn usage(&self) -> Usage {
        let node = &*self.node;
        let (files, data_budgets, owner) = {
            let index = node.lock_index();
            let owner = (self.owner != OwnerTag::DEFAULT)
                .then(|| index.owner_usage(self.owner))
                .flatten();
            (index.files.len() as u64, index.data_bytes, owner)
        };
        let metadata_bytes: u64 = node
            .lock_external()
            .values()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Usage {
            dir: node.config.dir.clone(),
            capacity: node.config.capacity,
            used: node.overhead_bytes() + data_budgets,
            data_bytes: counter(&node.tally.present_bytes),
            index_bytes: node.journal.bytes(),
            metadata_bytes,
            files,
            complete_files: counter(&node.tally.complete_files),
            admitted: counter(&node.counters.admitted),
            rejected: counter(&node.counters.rejected),
            evicted_files: counter(&node.counters.evicted_files),
            evicted_bytes: counter(&node.counters.evicted_bytes),
            verify_failures: counter(&node.counters.verify_failures),
            damage: Damage {
                store_failures: counter(&node.counters.store_failures),
                ..*node.lock_damage()
            },
            owner,
        }
    }

    /// Every owner's part of the cache (volumes, unmounted volumes' files, the default owner
    /// when it has files), largest first.
    pub fn owners(&self) -> Vec<OwnerUsage> {
        let index = self.node.lock_index();
        let mut owners: Vec<OwnerUsage> = index
            .owners
            .iter()
            .filter(|(tag, o)| **tag != OwnerTag::DEFAULT || o.files > 0)
            .filter_map(|(tag, _)| index.owner_usage(*tag))
            .collect();
        owners.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.tag.cmp(&b.tag)));
        owners
    }

    fn io_error(&self, what: String, cause: std::io::Error) -> CacheError {
        CacheError::Io {
            dir: self.node.config.dir.clone(),
            what,
            cause,
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if self.owner != OwnerTag::DEFAULT {
            let mut index = self.node.lock_index();
            let mut gone = false;
            if let Some(owner) = index.owners.get_mut(&self.owner) {
                owner.views = owner.views.saturating_sub(1);
                if owner.views == 0 {
                    owner.name = None;
                    owner.quota = None;
                    gone = owner.files == 0;
                }
            }
            if gone {
                index.owners.remove(&self.owner);
            }
        }
        if self.discard_journals.load(Ordering::Relaxed) {
            let journals =
                std::mem::take(self.journals.get_mut().unwrap_or_else(|p| p.into_inner()));
            let dir = self.node.config.dir.join(layout::METADATA_DIR);
            {
                // Admissions read this map under the node lock: no unlink while it is held.
                let mut external = self.node.lock_external();
                for name in &journals {
                    external.remove(name);
                }
            }
            for name in journals {
                if let Err(e) = std::fs::remove_file(dir.join(&name))
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(
                        journal = name,
                        error = &e as &dyn std::error::Error,
                        "cannot remove a volume's metadata journal"
                    );
                }
            }
        }
    }
}

impl SharedCache {
    /// Counts an access: at open, because passthrough reads never reach the daemon.
    fn count_access_locked(&self, index: &mut Index, key: ContentKey) {
        let aged = index.sketch.increment(key);
        if aged {
            for owner in index.owners.values_mut() {
                owner.order.clear();
            }
            let Index { files, owners, .. } = index;
            for (key, file) in files.iter_mut() {
                file.rank.frequency /= 2;
                if let Some(owner) = owners.get_mut(&file.owner) {
                    owner.order.insert(*key, file.rank);
                }
            }
        }
        let frequency = index.sketch.estimate(key);
        if index.files.contains_key(&key) {
            let last_access = index.tick();
            index.rerank(
                key,
                Rank {
                    frequency,
                    last_access,
                },
            );
        }
    }

    fn evict_locked(&self, index: &mut Index, key: ContentKey) {
        let Some(file) = self.remove_locked(index, key) else {
            return;
        };
        if let Some(owner) = index.owners.get_mut(&file.owner) {
            owner.evicted_files += 1;
            owner.evicted_bytes += file.budget;
        }
        self.counters.evicted_files.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(file.budget, Ordering::Relaxed);
    }

    /// Drops a file and its charge, records that in the index, and dooms its data file
    /// (unlinked when the lock is released).
    fn remove_locked(&self, index: &mut Index, key: ContentKey) -> Option<CachedFile> {
        let file = index.files.remove(&key)?;
        index.discharge(key, file.owner, file.budget, file.rank);
        index.data_bytes -= file.budget;
        file.blocks.lock().release();
        index.doomed.push(self.data_path(key, file.generation));
        if let Err(e) = self.journal.append(&IndexRecord::Evicted {
            key,
            generation: file.generation,
        }) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot record an eviction"
            );
        }
        Some(file)
    }

    /// Directory, index and metadata bytes: everything accounted besides file data.
    fn overhead_bytes(&self) -> u64 {
        let external: u64 = self
            .lock_external()
            .values()
            .map(|b| b.load(Ordering::Relaxed).div_ceil(FS_BLOCK) * FS_BLOCK)
            .sum();
        layout::fixed_overhead() + self.journal.bytes().div_ceil(FS_BLOCK) * FS_BLOCK + external
    }

    /// Replaces the index journal by a snapshot of the books: encoded under the node lock,
    /// written and synced after it is released.
    fn rewrite_index(&self) -> Result<()> {
        let snapshot = {
            let index = self.lock_index();
            self.journal.snapshot(index::snapshot_records(&index))?
        };
        if let Some(snapshot) = snapshot {
            snapshot.install()?;
        }
        Ok(())
    }

    /// Gives back the coldest files, all owners' alike, until the file system has
    /// [`layout::MINIMUM_FREE`] bytes free or the cache is empty: at start, and at every flush
    /// (each second), since other files may share the disk and fill it. What is left short is
    /// served from the source (blocks the disk refuses stay missing).
    fn make_free_space(&self) -> Result<()> {
        let free = layout::free_space(&self.config.dir)?;
        if free >= layout::MINIMUM_FREE {
            return Ok(());
        }
        let must_free = layout::MINIMUM_FREE - free;
        let mut index = self.lock_index();
        let mut freed = 0;
        let mut victims = Vec::new();
        for (key, _) in index.victims() {
            if freed >= must_free {
                break;
            }
            if let Some(file) = index.files.get(&key) {
                freed += file.blocks.lock().present_bytes();
                victims.push(key);
            }
        }
        for key in &victims {
            self.evict_locked(&mut index, *key);
        }
        drop(index);
        if victims.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            dir = %self.config.dir.display(),
            free,
            evicted_files = victims.len(),
            "the cache's file system is short of free space; gave back the coldest files"
        );
        self.lock_damage().evicted_for_space += victims.len() as u64;
        Ok(())
    }

    fn lock_damage(&self) -> MutexGuard<'_, Damage> {
        self.damage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn data_path(&self, key: ContentKey, generation: u64) -> PathBuf {
        layout::data_path(&self.data_dir, key, generation)
    }

    fn lock_index(&self) -> IndexGuard<'_> {
        IndexGuard::new(self.index.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock_external(&self) -> MutexGuard<'_, HashMap<String, Arc<AtomicU64>>> {
        self.external_journals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// The journals already in `meta/`, at their size on disk: they take space whether or not a
/// volume has them open.
fn existing_journals(dir: &Path) -> HashMap<String, Arc<AtomicU64>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let size = entry.metadata().ok()?.len();
            let name = entry.file_name().into_string().ok()?;
            Some((name, Arc::new(AtomicU64::new(size))))
        })
        .collect()
}

#[cfg(test)]
mod tests;
