//! The FUSE face of a [`Volume`]: a thin adapter from kernel requests to the core.
//!
//! Each request is first tried synchronously on the FUSE thread (`Volume::try_*`: fresh
//! metadata, cached blocks); only what needs the source goes to the async runtime, which
//! replies when the source answers. The adapter also owns what is FUSE-specific: file and
//! directory handles, and the kernel's per-inode passthrough rules: while an inode is open
//! through passthrough, every further open of it must use the same backing file, and an inode
//! open through the page cache cannot also be opened through passthrough.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow,
    WriteFlags,
};

use super::meta::{Ino, ListedEntry, ROOT};
use super::{Entry, FsError, OpenFile, Volume};
use crate::source::{Attr, Kind, Owner, SetAttr, SetTime, Timestamp};
use crate::units::Ttl;

/// Preferred I/O size reported in `st_blksize`.
const IO_BLOCK: u32 = 128 << 10;
const MAX_BACKGROUND: u16 = 256;

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

/// Mounts `volume` at `mountpoint` (read-only, allow_other, default_permissions). The kernel
/// handshake is done when this returns; the caller runs the session.
pub fn mount(
    volume: Arc<Volume>,
    mountpoint: &Path,
    config: &MountConfig,
) -> std::io::Result<fuser::Session<FuseAdapter>> {
    let mut options = Config::default();
    options.mount_options = vec![
        MountOption::FSName(sanitize_fs_name(&config.fs_name)),
        // Passed to the kernel (fuser would keep `Subtype` for fusermount), so that mount
        // tables show `fuse.reservoir`.
        MountOption::CUSTOM("subtype=reservoir".into()),
        if config.read_write {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    options.acl = SessionACL::All;
    options.n_threads = Some(config.threads.max(1));
    options.clone_fd = true;
    let adapter = FuseAdapter {
        shared: Arc::new(Shared {
            volume,
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            inodes: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            passthrough: AtomicBool::new(config.passthrough),
        }),
    };
    fuser::Session::new(adapter, mountpoint, &options)
}

/// Mount option values are comma-separated: keep the name from breaking them.
fn sanitize_fs_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == ',' || c.is_whitespace() || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

pub struct FuseAdapter {
    shared: Arc<Shared>,
}

impl FuseAdapter {
    fn remove(&self, parent: Ino, name: &OsStr, directory: bool, reply: ReplyEmpty) {
        let (name, shared) = (name.as_bytes().to_vec(), self.shared.clone());
        self.shared.spawn(async move {
            let result = shared.volume.remove(parent, &name, directory).await;
            Shared::reply_empty(
                reply,
                if directory { "rmdir" } else { "unlink" },
                parent,
                result,
            );
        });
    }

    fn commit(&self, ino: Ino, fh: FileHandle, op: &'static str, reply: ReplyEmpty) {
        match self.shared.handle(fh) {
            Some(open) if open.file.writable => {
                let volume = self.shared.volume.clone();
                self.shared.spawn(async move {
                    Shared::reply_empty(reply, op, ino, volume.commit(&open.file).await);
                });
            }
            _ => reply.ok(),
        }
    }

    /// Replies with what the core knows already, on this thread; or asks the source on the
    /// runtime and replies when it answers, leaving this thread free for cached requests.
    fn answer<T, R, Ask, Fut>(
        &self,
        known: Option<T>,
        reply: R,
        ask: Ask,
        finish: impl FnOnce(&Shared, R, T) + Send + 'static,
    ) where
        T: Send + 'static,
        R: Send + 'static,
        Ask: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send,
    {
        match known {
            Some(value) => finish(&self.shared, reply, value),
            None => {
                let shared = self.shared.clone();
                self.shared.spawn(async move {
                    let value = ask(shared.clone()).await;
                    finish(&shared, reply, value);
                });
            }
        }
    }
}

struct Shared {
    volume: Arc<Volume>,
    files: RwLock<HashMap<u64, OpenHandle>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<ListedEntry>>>>,
    inodes: Mutex<HashMap<Ino, InodeIo>>,
    next_handle: AtomicU64,
    passthrough: AtomicBool,
}

#[derive(Clone)]
struct OpenHandle {
    file: Arc<OpenFile>,
    passthrough: bool,
}

/// How an inode is open right now, as far as the kernel's io modes go.
#[derive(Default)]
struct InodeIo {
    /// Opens served by the daemon (through the page cache).
    daemon_opens: u32,
    /// The backing file shared by the inode's passthrough opens, and how many there are.
    backing: Option<(Arc<BackingId>, u32)>,
    /// The backing file is the source file itself (opened for a writer), not a cache file:
    /// writers may share it.
    backing_is_source: bool,
}

impl InodeIo {
    /// Whether a writer may open the inode now: not while it is read through a cache file.
    fn writable(&self) -> bool {
        self.backing.is_none() || self.backing_is_source
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn log_error(op: &'static str, ino: Ino, e: &FsError) {
    if e.is_notable() {
        tracing::warn!(op, ino, error = %e, "request failed");
    } else {
        tracing::debug!(op, ino, error = %e, "request failed");
    }
}

fn system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Directory => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(ino: Ino, attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: system_time(attr.atime),
        mtime: system_time(attr.mtime),
        ctime: system_time(attr.ctime),
        crtime: system_time(attr.mtime),
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: IO_BLOCK,
        flags: 0,
    }
}

impl Shared {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.volume.runtime().spawn(task);
    }

    fn reply_entry(&self, reply: ReplyEntry, parent: Ino, result: Result<Entry, FsError>) {
        match result {
            Ok(entry) => reply.entry(
                &entry.ttl,
                &file_attr(entry.ino, &entry.attr),
                Generation(0),
            ),
            // A negative entry: the kernel remembers the name is absent for the metadata TTL.
            Err(e) if e.errno() == libc::ENOENT => {
                let mut absent = file_attr(0, &placeholder_attr());
                absent.ino = INodeNo(0);
                reply.entry(&self.volume.kernel_ttl(), &absent, Generation(0));
            }
            Err(e) => {
                log_error("lookup", parent, &e);
                reply.error(errno(&e));
            }
        }
    }

    fn reply_attr(reply: ReplyAttr, ino: Ino, result: Result<Entry, FsError>) {
        match result {
            Ok(entry) => reply.attr(&entry.ttl, &file_attr(entry.ino, &entry.attr)),
            Err(e) => {
                log_error("getattr", ino, &e);
                reply.error(errno(&e));
            }
        }
    }

    /// Chooses how the kernel reads an opened file and replies.
    fn reply_open(&self, reply: ReplyOpen, ino: Ino, result: Result<Arc<OpenFile>, FsError>) {
        let file = match result {
            Ok(file) => file,
            Err(e) => {
                log_error("open", ino, &e);
                return reply.error(errno(&e));
            }
        };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        let io = inodes.entry(ino).or_default();
        if file.writable && !io.writable() {
            // The kernel would make this open passthrough too, and its writes would land in the
            // cache file instead of the source: refuse, as for a running executable.
            drop(inodes);
            tracing::warn!(
                ino,
                "refusing to open for writing a file that is being read through passthrough (ETXTBSY)"
            );
            self.volume.runtime().spawn({
                let volume = self.volume.clone();
                async move { volume.release(&file).await }
            });
            return reply.error(Errno::ETXTBSY);
        }
        let backing = match &mut io.backing {
            // The kernel requires every open of an inode in passthrough mode to use it.
            Some((backing, count)) => {
                *count += 1;
                Some(backing.clone())
            }
            None if file.writable => self.source_backing(io, &file, |fd| reply.open_backing(fd)),
            None if file.passthrough_ready
                && io.daemon_opens == 0
                && self.passthrough.load(Ordering::Relaxed) =>
            {
                let opened = file
                    .lease
                    .as_ref()
                    .and_then(|lease| lease.data_file())
                    .map(|data| reply.open_backing(data));
                match opened {
                    Some(Ok(id)) => {
                        let id = Arc::new(id);
                        io.backing = Some((id.clone(), 1));
                        Some(id)
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the kernel refused a passthrough backing file; serving cached files from the daemon from now on");
                        self.passthrough.store(false, Ordering::Relaxed);
                        None
                    }
                    None => None,
                }
            }
            None => None,
        };
        if backing.is_none() {
            io.daemon_opens += 1;
        }
        let through_source = io.backing_is_source;
        drop(inodes);
        let passthrough = backing.is_some();
        if passthrough && file.writable {
            self.volume.direct_writer(ino, true);
        } else if passthrough && !through_source {
            self.volume.note_passthrough(&file);
        }
        let mut flags = open_flags(&file);
        if passthrough {
            // The kernel refuses KEEP_CACHE together with passthrough.
            flags.remove(FopenFlags::FOPEN_KEEP_CACHE);
        }
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, OpenHandle { file, passthrough });
        match backing {
            Some(id) => reply.opened_passthrough(FileHandle(handle), flags, &id),
            None => reply.opened(FileHandle(handle), flags),
        }
    }

    /// For a writer of an inode nobody else has open: the source file itself as the backing
    /// file, so that the kernel writes to it directly (a directory source). Readers that open
    /// the inode meanwhile share it, so they read the source's current bytes too.
    fn source_backing(
        &self,
        io: &mut InodeIo,
        file: &OpenFile,
        open_backing: impl FnOnce(&std::os::fd::OwnedFd) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if io.daemon_opens > 0 || !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let fd = self.volume.open_direct_writer(file)?;
        match open_backing(&fd) {
            Ok(id) => {
                let id = Arc::new(id);
                io.backing = Some((id.clone(), 1));
                io.backing_is_source = true;
                Some(id)
            }
            Err(e) => {
                // E.g. a source directory on a stacked file system (overlayfs): this writer is
                // served by the daemon; cached files may still pass through.
                tracing::debug!(ino = file.ino, error = %e, "the kernel refused the source file as a passthrough backing file");
                None
            }
        }
    }

    /// Registers a file opened by `create` (served by the daemon, or written through to the
    /// source file as [`Shared::source_backing`] allows) and replies.
    fn reply_create(
        &self,
        reply: ReplyCreate,
        parent: Ino,
        result: Result<(Entry, Arc<OpenFile>), FsError>,
    ) {
        let (entry, file) = match result {
            Ok(created) => created,
            Err(e) => {
                log_error("create", parent, &e);
                return reply.error(errno(&e));
            }
        };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        let io = inodes.entry(entry.ino).or_default();
        let shareable = io.backing_is_source;
        let backing = match &mut io.backing {
            Some((backing, count)) if shareable => {
                *count += 1;
                Some(backing.clone())
            }
            Some(_) => None,
            None => self.source_backing(io, &file, |fd| reply.open_backing(fd)),
        };
        if backing.is_none() {
            io.daemon_opens += 1;
        }
        drop(inodes);
        let passthrough = backing.is_some();
        if passthrough {
            self.volume.direct_writer(entry.ino, true);
        }
        let mut flags = open_flags(&file);
        if passthrough {
            flags.remove(FopenFlags::FOPEN_KEEP_CACHE);
        }
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, OpenHandle { file, passthrough });
        let attr = file_attr(entry.ino, &entry.attr);
        match backing {
            Some(id) => reply.created_passthrough(
                &entry.ttl,
                &attr,
                Generation(0),
                FileHandle(handle),
                flags,
                &id,
            ),
            None => reply.created(&entry.ttl, &attr, Generation(0), FileHandle(handle), flags),
        }
    }

    fn handle(&self, fh: FileHandle) -> Option<OpenHandle> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned()
    }

    /// Replies to a request whose answer is only success or an errno.
    fn reply_empty(reply: ReplyEmpty, op: &'static str, ino: Ino, result: Result<(), FsError>) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_error(op, ino, &e);
                reply.error(errno(&e));
            }
        }
    }

    fn release_file(&self, handle: u64) -> Option<Arc<OpenFile>> {
        let open = self
            .files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle)?;
        let ino = open.file.ino;
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(io) = inodes.get_mut(&ino) else {
            return Some(open.file);
        };
        if open.passthrough {
            if open.file.writable {
                self.volume.direct_writer(ino, false);
            }
            if let Some((_, count)) = &mut io.backing {
                *count -= 1;
                if *count == 0 {
                    io.backing = None;
                    io.backing_is_source = false;
                }
            }
        } else {
            io.daemon_opens = io.daemon_opens.saturating_sub(1);
        }
        if io.backing.is_none() && io.daemon_opens == 0 {
            inodes.remove(&ino);
        }
        Some(open.file)
    }

    fn open_dir(&self, reply: ReplyOpen, ino: Ino, result: Result<Vec<ListedEntry>, FsError>) {
        match result {
            Ok(entries) => {
                let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
                self.dirs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(handle, Arc::new(entries));
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if self.volume.metadata_ttl() == Ttl::Forever {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(handle), flags);
            }
            Err(e) => {
                log_error("opendir", ino, &e);
                reply.error(errno(&e));
            }
        }
    }

    fn read_write(&self) -> bool {
        self.volume.read_write()
    }

    /// Replies to mkdir and symlink.
    fn reply_created_entry(&self, reply: ReplyEntry, parent: Ino, result: Result<Entry, FsError>) {
        match result {
            Ok(entry) => reply.entry(
                &entry.ttl,
                &file_attr(entry.ino, &entry.attr),
                Generation(0),
            ),
            Err(e) => {
                log_error("create", parent, &e);
                reply.error(errno(&e));
            }
        }
    }

    fn listing(&self, handle: FileHandle) -> Option<Arc<Vec<ListedEntry>>> {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&handle.0)
            .cloned()
    }

    /// The parent of a directory, for `..`.
    fn parent_of(&self, ino: Ino) -> Ino {
        if ino == ROOT {
            return ROOT;
        }
        self.volume.parent_of(ino).unwrap_or(ROOT)
    }
}

/// How the kernel is to treat an opened file. Writers need FLUSH (close commits); readers of
/// a read-only file do not.
fn open_flags(file: &OpenFile) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if !file.writable {
        flags |= FopenFlags::FOPEN_NOFLUSH;
    }
    if file.keep_cache && !file.passthrough_ready {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    flags
}

fn owner(req: &Request) -> Owner {
    Owner {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_change(time: Option<TimeOrNow>) -> Option<SetTime> {
    time.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => {
            let (secs, nanos) = match at.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(before) => {
                    let d = before.duration();
                    (
                        -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0),
                        (1_000_000_000 - d.subsec_nanos()) % 1_000_000_000,
                    )
                }
            };
            SetTime::At(Timestamp { secs, nanos })
        }
    })
}

/// Attributes for a negative entry, which the kernel ignores.
fn placeholder_attr() -> Attr {
    Attr {
        kind: Kind::File,
        size: 0,
        perm: 0,
        uid: 0,
        gid: 0,
        nlink: 0,
        rdev: 0,
        fileid: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_ASYNC_READ;
        if self.shared.volume.metadata_ttl() != Ttl::Forever {
            wanted |= InitFlags::FUSE_AUTO_INVAL_DATA;
        }
        for flag in wanted.iter() {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel does not offer this FUSE capability");
            }
        }
        if self.shared.passthrough.load(Ordering::Relaxed) {
            let enabled = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !enabled {
                tracing::info!(
                    "kernel offers no FUSE passthrough; cached files are served by the daemon"
                );
                self.shared.passthrough.store(false, Ordering::Relaxed);
            }
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        let name = name.as_bytes();
        let known = self.shared.volume.try_lookup(parent, name);
        let name = name.to_vec();
        self.answer(
            known,
            reply,
            move |shared| async move { shared.volume.lookup(parent, &name).await },
            move |shared, reply, result| shared.reply_entry(reply, parent, result),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = ino.0;
        self.answer(
            self.shared.volume.try_getattr(ino),
            reply,
            move |shared| async move { shared.volume.getattr(ino).await },
            move |_, reply, result| Shared::reply_attr(reply, ino, result),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = ino.0;
        self.answer(
            self.shared.volume.try_read_link(ino),
            reply,
            move |shared| async move { shared.volume.read_link(ino).await },
            move |_, reply, result| match result {
                Ok(target) => reply.data(&target),
                Err(e) => {
                    log_error("readlink", ino, &e);
                    reply.error(errno(&e));
                }
            },
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC arrives as a separate SETATTR (no atomic O_TRUNC), which a read-only volume
        // refuses.
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let ino = ino.0;
        self.answer(
            self.shared.volume.try_open_file(ino, writable),
            reply,
            move |shared| async move { shared.volume.open_file(ino, writable).await },
            move |shared, reply, result| shared.reply_open(reply, ino, result),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(open) = self
            .shared
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned()
        else {
            return reply.error(Errno::EBADF);
        };
        let volume = &self.shared.volume;
        if let Some(data) = volume.try_read(&open.file, offset, size) {
            return reply.data(&data);
        }
        let volume = volume.clone();
        self.shared.spawn(async move {
            match volume.read(&open.file, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    log_error("read", ino.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(file) = self.shared.release_file(fh.0).filter(|f| f.writable) {
            let volume = self.shared.volume.clone();
            self.shared
                .spawn(async move { volume.release(&file).await });
        }
        reply.ok();
    }

    // Every close() of a written file flushes: that is where written data becomes durable
    // (close-to-open consistency). Readers never flush (FOPEN_NOFLUSH).
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.commit(ino.0, fh, "flush", reply);
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        self.commit(ino.0, fh, "fsync", reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let ino = ino.0;
        self.answer(
            self.shared.volume.try_list(ino),
            reply,
            move |shared| async move { shared.volume.list(ino).await },
            move |shared, reply, result| shared.open_dir(reply, ino, result),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.shared.listing(fh) else {
            return reply.error(Errno::EBADF);
        };
        let parent = self.shared.parent_of(ino.0);
        let dots = [
            (ino.0, FileType::Directory, &b"."[..]),
            (parent, FileType::Directory, &b".."[..]),
        ];
        let listed = entries
            .iter()
            .map(|e| (e.ino, file_type(e.kind), &e.name[..]));
        for (index, (child, kind, name)) in dots
            .into_iter()
            .chain(listed)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(
                INodeNo(child),
                index as u64 + 1,
                kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.shared.listing(fh) else {
            return reply.error(Errno::EBADF);
        };
        let volume = &self.shared.volume;
        let parent = self.shared.parent_of(ino.0);
        let dots = [(ino.0, &b"."[..]), (parent, &b".."[..])];
        let listed = entries.iter().map(|e| (e.ino, &e.name[..]));
        for (index, (child, name)) in dots
            .into_iter()
            .chain(listed)
            .enumerate()
            .skip(offset as usize)
        {
            let Some(entry) = volume.known_entry(child) else {
                continue;
            };
            let full = reply.add(
                INodeNo(child),
                index as u64 + 1,
                OsStr::from_bytes(name),
                &entry.ttl,
                &file_attr(child, &entry.attr),
                Generation(0),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BLOCK: u64 = 4096;
        let status = self.shared.volume.status();
        let (total, free) = match status.cache {
            Some(usage) => (usage.capacity, usage.capacity.saturating_sub(usage.used)),
            None => (0, 0),
        };
        reply.statfs(
            total / BLOCK,
            free / BLOCK,
            free / BLOCK,
            status.nodes_known,
            0,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) && !self.shared.read_write() {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    // Extended attributes are not served: ENOSYS makes the kernel stop asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // Changes go to the core, which refuses them with EROFS on a read-only volume (whose mount
    // is read-only too, so the kernel refuses them first).
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: time_change(atime),
            mtime: time_change(mtime),
        };
        let (ino, shared) = (ino.0, self.shared.clone());
        self.shared.spawn(async move {
            Shared::reply_attr(reply, ino, shared.volume.setattr(ino, changes).await);
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        // Device nodes, FIFOs and sockets have no place in a dataset volume.
        reply.error(if self.shared.read_write() {
            Errno::EPERM
        } else {
            Errno::EROFS
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (parent, name) = (parent.0, name.as_bytes().to_vec());
        let (perm, owner) = ((mode & !umask & 0o7777) as u16, owner(req));
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let result = shared.volume.mkdir(parent, &name, perm, owner).await;
            shared.reply_created_entry(reply, parent, result);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (parent, name) = (parent.0, name.as_bytes().to_vec());
        let (target, owner) = (target.as_os_str().as_bytes().to_vec(), owner(req));
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let result = shared.volume.symlink(parent, &name, &target, owner).await;
            shared.reply_created_entry(reply, parent, result);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            // RENAME_NOREPLACE and RENAME_EXCHANGE cannot be done atomically on the source.
            return reply.error(Errno::EINVAL);
        }
        let (parent, new_parent) = (parent.0, new_parent.0);
        let (name, new_name) = (name.as_bytes().to_vec(), new_name.as_bytes().to_vec());
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let result = shared
                .volume
                .rename(parent, &name, new_parent, &new_name)
                .await;
            Shared::reply_empty(reply, "rename", parent, result);
        });
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        // Hard links would give one file two names in the cache's view; not supported.
        reply.error(if self.shared.read_write() {
            Errno::EPERM
        } else {
            Errno::EROFS
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(open) = self.shared.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        // A directory source writes straight from the kernel's buffer, on this thread.
        if let Some(result) = self.shared.volume.try_write(&open.file, offset, data) {
            return match result {
                Ok(written) => reply.written(written),
                Err(e) => {
                    log_error("write", ino.0, &e);
                    reply.error(errno(&e));
                }
            };
        }
        // Otherwise the bytes are copied once, into the buffer the write owns until it lands.
        let (volume, data) = (self.shared.volume.clone(), data.to_vec());
        self.shared.spawn(async move {
            match volume.write(&open.file, offset, data).await {
                Ok(written) => reply.written(written),
                Err(e) => {
                    log_error("write", ino.0, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (parent, name) = (parent.0, name.as_bytes().to_vec());
        let perm = (mode & !umask & 0o7777) as u16;
        let (owner, exclusive) = (owner(req), flags & libc::O_EXCL != 0);
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let result = shared
                .volume
                .create(parent, &name, perm, owner, exclusive)
                .await;
            shared.reply_create(reply, parent, result);
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(if self.shared.read_write() {
            Errno::ENOTSUP
        } else {
            Errno::EROFS
        });
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(if self.shared.read_write() {
            Errno::ENOTSUP
        } else {
            Errno::EROFS
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(if self.shared.read_write() {
            Errno::EOPNOTSUPP
        } else {
            Errno::EROFS
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_names_cannot_break_mount_options() {
        assert_eq!(sanitize_fs_name("nfs://h/a,b c"), "nfs://h/a_b_c");
    }

    #[test]
    fn times_before_the_epoch_convert() {
        let t = system_time(Timestamp {
            secs: -2,
            nanos: 500_000_000,
        });
        assert_eq!(
            UNIX_EPOCH.duration_since(t).unwrap(),
            Duration::from_millis(1500)
        );
    }
}
