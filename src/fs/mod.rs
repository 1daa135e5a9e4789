//! The file system core: one [`Volume`] is a source seen through the cache, with the
//! namespace, attributes and data that the FUSE adapter ([`fuse`]) serves to the kernel.
//!
//! Every operation comes in two forms: `try_*`, which answers from what is already known
//! (cached, fresh metadata; cached blocks) without waiting on the source, and an async form that
//! may ask the source. The FUSE adapter calls `try_*` on its request thread and hands only the
//! misses to the async runtime, so that a slow or dead source never holds a thread that serves
//! cached data. Tests drive the core directly, without FUSE.

pub mod fuse;
pub mod handles;
pub mod intents;
pub mod meta;
pub mod passthrough;
pub mod warm;
mod write;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, Semaphore};
use tracing::Instrument;
use xxhash_rust::xxh3::Xxh3;

use crate::cache::policy::Priority;
use crate::cache::{Cache, CacheError, ContentKey, Lease, Usage};
use crate::source::{self, Attr, Handle, Kind, Source, SourceError, SourceOptions, SourceSpec};
use crate::units::Ttl;
use meta::{Ino, ListedEntry, MetaStore, ROOT};

/// How long the kernel may trust metadata served while the source is unreachable.
const STALE_TTL: Duration = Duration::from_secs(1);
/// What the kernel is told for `--metadata-ttl forever`.
const FOREVER_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Blocks fetched ahead of a sequential reader, at most (see [`ReadAhead::fetched`]).
const MAX_READAHEAD_BLOCKS: u32 = 16;
/// A block fetch slower than this many times the file's fastest means the blocks in flight
/// queue at the bottleneck: the read-ahead limit halves.
const SLOW_FETCH: u32 = 3;
/// Block fetches running ahead of readers (readahead and open-time prefetch), across the volume.
const PREFETCH_SLOTS: usize = 32;
/// Files up to this many blocks are fetched whole as soon as they are opened.
const OPEN_PREFETCH_BLOCKS: u32 = 4;
/// Fetched blocks waiting to be written to the cache after their readers got them; beyond
/// this, the fetcher writes its block itself (backpressure on a slow cache disk).
const STORE_QUEUE: usize = 16;
/// How long the end of a volume waits for queued cache writes.
const STORE_DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Nodes the kernel does not reference kept in memory per volume, at most (a few hundred bytes
/// each): the part of the namespace that is answered without asking the source once forgotten.
pub const DEFAULT_IDLE_NODES: usize = 100_000;

/// Why a file-system request failed: the errno the kernel gets, what failed, the chain of causes
/// underneath (a [`SourceError`], a [`CacheError`], with theirs), and how loudly the FUSE
/// adapter logs it, which it does once, with the whole chain, when it replies.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    errno: i32,
    message: Cow<'static, str>,
    level: tracing::Level,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl FsError {
    /// A failure with no cause underneath; logged at debug level if it is an ordinary answer
    /// (such as "no such file"), at warning level otherwise.
    pub fn new(errno: i32, message: impl Into<Cow<'static, str>>) -> Self {
        FsError {
            errno,
            message: message.into(),
            level: ordinary_level(errno),
            cause: None,
        }
    }

    fn not_found() -> Self {
        FsError::new(libc::ENOENT, "no such file or directory")
    }

    /// The kernel named an inode this process does not know (`ESTALE`).
    pub fn unknown_inode(ino: Ino) -> Self {
        FsError::new(libc::ESTALE, format!("inode {ino} is not known"))
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The level the FUSE adapter logs this at.
    pub fn level(&self) -> tracing::Level {
        self.level
    }
}

/// Answers the kernel gives every day are not worth more than a debug line.
fn ordinary_level(errno: i32) -> tracing::Level {
    match errno {
        libc::ENOENT
        | libc::ENOTDIR
        | libc::EISDIR
        | libc::EACCES
        | libc::EPERM
        | libc::ELOOP
        | libc::EEXIST
        | libc::ENOTEMPTY => tracing::Level::DEBUG,
        _ => tracing::Level::WARN,
    }
}

impl From<SourceError> for FsError {
    fn from(e: SourceError) -> Self {
        FsError {
            errno: e.errno(),
            message: "the source failed".into(),
            level: ordinary_level(e.errno()),
            cause: Some(Box::new(e)),
        }
    }
}

/// Every cache failure the kernel sees is an `EIO`, always logged with its cause.
impl From<CacheError> for FsError {
    fn from(e: CacheError) -> Self {
        FsError {
            errno: libc::EIO,
            message: "the cache failed".into(),
            level: tracing::Level::ERROR,
            cause: Some(Box::new(e)),
        }
    }
}

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
pub struct Entry {
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

    fn source(&self) -> Result<Arc<dyn Source>, SourceError> {
        let source = self
            .source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        source.ok_or_else(|| SourceError::Unavailable {
            source_name: self.source_id.clone(),
            message: "not connected (started offline; retrying)".into(),
            cause: None,
        })
    }

    /// Notes the outcome of a source call, to report whether the source is reachable.
    fn observe<T>(&self, result: &Result<T, SourceError>) {
        match result {
            Ok(_) => {
                if !self.online.swap(true, Ordering::Relaxed) {
                    tracing::info!(source = %self.source_id, "source reachable again; back online");
                }
            }
            Err(e) if e.is_unavailable() => {
                self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                if self.online.swap(false, Ordering::Relaxed) {
                    tracing::warn!(source = %self.source_id, error = %crate::error::Chain(&e), "source unreachable; serving what is cached");
                }
            }
            Err(_) => {}
        }
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

    fn entry(&self, ino: Ino, fresh: bool) -> Option<Entry> {
        let attr = self.meta.with(ino, |n| n.attr.clone())?;
        let ttl = if fresh { self.kernel_ttl() } else { STALE_TTL };
        Some(Entry { ino, attr, ttl })
    }

    /// [`Volume::entry`] for the kernel: the reference it is given is counted.
    fn referenced_entry(&self, ino: Ino, fresh: bool) -> Option<Entry> {
        let attr = self.meta.reference(ino, |n| n.attr.clone())?;
        let ttl = if fresh { self.kernel_ttl() } else { STALE_TTL };
        Some(Entry { ino, attr, ttl })
    }

    /// The kernel dropped `count` references to `ino` (FUSE `FORGET`), or a reference an
    /// entry carried was not handed to it. Once none is left, what the volume kept for the
    /// inode goes (its node stays while the namespace cache has room, see [`meta`]).
    pub fn forget(&self, ino: Ino, count: u64) {
        if !self.meta.forget(ino, count) {
            return;
        }
        // No open file and no page of it left in the kernel.
        self.page_cache_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
        self.drop_idle_write_state(ino);
    }

    /// A resumed connection: the kernel may hold any node known (see [`MetaStore::pin_all`]).
    pub fn kernel_resumed(&self) {
        self.meta.pin_all();
    }

    fn node_handle(&self, ino: Ino) -> Result<Handle> {
        self.meta
            .with(ino, |n| n.handle.clone())
            .ok_or(FsError::unknown_inode(ino))
    }

    // ---- lookup and attributes -------------------------------------------------------------

    /// Answers a lookup from fresh metadata; `None` when the source must be asked. The entry
    /// found carries a reference for the kernel ([`Volume::forget`] it if it is not handed on).
    pub fn try_lookup(&self, parent: Ino, name: &[u8]) -> Option<Result<Entry>> {
        if let Some(ino) = self.meta.child(parent, name) {
            if self.writes_in_flight(ino) {
                return None;
            }
            let checked = self.meta.with(ino, |n| n.checked_ms)?;
            return self.fresh(checked).then(|| {
                self.referenced_entry(ino, true)
                    .ok_or(FsError::unknown_inode(ino))
            });
        }
        if self.meta.known_absent(parent, name, |ms| self.fresh(ms)) {
            return Some(Err(FsError::not_found()));
        }
        None
    }

    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Entry> {
        if let Some(answer) = self.try_lookup(parent, name) {
            return answer;
        }
        let dir = self.node_handle(parent)?;
        if let Some(ino) = self.meta.child(parent, name) {
            self.settle_writes(ino).await;
        }
        let result = match self.source() {
            Ok(source) => source.lookup(&dir, name).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        match result {
            Ok((handle, attr)) => {
                let ino = self
                    .meta
                    .upsert_child(parent, name, handle, attr.clone(), true)
                    .ok_or(FsError::new(libc::ENOTDIR, "not a directory"))?;
                self.cover_writes_in_flight(ino);
                Ok(Entry {
                    ino,
                    attr,
                    ttl: self.kernel_ttl(),
                })
            }
            Err(e) if e.errno() == libc::ENOENT => {
                self.meta.remove_child(parent, name);
                Err(e.into())
            }
            Err(e) if e.is_unavailable() => {
                if let Some(ino) = self.meta.child(parent, name) {
                    return self
                        .referenced_entry(ino, false)
                        .ok_or(FsError::unknown_inode(ino));
                }
                if self.meta.known_absent(parent, name, |_| true) {
                    return Err(FsError::not_found());
                }
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn try_getattr(&self, ino: Ino) -> Option<Result<Entry>> {
        let Some(checked) = self.meta.with(ino, |n| n.checked_ms) else {
            return Some(Err(FsError::unknown_inode(ino)));
        };
        if self.writes_in_flight(ino) {
            return None;
        }
        self.fresh(checked)
            .then(|| self.entry(ino, true).ok_or(FsError::unknown_inode(ino)))
    }

    pub async fn getattr(&self, ino: Ino) -> Result<Entry> {
        if let Some(answer) = self.try_getattr(ino) {
            return answer;
        }
        self.revalidate(ino).await
    }

    /// Asks the source for a node's attributes (serving the known ones if it cannot answer).
    async fn revalidate(&self, ino: Ino) -> Result<Entry> {
        let handle = self.node_handle(ino)?;
        // The source must not be asked before the writes it has not seen yet land.
        self.settle_writes(ino).await;
        let result = match self.source() {
            Ok(source) => source.getattr(&handle).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        match result {
            Ok(attr) => {
                self.meta.update_attr(ino, attr.clone());
                self.cover_writes_in_flight(ino);
                Ok(Entry {
                    ino,
                    attr,
                    ttl: self.kernel_ttl(),
                })
            }
            Err(e) if e.is_unavailable() => self.entry(ino, false).ok_or(e.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// The directory a node was found in.
    pub fn parent_of(&self, ino: Ino) -> Option<Ino> {
        self.meta.with(ino, |n| n.parent)
    }

    /// The attributes of a node, as known.
    pub fn known_entry(&self, ino: Ino) -> Option<Entry> {
        let checked = self.meta.with(ino, |n| n.checked_ms)?;
        self.entry(ino, self.fresh(checked))
    }

    /// [`Volume::known_entry`] for the kernel (a listing with attributes, a resent CREATE):
    /// the reference it is given is counted.
    pub fn referenced_known_entry(&self, ino: Ino) -> Option<Entry> {
        let (checked, attr) = self
            .meta
            .reference(ino, |n| (n.checked_ms, n.attr.clone()))?;
        let ttl = if self.fresh(checked) {
            self.kernel_ttl()
        } else {
            STALE_TTL
        };
        Some(Entry { ino, attr, ttl })
    }

    // ---- directories and symlinks ----------------------------------------------------------

    pub fn try_list(&self, dir: Ino) -> Option<Result<Vec<ListedEntry>>> {
        let (entries, listed_ms) = self.meta.listing(dir)?;
        self.fresh(listed_ms).then_some(Ok(entries))
    }

    pub async fn list(&self, dir: Ino) -> Result<Vec<ListedEntry>> {
        if let Some(answer) = self.try_list(dir) {
            return answer;
        }
        let (handle, kind) = self
            .meta
            .with(dir, |n| (n.handle.clone(), n.attr.kind))
            .ok_or(FsError::unknown_inode(dir))?;
        if kind != Kind::Directory {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        }
        let result = match self.source() {
            Ok(source) => source.read_dir(&handle).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        match result {
            Ok(entries) => Ok(self.meta.set_listing(dir, entries)),
            Err(e) if e.is_unavailable() => match self.meta.listing(dir) {
                Some((entries, _)) => Ok(entries),
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    pub fn try_read_link(&self, ino: Ino) -> Option<Result<Vec<u8>>> {
        self.meta
            .with(ino, |n| n.link.as_ref().map(|t| t.to_vec()))
            .flatten()
            .map(Ok)
    }

    pub async fn read_link(&self, ino: Ino) -> Result<Vec<u8>> {
        if let Some(answer) = self.try_read_link(ino) {
            return answer;
        }
        let handle = self.node_handle(ino)?;
        let result = match self.source() {
            Ok(source) => source.read_link(&handle).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        let target = result?;
        self.meta.set_link(ino, &target);
        Ok(target)
    }

    /// Resolves a path relative to the volume root, component by component (used by preload).
    /// The entry carries a reference (unless it is the root): [`Volume::forget`] it when done.
    pub async fn resolve(&self, path: &[u8]) -> Result<Entry> {
        let mut entry = match self.try_getattr(ROOT) {
            Some(answer) => answer?,
            None => self.getattr(ROOT).await?,
        };
        for component in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            if component == b".." {
                return Err(FsError::new(libc::EINVAL, "'..' is not allowed in a path"));
            }
            let next = self.lookup(entry.ino, component).await;
            if entry.ino != ROOT {
                self.forget(entry.ino, 1);
            }
            entry = next?;
        }
        Ok(entry)
    }

    // ---- opening and reading files ---------------------------------------------------------

    /// Opens a file from fresh metadata; `None` when its attributes must be revalidated with
    /// the source first (close-to-open consistency within the metadata TTL).
    pub fn try_open_file(
        self: &Arc<Self>,
        ino: Ino,
        writable: bool,
    ) -> Option<Result<Arc<OpenFile>>> {
        let checked = self.meta.with(ino, |n| n.checked_ms)?;
        self.fresh(checked).then(|| self.open_known(ino, writable))
    }

    pub async fn open_file(self: &Arc<Self>, ino: Ino, writable: bool) -> Result<Arc<OpenFile>> {
        if let Some(answer) = self.try_open_file(ino, writable) {
            return answer;
        }
        self.revalidate(ino).await?;
        self.open_known(ino, writable)
    }

    fn open_known(self: &Arc<Self>, ino: Ino, writable: bool) -> Result<Arc<OpenFile>> {
        if writable && !self.config.read_write {
            return Err(FsError::new(libc::EROFS, "read-only volume"));
        }
        let (handle, attr) = self
            .meta
            .with(ino, |n| (n.handle.clone(), n.attr.clone()))
            .ok_or(FsError::unknown_inode(ino))?;
        match attr.kind {
            Kind::File => {}
            Kind::Directory => return Err(FsError::new(libc::EISDIR, "is a directory")),
            _ => return Err(FsError::new(libc::ENXIO, "not a regular file")),
        }
        let key = content_key(&self.source_id, &handle, &attr);
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        // Registering a writer first means a concurrent write cannot slip in after the check.
        let opened_epoch = if writable {
            self.begin_writing(ino, key)
        } else {
            self.write_epoch.load(Ordering::Acquire)
        };
        let cacheable = !writable && !self.has_writers(ino);
        let (lease, passthrough_ready) = match &self.cache {
            Some(cache) if cacheable => match cache.lease(key, attr.size, Priority::Access) {
                Ok(Some(lease)) => {
                    let lease = Arc::new(lease);
                    let ready = self.passthrough_ready(cache, &lease);
                    (Some(lease), ready)
                }
                Ok(None) => (None, false),
                Err(e) => {
                    tracing::warn!(error = %crate::error::Chain(&e), "cache unusable for this file; reading from the source");
                    (None, false)
                }
            },
            _ => (None, false),
        };
        let keep_cache = !passthrough_ready && {
            let mut versions = self
                .page_cache_versions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            versions.insert(ino, key) == Some(key)
        };
        let file = Arc::new(OpenFile {
            ino,
            handle,
            size: attr.size,
            key,
            lease,
            passthrough_ready,
            keep_cache,
            writable,
            opened_epoch,
            readahead: Mutex::new(ReadAhead::default()),
            writes: write::HandleWrites::default(),
        });
        if let Some(lease) = &file.lease {
            if !passthrough_ready {
                let blocks = lease.block_count().min(OPEN_PREFETCH_BLOCKS);
                self.prefetch(&file, 0..blocks);
            }
        }
        Ok(file)
    }

    /// Whether a cached file can go to the kernel directly. Verification of a file written by
    /// an earlier process is done inline only when it is one block; bigger files are verified
    /// in the background and get passthrough from their next open.
    fn passthrough_ready(self: &Arc<Self>, cache: &Arc<Cache>, lease: &Arc<Lease>) -> bool {
        if !lease.complete {
            return false;
        }
        if lease.verified {
            return true;
        }
        if lease.block_count() <= 1 {
            return cache.prepare_passthrough(lease).unwrap_or_else(|e| {
                tracing::warn!(error = %crate::error::Chain(&e), "cannot verify cached file");
                false
            });
        }
        let (cache, lease, span) = (cache.clone(), lease.clone(), tracing::Span::current());
        self.runtime.spawn_blocking(move || {
            let _span = span.enter();
            if let Err(e) = cache.prepare_passthrough(&lease) {
                tracing::warn!(error = %crate::error::Chain(&e), "cannot verify cached file");
            }
        });
        false
    }

    /// Counts an open that the kernel serves through passthrough.
    pub fn note_passthrough(&self, file: &OpenFile) {
        self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        self.stats
            .passthrough_bytes
            .fetch_add(file.size, Ordering::Relaxed);
    }

    /// Reads from the cache; `None` when a block is missing and the source must be asked.
    pub fn try_read(
        self: &Arc<Self>,
        file: &Arc<OpenFile>,
        offset: u64,
        size: u32,
    ) -> Option<Vec<u8>> {
        let lease = file.lease.as_ref().filter(|_| self.cache_current(file))?;
        let cache = self.cache.as_ref()?;
        match cache.read(lease, offset, size as usize) {
            Ok(Some(data)) => {
                self.stats
                    .bytes_from_cache
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.read_ahead(file, offset, size);
                Some(data)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "cache read failed; reading from the source");
                None
            }
        }
    }

    pub async fn read(
        self: &Arc<Self>,
        file: &Arc<OpenFile>,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        let lease = match &file.lease {
            Some(lease) if self.cache_current(file) => lease,
            // Not cached, or written since it was opened: the source has the current bytes
            // (and the current size).
            _ => {
                self.settle_writes(file.ino).await;
                let source = self.source()?;
                let result = source.read(&file.handle, offset, size).await;
                self.observe(&result);
                let data = result?;
                let n = data.len() as u64;
                self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                self.stats.bytes_from_source.fetch_add(n, Ordering::Relaxed);
                return Ok(data);
            }
        };
        let end = (offset + u64::from(size)).min(file.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        self.read_ahead(file, offset, size);
        let block_size = u64::from(lease.block_size);
        let first = (offset / block_size) as u32;
        let last = ((end - 1) / block_size) as u32;
        let blocks = futures_util::future::try_join_all(
            (first..=last).map(|block| self.block(file, lease, block, false)),
        )
        .await?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (block, data) in (first..=last).zip(blocks) {
            let block_start = u64::from(block) * block_size;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(data.len());
            out.extend_from_slice(&data[from.min(to)..to]);
        }
        self.stats
            .bytes_from_source
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// One block of a cached file: from the cache, or fetched from the source once (concurrent
    /// readers of the same block share one fetch) and stored. A reader gets its block before
    /// it is stored; a preload returns once it is stored.
    async fn block(
        self: &Arc<Self>,
        file: &OpenFile,
        lease: &Arc<Lease>,
        block: u32,
        preload: bool,
    ) -> Result<Arc<Vec<u8>>> {
        let (start, len) = lease.block_range(block);
        if let Some(cache) = &self.cache {
            if let Ok(Some(data)) = cache.read(lease, start, len) {
                return Ok(Arc::new(data));
            }
        }
        let cell = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight.entry((lease.key, block)).or_default().clone()
        };
        let data = cell
            .get_or_init(|| self.fetch_block(file, lease, block, preload, cell.clone()))
            .await
            .clone()?;
        if preload {
            // The fetch may have been a reader's, whose store is still queued.
            if let Some(cache) = &self.cache {
                store(cache, lease, block, &data);
            }
        }
        Ok(data)
    }

    /// Fetches one block and stores it: in the background for a reader, who should not wait
    /// for the cache disk, inline for a preload or when the store queue is full. The block's
    /// entry in `inflight` (`cell`) stays until it is stored, so that readers in between share
    /// the fetched bytes instead of fetching them again.
    async fn fetch_block(
        self: &Arc<Self>,
        file: &OpenFile,
        lease: &Arc<Lease>,
        block: u32,
        preload: bool,
        cell: Fetch,
    ) -> Result<Arc<Vec<u8>>, SourceError> {
        let fetched = self.fetch_from_source(file, lease, block, preload).await;
        let data = match fetched {
            Ok(data) => Arc::new(data),
            Err(e) => {
                self.forget_fetch(lease.key, block, &cell);
                return Err(e);
            }
        };
        let Some(cache) = &self.cache else {
            self.forget_fetch(lease.key, block, &cell);
            return Ok(data);
        };
        if preload || !self.stores.enqueue() {
            store(cache, lease, block, &data);
            self.forget_fetch(lease.key, block, &cell);
            return Ok(data);
        }
        let (volume, cache, lease, queued) =
            (self.clone(), cache.clone(), lease.clone(), data.clone());
        let span = tracing::Span::current();
        self.runtime.spawn_blocking(move || {
            let _span = span.enter();
            store(&cache, &lease, block, &queued);
            volume.forget_fetch(lease.key, block, &cell);
            volume.stores.done();
        });
        Ok(data)
    }

    async fn fetch_from_source(
        &self,
        file: &OpenFile,
        lease: &Lease,
        block: u32,
        preload: bool,
    ) -> Result<Vec<u8>, SourceError> {
        let (start, len) = lease.block_range(block);
        let source = self.source()?;
        let started = Instant::now();
        let result = source.read(&file.handle, start, len as u32).await;
        self.observe(&result);
        let data = result?;
        if !preload {
            file.readahead
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fetched(started.elapsed());
        }
        let counter = if preload {
            &self.stats.bytes_preloaded
        } else {
            &self.stats.bytes_fetched
        };
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        if data.len() != len {
            return Err(SourceError::status(
                "read",
                libc::EIO,
                format!(
                    "{}: file changed size while being read ({} bytes at {start}, expected {len})",
                    self.source_id,
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    /// Ends the sharing of one fetch: later readers look in the cache (or fetch again).
    fn forget_fetch(&self, key: ContentKey, block: u32, cell: &Fetch) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight
            .get(&(key, block))
            .is_some_and(|c| Arc::ptr_eq(c, cell))
        {
            inflight.remove(&(key, block));
        }
    }

    /// Starts fetching blocks in the background, bounded across the volume.
    fn prefetch(self: &Arc<Self>, file: &Arc<OpenFile>, blocks: std::ops::Range<u32>) {
        let (Some(lease), Some(cache)) = (&file.lease, &self.cache) else {
            return;
        };
        let first = blocks.start;
        let Some(last) = blocks.end.checked_sub(1) else {
            return;
        };
        if first > last {
            return;
        }
        for block in cache.missing_blocks(lease, first, last) {
            let (volume, file, lease) = (self.clone(), file.clone(), lease.clone());
            let slots = self.prefetch_slots.clone();
            let task = async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                if let Err(e) = volume.block(&file, &lease, block, false).await {
                    // Nobody waits for this block: the failure is only logged (a reader of it
                    // fetches it again). An unreachable source is logged once, by `observe`.
                    let (offset, size) = lease.block_range(block);
                    let error = crate::error::Chain(&e);
                    let (ino, key) = (file.ino, lease.key);
                    if !volume.is_online() {
                        tracing::debug!(ino, %key, block, offset, size, %error, "prefetch failed");
                    } else {
                        tracing::warn!(ino, %key, block, offset, size, %error, "prefetch failed");
                    }
                }
            };
            self.runtime.spawn(task.in_current_span());
        }
    }

    fn read_ahead(self: &Arc<Self>, file: &Arc<OpenFile>, offset: u64, size: u32) {
        let Some(lease) = &file.lease else {
            return;
        };
        let next = file
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .advance(offset, size, lease.block_size, lease.block_count());
        if let Some(blocks) = next {
            self.prefetch(file, blocks);
        }
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
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.flush(sync) {
                tracing::warn!(error = %crate::error::Chain(&e), "cannot flush the cache index");
            }
        }
    }
}

fn store(cache: &Cache, lease: &Lease, block: u32, data: &[u8]) {
    if let Err(e) = cache.store_block(lease, block, data) {
        tracing::warn!(error = %crate::error::Chain(&e), "cannot store a block in the cache");
    }
}

/// Cache writes queued on the blocking pool, counted so that the end of a volume can wait for
/// them and a full queue pushes back on fetchers.
#[derive(Default)]
struct PendingStores {
    queued: Mutex<usize>,
    idle: std::sync::Condvar,
}

impl PendingStores {
    /// Takes a place in the queue; false when it is full.
    fn enqueue(&self) -> bool {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if *queued >= STORE_QUEUE {
            return false;
        }
        *queued += 1;
        true
    }

    fn done(&self) {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        *queued = queued.saturating_sub(1);
        if *queued == 0 {
            self.idle.notify_all();
        }
    }

    /// True when the queue emptied within `wait`.
    fn wait_idle(&self, wait: Duration) -> bool {
        let queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let (queued, _) = self
            .idle
            .wait_timeout_while(queued, wait, |queued| *queued > 0)
            .unwrap_or_else(|p| p.into_inner());
        *queued == 0
    }
}

/// Opens the source and reads its root.
async fn connect(
    spec: &SourceSpec,
    options: &SourceOptions,
) -> Result<(Arc<dyn Source>, Handle, Attr), SourceError> {
    let source = source::open(spec, options).await?;
    let (handle, attr) = source.root().await?;
    Ok((source, handle, attr))
}

/// How often a volume asks its source for the root's attributes, so that its status (and the
/// CSI volume condition built on it) shows a source gone away, or back, even while nobody reads.
const SOURCE_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Checks the source of a volume every [`SOURCE_PROBE_INTERVAL`] for as long as the volume lives.
async fn probe_source(volume: std::sync::Weak<Volume>) {
    loop {
        tokio::time::sleep(SOURCE_PROBE_INTERVAL).await;
        let Some(strong) = volume.upgrade() else {
            return;
        };
        // Not connected yet: `reconnect` is at work.
        let (Ok(source), Some(root)) = (strong.source(), strong.meta.root_handle()) else {
            continue;
        };
        let result = source.getattr(&root).await;
        strong.observe(&result);
    }
}

/// Keeps trying to reach the source of a volume that started offline.
async fn reconnect(volume: std::sync::Weak<Volume>) {
    let mut delay = Duration::from_secs(1);
    loop {
        tokio::time::sleep(delay).await;
        let Some(strong) = volume.upgrade() else {
            return;
        };
        match connect(&strong.spec, &strong.source_options).await {
            Ok((source, handle, attr)) => {
                strong.meta.set_root(handle, attr);
                *strong.source.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
                strong.online.store(true, Ordering::Relaxed);
                tracing::info!(source = %strong.source_id, "source reachable again; back online");
                return;
            }
            Err(e) => {
                tracing::debug!(source = %strong.source_id, error = %crate::error::Chain(&e), "source still unreachable");
                delay = (delay * 2).min(Duration::from_secs(30));
            }
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

/// Detects sequential reading and decides what to fetch ahead of it.
struct ReadAhead {
    /// Where the next sequential read would start.
    next: u64,
    /// Blocks to keep fetched ahead; doubles while reading stays sequential, up to `limit`.
    window: u32,
    /// Blocks below this were already requested.
    requested_until: u32,
    /// The most blocks in flight that still pay.
    limit: u32,
    /// The file's fastest block fetch so far.
    fastest: Option<Duration>,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            next: 0,
            window: 0,
            requested_until: 0,
            limit: MAX_READAHEAD_BLOCKS,
            fastest: None,
        }
    }
}

impl ReadAhead {
    /// Adapts the limit to the path to the source, the way a delay-based TCP congestion control
    /// does. Blocks in flight beyond the path's bandwidth-delay product only wait in its queue,
    /// so each takes longer; on a shallow queue they are dropped, and one TCP retransmission
    /// timeout (at least 200 ms) stalls the reader. Measured over the benchmark's 1 Gbit/s link
    /// with a 2.5 MB queue: 16 blocks in flight read a cold file at 77-84 MiB/s with about 600
    /// drops, 2 blocks at 102-106 MiB/s with 35-60. On a long fat link fetches stay near the
    /// fastest even with 16 in flight, and the limit stays at the maximum.
    fn fetched(&mut self, took: Duration) {
        let fastest = self.fastest.map_or(took, |f| f.min(took));
        self.fastest = Some(fastest);
        if took > fastest * SLOW_FETCH {
            self.limit = (self.limit / 2).max(2);
        } else if took < fastest * 3 / 2 {
            self.limit = (self.limit + 1).min(MAX_READAHEAD_BLOCKS);
        }
    }

    fn advance(
        &mut self,
        offset: u64,
        size: u32,
        block_size: u32,
        block_count: u32,
    ) -> Option<std::ops::Range<u32>> {
        let block = u64::from(block_size);
        // The kernel issues several reads at once, so "sequential" tolerates a block of reordering.
        let sequential = offset + block >= self.next && offset <= self.next + block;
        self.next = self.next.max(offset + u64::from(size));
        if !sequential {
            self.window = 0;
            return None;
        }
        self.window = (self.window * 2).clamp(2, self.limit);
        let current = ((offset + u64::from(size)).saturating_sub(1) / block) as u32;
        let start = (current + 1).max(self.requested_until);
        let end = (current + 1 + self.window).min(block_count);
        if start >= end {
            return None;
        }
        self.requested_until = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests;
