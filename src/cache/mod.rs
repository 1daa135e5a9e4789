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

mod layout;
pub mod policy;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
}

impl Entry {
    fn new(generation: u64, size: u64, block_size: u32) -> Self {
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
        }
    }

    fn is_complete(&self) -> bool {
        self.present as usize == self.checksums.len()
    }

    fn block_len(&self, block: u32) -> usize {
        let start = u64::from(block) * u64::from(self.block_size);
        (self.size - start).min(u64::from(self.block_size)) as usize
    }
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
    order: EvictionOrder,
    /// Sum of the budgets of all entries.
    data_bytes: u64,
    next_generation: u64,
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
}

/// What a caller holds while it uses one cached file: the entry's generation and an open
/// descriptor of its data file.
pub struct Lease {
    pub key: ContentKey,
    generation: u64,
    pub size: u64,
    pub block_size: u32,
    /// Every block was cached when the lease was taken.
    pub complete: bool,
    /// ... and every block had been verified by this process.
    pub verified: bool,
    file: File,
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

    fn lease(self, key: ContentKey, size: u64, file: File) -> Lease {
        Lease {
            key,
            generation: self.generation,
            size,
            block_size: self.block_size,
            complete: self.complete,
            verified: self.verified,
            file,
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
    pub fn data_file(&self) -> &File {
        &self.file
    }
}

pub struct Cache {
    config: CacheConfig,
    data_dir: PathBuf,
    _lock: CacheLock,
    state: Mutex<State>,
    journal: Journal<IndexRecord>,
    /// Bytes of other journals kept in the cache directory (metadata), for accounting.
    external_journals: Mutex<Vec<Arc<AtomicU64>>>,
    counters: Counters,
}

impl Cache {
    /// Opens (or creates) the cache directory: takes its lock, checks the format, replays the
    /// index and removes data files the index does not know.
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

        let mut order = EvictionOrder::default();
        for (key, entry) in &mut entries {
            entry.rank.last_access = order.tick();
            order.insert(*key, entry.rank);
        }
        let data_bytes = entries.values().map(|e| e.budget).sum();
        let files = entries.len();
        let cache = Cache {
            data_dir,
            _lock: lock,
            state: Mutex::new(State {
                entries,
                sketch: Sketch::new(18),
                order,
                data_bytes,
                next_generation,
            }),
            journal,
            external_journals: Mutex::new(Vec::new()),
            counters: Counters::default(),
            config,
        };
        cache.rewrite_index(&cache.lock_state())?;
        tracing::debug!(
            dir = %cache.config.dir.display(),
            files,
            used = data_bytes,
            capacity = cache.config.capacity,
            "cache opened"
        );
        Ok(Arc::new(cache))
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Opens a journal kept in the cache directory (e.g. a volume's metadata), counting its
    /// bytes against the capacity.
    pub fn open_journal<R>(&self, name: &str) -> Result<(Journal<R>, Vec<R>)>
    where
        R: Serialize + serde::de::DeserializeOwned,
    {
        let path = self.config.dir.join(layout::METADATA_DIR).join(name);
        let (journal, records) = Journal::open(&path)?;
        self.lock_external().push(journal.bytes_counter());
        Ok((journal, records))
    }

    /// Counts an access to a file without opening it.
    pub fn record_access(&self, key: ContentKey) {
        self.count_access_locked(&mut self.lock_state(), key);
    }

    /// Counts an access: at open, because passthrough reads never reach the daemon.
    fn count_access_locked(&self, state: &mut State, key: ContentKey) {
        let aged = state.sketch.increment(key);
        if aged {
            state.order.clear();
            for (key, entry) in &mut state.entries {
                entry.rank.frequency /= 2;
                state.order.insert(*key, entry.rank);
            }
        }
        let frequency = state.sketch.estimate(key);
        let tick = state.order.tick();
        if let Some(entry) = state.entries.get_mut(&key) {
            state.order.remove(key, entry.rank);
            entry.rank = Rank {
                frequency,
                last_access: tick,
            };
            state.order.insert(key, entry.rank);
        }
    }

    /// Returns a lease on the cached copy of `key`, admitting it if it is not cached and the
    /// policy lets it in; an [`Priority::Access`] also counts as a use of the file. `None`
    /// means: serve this file straight from the source.
    pub fn lease(&self, key: ContentKey, size: u64, priority: Priority) -> Result<Option<Lease>> {
        let known = {
            let mut state = self.lock_state();
            if priority == Priority::Access {
                self.count_access_locked(&mut state, key);
            }
            match state.entries.get(&key) {
                Some(entry) if entry.size == size => Some(LeaseInfo::of(entry)),
                Some(_) => {
                    // Same identity and version but another size: not something a source
                    // does; drop what is cached.
                    self.evict_locked(&mut state, key);
                    None
                }
                None => None,
            }
        };
        if let Some(info) = known {
            // Opened outside the lock: the path lookup may wait on the disk.
            let path = self.data_path(key, info.generation);
            match File::options().read(true).write(true).open(&path) {
                Ok(file) => return Ok(Some(info.lease(key, size, file))),
                // Evicted meanwhile: admit it again below.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(cause) => {
                    return Err(CacheError::Io {
                        dir: self.config.dir.clone(),
                        what: format!("open {}", path.display()),
                        cause,
                    });
                }
            }
        }
        self.admit(key, size, priority)
    }

    /// Admits a file that is not cached, creating its (empty, sparse) data file.
    fn admit(&self, key: ContentKey, size: u64, priority: Priority) -> Result<Option<Lease>> {
        let mut state = self.lock_state();
        if state.entries.contains_key(&key) {
            // Admitted by a concurrent open: this one reads from the source.
            return Ok(None);
        }
        if !self.admit_locked(&mut state, key, size, priority) {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let generation = state.next_generation;
        state.next_generation += 1;
        let block_size = self.config.block_size;
        let mut entry = Entry::new(generation, size, block_size);
        entry.rank = Rank {
            frequency: state.sketch.estimate(key),
            last_access: state.order.tick(),
        };
        let path = self.data_path(key, generation);
        let created = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|file| file.set_len(size).map(|()| file));
        let file = match created {
            Ok(file) => file,
            Err(cause) => {
                let _ = std::fs::remove_file(&path);
                return Err(CacheError::Io {
                    dir: self.config.dir.clone(),
                    what: format!("create {}", path.display()),
                    cause,
                });
            }
        };
        self.journal.append(&IndexRecord::Admitted {
            key,
            generation,
            size,
            block_size,
        })?;
        let info = LeaseInfo::of(&entry);
        state.data_bytes += entry.budget;
        state.order.insert(key, entry.rank);
        state.entries.insert(key, entry);
        self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(Some(info.lease(key, size, file)))
    }

    /// Decides whether a file of `size` gets in, evicting what must go to make room.
    fn admit_locked(
        &self,
        state: &mut State,
        key: ContentKey,
        size: u64,
        priority: Priority,
    ) -> bool {
        let need = budget(size);
        let capacity = self.config.capacity;
        let high = (capacity as f64 * self.config.high_watermark) as u64;
        let low = (capacity as f64 * self.config.low_watermark) as u64;
        let overhead = self.overhead_bytes();
        if overhead + need > low {
            return false;
        }
        let used = overhead + state.data_bytes;
        if used + need <= high {
            return true;
        }
        let candidate = state.sketch.estimate(key);
        let must_free = used + need - high;
        let would_free = used + need - low;
        let mut victims = Vec::new();
        let mut freed = 0u64;
        for (victim, rank) in state.order.victims() {
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
        for victim in victims {
            self.evict_locked(state, victim);
        }
        true
    }

    fn evict_locked(&self, state: &mut State, key: ContentKey) {
        let Some(entry) = state.entries.remove(&key) else {
            return;
        };
        state.order.remove(key, entry.rank);
        state.data_bytes -= entry.budget;
        let path = self.data_path(key, entry.generation);
        // Unlink, never truncate: a reader holding the file (passthrough) keeps its bytes.
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove evicted cache file");
            }
        }
        if let Err(e) = self.journal.append(&IndexRecord::Evicted {
            key,
            generation: entry.generation,
        }) {
            tracing::warn!(error = %e, "cannot record eviction");
        }
        self.counters.evicted_files.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(entry.budget, Ordering::Relaxed);
    }

    /// Drops a cached file (its source version changed).
    pub fn forget(&self, key: ContentKey) {
        let mut state = self.lock_state();
        self.evict_locked(&mut state, key);
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
            let state = self.lock_state();
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
        let mut buf = vec![0u8; (end - offset) as usize];
        self.read_exact_at(lease, &mut buf, offset)?;
        Ok(Some(buf))
    }

    fn read_exact_at(&self, lease: &Lease, buf: &mut [u8], offset: u64) -> Result<()> {
        lease
            .file
            .read_exact_at(buf, offset)
            .map_err(|cause| CacheError::Io {
                dir: self.config.dir.clone(),
                what: format!("read cached file {}", lease.key),
                cause,
            })
    }

    /// Checks one block against its checksum; a mismatch drops the block so that it is
    /// fetched again.
    fn verify_block(&self, lease: &Lease, block: u32, checksum: u64) -> Result<bool> {
        let (start, len) = lease.block_range(block);
        let mut buf = vec![0u8; len];
        let intact = match lease.file.read_exact_at(&mut buf, start) {
            Ok(()) => xxh3_64(&buf) == checksum,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(cause) => {
                return Err(CacheError::Io {
                    dir: self.config.dir.clone(),
                    what: format!("read cached file {}", lease.key),
                    cause,
                });
            }
        };
        let mut state = self.lock_state();
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
        self.counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        if entry.checksums[block as usize].take().is_some() {
            entry.present -= 1;
        }
        self.journal.append(&IndexRecord::Dropped {
            key: lease.key,
            generation: lease.generation,
            block,
        })?;
        Ok(false)
    }

    /// Blocks in `first..=last` that are not cached.
    pub fn missing_blocks(&self, lease: &Lease, first: u32, last: u32) -> Vec<u32> {
        let state = self.lock_state();
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
        let (start, len) = lease.block_range(block);
        if data.len() != len {
            return Err(CacheError::Io {
                dir: self.config.dir.clone(),
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
        lease
            .file
            .write_all_at(data, start)
            .map_err(|cause| CacheError::Io {
                dir: self.config.dir.clone(),
                what: format!("write cached file {}", lease.key),
                cause,
            })?;
        let checksum = xxh3_64(data);
        let mut state = self.lock_state();
        let Some(entry) = state.entries.get_mut(&lease.key) else {
            return Ok(false);
        };
        if entry.generation != lease.generation || entry.checksums[block as usize].is_some() {
            return Ok(false);
        }
        entry.checksums[block as usize] = Some(checksum);
        entry.verified[block as usize] = true;
        entry.present += 1;
        self.journal.append(&IndexRecord::Stored {
            key: lease.key,
            generation: lease.generation,
            block,
            checksum,
        })?;
        self.counters
            .bytes_stored
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if self.journal.wants_rewrite() {
            self.rewrite_index(&state)?;
        }
        Ok(true)
    }

    fn is_missing(&self, lease: &Lease, block: u32) -> bool {
        let state = self.lock_state();
        state.entries.get(&lease.key).is_some_and(|entry| {
            entry.generation == lease.generation
                && entry
                    .checksums
                    .get(block as usize)
                    .is_some_and(|sum| sum.is_none())
        })
    }

    pub fn is_complete(&self, lease: &Lease) -> bool {
        let state = self.lock_state();
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
            let state = self.lock_state();
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
        let state = self.lock_state();
        state
            .entries
            .get(&key)
            .is_some_and(|e| e.size == size && e.is_complete())
    }

    /// Writes buffered index records out (and to stable storage with `sync`).
    pub fn flush(&self, sync: bool) -> Result<()> {
        self.journal.flush(sync)?;
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        let state = self.lock_state();
        let metadata_bytes: u64 = self
            .lock_external()
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        let data_bytes = state
            .entries
            .values()
            .map(|e| {
                e.checksums
                    .iter()
                    .enumerate()
                    .filter(|(_, sum)| sum.is_some())
                    .map(|(b, _)| e.block_len(b as u32) as u64)
                    .sum::<u64>()
            })
            .sum();
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Usage {
            dir: self.config.dir.clone(),
            capacity: self.config.capacity,
            used: self.overhead_bytes() + state.data_bytes,
            data_bytes,
            index_bytes: self.journal.bytes(),
            metadata_bytes,
            files: state.entries.len() as u64,
            complete_files: state.entries.values().filter(|e| e.is_complete()).count() as u64,
            admitted: counter(&self.counters.admitted),
            rejected: counter(&self.counters.rejected),
            evicted_files: counter(&self.counters.evicted_files),
            evicted_bytes: counter(&self.counters.evicted_bytes),
            verify_failures: counter(&self.counters.verify_failures),
        }
    }

    /// Directory, index and metadata bytes: everything accounted besides file data.
    fn overhead_bytes(&self) -> u64 {
        let external: u64 = self
            .lock_external()
            .iter()
            .map(|b| b.load(Ordering::Relaxed).div_ceil(FS_BLOCK) * FS_BLOCK)
            .sum();
        layout::fixed_overhead() + self.journal.bytes().div_ceil(FS_BLOCK) * FS_BLOCK + external
    }

    fn rewrite_index(&self, state: &State) -> Result<()> {
        let records = state.entries.iter().map(|(key, entry)| IndexRecord::Entry {
            key: *key,
            generation: entry.generation,
            size: entry.size,
            block_size: entry.block_size,
            blocks: entry
                .checksums
                .iter()
                .enumerate()
                .filter_map(|(b, sum)| sum.map(|sum| (b as u32, sum)))
                .collect(),
        });
        self.journal.rewrite(records)?;
        Ok(())
    }

    fn data_path(&self, key: ContentKey, generation: u64) -> PathBuf {
        layout::data_path(&self.data_dir, key, generation)
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_external(&self) -> MutexGuard<'_, Vec<Arc<AtomicU64>>> {
        self.external_journals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
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
            entries.insert(key, Entry::new(generation, size, block_size));
        }
        IndexRecord::Entry {
            key,
            generation,
            size,
            block_size,
            blocks,
        } => {
            let mut entry = Entry::new(generation, size, block_size);
            for (block, checksum) in blocks {
                if let Some(slot) = entry.checksums.get_mut(block as usize) {
                    if slot.replace(checksum).is_none() {
                        entry.present += 1;
                    }
                }
            }
            entries.insert(key, entry);
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
