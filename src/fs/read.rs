//! The read path: opening a file (its content key, its lease on the cached copy, whether the
//! kernel may read the cache file directly) and reading it, from the cache on the calling
//! thread when every block is there, else from the source with one fetch per missing block
//! shared by concurrent readers, the blocks stored in the cache behind the readers.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::meta::Ino;
use super::readahead::{OPEN_PREFETCH_BLOCKS, ReadAhead};
use super::{Fetch, FsError, OpenFile, Result, STORE_QUEUE, Volume, content_key, write};
use crate::cache::policy::Priority;
use crate::cache::{Cache, ContentKey, Lease};
use crate::source::{Handle, Kind, SourceError};

impl Volume {
    // ---- opening and reading files ---------------------------------------------------------

    /// The source's handle of an open file now: a directory source names files by path, and
    /// on a read-write volume the file (or a directory above it) may have been renamed since
    /// it was opened, which must not cut its readers and writers off (`model_tests`,
    /// `an_open_file_is_read_and_written_after_its_directory_is_renamed`). A read-only volume
    /// renames nothing: its reads use the handle they opened with, without a table lookup.
    pub(super) fn current_handle<'a>(&self, file: &'a OpenFile) -> Cow<'a, Handle> {
        if !self.config.read_write {
            return Cow::Borrowed(&file.handle);
        }
        Cow::Owned(
            self.node_handle(file.ino)
                .unwrap_or_else(|_| file.handle.clone()),
        )
    }

    /// Opens a file from fresh metadata; `None` when its attributes must be revalidated with
    /// the source first (close-to-open consistency within the metadata TTL).
    pub fn try_open_file(
        self: &Arc<Self>,
        ino: Ino,
        writable: bool,
    ) -> Option<Result<Arc<OpenFile>>> {
        if writable && self.config.read_write {
            // A writer binds to its source file at open (see `open_file`), which may block.
            return None;
        }
        let checked = self.meta.with(ino, |n| n.checked_ms)?;
        self.fresh(checked).then(|| self.open_known(ino, writable))
    }

    pub async fn open_file(self: &Arc<Self>, ino: Ino, writable: bool) -> Result<Arc<OpenFile>> {
        let checked = self.meta.with(ino, |n| n.checked_ms);
        if !checked.is_some_and(|checked| self.fresh(checked)) {
            self.revalidate(ino).await?;
        }
        let file = self.open_known(ino, writable)?;
        if writable {
            self.bind_writer(&file).await?;
        }
        Ok(file)
    }

    pub(super) fn open_known(self: &Arc<Self>, ino: Ino, writable: bool) -> Result<Arc<OpenFile>> {
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
        if let Some(lease) = &file.lease
            && !passthrough_ready
        {
            let blocks = lease.block_count().min(OPEN_PREFETCH_BLOCKS);
            self.prefetch(&file, 0..blocks);
        }
        Ok(file)
    }

    /// Whether a cached file can go to the kernel directly. Verification of a file written by
    /// an earlier process is done inline only when it is one block; bigger files are verified
    /// in the background and get passthrough from their next open.
    pub(super) fn passthrough_ready(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        lease: &Arc<Lease>,
    ) -> bool {
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
                let result = source.read(&self.current_handle(file), offset, size).await;
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
    pub(super) async fn block(
        self: &Arc<Self>,
        file: &OpenFile,
        lease: &Arc<Lease>,
        block: u32,
        preload: bool,
    ) -> Result<Arc<Vec<u8>>> {
        let (start, len) = lease.block_range(block);
        if let Some(cache) = &self.cache
            && let Ok(Some(data)) = cache.read(lease, start, len)
        {
            return Ok(Arc::new(data));
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
    pub(super) async fn fetch_block(
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

    pub(super) async fn fetch_from_source(
        &self,
        file: &OpenFile,
        lease: &Lease,
        block: u32,
        preload: bool,
    ) -> Result<Vec<u8>, SourceError> {
        let (start, len) = lease.block_range(block);
        let source = self.source()?;
        let started = Instant::now();
        let result = source
            .read(&self.current_handle(file), start, len as u32)
            .await;
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
    pub(super) fn forget_fetch(&self, key: ContentKey, block: u32, cell: &Fetch) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight
            .get(&(key, block))
            .is_some_and(|c| Arc::ptr_eq(c, cell))
        {
            inflight.remove(&(key, block));
        }
    }
}

pub(super) fn store(cache: &Cache, lease: &Lease, block: u32, data: &[u8]) {
    if let Err(e) = cache.store_block(lease, block, data) {
        // The cache counts these and logs them at a bounded rate: a full disk fails every one.
        tracing::debug!(error = %crate::error::Chain(&e), "cannot store a block in the cache");
    }
}

/// Cache writes queued on the blocking pool, counted so that the end of a volume can wait for
/// them and a full queue pushes back on fetchers.
#[derive(Default)]
pub(super) struct PendingStores {
    queued: Mutex<usize>,
    idle: std::sync::Condvar,
}

impl PendingStores {
    /// Takes a place in the queue; false when it is full.
    pub(super) fn enqueue(&self) -> bool {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if *queued >= STORE_QUEUE {
            return false;
        }
        *queued += 1;
        true
    }

    pub(super) fn done(&self) {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        *queued = queued.saturating_sub(1);
        if *queued == 0 {
            self.idle.notify_all();
        }
    }

    /// True when the queue emptied within `wait`.
    pub(super) fn wait_idle(&self, wait: Duration) -> bool {
        let queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let (queued, _) = self
            .idle
            .wait_timeout_while(queued, wait, |queued| *queued > 0)
            .unwrap_or_else(|p| p.into_inner());
        *queued == 0
    }
}
