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
//! One cache serves every volume of a node. Each entry is attributed to the volume that admitted
//! it (an [`OwnerTag`], persisted in the index), and a volume may be held to a [`Quota`] inside
//! the node-wide capacity: a volume over its quota evicts among its own files, and the node
//! over its capacity evicts among everyone's, with the same scan-resistant policy. Volumes over
//! the same source share cached bytes (content keys name the source and the file version, not
//! the volume): the first volume to admit a file owns it and is charged for it; another volume
//! reading it is served from it for free. When the owner goes away (unmounted), the next volume
//! that opens the file adopts it if it fits in that volume's quota. A [`Cache`] value is one
//! owner's view of the shared cache ([`Cache::for_owner`]); the one [`Cache::open`] returns is
//! the default owner, with no quota but the capacity (`reservoir mount`).

mod layout;
pub mod policy;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::journal::{Journal, JournalError};
use policy::{EvictionOrder, Priority, Rank, Sketch};

pub use layout::CacheLock;

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
    #[error("cache directory {dir}: {what}: {cause}")]
    Io {
        dir: PathBuf,
        what: String,
        cause: std::io::Error,
    },
    #[error(
        "cache directory {dir}: its file system has only {free} bytes free; at least {needed} are needed"
    )]
    Full {
        dir: PathBuf,
        free: u64,
        needed: u64,
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

/// Who admitted a cache entry: a hash of the volume's name, persisted with the entry.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OwnerTag(pub u64);

impl OwnerTag {
    /// The cache's own owner: a `reservoir mount`, and entries written before owners existed.
    pub const DEFAULT: OwnerTag = OwnerTag(0);

    /// The tag of the owner called `name` (a volume id).
    pub fn of(name: &str) -> OwnerTag {
        match xxh3_64(name.as_bytes()) {
            0 => OwnerTag(1),
            hash => OwnerTag(hash),
        }
    }
}

impl fmt::Display for OwnerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for OwnerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerTag({self})")
    }
}

/// How much of the node's cache one owner (a volume) may hold: its files' disk budgets, not
/// counting the shared overhead (directories, index, metadata journals).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub bytes: u64,
    /// Fraction of `bytes` at which the owner's own files start being evicted.
    pub high_watermark: f64,
    /// Fraction of `bytes` down to which they are evicted.
    pub low_watermark: f64,
}

impl Quota {
    fn high(&self) -> u64 {
        (self.bytes as f64 * self.high_watermark) as u64
    }

    fn low(&self) -> u64 {
        (self.bytes as f64 * self.low_watermark) as u64
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
        if !(4096..=64 << 20).contains(&self.block_size) || !self.block_size.is_power_of_two() {
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

/// Persistent index records.
#[derive(Serialize, Deserialize)]
enum IndexRecord {
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
    /// Snapshot form of a whole entry.
    Entry {
        key: ContentKey,
        generation: u64,
        size: u64,
        block_size: u32,
        blocks: Vec<(u32, u64)>,
    },
    // Records of entries with an owner other than the default. New variants go last: postcard
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
    /// The entry now belongs to `owner` (adopted after its owner went away).
    Owned {
        key: ContentKey,
        generation: u64,
        owner: OwnerTag,
    },
}

/// One cached version of a file.
struct Entry {
    generation: u64,
    size: u64,
    block_size: u32,
    /// Checksum of each block; `None` where the block is not cached.
    checksums: Box<[Option<u64>]>,
    present: u32,
    /// Blocks whose bytes were checked (or written) by this process. Bytes written by an earlier
    /// process are verified before they are first used.
    verified: Box<[bool]>,
    budget: u64,
    rank: Rank,
    owner: OwnerTag,
}

impl Entry {
    fn new(generation: u64, size: u64, block_size: u32, owner: OwnerTag) -> Self {
        let blocks = block_count(size, block_size);
        Entry {
            generation,
            size,
            block_size,
            checksums: vec![None; blocks].into_boxed_slice(),
            present: 0,
            verified: vec![false; blocks].into_boxed_slice(),
            budget: budget(size),
            rank: Rank {
                frequency: 0,
                last_access: 0,
            },
            owner,
        }
    }

    fn is_complete(&self) -> bool {
        self.present as usize == self.checksums.len()
    }

    fn block_len(&self, block: u32) -> usize {
        let start = u64::from(block) * u64::from(self.block_size);
        (self.size - start).min(u64::from(self.block_size)) as usize
    }

    /// Bytes of file data present.
    fn data_bytes(&self) -> u64 {
        self.checksums
            .iter()
            .enumerate()
            .filter(|(_, sum)| sum.is_some())
            .map(|(b, _)| self.block_len(b as u32) as u64)
            .sum()
    }
}

/// An entry from its snapshot record.
fn snapshot_entry(
    generation: u64,
    size: u64,
    block_size: u32,
    blocks: Vec<(u32, u64)>,
    owner: OwnerTag,
) -> Entry {
    let mut entry = Entry::new(generation, size, block_size, owner);
    for (block, checksum) in blocks {
        if let Some(slot) = entry.checksums.get_mut(block as usize) {
            if slot.replace(checksum).is_none() {
                entry.present += 1;
            }
        }
    }
    entry
}

fn block_count(size: u64, block_size: u32) -> usize {
    size.div_ceil(u64::from(block_size)) as usize
}

/// Disk bytes a cached file of `size` may occupy.
fn budget(size: u64) -> u64 {
    size.div_ceil(FS_BLOCK) * FS_BLOCK + PER_FILE_OVERHEAD
}

struct State {
    entries: HashMap<ContentKey, Entry>,
    sketch: Sketch,
    /// Every owner that has entries or a view, with its entries in eviction order.
    owners: HashMap<OwnerTag, OwnerState>,
    /// The clock of eviction ranks (shared by all owners' orders).
    clock: u64,
    /// Sum of the budgets of all entries.
    data_bytes: u64,
    next_generation: u64,
    /// Data files of entries removed under the lock, unlinked once it is released.
    doomed: Vec<PathBuf>,
}

/// The node lock. The data files of entries removed while it is held are unlinked after it is
/// released: one admission may evict thousands of files, and every open waits on this lock.
/// (The paths are never reused: a re-admitted file gets a new generation.)
struct StateGuard<'a> {
    state: Option<MutexGuard<'a, State>>,
}

impl Deref for StateGuard<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        self.state.as_deref().expect("held until dropped")
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.state.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        let doomed = std::mem::take(&mut state.doomed);
        drop(state);
        for path in doomed {
            // Unlink, never truncate: a reader holding the file (passthrough) keeps its bytes.
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove evicted cache file");
                }
            }
        }
    }
}

/// One owner's share of the cache.
#[derive(Default)]
struct OwnerState {
    /// The name given by the live view(s); `None` for entries whose owner is not mounted.
    name: Option<String>,
    quota: Option<Quota>,
    /// Live views ([`Cache::for_owner`]); the owner's files may be adopted by others at 0.
    views: usize,
    /// Sum of the budgets of the owner's entries.
    used: u64,
    files: u64,
    order: EvictionOrder,
    admitted: u64,
    rejected: u64,
    evicted_files: u64,
    evicted_bytes: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn owner_mut(&mut self, owner: OwnerTag) -> &mut OwnerState {
        self.owners.entry(owner).or_default()
    }

    /// Adds an entry to its owner's books (not to `entries`).
    fn charge(&mut self, key: ContentKey, owner: OwnerTag, budget: u64, rank: Rank) {
        let state = self.owner_mut(owner);
        state.used += budget;
        state.files += 1;
        state.order.insert(key, rank);
    }

    /// Removes an entry from its owner's books.
    fn discharge(&mut self, key: ContentKey, owner: OwnerTag, budget: u64, rank: Rank) {
        if let Some(state) = self.owners.get_mut(&owner) {
            state.used -= budget;
            state.files -= 1;
            state.order.remove(key, rank);
            if state.files == 0 && state.views == 0 && owner != OwnerTag::DEFAULT {
                self.owners.remove(&owner);
            }
        }
    }

    fn rerank(&mut self, key: ContentKey, rank: Rank) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let old = std::mem::replace(&mut entry.rank, rank);
        if let Some(owner) = self.owners.get_mut(&entry.owner) {
            owner.order.remove(key, old);
            owner.order.insert(key, rank);
        }
    }

    /// Residents of every owner, from the first to be evicted to the last (a merge of the
    /// owners' orders, which are few).
    fn victims(&self) -> impl Iterator<Item = (ContentKey, Rank)> + '_ {
        let mut heads: Vec<_> = self
            .owners
            .values()
            .map(|o| o.order.victims().peekable())
            .collect();
        std::iter::from_fn(move || {
            let best = heads
                .iter_mut()
                .enumerate()
                .filter_map(|(i, it)| {
                    it.peek()
                        .map(|(key, rank)| ((rank.frequency, rank.last_access, *key), i))
                })
                .min()?
                .1;
            heads[best].next()
        })
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
}

/// One owner's part of the cache, for status reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OwnerUsage {
    /// The volume's name; `None` for files whose volume is not mounted.
    pub name: Option<String>,
    pub tag: String,
    /// The owner's quota in bytes (`None`: only the node's capacity bounds it).
    pub quota: Option<u64>,
    /// Disk budgets of the owner's files (what counts against the quota).
    pub used: u64,
    /// Bytes of the owner's file data present.
    pub data_bytes: u64,
    pub files: u64,
    pub complete_files: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub evicted_files: u64,
    pub evicted_bytes: u64,
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
    /// The part of the owner whose view reported this (volumes of a daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerUsage>,
}

/// What a caller holds while it uses one cached file: the entry's generation and an open
/// descriptor of its data file. A file just admitted has no data file until its first block
/// is stored: creating one costs an inode, which a cold open should not wait for.
pub struct Lease {
    pub key: ContentKey,
    generation: u64,
    pub size: u64,
    pub block_size: u32,
    /// Every block was cached when the lease was taken.
    pub complete: bool,
    /// ... and every block had been verified by this process.
    pub verified: bool,
    file: OnceLock<File>,
}

/// What a lease records about its entry, read under the lock.
struct LeaseInfo {
    generation: u64,
    block_size: u32,
    complete: bool,
    verified: bool,
}

impl LeaseInfo {
    fn of(entry: &Entry) -> Self {
        LeaseInfo {
            generation: entry.generation,
            block_size: entry.block_size,
            complete: entry.is_complete(),
            verified: entry.verified.iter().all(|v| *v),
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
            file: file.map(OnceLock::from).unwrap_or_default(),
        }
    }
}

impl Lease {
    pub fn block_count(&self) -> u32 {
        block_count(self.size, self.block_size) as u32
    }

    /// The byte range of `block`.
    pub fn block_range(&self, block: u32) -> (u64, usize) {
        let start = u64::from(block) * u64::from(self.block_size);
        let len = (self.size - start).min(u64::from(self.block_size)) as usize;
        (start, len)
    }

    /// The data file, for FUSE passthrough. Only meaningful once the file is complete and
    /// verified ([`Cache::prepare_passthrough`]).
    pub fn data_file(&self) -> Option<&File> {
        self.file.get()
    }
}

/// One owner's view of the node's cache. Views made by [`Cache::for_owner`] share everything
/// with the one [`Cache::open`] returned; what they admit is attributed to their owner.
pub struct Cache {
    node: Arc<Node>,
    owner: OwnerTag,
    /// Names (under `meta/`) of the journals opened through this view.
    journals: Mutex<Vec<String>>,
    /// Remove those journals when the view is dropped (its volume was unmounted for good).
    discard_journals: AtomicBool,
}

/// What all views share.
struct Node {
    config: CacheConfig,
    data_dir: PathBuf,
    _lock: CacheLock,
    state: Mutex<State>,
    journal: Journal<IndexRecord>,
    /// Bytes of the other journals kept in the cache directory (metadata), by file name, for
    /// accounting: open ones count live, the others at their size on disk.
    external_journals: Mutex<HashMap<String, Arc<AtomicU64>>>,
    counters: Counters,
}

impl Cache {
    /// Opens (or creates) the cache directory: takes its lock, checks the format, replays the
    /// index and removes data files the index does not know. The result is the default
    /// owner's view, bounded by the capacity alone.
    pub fn open(config: CacheConfig) -> Result<Arc<Cache>> {
        config.validate()?;
        let lock = layout::prepare(&config.dir)?;
        let data_dir = config.dir.join(layout::DATA_DIR);
        let (journal, records) =
            Journal::<IndexRecord>::open(&config.dir.join(layout::INDEX_FILE))?;

        let mut entries: HashMap<ContentKey, Entry> = HashMap::new();
        for record in records {
            replay(&mut entries, record);
        }
        let next_generation = entries
            .values()
            .map(|e| e.generation + 1)
            .max()
            .unwrap_or(1);
        reconcile_with_disk(&data_dir, &mut entries)?;

        let mut state = State {
            entries: HashMap::new(),
            sketch: Sketch::new(18),
            owners: HashMap::new(),
            clock: 0,
            data_bytes: 0,
            next_generation,
            doomed: Vec::new(),
        };
        state.owner_mut(OwnerTag::DEFAULT);
        for (key, mut entry) in entries {
            entry.rank.last_access = state.tick();
            state.charge(key, entry.owner, entry.budget, entry.rank);
            state.data_bytes += entry.budget;
            state.entries.insert(key, entry);
        }
        let (files, data_bytes) = (state.entries.len(), state.data_bytes);
        let external = existing_journals(&config.dir.join(layout::METADATA_DIR));
        let node = Node {
            data_dir,
            _lock: lock,
            state: Mutex::new(state),
            journal,
            external_journals: Mutex::new(external),
            counters: Counters::default(),
            config,
        };
        node.rewrite_index(&node.lock_state())?;
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
            let mut state = self.node.lock_state();
            let entry = state.owner_mut(owner);
            entry.name = Some(name.to_string());
            entry.quota = quota;
            entry.views += 1;
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
            .count_access_locked(&mut self.node.lock_state(), key);
    }

    /// Returns a lease on the cached copy of `key`, admitting it if it is not cached and the
    /// policy lets it in; an [`Priority::Access`] also counts as a use of the file. `None`
    /// means: serve this file straight from the source.
    pub fn lease(&self, key: ContentKey, size: u64, priority: Priority) -> Result<Option<Lease>> {
        let node = &*self.node;
        let known = {
            let mut state = node.lock_state();
            if priority == Priority::Access {
                node.count_access_locked(&mut state, key);
            }
            match state.entries.get(&key) {
                Some(entry) if entry.size == size => {
                    let info = LeaseInfo::of(entry);
                    self.adopt_locked(&mut state, key);
                    Some(info)
                }
                Some(_) => {
                    // Same identity and version but another size: not something a source
                    // does; drop what is cached.
                    node.evict_locked(&mut state, key);
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
                    let state = node.lock_state();
                    let current = state
                        .entries
                        .get(&key)
                        .is_some_and(|entry| entry.generation == info.generation);
                    if current {
                        return Ok(Some(info.lease(key, size, None)));
                    }
                }
                Err(cause) => {
                    return Err(CacheError::Io {
                        dir: node.config.dir.clone(),
                        what: format!("open {}", path.display()),
                        cause,
                    });
                }
            }
        }
        self.admit(key, size, priority)
    }

    /// Takes over a file whose owner has no live view (its volume was unmounted), if it fits
    /// in this owner's quota. A file whose owner is mounted stays with it: the first admitter
    /// is charged, and others read it for free.
    fn adopt_locked(&self, state: &mut State, key: ContentKey) {
        let Some(entry) = state.entries.get(&key) else {
            return;
        };
        let (from, budget, rank, generation) =
            (entry.owner, entry.budget, entry.rank, entry.generation);
        if from == self.owner || state.owners.get(&from).is_some_and(|o| o.views > 0) {
            return;
        }
        let to = state.owner_mut(self.owner);
        if to.quota.is_some_and(|q| to.used + budget > q.high()) {
            return;
        }
        state.discharge(key, from, budget, rank);
        state.charge(key, self.owner, budget, rank);
        if let Some(entry) = state.entries.get_mut(&key) {
            entry.owner = self.owner;
        }
        if let Err(e) = self.node.journal.append(&IndexRecord::Owned {
            key,
            generation,
            owner: self.owner,
        }) {
            tracing::warn!(error = %e, "cannot record a change of owner");
        }
    }

    /// Admits a file that is not cached. Its data file is created with the first block
    /// stored ([`Cache::store_block`]).
    fn admit(&self, key: ContentKey, size: u64, priority: Priority) -> Result<Option<Lease>> {
        let node = &*self.node;
        let info = {
            let mut state = node.lock_state();
            if state.entries.contains_key(&key) {
                // Admitted by a concurrent open: this one reads from the source.
                return Ok(None);
            }
            if !self.admit_locked(&mut state, key, size, priority) {
                node.counters.rejected.fetch_add(1, Ordering::Relaxed);
                state.owner_mut(self.owner).rejected += 1;
                return Ok(None);
            }
            let generation = state.next_generation;
            state.next_generation += 1;
            let block_size = node.config.block_size;
            let mut entry = Entry::new(generation, size, block_size, self.owner);
            entry.rank = Rank {
                frequency: state.sketch.estimate(key),
                last_access: state.tick(),
            };
            let record = if self.owner == OwnerTag::DEFAULT {
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
                    owner: self.owner,
                }
            };
            node.journal.append(&record)?;
            let info = LeaseInfo::of(&entry);
            state.data_bytes += entry.budget;
            state.charge(key, self.owner, entry.budget, entry.rank);
            state.owner_mut(self.owner).admitted += 1;
            state.entries.insert(key, entry);
            node.counters.admitted.fetch_add(1, Ordering::Relaxed);
            info
        };
        Ok(Some(info.lease(key, size, None)))
    }

    /// The lease's data file; with `create`, created (empty and sparse) if it does not exist
    /// yet. `None` when it does not exist (and not `create`) or the entry was evicted.
    ///
    /// Created outside the node lock: creating an inode can take a millisecond (ext4 without a
    /// journal scans past every recently deleted inode), and concurrent cold reads must not
    /// queue behind it.
    fn data_file<'a>(&self, lease: &'a Lease, create: bool) -> Result<Option<&'a File>> {
        if let Some(file) = lease.file.get() {
            return Ok(Some(file));
        }
        let node = &*self.node;
        let path = node.data_path(lease.key, lease.generation);
        let existing = || File::options().read(true).write(true).open(&path);
        let opened = if create {
            // Two stores of one entry may race here: the second opens what the first created.
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => existing(),
                other => other.and_then(|file| file.set_len(lease.size).map(|()| file)),
            }
        } else {
            match existing() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                other => other,
            }
        };
        let state = node.lock_state();
        let current = state
            .entries
            .get(&lease.key)
            .is_some_and(|entry| entry.generation == lease.generation);
        if !current {
            drop(state);
            if create {
                // Evicted before the file existed, so nobody else removes it.
                let _ = std::fs::remove_file(&path);
            }
            return Ok(None);
        }
        drop(state);
        let file = opened.map_err(|cause| CacheError::Io {
            dir: node.config.dir.clone(),
            what: format!("open {}", path.display()),
            cause,
        })?;
        Ok(Some(lease.file.get_or_init(|| file)))
    }

    /// Decides whether a file of `size` gets in, evicting what must go to make room: first
    /// among the owner's own files if it would go over its quota, then among everyone's if the
    /// node would go over its capacity. Nothing is evicted unless both limits can be met.
    fn admit_locked(
        &self,
        state: &mut State,
        key: ContentKey,
        size: u64,
        priority: Priority,
    ) -> bool {
        let node = &*self.node;
        let need = budget(size);
        let candidate = state.sketch.estimate(key);
        let mut victims = Vec::new();

        // The owner's quota.
        let mut freed_by_owner = 0u64;
        state.owner_mut(self.owner);
        let owner = &state.owners[&self.owner];
        if let Some(quota) = owner.quota {
            if need > quota.low() {
                return false;
            }
            if owner.used + need > quota.high() {
                let must_free = owner.used + need - quota.high();
                let would_free = if policy::frees_down_to_low(priority) {
                    owner.used + need - quota.low()
                } else {
                    must_free
                };
                for (victim, rank) in owner.order.victims() {
                    if freed_by_owner >= would_free || !policy::displaces(priority, candidate, rank)
                    {
                        break;
                    }
                    if let Some(entry) = state.entries.get(&victim) {
                        freed_by_owner += entry.budget;
                        victims.push(victim);
                    }
                }
                if freed_by_owner < must_free {
                    return false;
                }
            }
        }

        // The node's capacity.
        let capacity = node.config.capacity;
        let high = (capacity as f64 * node.config.high_watermark) as u64;
        let low = (capacity as f64 * node.config.low_watermark) as u64;
        let overhead = node.overhead_bytes();
        if overhead + need > low {
            return false;
        }
        let used = overhead + state.data_bytes - freed_by_owner;
        if used + need > high {
            let must_free = used + need - high;
            let would_free = if policy::frees_down_to_low(priority) {
                used + need - low
            } else {
                must_free
            };
            let chosen: HashSet<ContentKey> = victims.iter().copied().collect();
            let mut freed = 0u64;
            for (victim, rank) in state.victims() {
                if chosen.contains(&victim) {
                    continue;
                }
                if freed >= would_free || !policy::displaces(priority, candidate, rank) {
                    break;
                }
                if let Some(entry) = state.entries.get(&victim) {
                    freed += entry.budget;
                    victims.push(victim);
                }
            }
            if freed < must_free {
                return false;
            }
        }
        for victim in victims {
            node.evict_locked(state, victim);
        }
        true
    }

    /// Drops a cached file (its source version changed).
    pub fn forget(&self, key: ContentKey) {
        let mut state = self.node.lock_state();
        self.node.evict_locked(&mut state, key);
    }

    /// Reads `[offset, offset + len)` (clipped to the file) from the cache if every block it
    /// touches is present, verifying blocks written by an earlier process before their first
    /// use. `Ok(None)` means a block is missing (or just failed verification and was dropped).
    pub fn read(&self, lease: &Lease, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let end = (offset + len as u64).min(lease.size);
        if offset >= end {
            return Ok(Some(Vec::new()));
        }
        let first = (offset / u64::from(lease.block_size)) as u32;
        let last = ((end - 1) / u64::from(lease.block_size)) as u32;
        let mut unverified = Vec::new();
        {
            let state = self.node.lock_state();
            let Some(entry) = state.entries.get(&lease.key) else {
                return Ok(None);
            };
            if entry.generation != lease.generation {
                return Ok(None);
            }
            for block in first..=last {
                match entry.checksums[block as usize] {
                    None => return Ok(None),
                    Some(sum) if !entry.verified[block as usize] => unverified.push((block, sum)),
                    Some(_) => {}
                }
            }
        }
        for (block, checksum) in unverified {
            if !self.verify_block(lease, block, checksum)? {
                return Ok(None);
            }
        }
        let Some(file) = self.data_file(lease, false)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; (end - offset) as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|cause| CacheError::Io {
                dir: self.node.config.dir.clone(),
                what: format!("read cached file {}", lease.key),
                cause,
            })?;
        Ok(Some(buf))
    }

    /// Checks one block against its checksum; a mismatch drops the block so that it is
    /// fetched again.
    fn verify_block(&self, lease: &Lease, block: u32, checksum: u64) -> Result<bool> {
        let node = &*self.node;
        let (start, len) = lease.block_range(block);
        let mut buf = vec![0u8; len];
        let Some(file) = self.data_file(lease, false)? else {
            return Ok(false);
        };
        let intact = match file.read_exact_at(&mut buf, start) {
            Ok(()) => xxh3_64(&buf) == checksum,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(cause) => {
                return Err(CacheError::Io {
                    dir: node.config.dir.clone(),
                    what: format!("read cached file {}", lease.key),
                    cause,
                });
            }
        };
        let mut state = node.lock_state();
        let Some(entry) = state.entries.get_mut(&lease.key) else {
            return Ok(false);
        };
        if entry.generation != lease.generation {
            return Ok(false);
        }
        if intact {
            entry.verified[block as usize] = true;
            return Ok(true);
        }
        // Concurrent readers of one block verify it in parallel: only the first to see the
        // mismatch drops and counts it; a block stored again since then is the good copy.
        if entry.checksums[block as usize].is_none() {
            return Ok(false);
        }
        if entry.verified[block as usize] {
            return Ok(true);
        }
        tracing::warn!(key = %lease.key, block, "cached block failed its checksum; fetching it again");
        node.counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        if entry.checksums[block as usize].take().is_some() {
            entry.present -= 1;
        }
        node.journal.append(&IndexRecord::Dropped {
            key: lease.key,
            generation: lease.generation,
            block,
        })?;
        Ok(false)
    }

    /// Blocks in `first..=last` that are not cached.
    pub fn missing_blocks(&self, lease: &Lease, first: u32, last: u32) -> Vec<u32> {
        let state = self.node.lock_state();
        match state.entries.get(&lease.key) {
            Some(entry) if entry.generation == lease.generation => (first..=last)
                .filter(|&b| {
                    entry
                        .checksums
                        .get(b as usize)
                        .is_some_and(|sum| sum.is_none())
                })
                .collect(),
            // Evicted meanwhile: nothing more will be stored under this lease.
            _ => Vec::new(),
        }
    }

    /// Stores one fetched block. `data` must be the whole block (shorter only for the last).
    /// Returns false when the block was not stored (the entry was evicted meanwhile, or it was
    /// already present).
    pub fn store_block(&self, lease: &Lease, block: u32, data: &[u8]) -> Result<bool> {
        let node = &*self.node;
        let (start, len) = lease.block_range(block);
        if data.len() != len {
            return Err(CacheError::Io {
                dir: node.config.dir.clone(),
                what: format!(
                    "store block {block} of {}: got {} bytes, expected {len} (the source file changed while it was read?)",
                    lease.key,
                    data.len()
                ),
                cause: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        if !self.is_missing(lease, block) {
            return Ok(false);
        }
        let Some(file) = self.data_file(lease, true)? else {
            return Ok(false);
        };
        file.write_all_at(data, start)
            .map_err(|cause| CacheError::Io {
                dir: node.config.dir.clone(),
                what: format!("write cached file {}", lease.key),
                cause,
            })?;
        let checksum = xxh3_64(data);
        let mut state = node.lock_state();
        let Some(entry) = state.entries.get_mut(&lease.key) else {
            return Ok(false);
        };
        if entry.generation != lease.generation || entry.checksums[block as usize].is_some() {
            return Ok(false);
        }
        entry.checksums[block as usize] = Some(checksum);
        entry.verified[block as usize] = true;
        entry.present += 1;
        node.journal.append(&IndexRecord::Stored {
            key: lease.key,
            generation: lease.generation,
            block,
            checksum,
        })?;
        node.counters
            .bytes_stored
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if node.journal.wants_rewrite() {
            node.rewrite_index(&state)?;
        }
        Ok(true)
    }

    fn is_missing(&self, lease: &Lease, block: u32) -> bool {
        let state = self.node.lock_state();
        state.entries.get(&lease.key).is_some_and(|entry| {
            entry.generation == lease.generation
                && entry
                    .checksums
                    .get(block as usize)
                    .is_some_and(|sum| sum.is_none())
        })
    }

    pub fn is_complete(&self, lease: &Lease) -> bool {
        let state = self.node.lock_state();
        state
            .entries
            .get(&lease.key)
            .is_some_and(|e| e.generation == lease.generation && e.is_complete())
    }

    /// True when the file is complete and every block has been verified by this process, so
    /// that the kernel may read the data file directly. Verifies what needs it (reads the
    /// blocks written by an earlier process: call off the request threads for big files).
    pub fn prepare_passthrough(&self, lease: &Lease) -> Result<bool> {
        let pending: Vec<(u32, u64)> = {
            let state = self.node.lock_state();
            let Some(entry) = state.entries.get(&lease.key) else {
                return Ok(false);
            };
            if entry.generation != lease.generation || !entry.is_complete() {
                return Ok(false);
            }
            entry
                .checksums
                .iter()
                .zip(entry.verified.iter())
                .enumerate()
                .filter(|(_, (_, verified))| !**verified)
                .filter_map(|(block, (sum, _))| sum.map(|sum| (block as u32, sum)))
                .collect()
        };
        for (block, checksum) in pending {
            if !self.verify_block(lease, block, checksum)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether `key` is cached completely (without taking a lease).
    pub fn contains_complete(&self, key: ContentKey, size: u64) -> bool {
        let state = self.node.lock_state();
        state
            .entries
            .get(&key)
            .is_some_and(|e| e.size == size && e.is_complete())
    }

    /// Writes buffered index records out (and to stable storage with `sync`).
    pub fn flush(&self, sync: bool) -> Result<()> {
        self.node.journal.flush(sync)?;
        Ok(())
    }

    /// The node's use of the cache, and this view's owner's part of it.
    pub fn usage(&self) -> Usage {
        let node = &*self.node;
        let state = node.lock_state();
        let metadata_bytes: u64 = node
            .lock_external()
            .values()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        let data_bytes = state.entries.values().map(Entry::data_bytes).sum();
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let owner = (self.owner != OwnerTag::DEFAULT)
            .then(|| owner_usage(&state, self.owner))
            .flatten();
        Usage {
            dir: node.config.dir.clone(),
            capacity: node.config.capacity,
            used: node.overhead_bytes() + state.data_bytes,
            data_bytes,
            index_bytes: node.journal.bytes(),
            metadata_bytes,
            files: state.entries.len() as u64,
            complete_files: state.entries.values().filter(|e| e.is_complete()).count() as u64,
            admitted: counter(&node.counters.admitted),
            rejected: counter(&node.counters.rejected),
            evicted_files: counter(&node.counters.evicted_files),
            evicted_bytes: counter(&node.counters.evicted_bytes),
            verify_failures: counter(&node.counters.verify_failures),
            owner,
        }
    }

    /// Every owner's part of the cache (volumes, unmounted volumes' files, the default owner
    /// when it has files), largest first.
    pub fn owners(&self) -> Vec<OwnerUsage> {
        let state = self.node.lock_state();
        let mut owners: Vec<OwnerUsage> = state
            .owners
            .iter()
            .filter(|(tag, o)| **tag != OwnerTag::DEFAULT || o.files > 0)
            .filter_map(|(tag, _)| owner_usage(&state, *tag))
            .collect();
        owners.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.tag.cmp(&b.tag)));
        owners
    }

    fn lock_state(&self) -> StateGuard<'_> {
        self.node.lock_state()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if self.owner != OwnerTag::DEFAULT {
            let mut state = self.lock_state();
            let mut gone = false;
            if let Some(owner) = state.owners.get_mut(&self.owner) {
                owner.views = owner.views.saturating_sub(1);
                if owner.views == 0 {
                    owner.name = None;
                    owner.quota = None;
                    gone = owner.files == 0;
                }
            }
            if gone {
                state.owners.remove(&self.owner);
            }
        }
        if self.discard_journals.load(Ordering::Relaxed) {
            let journals =
                std::mem::take(self.journals.get_mut().unwrap_or_else(|p| p.into_inner()));
            let dir = self.node.config.dir.join(layout::METADATA_DIR);
            let mut external = self.node.lock_external();
            for name in journals {
                external.remove(&name);
                if let Err(e) = std::fs::remove_file(dir.join(&name)) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(journal = name, error = %e, "cannot remove a volume's metadata journal");
                    }
                }
            }
        }
    }
}

impl Node {
    /// Counts an access: at open, because passthrough reads never reach the daemon.
    fn count_access_locked(&self, state: &mut State, key: ContentKey) {
        let aged = state.sketch.increment(key);
        if aged {
            for owner in state.owners.values_mut() {
                owner.order.clear();
            }
            let State {
                entries, owners, ..
            } = state;
            for (key, entry) in entries.iter_mut() {
                entry.rank.frequency /= 2;
                if let Some(owner) = owners.get_mut(&entry.owner) {
                    owner.order.insert(*key, entry.rank);
                }
            }
        }
        let frequency = state.sketch.estimate(key);
        if state.entries.contains_key(&key) {
            let last_access = state.tick();
            state.rerank(
                key,
                Rank {
                    frequency,
                    last_access,
                },
            );
        }
    }

    fn evict_locked(&self, state: &mut State, key: ContentKey) {
        let Some(entry) = self.remove_locked(state, key) else {
            return;
        };
        if let Some(owner) = state.owners.get_mut(&entry.owner) {
            owner.evicted_files += 1;
            owner.evicted_bytes += entry.budget;
        }
        self.counters.evicted_files.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(entry.budget, Ordering::Relaxed);
    }

    /// Drops an entry and its charge, records that in the index, and dooms its data file
    /// (unlinked when the lock is released).
    fn remove_locked(&self, state: &mut State, key: ContentKey) -> Option<Entry> {
        let entry = state.entries.remove(&key)?;
        state.discharge(key, entry.owner, entry.budget, entry.rank);
        state.data_bytes -= entry.budget;
        state.doomed.push(self.data_path(key, entry.generation));
        if let Err(e) = self.journal.append(&IndexRecord::Evicted {
            key,
            generation: entry.generation,
        }) {
            tracing::warn!(error = %e, "cannot record eviction");
        }
        Some(entry)
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

    fn rewrite_index(&self, state: &State) -> Result<()> {
        let records = state.entries.iter().map(|(key, entry)| {
            let blocks = entry
                .checksums
                .iter()
                .enumerate()
                .filter_map(|(b, sum)| sum.map(|sum| (b as u32, sum)))
                .collect();
            if entry.owner == OwnerTag::DEFAULT {
                IndexRecord::Entry {
                    key: *key,
                    generation: entry.generation,
                    size: entry.size,
                    block_size: entry.block_size,
                    blocks,
                }
            } else {
                IndexRecord::EntryOf {
                    key: *key,
                    generation: entry.generation,
                    size: entry.size,
                    block_size: entry.block_size,
                    blocks,
                    owner: entry.owner,
                }
            }
        });
        self.journal.rewrite(records)?;
        Ok(())
    }

    fn data_path(&self, key: ContentKey, generation: u64) -> PathBuf {
        layout::data_path(&self.data_dir, key, generation)
    }

    fn lock_state(&self) -> StateGuard<'_> {
        StateGuard {
            state: Some(self.state.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    fn lock_external(&self) -> MutexGuard<'_, HashMap<String, Arc<AtomicU64>>> {
        self.external_journals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn owner_usage(state: &State, tag: OwnerTag) -> Option<OwnerUsage> {
    let owner = state.owners.get(&tag)?;
    let mine = || state.entries.values().filter(|e| e.owner == tag);
    Some(OwnerUsage {
        name: owner.name.clone(),
        tag: tag.to_string(),
        quota: owner.quota.map(|q| q.bytes),
        used: owner.used,
        data_bytes: mine().map(Entry::data_bytes).sum(),
        files: owner.files,
        complete_files: mine().filter(|e| e.is_complete()).count() as u64,
        admitted: owner.admitted,
        rejected: owner.rejected,
        evicted_files: owner.evicted_files,
        evicted_bytes: owner.evicted_bytes,
    })
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

fn replay(entries: &mut HashMap<ContentKey, Entry>, record: IndexRecord) {
    let matches = |entry: &Entry, generation: u64| entry.generation == generation;
    match record {
        IndexRecord::Admitted {
            key,
            generation,
            size,
            block_size,
        } => {
            entries.insert(
                key,
                Entry::new(generation, size, block_size, OwnerTag::DEFAULT),
            );
        }
        IndexRecord::AdmittedBy {
            key,
            generation,
            size,
            block_size,
            owner,
        } => {
            entries.insert(key, Entry::new(generation, size, block_size, owner));
        }
        IndexRecord::Entry {
            key,
            generation,
            size,
            block_size,
            blocks,
        } => {
            let entry = snapshot_entry(generation, size, block_size, blocks, OwnerTag::DEFAULT);
            entries.insert(key, entry);
        }
        IndexRecord::EntryOf {
            key,
            generation,
            size,
            block_size,
            blocks,
            owner,
        } => {
            let entry = snapshot_entry(generation, size, block_size, blocks, owner);
            entries.insert(key, entry);
        }
        IndexRecord::Owned {
            key,
            generation,
            owner,
        } => {
            if let Some(entry) = entries.get_mut(&key).filter(|e| matches(e, generation)) {
                entry.owner = owner;
            }
        }
        IndexRecord::Stored {
            key,
            generation,
            block,
            checksum,
        } => {
            if let Some(entry) = entries.get_mut(&key).filter(|e| matches(e, generation)) {
                if let Some(slot) = entry.checksums.get_mut(block as usize) {
                    if slot.replace(checksum).is_none() {
                        entry.present += 1;
                    }
                }
            }
        }
        IndexRecord::Dropped {
            key,
            generation,
            block,
        } => {
            if let Some(entry) = entries.get_mut(&key).filter(|e| matches(e, generation)) {
                if let Some(slot) = entry.checksums.get_mut(block as usize) {
                    if slot.take().is_some() {
                        entry.present -= 1;
                    }
                }
            }
        }
        IndexRecord::Evicted { key, generation } => {
            if entries.get(&key).is_some_and(|e| matches(e, generation)) {
                entries.remove(&key);
            }
        }
    }
}

/// Removes data files the index does not know (a crash between creating a file and recording
/// it) and index entries whose file is gone.
fn reconcile_with_disk(data_dir: &Path, entries: &mut HashMap<ContentKey, Entry>) -> Result<()> {
    let on_disk = layout::list_data_files(data_dir)?;
    let mut seen = std::collections::HashSet::new();
    for (path, parsed) in on_disk {
        let known = parsed.is_some_and(|(key, generation)| {
            entries
                .get(&key)
                .is_some_and(|e| e.generation == generation)
                && seen.insert(key)
        });
        if !known {
            tracing::debug!(path = %path.display(), "removing cache file the index does not know");
            let _ = std::fs::remove_file(&path);
        }
    }
    entries.retain(|key, _| seen.contains(key));
    Ok(())
}

#[cfg(test)]
mod tests;
