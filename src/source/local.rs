//! A directory as a source (a mounted PVC, a hostPath).
//!
//! Every name is resolved beneath the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`,
//! so neither `..` nor a symlink (even one swapped in by someone writing to the source) can lead
//! outside the root, and the daemon never follows a symlink: symlinks are reported as symlinks.
//! The directory may itself be a network mount that can hang, so every call runs on the blocking
//! pool under the source timeout.
//!
//! Writes follow the same rule: names are created, removed and renamed with `*at()` calls in a
//! parent directory opened beneath the root, and the final component is never followed (see
//! "Writing" below). A writer handle opens its file once ([`SourceWrite::open_writer`]) and
//! `pwrite`s to that descriptor, on the FUSE thread itself when a slot is free; `commit` is
//! `fsync`.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat, renameat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstat, fstatat,
    mkdirat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{
    Gid, Uid, UnlinkatFlags, fchown, fchownat, fsync, ftruncate, symlinkat, unlinkat,
};

use super::{
    Attr, DirEntry, FileWriter, Handle, Kind, Owner, Result, SetAttr, SetTime, Source, SourceError,
    SourceOptions, SourceWrite, Timestamp, check_name,
};

/// How often a non-exclusive create goes round when the name it found is removed before it could
/// be looked at.
const CREATE_ATTEMPTS: u32 = 3;

pub struct LocalSource {
    inner: Arc<SourceDir>,
    timeout: Duration,
}

struct SourceDir {
    id: String,
    root: OwnedFd,
    /// Writes running on callers' threads (see [`CALLER_THREAD_WRITES`]).
    caller_writes: AtomicUsize,
}

impl LocalSource {
    /// Opens `path` as a source root. It must be an existing directory.
    pub async fn open(path: &Path, options: &SourceOptions) -> Result<Self> {
        let owned: PathBuf = path.to_path_buf();
        let opened = tokio::time::timeout(
            options.timeout,
            tokio::task::spawn_blocking(move || open_root(&owned)),
        )
        .await;
        let root = match opened {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => return Err(SourceError::Invalid(join.to_string())),
            Err(_) => {
                return Err(SourceError::Timeout {
                    op: "open source directory",
                    source_name: path.display().to_string(),
                    after: options.timeout,
                });
            }
        };
        Ok(LocalSource {
            inner: Arc::new(SourceDir {
                id: path.display().to_string(),
                root,
                caller_writes: AtomicUsize::new(0),
            }),
            timeout: options.timeout,
        })
    }

    /// Runs a blocking operation on the blocking pool, bounded by the source timeout.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&SourceDir) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        match tokio::time::timeout(self.timeout, tokio::task::spawn_blocking(move || f(&inner)))
            .await
        {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(SourceError::failed(
                op,
                libc::EIO,
                format!("{}: the call's task failed", self.inner.id),
                join,
            )),
            Err(_) => Err(SourceError::Timeout {
                op,
                source_name: self.inner.id.clone(),
                after: self.timeout,
            }),
        }
    }
}

fn open_root(path: &Path) -> Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| {
        // A dead network mount (a PVC whose server is gone) is unreachable, not misconfigured.
        if matches!(
            errno,
            Errno::ENOTCONN | Errno::EIO | Errno::EHOSTDOWN | Errno::ESTALE | Errno::ETIMEDOUT
        ) {
            return SourceError::unavailable(
                path.display().to_string(),
                "the directory cannot be opened",
                std::io::Error::from(errno),
            );
        }
        let why = match errno {
            Errno::ENOENT => "does not exist".to_string(),
            Errno::ENOTDIR => "is not a directory".to_string(),
            Errno::EACCES => "is not accessible (permission denied)".to_string(),
            other => other.desc().to_string(),
        };
        SourceError::Invalid(format!("source directory {} {why}", path.display()))
    })?;
    Ok(fd)
}

impl SourceDir {
    fn error(&self, op: &'static str, path: &[u8], errno: Errno) -> SourceError {
        let shown = if path.is_empty() { b"." as &[u8] } else { path };
        SourceError::os(
            op,
            errno as i32,
            format!("{}/{}", self.id, String::from_utf8_lossy(shown)),
        )
    }

    /// Opens a path relative to the root without leaving it and without following symlinks.
    fn open_beneath(&self, rel: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
        let path: &OsStr = if rel.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(rel)
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        openat2(self.root.as_fd(), path, how)
    }

    /// Opens the parent directory of a non-root node and returns it with the node's name.
    fn open_parent<'a>(&self, rel: &'a [u8]) -> nix::Result<(OwnedFd, &'a [u8])> {
        let (parent, name) = split_parent(rel);
        let dir = self.open_beneath(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok((dir, name))
    }

    fn stat(&self, rel: &[u8]) -> nix::Result<FileStat> {
        if rel.is_empty() {
            return fstat(self.root.as_fd());
        }
        let (dir, name) = self.open_parent(rel)?;
        fstatat(
            dir.as_fd(),
            OsStr::from_bytes(name),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }
}

/// Splits `a/b/c` into (`a/b`, `c`) and `c` into (``, `c`).
fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(slash) => (&rel[..slash], &rel[slash + 1..]),
        None => (&[], rel),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Handle {
    let mut path = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        path.extend_from_slice(dir);
        path.push(b'/');
    }
    path.extend_from_slice(name);
    Handle(path.into_boxed_slice())
}

fn timestamp(secs: i64, nanos: i64) -> Timestamp {
    Timestamp {
        secs,
        nanos: nanos.clamp(0, 999_999_999) as u32,
    }
}

fn attr_from_stat(st: &FileStat) -> Attr {
    let kind = match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Directory,
        SFlag::S_IFLNK => Kind::Symlink,
        SFlag::S_IFIFO => Kind::Fifo,
        SFlag::S_IFSOCK => Kind::Socket,
        SFlag::S_IFCHR => Kind::CharDevice,
        SFlag::S_IFBLK => Kind::BlockDevice,
        _ => Kind::File,
    };
    Attr {
        kind,
        size: st.st_size.max(0) as u64,
        perm: (st.st_mode & 0o7777) as u16,
        uid: st.st_uid,
        gid: st.st_gid,
        nlink: st.st_nlink.min(u64::from(u32::MAX)) as u32,
        rdev: st.st_rdev as u32,
        fileid: st.st_ino,
        atime: timestamp(st.st_atime, st.st_atime_nsec),
        mtime: timestamp(st.st_mtime, st.st_mtime_nsec),
        ctime: timestamp(st.st_ctime, st.st_ctime_nsec),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing. Names are created, removed and renamed with *at() calls relative to their parent
// directory, itself opened beneath the root without following symlinks; the final component is
// never followed either (O_NOFOLLOW, O_EXCL, AT_SYMLINK_NOFOLLOW). The daemon runs as root:
// new objects are made by it, then given to their owner, and their mode is set exactly (the
// daemon's umask applied at creation; a change of owner may clear set-id bits).

fn mode_of(perm: u16) -> Mode {
    Mode::from_bits_truncate(libc::mode_t::from(perm & 0o7777))
}

fn uid_gid(owner: Owner) -> (Option<Uid>, Option<Gid>) {
    (
        Some(Uid::from_raw(owner.uid)),
        Some(Gid::from_raw(owner.gid)),
    )
}

fn timespec_of(time: Option<SetTime>) -> TimeSpec {
    match time {
        None => TimeSpec::UTIME_OMIT,
        Some(SetTime::Now) => TimeSpec::UTIME_NOW,
        Some(SetTime::At(t)) => TimeSpec::new(t.secs, i64::from(t.nanos.min(999_999_999))),
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl SourceDir {
    /// A directory beneath the root, to make, remove or rename names in.
    fn open_dir(&self, rel: &[u8]) -> nix::Result<OwnedFd> {
        self.open_beneath(rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// The directory that holds a node and the node's name in it (the root is `.` in itself).
    fn locate<'a>(&self, rel: &'a [u8]) -> nix::Result<(OwnedFd, &'a [u8])> {
        if rel.is_empty() {
            Ok((self.root.try_clone().map_err(io_errno)?, b"."))
        } else {
            self.open_parent(rel)
        }
    }

    /// Gives a new object (open as `fd`) to its owner with exactly `perm`; returns its stat.
    fn settle(&self, fd: &OwnedFd, perm: u16, owner: Owner) -> nix::Result<FileStat> {
        let (uid, gid) = uid_gid(owner);
        fchown(fd.as_fd(), uid, gid)?;
        fchmod(fd.as_fd(), mode_of(perm))?;
        fstat(fd.as_fd())
    }

    fn create(
        &self,
        dir: &[u8],
        name: &[u8],
        perm: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Handle, Attr)> {
        let handle = join(dir, name);
        let fail = |e| self.error("create", handle.as_bytes(), e);
        let dirfd = self
            .open_dir(dir)
            .map_err(|e| self.error("create", dir, e))?;
        let cname = OsStr::from_bytes(name);
        for _ in 0..CREATE_ATTEMPTS {
            // O_EXCL even when not exclusive, so that the owner and mode are only ever applied to
            // a file this call made: an existing file is opened as it is.
            let created = openat(
                dirfd.as_fd(),
                cname,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                mode_of(perm),
            );
            match created {
                Ok(fd) => {
                    let st = self.settle(&fd, perm, owner).map_err(fail)?;
                    return Ok((handle, attr_from_stat(&st)));
                }
                Err(Errno::EEXIST) if !exclusive => {
                    match fstatat(dirfd.as_fd(), cname, AtFlags::AT_SYMLINK_NOFOLLOW) {
                        Ok(st) => {
                            let attr = attr_from_stat(&st);
                            return match attr.kind {
                                Kind::File => Ok((handle, attr)),
                                Kind::Directory => Err(fail(Errno::EISDIR)),
                                _ => Err(fail(Errno::EEXIST)),
                            };
                        }
                        // Removed since: create again.
                        Err(Errno::ENOENT) => continue,
                        Err(e) => return Err(fail(e)),
                    }
                }
                Err(e) => return Err(fail(e)),
            }
        }
        Err(fail(Errno::EEXIST))
    }

    fn mkdir(&self, dir: &[u8], name: &[u8], perm: u16, owner: Owner) -> Result<(Handle, Attr)> {
        let handle = join(dir, name);
        let fail = |e| self.error("mkdir", handle.as_bytes(), e);
        let dirfd = self
            .open_dir(dir)
            .map_err(|e| self.error("mkdir", dir, e))?;
        let cname = OsStr::from_bytes(name);
        mkdirat(dirfd.as_fd(), cname, mode_of(perm)).map_err(fail)?;
        let fd = openat(
            dirfd.as_fd(),
            cname,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(fail)?;
        let st = self.settle(&fd, perm, owner).map_err(fail)?;
        Ok((handle, attr_from_stat(&st)))
    }

    fn symlink(
        &self,
        dir: &[u8],
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        let handle = join(dir, name);
        let fail = |e| self.error("symlink", handle.as_bytes(), e);
        let dirfd = self
            .open_dir(dir)
            .map_err(|e| self.error("symlink", dir, e))?;
        let cname = OsStr::from_bytes(name);
        symlinkat(OsStr::from_bytes(target), dirfd.as_fd(), cname).map_err(fail)?;
        let (uid, gid) = uid_gid(owner);
        fchownat(dirfd.as_fd(), cname, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(fail)?;
        let st = fstatat(dirfd.as_fd(), cname, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(fail)?;
        Ok((handle, attr_from_stat(&st)))
    }

    fn unlink(&self, op: &'static str, dir: &[u8], name: &[u8], flag: UnlinkatFlags) -> Result<()> {
        let dirfd = self.open_dir(dir).map_err(|e| self.error(op, dir, e))?;
        unlinkat(dirfd.as_fd(), OsStr::from_bytes(name), flag)
            .map_err(|e| self.error(op, join(dir, name).as_bytes(), e))
    }

    fn rename(&self, from_dir: &[u8], from: &[u8], to_dir: &[u8], to: &[u8]) -> Result<()> {
        let from_fd = self
            .open_dir(from_dir)
            .map_err(|e| self.error("rename", from_dir, e))?;
        let to_fd = self
            .open_dir(to_dir)
            .map_err(|e| self.error("rename", to_dir, e))?;
        renameat(
            from_fd.as_fd(),
            OsStr::from_bytes(from),
            to_fd.as_fd(),
            OsStr::from_bytes(to),
        )
        .map_err(|errno| {
            SourceError::os(
                "rename",
                errno as i32,
                format!(
                    "{id}/{} to {id}/{}",
                    String::from_utf8_lossy(join(from_dir, from).as_bytes()),
                    String::from_utf8_lossy(join(to_dir, to).as_bytes()),
                    id = self.id,
                ),
            )
        })
    }

    /// Opens a file beneath the root for writing. O_NONBLOCK: a FIFO swapped in under the
    /// name fails instead of blocking.
    fn open_for_writing(&self, rel: &[u8]) -> nix::Result<OwnedFd> {
        self.open_beneath(rel, OFlag::O_WRONLY | OFlag::O_NONBLOCK)
    }

    fn write(&self, rel: &[u8], offset: u64, data: &[u8]) -> Result<Attr> {
        let fd = self
            .open_for_writing(rel)
            .map_err(|e| self.error("write", rel, e))?;
        self.write_fd(&fd, rel, offset, data)
    }

    /// `pwrite`s all of `data` at `offset` to an open file; returns its attributes after.
    fn write_fd(&self, fd: &OwnedFd, rel: &[u8], offset: u64, data: &[u8]) -> Result<Attr> {
        let fail = |e| self.error("write", rel, e);
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= i64::MAX as u64);
        if end.is_none() {
            return Err(fail(Errno::EFBIG));
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            match nix::sys::uio::pwrite(fd.as_fd(), &data[done..], at as libc::off_t) {
                Ok(0) => return Err(fail(Errno::EIO)),
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(fail(e)),
            }
        }
        fstat(fd.as_fd())
            .map(|st| attr_from_stat(&st))
            .map_err(fail)
    }

    fn commit(&self, rel: &[u8]) -> Result<()> {
        let fail = |e| self.error("commit", rel, e);
        let fd = self
            .open_beneath(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
            .map_err(fail)?;
        fsync(fd.as_fd()).map_err(fail)
    }

    fn setattr(&self, rel: &[u8], changes: &SetAttr) -> Result<Attr> {
        let fail = |e| self.error("setattr", rel, e);
        let (dirfd, name) = self.locate(rel).map_err(fail)?;
        let cname = OsStr::from_bytes(name);
        // Size first (it changes the times), owner before mode (chown may clear set-id bits),
        // times last.
        if let Some(size) = changes.size {
            let size = libc::off_t::try_from(size).map_err(|_| fail(Errno::EFBIG))?;
            let fd = self
                .open_beneath(rel, OFlag::O_WRONLY | OFlag::O_NONBLOCK)
                .map_err(fail)?;
            ftruncate(fd.as_fd(), size).map_err(fail)?;
        }
        if changes.uid.is_some() || changes.gid.is_some() {
            fchownat(
                dirfd.as_fd(),
                cname,
                changes.uid.map(Uid::from_raw),
                changes.gid.map(Gid::from_raw),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(fail)?;
        }
        if let Some(perm) = changes.perm {
            // Never follows a symlink: on one, the kernel (fchmodat2, Linux 6.6+) or glibc (2.32+:
            // an O_PATH descriptor, checked not to be a symlink, changed through /proc/self/fd)
            // refuses with EOPNOTSUPP.
            fchmodat(
                dirfd.as_fd(),
                cname,
                mode_of(perm),
                FchmodatFlags::NoFollowSymlink,
            )
            .map_err(fail)?;
        }
        if changes.atime.is_some() || changes.mtime.is_some() {
            utimensat(
                dirfd.as_fd(),
                cname,
                &timespec_of(changes.atime),
                &timespec_of(changes.mtime),
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(fail)?;
        }
        let st = fstatat(dirfd.as_fd(), cname, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(fail)?;
        Ok(attr_from_stat(&st))
    }
}

#[async_trait]
impl Source for LocalSource {
    fn id(&self) -> &str {
        &self.inner.id
    }

    async fn root(&self) -> Result<(Handle, Attr)> {
        self.run("getattr", |inner| {
            let st = inner
                .stat(b"")
                .map_err(|e| inner.error("getattr", b"", e))?;
            Ok((Handle(Box::default()), attr_from_stat(&st)))
        })
        .await
    }

    async fn lookup(&self, dir: &Handle, name: &[u8]) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let handle = join(dir.as_bytes(), name);
        self.run("lookup", move |inner| {
            let st = inner
                .stat(handle.as_bytes())
                .map_err(|e| inner.error("lookup", handle.as_bytes(), e))?;
            Ok((handle, attr_from_stat(&st)))
        })
        .await
    }

    async fn getattr(&self, node: &Handle) -> Result<Attr> {
        let node = node.clone();
        self.run("getattr", move |inner| {
            let st = inner
                .stat(node.as_bytes())
                .map_err(|e| inner.error("getattr", node.as_bytes(), e))?;
            Ok(attr_from_stat(&st))
        })
        .await
    }

    async fn read_dir(&self, dir: &Handle) -> Result<Vec<DirEntry>> {
        let dir = dir.clone();
        self.run("readdir", move |inner| {
            let rel = dir.as_bytes();
            let fail = |e| inner.error("readdir", rel, e);
            let fd = inner
                .open_beneath(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(fail)?;
            let stat_fd = fd.try_clone().map_err(|e| {
                SourceError::failed(
                    "readdir",
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("{}/{}", inner.id, String::from_utf8_lossy(rel)),
                    e,
                )
            })?;
            let mut listing = nix::dir::Dir::from_fd(fd).map_err(fail)?;
            let mut entries = Vec::new();
            for entry in listing.iter() {
                let entry = entry.map_err(fail)?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                match fstatat(
                    stat_fd.as_fd(),
                    entry.file_name(),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => entries.push(DirEntry {
                        name: name.to_vec(),
                        handle: join(rel, name),
                        attr: attr_from_stat(&st),
                    }),
                    // Removed between the listing and the stat: it is simply not there.
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(inner.error("readdir", &join(rel, name).0, e)),
                }
            }
            Ok(entries)
        })
        .await
    }

    async fn read(&self, file: &Handle, offset: u64, len: u32) -> Result<Vec<u8>> {
        let file = file.clone();
        self.run("read", move |inner| {
            let rel = file.as_bytes();
            let fd = inner
                .open_beneath(rel, OFlag::O_RDONLY)
                .map_err(|e| inner.error("read", rel, e))?;
            let mut buf = vec![0u8; len as usize];
            let mut filled = 0usize;
            while filled < buf.len() {
                let at = offset + filled as u64;
                match nix::sys::uio::pread(fd.as_fd(), &mut buf[filled..], at as libc::off_t) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(inner.error("read", rel, e)),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        })
        .await
    }

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>> {
        let link = link.clone();
        self.run("readlink", move |inner| {
            let rel = link.as_bytes();
            let fail = |e| inner.error("readlink", rel, e);
            let (dir, name) = inner.open_parent(rel).map_err(fail)?;
            let target = readlinkat(dir.as_fd(), OsStr::from_bytes(name)).map_err(fail)?;
            Ok(target.into_vec())
        })
        .await
    }
}

#[async_trait]
impl SourceWrite for LocalSource {
    /// `pwrite` on a descriptor opened beneath the root for this call; returns the attributes
    /// after the write.
    async fn write(&self, file: &Handle, offset: u64, data: &[u8]) -> Result<Option<Attr>> {
        let file = file.clone();
        let data = data.to_vec();
        self.run("write", move |inner| {
            inner.write(file.as_bytes(), offset, &data).map(Some)
        })
        .await
    }

    /// Opens the file once for the handle's writes (the descriptor is kept until the handle's
    /// release), so that a write is one `pwrite` instead of a path walk, open and close.
    async fn open_writer(&self, file: &Handle) -> Result<Option<Arc<dyn FileWriter>>> {
        let handle = file.clone();
        let fd = self
            .run("open for writing", move |inner| {
                let rel = handle.as_bytes();
                inner
                    .open_for_writing(rel)
                    .map_err(|e| inner.error("open for writing", rel, e))
            })
            .await?;
        Ok(Some(Arc::new(LocalFileWriter {
            fd: Arc::new(fd),
            rel: file.clone(),
            source: LocalSource {
                inner: self.inner.clone(),
                timeout: self.timeout,
            },
        })))
    }

    /// A descriptor opened beneath the root (no symlink followed), checked to be a regular
    /// file, in a caller-thread slot.
    fn open_passthrough(&self, file: &Handle) -> Option<Result<OwnedFd>> {
        let inner = &self.inner;
        let _slot = inner.caller_slot()?;
        let rel = file.as_bytes();
        let fail = |e| inner.error("open", rel, e);
        let opened = inner
            .open_beneath(rel, OFlag::O_RDWR | OFlag::O_NONBLOCK)
            .and_then(|fd| {
                let st = fstat(fd.as_fd())?;
                if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG {
                    Ok(fd)
                } else {
                    Err(Errno::EINVAL)
                }
            });
        Some(opened.map_err(fail))
    }

    /// `fsync`.
    async fn commit(&self, file: &Handle) -> Result<()> {
        let file = file.clone();
        self.run("commit", move |inner| inner.commit(file.as_bytes()))
            .await
    }

    async fn create(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let (dir, name) = (dir.clone(), name.to_vec());
        self.run("create", move |inner| {
            inner.create(dir.as_bytes(), &name, mode, owner, exclusive)
        })
        .await
    }

    async fn mkdir(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let (dir, name) = (dir.clone(), name.to_vec());
        self.run("mkdir", move |inner| {
            inner.mkdir(dir.as_bytes(), &name, mode, owner)
        })
        .await
    }

    async fn symlink(
        &self,
        dir: &Handle,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let (dir, name, target) = (dir.clone(), name.to_vec(), target.to_vec());
        self.run("symlink", move |inner| {
            inner.symlink(dir.as_bytes(), &name, &target, owner)
        })
        .await
    }

    async fn remove(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        check_name(name)?;
        let (dir, name) = (dir.clone(), name.to_vec());
        self.run("remove", move |inner| {
            inner.unlink("remove", dir.as_bytes(), &name, UnlinkatFlags::NoRemoveDir)
        })
        .await
    }

    async fn rmdir(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        check_name(name)?;
        let (dir, name) = (dir.clone(), name.to_vec());
        self.run("rmdir", move |inner| {
            inner.unlink("rmdir", dir.as_bytes(), &name, UnlinkatFlags::RemoveDir)
        })
        .await
    }

    async fn rename(
        &self,
        from_dir: &Handle,
        from: &[u8],
        to_dir: &Handle,
        to: &[u8],
    ) -> Result<()> {
        check_name(from)?;
        check_name(to)?;
        let (from_dir, from, to_dir, to) =
            (from_dir.clone(), from.to_vec(), to_dir.clone(), to.to_vec());
        self.run("rename", move |inner| {
            inner.rename(from_dir.as_bytes(), &from, to_dir.as_bytes(), &to)
        })
        .await
    }

    async fn setattr(&self, node: &Handle, changes: &SetAttr) -> Result<Attr> {
        let (node, changes) = (node.clone(), changes.clone());
        self.run("setattr", move |inner| {
            inner.setattr(node.as_bytes(), &changes)
        })
        .await
    }
}

/// Writes done on the callers' threads at once, at most. A directory source may be a network
/// mount that hangs: the FUSE threads it could hold are bounded, so that the others keep serving
/// cached data; writes beyond the bound take the blocking pool (one more copy and hop).
const CALLER_THREAD_WRITES: usize = 2;

/// A file of a directory source open for one writer handle. The descriptor was opened beneath
/// the root (no symlink followed); it stays on the same file if the file is renamed, as an open
/// file does.
struct LocalFileWriter {
    fd: Arc<OwnedFd>,
    /// For error messages.
    rel: Handle,
    source: LocalSource,
}

/// A taken caller-thread write slot, given back when dropped.
struct CallerSlot<'a>(&'a AtomicUsize);

impl Drop for CallerSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SourceDir {
    fn caller_slot(&self) -> Option<CallerSlot<'_>> {
        self.caller_writes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < CALLER_THREAD_WRITES).then_some(n + 1)
            })
            .ok()
            .map(|_| CallerSlot(&self.caller_writes))
    }
}

#[async_trait]
impl FileWriter for LocalFileWriter {
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<Attr>> {
        let inner = &self.source.inner;
        let _slot = inner.caller_slot()?;
        Some(inner.write_fd(&self.fd, self.rel.as_bytes(), offset, data))
    }

    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<Attr> {
        let (fd, rel) = (self.fd.clone(), self.rel.clone());
        self.source
            .run("write", move |inner| {
                inner.write_fd(&fd, rel.as_bytes(), offset, &data)
            })
            .await
    }

    async fn commit(&self) -> Result<()> {
        let (fd, rel) = (self.fd.clone(), self.rel.clone());
        self.source
            .run("commit", move |inner| {
                fsync(fd.as_fd()).map_err(|e| inner.error("commit", rel.as_bytes(), e))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn options() -> SourceOptions {
        SourceOptions {
            timeout: Duration::from_secs(5),
            ..SourceOptions::default()
        }
    }

    #[tokio::test]
    async fn reads_a_tree_and_never_leaves_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("sub/data.bin"), b"0123456789").unwrap();
        symlink(outside.path().join("secret"), root.path().join("escape")).unwrap();
        symlink(outside.path(), root.path().join("sub/dir-escape")).unwrap();

        let source = LocalSource::open(root.path(), &options()).await.unwrap();
        let (root_handle, root_attr) = source.root().await.unwrap();
        assert_eq!(root_attr.kind, Kind::Directory);

        let mut names: Vec<_> = source
            .read_dir(&root_handle)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (String::from_utf8(e.name).unwrap(), e.attr.kind))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            names,
            [
                ("escape".into(), Kind::Symlink),
                ("sub".into(), Kind::Directory)
            ]
        );

        let (sub, _) = source.lookup(&root_handle, b"sub").await.unwrap();
        let (data, attr) = source.lookup(&sub, b"data.bin").await.unwrap();
        assert_eq!(attr.size, 10);
        assert_eq!(source.read(&data, 2, 4).await.unwrap(), b"2345");
        assert_eq!(source.read(&data, 8, 100).await.unwrap(), b"89");

        // A symlink is reported, never followed, even when reading through it is attempted.
        let (escape, attr) = source.lookup(&root_handle, b"escape").await.unwrap();
        assert_eq!(attr.kind, Kind::Symlink);
        assert_eq!(
            source.read_link(&escape).await.unwrap(),
            outside.path().join("secret").as_os_str().as_bytes()
        );
        let err = source.read(&escape, 0, 6).await.unwrap_err();
        assert_eq!(err.errno(), libc::ELOOP, "{err}");
        let through_dir = Handle(b"sub/dir-escape/secret".to_vec().into_boxed_slice());
        assert!(source.read(&through_dir, 0, 6).await.is_err());
        assert!(source.getattr(&through_dir).await.is_err());

        for bad in [&b".."[..], b"a/b", b"", b"."] {
            assert_eq!(
                source.lookup(&root_handle, bad).await.unwrap_err().errno(),
                libc::EINVAL
            );
        }
        let dotdot = Handle(b"../etc/passwd".to_vec().into_boxed_slice());
        assert!(source.read(&dotdot, 0, 10).await.is_err());
        let missing = source.lookup(&root_handle, b"missing").await.unwrap_err();
        assert_eq!(missing.errno(), libc::ENOENT);
        // The message names the source and the path; the system call's error is its source.
        let message = missing.to_string();
        let expected = format!("{}/missing", root.path().display());
        assert!(message.contains(&expected), "{message}");
        let cause = std::error::Error::source(&missing).expect("the I/O error underneath");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("an I/O error");
        assert_eq!(io.raw_os_error(), Some(libc::ENOENT));
    }

    #[tokio::test]
    async fn a_missing_or_non_directory_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = LocalSource::open(&missing, &options()).await.err().unwrap();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = LocalSource::open(&file, &options()).await.err().unwrap();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
