//! Read-write volumes: every change goes through to the source before it is acknowledged.
//!
//! The contract is NFS's close-to-open consistency. A `write` is sent to the source before it
//! returns, and `flush` (every `close()`) and `fsync` make it durable (COMMIT, or fsync on a
//! directory source). Nothing is ever written into the cache. Instead, the cached copy of a
//! file that is being written is dropped, and every handle opened before the write reads from
//! the source from then on. The next open after the writers are gone sees the new version (new
//! attributes, so a new content key) and caches it afresh.
//!
//! On an NFS source a write is answered as soon as its WRITE request is on the wire, as the
//! kernel's NFS client answers from its page cache, so that consecutive writes overlap
//! (at most [`MAX_IN_FLIGHT_BYTES`] per file). What that costs is where a failure shows: an
//! error the server answers after the `write()` returned is kept and returned by the file's
//! next write, fsync or flush (close), which all wait for the file's writes in flight first.
//! Until a write has landed, nothing that would show the source's older state is served: a
//! write overlapping it waits, and reads, attribute requests and attribute changes of the file
//! wait for the writes in flight when they arrive. A directory source has nothing to overlap:
//! its `pwrite` is done before the reply, on the FUSE thread itself when it can.

use std::collections::HashMap;
use std::ops::ControlFlow::{self, Break, Continue};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;
use tracing::Instrument;

use super::meta::Ino;
use super::{FsError, NodeEntry, OpenFile, Result, Volume, content_key};
use crate::cache::ContentKey;
use crate::source::{Attr, FileWriter, Handle, Kind, Landing, Owner, SetAttr, Source, SourceError};

/// Bytes of one file's writes that may be sent and not yet answered. Eight 1 MiB WRITEs keep
/// the server busy while the kernel hands over the next request; more only hold memory.
pub const MAX_IN_FLIGHT_BYTES: u64 = 8 << 20;
/// Bytes of a file's NFS writes landed since its last COMMIT after which one is sent in the
/// background, so that the server flushes while the writer goes on and the final `fsync` finds
/// little left (the kernel's NFS client commits as its writeback proceeds, too).
const EARLY_COMMIT_BYTES: u64 = 64 << 20;

/// What the volume knows of the writing done to one inode.
#[derive(Default)]
pub(super) struct WriteState {
    /// Handles open for writing.
    writers: u32,
    /// The write epoch of the last change: handles opened before it hold a stale lease.
    epoch: u64,
    /// Writes started and not yet answered by the source.
    in_flight: Vec<InFlight>,
    /// The first failure of a write answered after its `write()` returned: for the next write,
    /// fsync or flush of the file.
    late_error: Option<SourceError>,
    /// Woken whenever one of the inode's writes lands.
    landed: Arc<Notify>,
    /// Writer handles whose writes the kernel sends to the source file itself (passthrough):
    /// the daemon never sees them, so the known attributes are never current meanwhile.
    direct_writers: u32,
    /// Bytes of NFS writes landed since the last COMMIT started.
    uncommitted: u64,
    /// A COMMIT sent in the background has not been answered yet.
    committing: bool,
}

/// One write in flight: its id (the write epoch it started at) and the bytes it covers.
struct InFlight {
    id: u64,
    range: Range<u64>,
}

impl WriteState {
    fn in_flight_bytes(&self) -> u64 {
        self.in_flight
            .iter()
            .map(|w| w.range.end - w.range.start)
            .sum()
    }

    /// Whether a write of `range` must wait: it overlaps one in flight (the later write must
    /// land last), or the file already has its fill of bytes in flight.
    fn must_wait(&self, range: &Range<u64>) -> bool {
        let overlaps = self
            .in_flight
            .iter()
            .any(|w| w.range.start < range.end && range.start < w.range.end);
        let full = !self.in_flight.is_empty()
            && self.in_flight_bytes() + (range.end - range.start) > MAX_IN_FLIGHT_BYTES;
        overlaps || full
    }
}

/// What a writer handle keeps: the file as the source opened it for this handle (directory
/// sources), opened with the handle and closed with it. Opening it later, by the path the file
/// then has, would write to whatever a rename has since put there.
#[derive(Default)]
pub struct HandleWrites {
    writer: tokio::sync::OnceCell<Option<Arc<dyn FileWriter>>>,
}

impl Volume {
    fn check_writable(&self) -> Result<()> {
        if self.config.read_write {
            Ok(())
        } else {
            Err(FsError::new(libc::EROFS, "read-only volume"))
        }
    }

    /// Whether a handle's cached copy still holds the file's current bytes.
    pub(super) fn cache_current(&self, file: &OpenFile) -> bool {
        if !self.config.read_write {
            return true;
        }
        let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        writes
            .get(&file.ino)
            .is_none_or(|w| w.writers == 0 && w.epoch <= file.opened_epoch)
    }

    /// Drops the write state of an inode the kernel forgot (no handle open, so no handle's
    /// epoch needs it) once nothing is pending on it.
    pub(super) fn drop_idle_write_state(&self, ino: Ino) {
        if !self.config.read_write {
            return;
        }
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let idle = writes.get(&ino).is_some_and(|w| {
            w.writers == 0
                && w.direct_writers == 0
                && w.in_flight.is_empty()
                && !w.committing
                && w.late_error.is_none()
        });
        if idle {
            writes.remove(&ino);
        }
    }

    pub(super) fn has_writers(&self, ino: Ino) -> bool {
        self.write_state_is(ino, |w| w.writers > 0)
    }

    /// Whether the volume is read-write and `ino`'s write state satisfies `test`.
    fn write_state_is(&self, ino: Ino, test: impl FnOnce(&WriteState) -> bool) -> bool {
        self.config.read_write
            && self
                .writes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ino)
                .is_some_and(test)
    }

    /// Marks the inode as changed: handles opened before now stop using their cached copy.
    /// Returns the new epoch.
    fn changed(&self, state: &mut WriteState) -> u64 {
        let epoch = self.write_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        state.epoch = epoch;
        epoch
    }

    /// Registers a writer of `ino` whose current version is `key`; drops that version from
    /// the cache. Returns the epoch the writer's handle starts at.
    pub(super) fn begin_writing(&self, ino: Ino, key: ContentKey) -> u64 {
        let epoch = {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            state.writers += 1;
            self.changed(state)
        };
        if let Some(cache) = &self.cache {
            cache.forget(key);
        }
        epoch
    }

    /// Notes a change to the data of `ino` outside an open writer (a truncate).
    fn data_changed(&self, ino: Ino, key: ContentKey) {
        {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            self.changed(state);
        }
        if let Some(cache) = &self.cache {
            cache.forget(key);
        }
    }

    fn current_key(&self, ino: Ino) -> Option<ContentKey> {
        self.meta
            .with(ino, |n| content_key(&self.source_id, &n.handle, &n.attr))
    }

    /// Whether `ino` has writes the known attributes may not show: writes in flight, or a
    /// writer whose writes go to the source file directly. Its attributes are then asked of
    /// the source (after the writes in flight land) instead of served from what is known.
    pub(super) fn writes_in_flight(&self, ino: Ino) -> bool {
        self.write_state_is(ino, |w| !w.in_flight.is_empty() || w.direct_writers > 0)
    }

    /// Opens the source file of a writer handle for the kernel to write to directly (FUSE
    /// passthrough), when the source has such a file (a directory source). The kernel then
    /// writes at the source's own speed and the daemon never sees the bytes: nothing reaches
    /// the cache, and the file's attributes are asked of the source until
    /// [`Volume::direct_writer_closed`].
    pub fn open_direct_writer(&self, file: &OpenFile) -> Option<OwnedFd> {
        if !file.writable {
            return None;
        }
        let source = self.source().ok()?;
        let handle = self.current_handle(file);
        match source.open_passthrough(&handle)? {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(ino = file.ino, error = %crate::error::Chain(&e), "no passthrough for this writer");
                None
            }
        }
    }

    /// A writer handle's writes go to the source file directly from now on
    /// (`opened` true), or no longer (its release).
    pub fn direct_writer(&self, ino: Ino, opened: bool) {
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let state = writes.entry(ino).or_default();
        if opened {
            state.direct_writers += 1;
            self.changed(state);
        } else {
            state.direct_writers = state.direct_writers.saturating_sub(1);
        }
        drop(writes);
        self.meta.expire(ino);
    }

    /// Waits until the writes to `ino` in flight now have landed (later ones are not waited
    /// for: a steady writer cannot starve the caller).
    pub(super) async fn settle_writes(&self, ino: Ino) {
        if !self.config.read_write {
            return;
        }
        let mut upto = None;
        self.wait_on_writes(|writes| {
            let Some(state) = writes.get(&ino) else {
                return Break(());
            };
            let Some(last) =
                *upto.get_or_insert_with(|| state.in_flight.iter().map(|w| w.id).max())
            else {
                return Break(());
            };
            if !state.in_flight.iter().any(|w| w.id <= last) {
                return Break(());
            }
            Continue(state.landed.clone())
        })
        .await
    }

    /// Runs `step` on the write states under their lock until it answers (`Break`), waiting in
    /// between on the `Notify` it names: a landing, or the answer to a background commit.
    async fn wait_on_writes<T>(
        &self,
        mut step: impl FnMut(&mut HashMap<Ino, WriteState>) -> ControlFlow<T, Arc<Notify>>,
    ) -> T {
        loop {
            let landed;
            let notified;
            {
                let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
                match step(&mut writes) {
                    Break(answer) => return answer,
                    Continue(notify) => landed = notify,
                }
                // Made while the lock is held: nothing can be notified between check and wait.
                notified = landed.notified();
            }
            notified.await;
        }
    }

    /// Registers a write of `range` to `ino` as in flight, once it overlaps none in flight and
    /// the file has room; returns its id. A late failure of an earlier write is returned
    /// instead (and forgotten: it is reported once).
    async fn start_write(&self, ino: Ino, range: Range<u64>) -> Result<u64> {
        let end = range.end;
        let id = self
            .wait_on_writes(|writes| {
                let state = writes.entry(ino).or_default();
                if let Some(e) = state.late_error.take() {
                    return Break(Err(e));
                }
                if state.must_wait(&range) {
                    return Continue(state.landed.clone());
                }
                let id = self.changed(state);
                state.in_flight.push(InFlight {
                    id,
                    range: range.clone(),
                });
                Break(Ok(id))
            })
            .await?;
        self.grow_known_size(ino, end);
        Ok(id)
    }

    /// Attributes known before a write must not be served while it is out: they are expired
    /// (getattr asks the source once the write lands), and the known size is raised to the
    /// write's end, for what is served without asking (directory listings with attributes),
    /// so that the size the kernel sees after the write is acknowledged never goes back.
    fn grow_known_size(&self, ino: Ino, end: u64) {
        if let Some(mut attr) = self.meta.with(ino, |n| n.attr.clone())
            && attr.size < end
        {
            attr.size = end;
            self.meta.update_attr(ino, attr);
        }
        self.meta.expire(ino);
    }

    /// Attributes the source gave were just stored; writes that started after it was asked
    /// may be in flight, and the known size must still cover them.
    pub(super) fn cover_writes_in_flight(&self, ino: Ino) {
        if !self.config.read_write {
            return;
        }
        let end = self
            .writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .and_then(|w| w.in_flight.iter().map(|f| f.range.end).max());
        if let Some(end) = end {
            self.grow_known_size(ino, end);
        }
    }

    /// A write started by [`Volume::start_write`] has its answer (`failure`: one that came after
    /// the `write()` was acknowledged, to report later).
    fn write_landed(&self, ino: Ino, id: u64, failure: Option<SourceError>) {
        {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            state.in_flight.retain(|w| w.id != id);
            if let Some(e) = failure {
                state.late_error.get_or_insert(e);
            }
            state.landed.notify_waiters();
        }
        // Replies may come in another order than the server carried the writes out, so none of
        // them is known to hold the latest attributes: the next getattr asks the source.
        self.meta.expire(ino);
    }

    /// Counts `bytes` of NFS writes landed on the source for `ino` (answered before or after the
    /// `write()` returned), and once [`EARLY_COMMIT_BYTES`] have landed since the last one, sends
    /// a COMMIT in the background (one at a time per file). Its failure is kept
    /// like a late write failure, for the file's next write, fsync or close.
    fn commit_early(self: &Arc<Self>, ino: Ino, handle: &Handle, bytes: u64) {
        {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            state.uncommitted += bytes;
            if state.committing || state.uncommitted < EARLY_COMMIT_BYTES {
                return;
            }
            state.committing = true;
            state.uncommitted = 0;
        }
        self.stats
            .background_commits
            .fetch_add(1, Ordering::Relaxed);
        let (volume, handle) = (self.clone(), handle.clone());
        self.runtime.spawn(async move {
            let result = match volume.source() {
                Ok(source) => source.commit(&handle).await,
                Err(e) => Err(e),
            };
            volume.observe(&result);
            let mut writes = volume.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            state.committing = false;
            if let Err(e) = result {
                tracing::warn!(ino, error = %crate::error::Chain(&e), "a background COMMIT failed; the file's next write, fsync or close reports it");
                state.late_error.get_or_insert(e);
            }
            state.landed.notify_waiters();
        }.in_current_span());
    }

    /// Waits for a background COMMIT of `ino` to be answered, so that its failure is not
    /// reported after the fsync or close that should report it.
    async fn settle_early_commit(&self, ino: Ino) {
        self.wait_on_writes(|writes| match writes.get(&ino) {
            Some(state) if state.committing => Continue(state.landed.clone()),
            _ => Break(()),
        })
        .await
    }

    fn take_late_error(&self, ino: Ino) -> Option<SourceError> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&ino)
            .and_then(|w| w.late_error.take())
    }

    /// Opens the source file a writer handle writes to, while the handle still names it.
    pub(super) async fn bind_writer(&self, file: &OpenFile) -> Result<()> {
        let source = self.source()?;
        self.writer(file, &source).await.map(drop)
    }

    /// The handle's own open file on the source, bound at open ([`Volume::bind_writer`]) or,
    /// if that failed at create, at the first write; `None` for sources that write by handle.
    async fn writer(
        &self,
        file: &OpenFile,
        source: &Arc<dyn Source>,
    ) -> Result<Option<Arc<dyn FileWriter>>> {
        let opened = file
            .writes
            .writer
            .get_or_try_init(|| async {
                let result = source.open_writer(&file.handle).await;
                self.observe(&result);
                result
            })
            .await?;
        Ok(opened.clone())
    }

    /// Writes on the calling (FUSE) thread when the source can do it right away (a directory
    /// source whose descriptor for this handle is open, with a free caller-thread slot) and no
    /// write of the file is in flight; `None` sends the caller to [`Volume::write`].
    pub fn try_write(&self, file: &OpenFile, offset: u64, data: &[u8]) -> Option<Result<u32>> {
        if !file.writable {
            return Some(Err(FsError::new(libc::EBADF, "not open for writing")));
        }
        let writer = file.writes.writer.get()?.as_ref()?;
        let end = offset.checked_add(data.len() as u64)?;
        let id = {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(file.ino).or_default();
            if !state.in_flight.is_empty() || state.late_error.is_some() {
                return None;
            }
            let id = self.changed(state);
            state.in_flight.push(InFlight {
                id,
                range: offset..end,
            });
            id
        };
        let result = writer.try_write(offset, data);
        self.write_landed(file.ino, id, None);
        let result = result?;
        self.observe(&result);
        Some(
            result
                .map(|attr| {
                    self.meta.update_attr(file.ino, attr);
                    data.len() as u32
                })
                .map_err(FsError::from),
        )
    }

    /// Writes `data` at `offset` to the source. On a source that overlaps writes this returns
    /// once the write is sent; its outcome lands later (see the module comment).
    #[tracing::instrument(skip(self, file, data), fields(ino = file.ino, len = data.len()))]
    pub async fn write(
        self: &Arc<Self>,
        file: &OpenFile,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32> {
        if !file.writable {
            return Err(FsError::new(libc::EBADF, "not open for writing"));
        }
        let len = data.len() as u32;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::new(libc::EFBIG, "write beyond the largest offset"))?;
        let source = self.source()?;
        let writer = self.writer(file, &source).await?;
        let ino = file.ino;
        let id = self.start_write(ino, offset..end).await?;
        if let Some(writer) = writer {
            let result = writer.write(offset, data).await;
            self.observe(&result);
            self.write_landed(ino, id, None);
            self.meta.update_attr(ino, result?);
            return Ok(len);
        }
        let started = source
            .write_sent(&self.current_handle(file), offset, data)
            .await;
        self.observe(&started);
        match started {
            Err(e) => {
                self.write_landed(ino, id, None);
                Err(e.into())
            }
            Ok(Landing::Landed(_)) => {
                self.write_landed(ino, id, None);
                self.commit_early(ino, &self.current_handle(file), u64::from(len));
                Ok(len)
            }
            Ok(Landing::InFlight(outcome)) => {
                let (volume, handle) = (self.clone(), self.current_handle(file).into_owned());
                self.runtime.spawn(async move {
                    let result = outcome.await;
                    volume.observe(&result);
                    let failure = result.err();
                    if let Some(e) = &failure {
                        tracing::warn!(ino, offset, error = %crate::error::Chain(&e), "a write failed after it was acknowledged; the file's next write, fsync or close reports it");
                    }
                    let landed = failure.is_none();
                    volume.write_landed(ino, id, failure);
                    if landed {
                        volume.commit_early(ino, &handle, u64::from(len));
                    }
                }.in_current_span());
                Ok(len)
            }
        }
    }

    /// Makes what was written through `file` durable (flush on close, fsync): waits for the
    /// file's writes in flight, then commits. A write that failed after it was acknowledged
    /// makes this fail with its error (the rest is committed all the same).
    #[tracing::instrument(skip(self, file), fields(ino = file.ino))]
    pub async fn commit(&self, file: &OpenFile) -> Result<()> {
        if !file.writable {
            return Ok(());
        }
        self.settle_writes(file.ino).await;
        self.settle_early_commit(file.ino).await;
        let late = self.take_late_error(file.ino);
        let result = self.commit_source(file).await;
        if let Some(e) = late {
            return Err(e.into());
        }
        result
    }

    /// COMMIT, or fsync through the handle's own descriptor (opened now if its writes went
    /// to the source file directly), which stays on the file if it was renamed.
    async fn commit_source(&self, file: &OpenFile) -> Result<()> {
        let source = self.source()?;
        let result = match self.writer(file, &source).await? {
            Some(writer) => writer.commit().await,
            None => source.commit(&self.current_handle(file)).await,
        };
        self.observe(&result);
        Ok(result?)
    }

    /// A handle is closed for good. For the last writer of an inode, the file's attributes
    /// are read again so that the next open sees (and caches) the version it left.
    pub async fn release(&self, file: &OpenFile) {
        if !file.writable {
            return;
        }
        self.settle_writes(file.ino).await;
        let (last, unreported) = {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(file.ino).or_default();
            state.writers = state.writers.saturating_sub(1);
            let last = state.writers == 0;
            // Every close flushes, and flush reports late failures; one can only be left if
            // the kernel released without a flush (the writer died): nobody is left to tell.
            (last, if last { state.late_error.take() } else { None })
        };
        if let Some(e) = unreported {
            tracing::warn!(ino = file.ino, error = %crate::error::Chain(&e), "a write failed after the file's last flush");
        }
        if last {
            self.meta.expire(file.ino);
            if let Err(e) = self.getattr(file.ino).await {
                tracing::debug!(ino = file.ino, error = %crate::error::Chain(&e), "cannot read attributes after writing");
            }
        }
    }

    /// Creates and opens a regular file.
    #[tracing::instrument(skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn create(
        self: &Arc<Self>,
        parent: Ino,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(NodeEntry, Arc<OpenFile>)> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = source.create(&dir, name, mode, owner, exclusive).await;
        self.observe(&result);
        let (handle, attr) = result?;
        let entry = self.add_child(parent, name, handle.clone(), attr.clone())?;
        let key = content_key(&self.source_id, &handle, &attr);
        let opened_epoch = self.begin_writing(entry.ino, key);
        let file = Arc::new(OpenFile {
            ino: entry.ino,
            handle,
            size: attr.size,
            key,
            lease: None,
            passthrough_ready: false,
            keep_cache: false,
            writable: true,
            opened_epoch,
            readahead: Default::default(),
            writes: HandleWrites::default(),
        });
        // The file exists now whatever happens next, so a failure to bind is not this call's
        // failure: the writer is then opened at the first write, by the name it was created at.
        if let Err(e) = self.bind_writer(&file).await {
            tracing::debug!(ino = entry.ino, error = %crate::error::Chain(&e), "writer not bound at create");
        }
        Ok((entry, file))
    }

    #[tracing::instrument(skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u16,
        owner: Owner,
    ) -> Result<NodeEntry> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = source.mkdir(&dir, name, mode, owner).await;
        self.observe(&result);
        let (handle, attr) = result?;
        self.add_child(parent, name, handle, attr)
    }

    #[tracing::instrument(skip(self, name, target), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<NodeEntry> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = source.symlink(&dir, name, target, owner).await;
        self.observe(&result);
        let (handle, attr) = result?;
        let entry = self.add_child(parent, name, handle, attr)?;
        self.meta.set_link(entry.ino, target);
        Ok(entry)
    }

    /// Records a node created on the source; its entry carries a reference for the kernel.
    fn add_child(&self, parent: Ino, name: &[u8], handle: Handle, attr: Attr) -> Result<NodeEntry> {
        let ino = self
            .meta
            .upsert_child(parent, name, handle, attr.clone(), true)
            .ok_or(FsError::new(libc::ENOTDIR, "not a directory"))?;
        Ok(NodeEntry {
            ino,
            attr,
            ttl: self.kernel_ttl(),
        })
    }

    /// Removes a file (`directory` false) or an empty directory.
    #[tracing::instrument(skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn remove(&self, parent: Ino, name: &[u8], directory: bool) -> Result<()> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = if directory {
            source.rmdir(&dir, name).await
        } else {
            source.remove(&dir, name).await
        };
        self.observe(&result);
        match result {
            Ok(()) => {}
            // Already gone on the source: the name is gone here too.
            Err(e) if e.errno() == libc::ENOENT => {
                self.meta.remove_child(parent, name);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(key) = self
            .meta
            .child(parent, name)
            .and_then(|ino| self.current_key(ino))
            && let Some(cache) = &self.cache
        {
            cache.forget(key);
        }
        self.meta.remove_child(parent, name);
        Ok(())
    }

    /// Renames, replacing an existing target.
    #[tracing::instrument(skip(self, name, new_name), fields(
        from = %String::from_utf8_lossy(name),
        to = %String::from_utf8_lossy(new_name),
    ))]
    pub async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
    ) -> Result<()> {
        self.check_writable()?;
        let from_dir = self.node_handle(parent)?;
        let to_dir = self.node_handle(new_parent)?;
        let source = self.source()?;
        let result = source.rename(&from_dir, name, &to_dir, new_name).await;
        self.observe(&result);
        result?;
        // The moved node's handle may change (a directory source addresses nodes by path):
        // ask the source for it under its new name.
        let looked_up = source.lookup(&to_dir, new_name).await;
        self.observe(&looked_up);
        match looked_up {
            Ok((handle, attr)) => {
                if let Some(replaced) = self.meta.child(new_parent, new_name)
                    && let (Some(cache), Some(key)) = (&self.cache, self.current_key(replaced))
                {
                    cache.forget(key);
                }
                self.meta
                    .rename(parent, name, new_parent, new_name, handle, attr);
            }
            Err(e) => {
                // Renamed, but its new identity is unknown: forget both names; the kernel's
                // next lookup asks the source.
                tracing::debug!(error = %crate::error::Chain(&e), "cannot look up a renamed file");
                self.meta.remove_child(parent, name);
                self.meta.unknown_child(new_parent, new_name);
            }
        }
        Ok(())
    }

    /// Changes attributes: mode, owner, size (truncate), times.
    #[tracing::instrument(skip(self))]
    pub async fn setattr(&self, ino: Ino, changes: SetAttr) -> Result<NodeEntry> {
        self.check_writable()?;
        let handle = self.node_handle(ino)?;
        let truncates = changes.size.is_some();
        let kind = self.meta.with(ino, |n| n.attr.kind);
        if truncates && kind == Some(Kind::Directory) {
            return Err(FsError::new(libc::EISDIR, "is a directory"));
        }
        // A truncate must not be overtaken by an earlier write, nor a size set by one.
        self.settle_writes(ino).await;
        let key_before = self.current_key(ino);
        let source = self.source()?;
        let result = source.setattr(&handle, &changes).await;
        self.observe(&result);
        let attr = result?;
        if truncates && let Some(key) = key_before {
            self.data_changed(ino, key);
        }
        self.meta.update_attr(ino, attr.clone());
        Ok(NodeEntry {
            ino,
            attr,
            ttl: self.kernel_ttl(),
        })
    }
}
