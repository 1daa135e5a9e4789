//! The FUSE face of a [`Volume`]: a thin adapter from kernel requests ([`crate::fuse`]) to the
//! core.
//!
//! Each request is first tried synchronously on the FUSE thread (`Volume::try_*`: fresh
//! metadata, cached blocks); only what needs the source goes to the async runtime, which
//! replies when the source answers. The adapter also owns what is FUSE-specific: the handles
//! the kernel holds ([`Handles`]) and the kernel's passthrough rules ([`super::passthrough`]).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{Instrument, Level};

use super::handles::{FileHandle, Handles};
use super::intents::Intents;
use super::meta::{Ino, ListedEntry, ROOT};
use super::passthrough::{BackingKind, Decision, OpenMode};
use super::{FsError, NodeEntry, OpenFile, Volume};
use crate::error::Chain;
use crate::failpoint;
use crate::fuse::abi::{UNIQUE_RESEND, fopen, init};
use crate::fuse::{
    Attributes, Connection, ConnectionError, DirectoryBuffer, EntryOut, Filesystem, KernelParams,
    MountOptions, OpenOut, Operation, Reply, Request, Session, SetattrIn, StatfsOut, TimeChange,
};
use crate::source::{Attr, Kind, Owner, SetAttr, SetTime, Timestamp};
use crate::units::Ttl;

/// Preferred I/O size reported in `st_blksize`.
const IO_BLOCK: u32 = 128 << 10;
/// How long a writer refused by a passthrough reader waits for that reader's RELEASE.
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// How a FUSE session is set up.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
    pub threads: usize,
    /// Hand fully cached files to the kernel (FUSE passthrough).
    pub passthrough: bool,
    /// Mount read-write (the volume must be read-write too).
    pub read_write: bool,
}

/// A served connection: its threads, and what a successor needs to take it over.
pub struct Served {
    pub session: Session,
    pub params: KernelParams,
}

/// Mounts `volume` at `mountpoint` (read-only unless read-write, allow_other,
/// default_permissions) and serves it.
pub fn mount(
    volume: Arc<Volume>,
    mountpoint: &Path,
    config: &MountConfig,
    logs: SessionLogs,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<Served, ConnectionError> {
    let adapter = FuseAdapter::new(volume, logs, config.passthrough);
    let options = MountOptions {
        fs_name: config.fs_name.clone(),
        read_only: !config.read_write,
        allow_other: true,
    };
    let connection = Connection::mount(mountpoint, &options, config.threads, &adapter)?;
    serve(adapter, connection, on_end)
}

/// Serves a connection an earlier process mounted (see [`Connection::resume`]), with the
/// handles it logged.
pub fn resume(
    volume: Arc<Volume>,
    connection: Connection,
    logs: SessionLogs,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<Served, ConnectionError> {
    let passthrough = connection.params().passthrough();
    // The kernel's lookup counts are unknown to this process.
    volume.kernel_resumed();
    let adapter = FuseAdapter::new(volume, logs, passthrough);
    for handle in adapter.handles.files() {
        if let OpenMode::Passthrough {
            kind: BackingKind::Source,
            ..
        } = handle.mode
            && handle.writable
        {
            adapter.volume.direct_writer(handle.ino, true);
        }
    }
    serve(adapter, connection, on_end)
}

fn serve(
    adapter: FuseAdapter,
    connection: Connection,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<Served, ConnectionError> {
    let params = connection.params();
    adapter
        .passthrough
        .fetch_and(params.passthrough(), Ordering::Relaxed);
    if !params.passthrough() {
        tracing::info!("FUSE passthrough is off; cached files are served by the daemon");
    }
    let session = connection
        .serve(Arc::new(adapter), "fuse", on_end)
        .map_err(ConnectionError::Clone)?;
    Ok(Served { session, params })
}

pub struct FuseAdapter {
    volume: Arc<Volume>,
    handles: Handles,
    intents: Intents,
    passthrough: AtomicBool,
}

/// What a connection logs for a successor daemon (in memory only for `reservoir mount`).
pub struct SessionLogs {
    pub handles: Handles,
    pub intents: Intents,
}

impl SessionLogs {
    pub fn in_memory() -> Self {
        SessionLogs {
            handles: Handles::in_memory(),
            intents: Intents::in_memory(),
        }
    }
}

/// Logs a failed request once, with its whole chain of causes, at the error's own level.
fn log_error(op: &'static str, ino: Ino, e: &FsError) {
    let error = Chain(e);
    let errno = e.errno();
    match e.level() {
        Level::ERROR => tracing::error!(op, ino, errno, %error, "request failed"),
        Level::WARN => tracing::warn!(op, ino, errno, %error, "request failed"),
        Level::INFO => tracing::info!(op, ino, errno, %error, "request failed"),
        _ => tracing::debug!(op, ino, errno, %error, "request failed"),
    }
}

fn reply_error(reply: Reply, op: &'static str, ino: Ino, e: &FsError) {
    log_error(op, ino, e);
    reply.error(e.errno());
}

fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::File => libc::S_IFREG,
        Kind::Directory => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDevice => libc::S_IFCHR,
        Kind::BlockDevice => libc::S_IFBLK,
    }
}

/// The `DT_*` type of a directory entry.
fn dirent_type(kind: Kind) -> u32 {
    u32::from(match kind {
        Kind::File => libc::DT_REG,
        Kind::Directory => libc::DT_DIR,
        Kind::Symlink => libc::DT_LNK,
        Kind::Fifo => libc::DT_FIFO,
        Kind::Socket => libc::DT_SOCK,
        Kind::CharDevice => libc::DT_CHR,
        Kind::BlockDevice => libc::DT_BLK,
    })
}

fn attributes(ino: Ino, attr: &Attr) -> Attributes {
    let time = |t: Timestamp| (t.secs, t.nanos);
    Attributes {
        ino,
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: time(attr.atime),
        mtime: time(attr.mtime),
        ctime: time(attr.ctime),
        mode: type_bits(attr.kind) | u32::from(attr.perm),
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: IO_BLOCK,
    }
}

fn entry_out(entry: &NodeEntry) -> EntryOut {
    EntryOut {
        nodeid: entry.ino,
        ttl: entry.ttl,
        attr: attributes(entry.ino, &entry.attr),
    }
}

/// How the kernel is to treat an opened file. Writers need FLUSH (close commits); readers of
/// a read-only file do not. The kernel refuses KEEP_CACHE together with passthrough.
fn open_flags(file: &OpenFile, mode: OpenMode) -> u32 {
    let mut flags = 0;
    if !file.writable {
        flags |= fopen::NOFLUSH;
    }
    if file.keep_cache && !file.passthrough_ready && mode == OpenMode::Daemon {
        flags |= fopen::KEEP_CACHE;
    }
    flags
}

fn set_time(change: Option<TimeChange>) -> Option<SetTime> {
    change.map(|t| match t {
        TimeChange::Now => SetTime::Now,
        TimeChange::At { secs, nanos } => SetTime::At(Timestamp { secs, nanos }),
    })
}

/// The id a request had when first sent (a resent one has [`UNIQUE_RESEND`] set).
fn original_unique(unique: u64) -> u64 {
    unique & !UNIQUE_RESEND
}

impl FuseAdapter {
    fn new(volume: Arc<Volume>, logs: SessionLogs, passthrough: bool) -> Self {
        FuseAdapter {
            volume,
            handles: logs.handles,
            intents: logs.intents,
            passthrough: AtomicBool::new(passthrough),
        }
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.volume
            .runtime()
            .spawn(task.instrument(tracing::Span::current()));
    }

    /// Replies with what the core knows already, on this thread; or asks the source on the
    /// runtime and replies when it answers, leaving this thread free for cached requests.
    fn answer<T, Ask, Fut>(
        self: &Arc<Self>,
        known: Option<T>,
        reply: Reply,
        ask: Ask,
        finish: impl FnOnce(&Arc<FuseAdapter>, Reply, T) + Send + 'static,
    ) where
        T: Send + 'static,
        Ask: FnOnce(Arc<Volume>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send,
    {
        match known {
            Some(value) => finish(self, reply, value),
            None => {
                let this = self.clone();
                self.spawn(async move {
                    let value = ask(this.volume.clone()).await;
                    finish(&this, reply, value);
                });
            }
        }
    }

    fn reply_entry(&self, reply: Reply, parent: Ino, result: Result<NodeEntry, FsError>) {
        match result {
            Ok(entry) => {
                self.volume.persist_inodes();
                reply.entry(&entry_out(&entry));
            }
            // A negative entry: the kernel remembers the name is absent for the metadata TTL.
            Err(e) if e.errno() == libc::ENOENT => reply.entry(&EntryOut {
                nodeid: 0,
                ttl: self.volume.kernel_ttl(),
                attr: Attributes::default(),
            }),
            Err(e) => reply_error(reply, "lookup", parent, &e),
        }
    }

    fn reply_attr(reply: Reply, ino: Ino, result: Result<NodeEntry, FsError>) {
        match result {
            Ok(entry) => reply.attr(entry.ttl, &attributes(entry.ino, &entry.attr)),
            Err(e) => reply_error(reply, "getattr", ino, &e),
        }
    }

    /// Decides how the kernel reads (or writes) an opened file, registers the handle and
    /// replies; `entry` makes it a CREATE reply.
    fn reply_open(
        self: &Arc<Self>,
        reply: Reply,
        ino: Ino,
        result: Result<Arc<OpenFile>, FsError>,
        entry: Option<NodeEntry>,
        may_wait: bool,
    ) {
        let file = match result {
            Ok(file) => file,
            Err(e) => return reply_error(reply, "open", ino, &e),
        };
        // A writer of a directory source may write to the source file directly. Opened before
        // the decision, outside the lock: the source may be a network mount that hangs.
        let source_file = (file.writable && self.passthrough.load(Ordering::Relaxed))
            .then(|| self.volume.open_direct_writer(&file))
            .flatten();
        let mut opens = self.handles.opens.lock().unwrap_or_else(|p| p.into_inner());
        let mode = match opens.decide(ino, file.writable) {
            Decision::Refuse if may_wait => {
                // The reader may have just closed: the kernel sends RELEASE in the background,
                // and another thread may read this OPEN first. Give it a moment.
                drop(opens);
                let this = self.clone();
                self.spawn(async move {
                    tokio::time::sleep(RELEASE_GRACE).await;
                    this.reply_open(reply, ino, Ok(file), entry, false);
                });
                return;
            }
            Decision::Refuse => {
                // The kernel would make this open passthrough too, and its writes would land in
                // the cache file instead of the source: refuse, as for a running executable.
                drop(opens);
                tracing::warn!(
                    ino,
                    "refusing to open for writing a file that is being read through passthrough (ETXTBSY)"
                );
                let volume = self.volume.clone();
                self.spawn(async move { volume.release(&file).await });
                return reply.error(libc::ETXTBSY);
            }
            Decision::Share { backing, kind } => OpenMode::Passthrough { backing, kind },
            Decision::Daemon => OpenMode::Daemon,
            Decision::Free => self.new_backing(&reply, &file, source_file),
        };
        opens.record(ino, mode);
        drop(opens);
        match mode {
            OpenMode::Passthrough { .. } if file.writable => self.volume.direct_writer(ino, true),
            OpenMode::Passthrough {
                kind: BackingKind::Cache,
                ..
            } => self.volume.note_passthrough(&file),
            _ => {}
        }
        let flags = open_flags(&file, mode);
        let unique = original_unique(reply.unique());
        let fh = self.handles.insert_file(unique, ino, mode, file);
        send_open(reply, fh, flags, mode, entry);
    }

    /// A backing file for an open that nothing constrains: the source file for a writer (a
    /// directory source), the complete cache file for a reader; or none (the daemon serves).
    fn new_backing(
        &self,
        reply: &Reply,
        file: &OpenFile,
        source_file: Option<std::os::fd::OwnedFd>,
    ) -> OpenMode {
        if !self.passthrough.load(Ordering::Relaxed) {
            return OpenMode::Daemon;
        }
        if let Some(source_file) = source_file {
            return match reply.channel().open_backing(source_file.as_fd()) {
                Ok(backing) => OpenMode::Passthrough {
                    backing,
                    kind: BackingKind::Source,
                },
                Err(e) => {
                    // E.g. a source directory on a stacked file system (overlayfs): this writer
                    // is served by the daemon; cached files may still pass through.
                    tracing::debug!(ino = file.ino, error = %crate::error::Chain(&e), "the kernel refused the source file as a passthrough backing file");
                    OpenMode::Daemon
                }
            };
        }
        if file.writable || !file.passthrough_ready {
            return OpenMode::Daemon;
        }
        let Some(data) = file.lease.as_ref().and_then(|lease| lease.data_file()) else {
            return OpenMode::Daemon;
        };
        match reply.channel().open_backing(data.as_fd()) {
            Ok(backing) => OpenMode::Passthrough {
                backing,
                kind: BackingKind::Cache,
            },
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "the kernel refused a passthrough backing file; serving cached files from the daemon from now on");
                self.passthrough.store(false, Ordering::Relaxed);
                OpenMode::Daemon
            }
        }
    }

    /// Answers a resent OPEN or CREATE that an earlier process had answered already (the
    /// kernel never got that answer) with the same handle; `false` if it had not.
    fn answer_again(&self, reply: Reply, create: bool) -> Result<(), Reply> {
        if reply.unique() & UNIQUE_RESEND == 0 {
            return Err(reply);
        }
        let Some((fh, handle)) = self.handles.answered(original_unique(reply.unique())) else {
            return Err(reply);
        };
        let entry = match create {
            true => match self.volume.referenced_known_entry(handle.ino) {
                Some(entry) => Some(entry),
                None => return Err(reply),
            },
            false => None,
        };
        tracing::info!(
            fh,
            ino = handle.ino,
            "answering a resent open with the handle given before the restart"
        );
        let flags = if handle.writable { 0 } else { fopen::NOFLUSH };
        send_open(reply, fh, flags, handle.mode, entry);
        Ok(())
    }

    /// The open file of a handle, rebuilt (after a restart) if needed.
    async fn open_file_of(&self, handle: &FileHandle) -> Result<Arc<OpenFile>, FsError> {
        if let Some(file) = handle.file() {
            return Ok(file.clone());
        }
        let file = self.volume.open_file(handle.ino, handle.writable).await?;
        Ok(handle.set_file(file))
    }

    fn release(&self, reply: Reply, fh: u64) {
        if let Some(handle) = self.handles.remove_file(fh) {
            let closed = self
                .handles
                .opens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(handle.ino, handle.mode);
            if let Some(backing) = closed
                && let Err(e) = reply.channel().close_backing(backing)
            {
                tracing::warn!(backing, error = %crate::error::Chain(&e), "cannot close a passthrough backing file");
            }
            if handle.writable {
                if let OpenMode::Passthrough { .. } = handle.mode {
                    self.volume.direct_writer(handle.ino, false);
                }
                if let Some(file) = handle.file().cloned() {
                    let volume = self.volume.clone();
                    self.spawn(async move { volume.release(&file).await });
                }
            }
        }
        reply.ok();
    }

    fn commit(self: &Arc<Self>, reply: Reply, ino: Ino, fh: u64, op: &'static str) {
        let Some(handle) = self.handles.file(fh).filter(|h| h.writable) else {
            return reply.ok();
        };
        let this = self.clone();
        self.spawn(async move {
            let result = match this.open_file_of(&handle).await {
                Ok(file) => this.volume.commit(&file).await,
                Err(e) => Err(e),
            };
            reply_empty(reply, op, ino, result);
        });
    }

    fn read(self: &Arc<Self>, reply: Reply, ino: Ino, fh: u64, offset: u64, size: u32) {
        let Some(handle) = self.handles.file(fh) else {
            return reply.error(libc::EBADF);
        };
        if let Some(file) = handle.file()
            && let Some(data) = self.volume.try_read(file, offset, size)
        {
            return reply.data(&data);
        }
        let this = self.clone();
        self.spawn(async move {
            let result = match this.open_file_of(&handle).await {
                Ok(file) => this.volume.read(&file, offset, size).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(data) => reply.data(&data),
                Err(e) => reply_error(reply, "read", ino, &e),
            }
        });
    }

    fn write(self: &Arc<Self>, reply: Reply, ino: Ino, fh: u64, offset: u64, data: &[u8]) {
        let Some(handle) = self.handles.file(fh) else {
            return reply.error(libc::EBADF);
        };
        // A directory source writes straight from the kernel's buffer, on this thread.
        if let Some(file) = handle.file()
            && let Some(result) = self.volume.try_write(file, offset, data)
        {
            failpoint::hit("after-source:write");
            return match result {
                Ok(written) => reply.written(written),
                Err(e) => reply_error(reply, "write", ino, &e),
            };
        }
        // Otherwise the bytes are copied once, into the buffer the write owns until it lands.
        let (this, data) = (self.clone(), data.to_vec());
        self.spawn(async move {
            let result = match this.open_file_of(&handle).await {
                Ok(file) => this.volume.write(&file, offset, data).await,
                Err(e) => Err(e),
            };
            failpoint::hit("after-source:write");
            match result {
                Ok(written) => reply.written(written),
                Err(e) => reply_error(reply, "write", ino, &e),
            }
        });
    }

    fn open_dir(&self, reply: Reply, ino: Ino, result: Result<Vec<ListedEntry>, FsError>) {
        match result {
            Ok(entries) => {
                let fh = self.handles.next_handle();
                self.handles.insert_dir(fh, Arc::new(entries));
                let mut flags = fopen::CACHE_DIR;
                if self.volume.metadata_ttl() == Ttl::Forever {
                    flags |= fopen::KEEP_CACHE;
                }
                reply.opened(&OpenOut {
                    fh,
                    flags,
                    backing_id: None,
                });
            }
            Err(e) => reply_error(reply, "opendir", ino, &e),
        }
    }

    /// Lists an open directory from `offset`. A handle an earlier process opened is listed
    /// again (the listing is the same unless the source changed).
    fn read_dir(
        self: &Arc<Self>,
        reply: Reply,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) {
        if let Some(entries) = self.handles.dir(fh) {
            return self.fill_dir(reply, ino, &entries, offset, size, plus);
        }
        self.answer(
            self.volume.try_list(ino),
            reply,
            move |volume| async move { volume.list(ino).await },
            move |this, reply, result| match result {
                Ok(entries) => {
                    let entries = Arc::new(entries);
                    this.handles.insert_dir(fh, entries.clone());
                    this.fill_dir(reply, ino, &entries, offset, size, plus);
                }
                Err(e) => reply_error(reply, "readdir", ino, &e),
            },
        );
    }

    fn fill_dir(
        &self,
        reply: Reply,
        ino: Ino,
        entries: &[ListedEntry],
        offset: u64,
        size: u32,
        plus: bool,
    ) {
        let parent = if ino == ROOT {
            ROOT
        } else {
            self.volume.parent_of(ino).unwrap_or(ROOT)
        };
        let dots = [
            (ino, Kind::Directory, &b"."[..]),
            (parent, Kind::Directory, &b".."[..]),
        ];
        let listed = entries.iter().map(|e| (e.ino, e.kind, &e.name[..]));
        if plus {
            self.volume.persist_inodes();
        }
        let mut buffer = DirectoryBuffer::new(size);
        for (index, (child, kind, name)) in dots
            .into_iter()
            .chain(listed)
            .enumerate()
            .skip(offset as usize)
        {
            let next = index as u64 + 1;
            let added = if plus {
                // The kernel counts a lookup for every entry but the dots.
                let dot = index < dots.len();
                let entry = match dot {
                    true => self.volume.known_entry(child),
                    false => self.volume.referenced_known_entry(child),
                };
                let out = match &entry {
                    Some(entry) => entry_out(entry),
                    // Evicted since the listing was read: the name without attributes (the
                    // kernel looks it up when it is used).
                    None => EntryOut {
                        nodeid: 0,
                        ttl: std::time::Duration::ZERO,
                        attr: Attributes {
                            ino: child,
                            ..Attributes::default()
                        },
                    },
                };
                let added = buffer.add_plus(&out, next, dirent_type(kind), name);
                if !added && !dot && entry.is_some() {
                    self.volume.forget(child, 1);
                }
                added
            } else {
                buffer.add(child, next, dirent_type(kind), name)
            };
            if !added {
                break;
            }
        }
        reply.data(buffer.bytes());
    }

    fn statfs(&self, reply: Reply) {
        const BLOCK: u64 = 4096;
        let status = self.volume.status();
        let (total, free) = match status.cache {
            Some(usage) => (usage.capacity, usage.capacity.saturating_sub(usage.used)),
            None => (0, 0),
        };
        reply.statfs(&StatfsOut {
            blocks: total / BLOCK,
            bfree: free / BLOCK,
            bavail: free / BLOCK,
            files: status.nodes_known,
            ffree: 0,
            bsize: BLOCK as u32,
            namelen: 255,
            frsize: BLOCK as u32,
        });
    }

    /// The answer to a change a read-only volume cannot make, or that no volume makes.
    fn refuse_change(&self, reply: Reply, on_read_write: i32) {
        reply.error(if self.volume.read_write() {
            on_read_write
        } else {
            libc::EROFS
        });
    }

    fn dispatch(self: &Arc<Self>, request: Request<'_>, reply: Reply) {
        let header = request.header;
        let (ino, owner) = (
            header.nodeid,
            Owner {
                uid: header.uid,
                gid: header.gid,
            },
        );
        match request.operation {
            Operation::Lookup { name } => {
                let known = self.volume.try_lookup(ino, name);
                let name = name.to_vec();
                self.answer(
                    known,
                    reply,
                    move |volume| async move { volume.lookup(ino, &name).await },
                    move |this, reply, result| this.reply_entry(reply, ino, result),
                );
            }
            Operation::Getattr { .. } => self.answer(
                self.volume.try_getattr(ino),
                reply,
                move |volume| async move { volume.getattr(ino).await },
                move |_, reply, result| Self::reply_attr(reply, ino, result),
            ),
            Operation::Readlink => self.answer(
                self.volume.try_read_link(ino),
                reply,
                move |volume| async move { volume.read_link(ino).await },
                move |_, reply, result| match result {
                    Ok(target) => reply.data(&target),
                    Err(e) => reply_error(reply, "readlink", ino, &e),
                },
            ),
            Operation::Open { flags } => {
                let Err(reply) = self.answer_again(reply, false) else {
                    return;
                };
                // O_TRUNC arrives as a separate SETATTR (no atomic O_TRUNC), which a read-only
                // volume refuses.
                let writable = flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
                let volume = self.volume.clone();
                self.answer(
                    self.volume.try_open_file(ino, writable),
                    reply,
                    move |_| async move { volume.open_file(ino, writable).await },
                    move |this, reply, result| this.reply_open(reply, ino, result, None, true),
                );
            }
            Operation::Read { fh, offset, size } => self.read(reply, ino, fh, offset, size),
            Operation::Write { fh, offset, data } => self.write(reply, ino, fh, offset, data),
            Operation::Release { fh } => self.release(reply, fh),
            // Every close() of a written file flushes: that is where written data becomes
            // durable (close-to-open consistency). Readers never flush (FOPEN_NOFLUSH).
            Operation::Flush { fh } => self.commit(reply, ino, fh, "flush"),
            Operation::Fsync { fh } => self.commit(reply, ino, fh, "fsync"),
            Operation::Opendir => self.answer(
                self.volume.try_list(ino),
                reply,
                move |volume| async move { volume.list(ino).await },
                move |this, reply, result| this.open_dir(reply, ino, result),
            ),
            Operation::Readdir {
                fh,
                offset,
                size,
                plus,
            } => self.read_dir(reply, ino, fh, offset, size, plus),
            Operation::Releasedir { fh } => {
                self.handles.remove_dir(fh);
                reply.ok();
            }
            Operation::Fsyncdir | Operation::Destroy => reply.ok(),
            Operation::Statfs => self.statfs(reply),
            Operation::Access { mask } => {
                if mask & libc::W_OK as u32 != 0 && !self.volume.read_write() {
                    return reply.error(libc::EROFS);
                }
                reply.ok();
            }
            // Extended attributes are not served: ENOSYS makes the kernel stop asking.
            Operation::Getxattr | Operation::Listxattr | Operation::Lseek { .. } => {
                reply.error(libc::ENOSYS)
            }
            Operation::Setxattr | Operation::Removexattr => {
                self.refuse_change(reply, libc::ENOTSUP)
            }
            Operation::Fallocate => self.refuse_change(reply, libc::EOPNOTSUPP),
            // Device nodes, FIFOs and sockets have no place in a dataset volume; hard links
            // would give one file two names in the cache's view.
            Operation::Mknod { .. } | Operation::Link { .. } => {
                self.refuse_change(reply, libc::EPERM)
            }
            // Changes go to the core, which refuses them with EROFS on a read-only volume
            // (whose mount is read-only too, so the kernel refuses them first).
            Operation::Setattr(set) => self.setattr(reply, ino, set),
            Operation::Mkdir { name, mode, umask } => {
                let (name, perm) = (name.to_vec(), (mode & !umask & 0o7777) as u16);
                self.change(
                    reply,
                    "after-source:mkdir",
                    move |volume, redone| async move {
                        match volume.mkdir(ino, &name, perm, owner).await {
                            Err(e) if redone && e.errno() == libc::EEXIST => {
                                volume.lookup(ino, &name).await
                            }
                            result => result,
                        }
                    },
                    move |this, reply, result| this.reply_created_entry(reply, ino, result),
                );
            }
            Operation::Symlink { name, target } => {
                let (name, target) = (name.to_vec(), target.to_vec());
                self.change(
                    reply,
                    "after-source:symlink",
                    move |volume, redone| async move {
                        match volume.symlink(ino, &name, &target, owner).await {
                            Err(e) if redone && e.errno() == libc::EEXIST => {
                                volume.lookup(ino, &name).await
                            }
                            result => result,
                        }
                    },
                    move |this, reply, result| this.reply_created_entry(reply, ino, result),
                );
            }
            Operation::Unlink { name } => self.remove(reply, ino, name, false),
            Operation::Rmdir { name } => self.remove(reply, ino, name, true),
            Operation::Rename {
                name,
                new_parent,
                new_name,
                flags,
            } => {
                if flags != 0 {
                    // RENAME_NOREPLACE and RENAME_EXCHANGE cannot be done atomically on the
                    // source.
                    return reply.error(libc::EINVAL);
                }
                let (name, new_name) = (name.to_vec(), new_name.to_vec());
                self.change(
                    reply,
                    "after-source:rename",
                    move |volume, redone| async move {
                        match volume.rename(ino, &name, new_parent, &new_name).await {
                            // Renamed already: the old name is gone, the new one is there.
                            Err(e) if redone && e.errno() == libc::ENOENT => {
                                let entry = volume.lookup(new_parent, &new_name).await?;
                                volume.forget(entry.ino, 1);
                                Ok(())
                            }
                            result => result,
                        }
                    },
                    move |_, reply, result| reply_empty(reply, "rename", ino, result),
                );
            }
            Operation::Create {
                name,
                flags,
                mode,
                umask,
            } => {
                let Err(reply) = self.answer_again(reply, true) else {
                    return;
                };
                let name = name.to_vec();
                let perm = (mode & !umask & 0o7777) as u16;
                let exclusive = flags & libc::O_EXCL as u32 != 0;
                self.change(
                    reply,
                    "after-source:create",
                    move |volume, redone| async move {
                        match volume.create(ino, &name, perm, owner, exclusive).await {
                            // Created already, by this very request: open what it created.
                            Err(e) if redone && e.errno() == libc::EEXIST => {
                                let entry = volume.lookup(ino, &name).await?;
                                let file = volume.open_file(entry.ino, true).await?;
                                Ok((entry, file))
                            }
                            result => result,
                        }
                    },
                    move |this, reply, result| match result {
                        Ok((entry, file)) => {
                            this.volume.persist_inodes();
                            let ino = entry.ino;
                            this.reply_open(reply, ino, Ok(file), Some(entry), true);
                        }
                        Err(e) => reply_error(reply, "create", ino, &e),
                    },
                );
            }
            Operation::Init { .. } => reply.error(libc::EIO),
            Operation::Forget { .. } | Operation::BatchForget(_) | Operation::Interrupt => {}
            Operation::Unsupported => reply.error(libc::ENOSYS),
        }
    }

    fn setattr(self: &Arc<Self>, reply: Reply, ino: Ino, set: SetattrIn) {
        let changes = SetAttr {
            perm: set.mode.map(|m| (m & 0o7777) as u16),
            uid: set.uid,
            gid: set.gid,
            size: set.size,
            atime: set_time(set.atime),
            mtime: set_time(set.mtime),
        };
        let volume = self.volume.clone();
        self.spawn(async move {
            let result = volume.setattr(ino, changes).await;
            failpoint::hit("after-source:setattr");
            Self::reply_attr(reply, ino, result);
        });
    }

    fn remove(self: &Arc<Self>, reply: Reply, parent: Ino, name: &[u8], directory: bool) {
        let name = name.to_vec();
        let (op, point) = match directory {
            true => ("rmdir", "after-source:rmdir"),
            false => ("unlink", "after-source:unlink"),
        };
        self.change(
            reply,
            point,
            move |volume, redone| async move {
                match volume.remove(parent, &name, directory).await {
                    // Removed already, by this very request.
                    Err(e) if redone && e.errno() == libc::ENOENT => Ok(()),
                    result => result,
                }
            },
            move |_, reply, result| reply_empty(reply, op, parent, result),
        );
    }

    /// Runs a change of the source for the request `reply` answers, on the runtime. The
    /// request's id is recorded first, so that if this daemon dies before answering, its
    /// successor knows the change may have been made when the kernel resends the request
    /// (`redone`), and answers as this daemon would have. `point` is the change's failpoint.
    fn change<T, Run, Fut>(
        self: &Arc<Self>,
        reply: Reply,
        point: &'static str,
        run: Run,
        finish: impl FnOnce(&Arc<FuseAdapter>, Reply, T) + Send + 'static,
    ) where
        T: Send + 'static,
        Run: FnOnce(Arc<Volume>, bool) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send,
    {
        let unique = original_unique(reply.unique());
        let redone = reply.unique() & UNIQUE_RESEND != 0 && self.intents.inherited(unique);
        if redone {
            tracing::info!(
                unique,
                "a change resent after a restart; the previous daemon may have made it"
            );
        }
        self.intents.begin(unique);
        let this = self.clone();
        self.spawn(async move {
            let value = run(this.volume.clone(), redone).await;
            failpoint::hit(point);
            finish(&this, reply, value);
            this.intents.end(unique);
        });
    }

    /// Replies to mkdir and symlink.
    fn reply_created_entry(&self, reply: Reply, parent: Ino, result: Result<NodeEntry, FsError>) {
        match result {
            Ok(entry) => {
                self.volume.persist_inodes();
                reply.entry(&entry_out(&entry));
            }
            Err(e) => reply_error(reply, "create", parent, &e),
        }
    }
}

/// A request's name, and the handle, offset and size it concerns (those it has).
fn describe(operation: &Operation<'_>) -> (&'static str, Option<u64>, Option<u64>, Option<u64>) {
    let none = (None, None, None);
    let (op, (fh, offset, size)) = match *operation {
        Operation::Init { .. } => ("init", none),
        Operation::Destroy => ("destroy", none),
        Operation::Lookup { .. } => ("lookup", none),
        Operation::Forget { .. } => ("forget", none),
        Operation::BatchForget(_) => ("batch_forget", none),
        Operation::Getattr { fh } => ("getattr", (fh, None, None)),
        Operation::Setattr(ref set) => ("setattr", (set.fh, set.size, None)),
        Operation::Readlink => ("readlink", none),
        Operation::Symlink { .. } => ("symlink", none),
        Operation::Mknod { .. } => ("mknod", none),
        Operation::Mkdir { .. } => ("mkdir", none),
        Operation::Unlink { .. } => ("unlink", none),
        Operation::Rmdir { .. } => ("rmdir", none),
        Operation::Rename { .. } => ("rename", none),
        Operation::Link { .. } => ("link", none),
        Operation::Open { .. } => ("open", none),
        Operation::Read { fh, offset, size } => {
            ("read", (Some(fh), Some(offset), Some(size.into())))
        }
        Operation::Write { fh, offset, data } => {
            ("write", (Some(fh), Some(offset), Some(data.len() as u64)))
        }
        Operation::Statfs => ("statfs", none),
        Operation::Release { fh } => ("release", (Some(fh), None, None)),
        Operation::Fsync { fh } => ("fsync", (Some(fh), None, None)),
        Operation::Flush { fh } => ("flush", (Some(fh), None, None)),
        Operation::Opendir => ("opendir", none),
        Operation::Readdir {
            fh, offset, size, ..
        } => ("readdir", (Some(fh), Some(offset), Some(size.into()))),
        Operation::Releasedir { fh } => ("releasedir", (Some(fh), None, None)),
        Operation::Fsyncdir => ("fsyncdir", none),
        Operation::Access { .. } => ("access", none),
        Operation::Create { .. } => ("create", none),
        Operation::Interrupt => ("interrupt", none),
        Operation::Getxattr => ("getxattr", none),
        Operation::Listxattr => ("listxattr", none),
        Operation::Setxattr => ("setxattr", none),
        Operation::Removexattr => ("removexattr", none),
        Operation::Fallocate => ("fallocate", none),
        Operation::Lseek { fh, offset, .. } => ("lseek", (Some(fh), Some(offset), None)),
        Operation::Unsupported => ("unsupported", none),
    };
    (op, fh, offset, size)
}

/// Replies to a request whose answer is only success or an errno.
fn reply_empty(reply: Reply, op: &'static str, ino: Ino, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply_error(reply, op, ino, &e),
    }
}

fn send_open(reply: Reply, fh: u64, flags: u32, mode: OpenMode, entry: Option<NodeEntry>) {
    let open = OpenOut {
        fh,
        flags,
        backing_id: match mode {
            OpenMode::Passthrough { backing, .. } => Some(backing),
            OpenMode::Daemon => None,
        },
    };
    match entry {
        Some(entry) => reply.created(&entry_out(&entry), &open),
        None => reply.opened(&open),
    }
}

impl Filesystem for FuseAdapter {
    fn init_flags(&self, _offered: u64) -> u64 {
        let mut wanted = init::DO_READDIRPLUS
            | init::PARALLEL_DIROPS
            | init::CACHE_SYMLINKS
            | init::ASYNC_READ
            | init::BIG_WRITES;
        if self.volume.metadata_ttl() != Ttl::Forever {
            wanted |= init::AUTO_INVAL_DATA;
        }
        if self.passthrough.load(Ordering::Relaxed) {
            wanted |= init::PASSTHROUGH;
        }
        wanted
    }

    fn handle(self: &Arc<Self>, request: Request<'_>, reply: Reply) {
        // Every line logged for the request, here or in the work it spawns, carries these.
        let (op, fh, offset, size) = describe(&request.operation);
        let span = tracing::info_span!(
            "fuse",
            unique = request.header.unique,
            op,
            ino = request.header.nodeid,
            fh,
            offset,
            size,
        );
        let _entered = span.enter();
        self.dispatch(request, reply);
    }

    fn forget(&self, nodeid: u64, nlookup: u64) {
        self.volume.forget(nodeid, nlookup);
    }
}
