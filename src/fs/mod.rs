//! The file system core: one [`Volume`] is a source seen through the cache, with the
//! namespace, attributes and data that the FUSE adapter ([`fuse`]) serves to the kernel.
//!
//! Every operation comes in two forms: `try_*`, which answers from what is already known
//! (cached, fresh metadata; cached blocks) without waiting on the source, and an async form that
//! may ask the source. The FUSE adapter calls `try_*` on its request thread and hands only the
//! misses to the async runtime, so that a slow or dead source never holds a thread that serves
//! cached data. Tests drive the core directly, without FUSE.

mod error;
pub mod fuse;
pub mod handles;
pub mod intents;
pub mod meta;
mod namespace;
mod online;
pub mod passthrough;
mod read;
mod readahead;
pub mod warm;
mod write;

pub use error::FsError;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, Semaphore};
use xxhash_rust::xxh3::Xxh3;

use crate::cache::{Cache, ContentKey, Lease, Usage};
use crate::source::{Attr, Handle, Kind, Source, SourceError, SourceOptions, SourceSpec};
use crate::units::Ttl;
use meta::{Ino, MetaStore};
use online::{connect, probe_source, reconnect};
use read::PendingStores;
use readahead::ReadAhead;

/// How long the kernel may trust metadata served while the source is unreachable.
const STALE_TTL: Duration = Duration::from_secs(1);
/// What the kernel is told for `--metadata-ttl forever`.
const FOREVER_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// A block fetch slower than this many times the file's fastest means the blocks in flight
/// Block fetches running ahead of readers (readahead and open-time prefetch), across the volume.
const PREFETCH_SLOTS: usize = 32;
/// Fetched blocks waiting to be written to the cache after their readers got them; beyond
/// this, the fetcher writes its block itself (backpressure on a slow cache disk).
const STORE_QUEUE: usize = 16;
/// How long the end of a volume waits for queued cache writes.
const STORE_DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Nodes the kernel does not reference kept in memory per volume, at most (a few hundred bytes
/// each): the part of the namespace that is answered without asking the source once forgotten.
pub const DEFAULT_IDLE_NODES: usize = 100_000;

pub type Result<T, E = FsError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// How long attributes and listings are trusted before the source is asked again.
    pub metadata_ttl: Ttl,
    /// Writes go through to the source; without it every change is refused with EROFS.
    pub read_write: bool,
    /// Nodes the kernel does not reference kept in memory, at most (see [`meta`]).
    pub idle_nodes: usize,
}

/// A node's attributes as served to the kernel, and how long it may keep them.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub ino: Ino,
    pub attr: Attr,
    pub ttl: Duration,
}

/// Counters for status reports.
#[derive(Default)]
struct Stats {
    /// Bytes the daemon answered from the cache.
    bytes_from_cache: AtomicU64,
    /// Bytes the daemon answered that had to come from the source.
    bytes_from_source: AtomicU64,
    /// Bytes read from the source for readers (including readahead).
    bytes_fetched: AtomicU64,
    /// Bytes read from the source by preloads.
    bytes_preloaded: AtomicU64,
    opens: AtomicU64,
    passthrough_opens: AtomicU64,
    /// Sizes of files opened through passthrough (their reads never reach the daemon).
    passthrough_bytes: AtomicU64,
    source_errors: AtomicU64,
    /// Commits sent to the source in the background while files were being written.
    background_commits: AtomicU64,
}

/// A point-in-time account of a volume, for `reservoir status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub source: String,
    pub online: bool,
    pub metadata_ttl: String,
    pub nodes_known: u64,
    /// Nodes the kernel holds references to (not counting those pinned by a resumed
    /// connection).
    #[serde(default)]
    pub nodes_referenced: u64,
    pub opens: u64,
    pub passthrough_opens: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_source: u64,
    pub bytes_fetched: u64,
    pub bytes_preloaded: u64,
    /// Upper bound of what passthrough opens read from the cache (their file sizes).
    pub passthrough_bytes: u64,
    /// 1 − bytes fetched for readers / bytes readers got (passthrough counted at file size).
    pub hit_ratio: Option<f64>,
    pub source_errors: u64,
    /// Commits sent to the source in the background while files were being written.
    #[serde(default)]
    pub background_commits: u64,
    pub cache: Option<Usage>,
    pub preload: Option<warm::Progress>,
}

/// One open regular file.
pub struct OpenFile {
    pub ino: Ino,
    handle: Handle,
    pub size: u64,
    pub key: ContentKey,
    /// The cached copy; `None` when the file is served straight from the source (no cache, or
    /// not admitted).
    pub lease: Option<Arc<Lease>>,
    /// The cached copy is complete and verified: the kernel may read it directly.
    pub passthrough_ready: bool,
    /// Pages the kernel cached at an earlier open of the same version are still valid.
    pub keep_cache: bool,
    /// Opened for writing: writes go to the source, and flush/close commit them.
    pub writable: bool,
    /// The write epoch when this file was opened: a later write to the inode makes its
    /// cached copy stale for this handle.
    opened_epoch: u64,
    readahead: Mutex<ReadAhead>,
    writes: write::HandleWrites,
}

type Fetch = Arc<OnceCell<Result<Arc<Vec<u8>>, SourceError>>>;

pub struct Volume {
    spec: SourceSpec,
    source_id: String,
    source_options: SourceOptions,
    source: RwLock<Option<Arc<dyn Source>>>,
    online: AtomicBool,
    cache: Option<Arc<Cache>>,
    meta: MetaStore,
    config: VolumeConfig,
    inflight: Mutex<HashMap<(ContentKey, u32), Fetch>>,
    prefetch_slots: Arc<Semaphore>,
    /// Cache writes queued behind the readers they served.
    stores: PendingStores,
    /// The version each inode was last opened at through the page cache.
    page_cache_versions: Mutex<HashMap<Ino, ContentKey>>,
    stats: Stats,
    preload: Mutex<Option<Arc<warm::Tracker>>>,
    /// Inodes written through this volume (read-write volumes only).
    writes: Mutex<HashMap<Ino, write::WriteState>>,
    write_epoch: AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl Volume {
    /// Opens a volume over `spec`. If the source cannot be reached but the cache knows this
    /// source, the volume starts offline (serving what is cached) and keeps trying to connect.
    pub async fn open(
        spec: SourceSpec,
        source_options: SourceOptions,
        cache: Option<Arc<Cache>>,
        config: VolumeConfig,
    ) -> Result<Arc<Volume>> {
        let source_id = spec.id();
        let meta = match &cache {
            Some(cache) => {
                let name = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(source_id.as_bytes()));
                let (journal, records) = cache.open_journal(&name)?;
                MetaStore::persistent(journal, records, config.idle_nodes)
            }
            None => MetaStore::in_memory(config.idle_nodes),
        };
        let connected = connect(&spec, &source_options).await;
        let source = match connected {
            Ok((source, root_handle, root_attr)) => {
                if root_attr.kind != Kind::Directory {
                    return Err(
                        SourceError::Invalid(format!("{source_id} is not a directory")).into(),
                    );
                }
                meta.set_root(root_handle, root_attr);
                Some(source)
            }
            Err(e) if e.is_unavailable() && meta.root_handle().is_some() => {
                tracing::warn!(
                    source = %source_id,
                    error = %crate::error::Chain(&e),
                    "source unreachable; starting offline with the cached part of the tree"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        let online = source.is_some();
        let volume = Arc::new(Volume {
            spec,
            source_id,
            source_options,
            source: RwLock::new(source),
            online: AtomicBool::new(online),
            cache,
            meta,
            config,
            inflight: Mutex::new(HashMap::new()),
            prefetch_slots: Arc::new(Semaphore::new(PREFETCH_SLOTS)),
            stores: PendingStores::default(),
            page_cache_versions: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            preload: Mutex::new(None),
            writes: Mutex::new(HashMap::new()),
            write_epoch: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        if !online {
            tokio::spawn(reconnect(Arc::downgrade(&volume)));
        }
        tokio::spawn(probe_source(Arc::downgrade(&volume)));
        Ok(volume)
    }

    pub fn source_id(&self) -> &str {
        &self.source_id
    }

    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    fn fresh(&self, checked_ms: u64) -> bool {
        self.config.metadata_ttl.covers(meta::age(checked_ms))
    }

    /// How long the kernel may keep what it is told.
    pub fn kernel_ttl(&self) -> Duration {
        match self.config.metadata_ttl {
            Ttl::Finite(ttl) => ttl,
            Ttl::Forever => FOREVER_TTL,
        }
    }

    pub fn metadata_ttl(&self) -> Ttl {
        self.config.metadata_ttl
    }

    pub fn read_write(&self) -> bool {
        self.config.read_write
    }

    /// Makes inode numbers given out since the last call known to a successor daemon (see
    /// [`MetaStore::persist_inodes`]); called before they reach the kernel.
    pub fn persist_inodes(&self) {
        self.meta.persist_inodes();
    }

    // ---- status ----------------------------------------------------------------------------

    pub fn status(&self) -> VolumeStatus {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let from_cache = load(&self.stats.bytes_from_cache);
        let from_source = load(&self.stats.bytes_from_source);
        let passthrough = load(&self.stats.passthrough_bytes);
        let fetched = load(&self.stats.bytes_fetched);
        let read = from_cache + from_source + passthrough;
        let hit_ratio = (read > 0).then(|| 1.0 - (fetched.min(read) as f64 / read as f64));
        VolumeStatus {
            source: self.source_id.clone(),
            online: self.is_online(),
            metadata_ttl: self.config.metadata_ttl.to_string(),
            nodes_known: self.meta.len() as u64,
            nodes_referenced: self.meta.referenced() as u64,
            opens: load(&self.stats.opens),
            passthrough_opens: load(&self.stats.passthrough_opens),
            bytes_from_cache: from_cache,
            bytes_from_source: from_source,
            bytes_fetched: fetched,
            bytes_preloaded: load(&self.stats.bytes_preloaded),
            passthrough_bytes: passthrough,
            hit_ratio,
            source_errors: load(&self.stats.source_errors),
            background_commits: load(&self.stats.background_commits),
            cache: self.cache.as_ref().map(|c| c.usage()),
            preload: self
                .preload
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|t| t.snapshot()),
        }
    }

    /// Waits (a bounded time) for the cache writes still queued; for the end of a volume, so
    /// that what its readers fetched is cached for the next one.
    pub fn drain_stores(&self) {
        if !self.stores.wait_idle(STORE_DRAIN_WAIT) {
            tracing::warn!(
                "cache writes still queued at the end of the volume; those blocks will be fetched again"
            );
        }
    }

    /// The end of a volume: queued cache writes done, journals on stable storage.
    pub fn finish(&self) {
        self.drain_stores();
        self.flush(true);
    }

    /// Writes buffered journals out; with `sync`, to stable storage.
    pub fn flush(&self, sync: bool) {
        self.meta.flush(sync);
        if let Some(cache) = &self.cache
            && let Err(e) = cache.flush(sync)
        {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot flush the cache index");
        }
    }
}

/// The identity of one version of a file: the source, the file's handle in it, and the
/// attributes that change when its contents do.
pub fn content_key(source_id: &str, handle: &Handle, attr: &Attr) -> ContentKey {
    let mut hasher = Xxh3::new();
    hasher.update(source_id.as_bytes());
    hasher.update(&[0]);
    hasher.update(handle.as_bytes());
    hasher.update(&(handle.as_bytes().len() as u64).to_le_bytes());
    hasher.update(&attr.fileid.to_le_bytes());
    hasher.update(&attr.size.to_le_bytes());
    for time in [attr.mtime, attr.ctime] {
        hasher.update(&time.secs.to_le_bytes());
        hasher.update(&time.nanos.to_le_bytes());
    }
    ContentKey(hasher.digest128())
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
