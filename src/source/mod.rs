//! Where bytes come from: a remote dataset behind the [`Source`] trait.
//!
//! Two kinds exist: [`nfs`] (a userspace NFSv3 client, because nodes and serverless sandboxes
//! often have no kernel NFS client) and [`local`] (a directory, e.g. where another PVC is
//! mounted). Both address nodes by an opaque, restart-stable [`Handle`] so that the metadata the
//! cache persists stays valid across restarts, and both bound every call by the source timeout so
//! that a dead source turns into an error instead of a hang.

#[cfg(test)]
pub mod faulty;
pub mod local;
pub mod nfs;
mod spec;

use std::fmt;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use spec::{NfsUrl, SourceSpec, SpecError};

/// An opaque, restart-stable address of a node inside a source: the NFS file handle, or the
/// path relative to the root of a directory source.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Handle(pub Box<[u8]>);

impl Handle {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Handle({})",
            String::from_utf8_lossy(&self.0).escape_debug()
        )
    }
}

/// The kind of a node, as the source reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// A point in time as seconds and nanoseconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// Attributes of a node, as the source reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (including setuid, setgid and sticky), without the file type.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    /// The source's own inode number (NFS `fileid`, `st_ino` for a directory).
    pub fileid: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub handle: Handle,
    pub attr: Attr,
}

/// What a source error grew out of: the I/O or RPC error underneath, kept as the error's
/// [`source`](std::error::Error::source) (shared, so that one error can go to every reader
/// waiting on one fetch).
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Errors a source reports. The errno a FUSE caller sees comes from [`SourceError::errno`];
/// what went wrong underneath (an I/O error, an RPC failure) is the error's source, not part of
/// its message: print the chain (`{:#}` through anyhow, or walk
/// [`source`](std::error::Error::source)).
#[derive(Clone, Debug)]
pub enum SourceError {
    /// The source answered, with an error about the object (no such file, permission denied...).
    /// The message names the source and the object.
    Status {
        op: &'static str,
        errno: i32,
        message: String,
        cause: Option<Cause>,
    },
    /// The source did not answer within the source timeout.
    Timeout {
        op: &'static str,
        source_name: String,
        after: Duration,
    },
    /// The source could not be reached (connection refused or reset, host down...).
    Unavailable {
        source_name: String,
        message: String,
        cause: Option<Cause>,
    },
    /// The source is misconfigured: a bad URL, a missing export or path, a path that is not a
    /// directory. Only returned when a source is opened.
    Invalid(String),
    /// The server answers, but not in the protocol reservoir speaks: NFSv3 and MOUNT v3 over
    /// TCP are not registered, or only NFSv4 answers (no portmapper). Only returned when a
    /// source is opened; a `pvc://` claim then falls back to a source pod (kubelet's mount).
    NotOffered {
        source_name: String,
        message: String,
    },
    /// The server broke the protocol while the source was opened (a reply that does not
    /// decode, a program it does not offer as it said).
    Protocol {
        source_name: String,
        message: String,
        cause: Cause,
    },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Status { op, message, .. } => write!(f, "{op}: {message}"),
            SourceError::Timeout {
                op,
                source_name,
                after,
            } => write!(f, "{op}: no answer from {source_name} within {after:?}"),
            SourceError::Unavailable {
                source_name,
                message,
                ..
            } => write!(f, "cannot reach {source_name}: {message}"),
            SourceError::Invalid(message) => f.write_str(message),
            SourceError::NotOffered {
                source_name,
                message,
            } => write!(f, "{source_name}: {message}"),
            SourceError::Protocol {
                source_name,
                message,
                ..
            } => write!(f, "{source_name}: {message}"),
        }
    }
}

/// Written out rather than derived, so that the source is the cause itself (an
/// `std::io::Error` one can downcast to), not the `Arc` that shares it.
impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let cause = match self {
            SourceError::Status { cause, .. } | SourceError::Unavailable { cause, .. } => {
                cause.as_ref()?
            }
            SourceError::Protocol { cause, .. } => cause,
            SourceError::Timeout { .. }
            | SourceError::Invalid(_)
            | SourceError::NotOffered { .. } => return None,
        };
        Some(&**cause)
    }
}

impl SourceError {
    /// The errno to give a FUSE caller for this error.
    pub fn errno(&self) -> i32 {
        match self {
            SourceError::Status { errno, .. } => *errno,
            SourceError::Timeout { .. }
            | SourceError::Unavailable { .. }
            | SourceError::Protocol { .. } => libc::EIO,
            SourceError::Invalid(_) | SourceError::NotOffered { .. } => libc::EINVAL,
        }
    }

    /// True when the source could not answer at all (as opposed to answering with an error):
    /// cached metadata and data may still be served in that case.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            SourceError::Timeout { .. } | SourceError::Unavailable { .. }
        )
    }

    /// The source's answer about an object, with nothing underneath.
    pub fn status(op: &'static str, errno: i32, message: impl Into<String>) -> Self {
        SourceError::Status {
            op,
            errno,
            message: message.into(),
            cause: None,
        }
    }

    /// A failed system call on the object `message` names: the errno, kept as its cause too.
    pub fn os(op: &'static str, errno: i32, message: impl Into<String>) -> Self {
        SourceError::Status {
            op,
            errno,
            message: message.into(),
            cause: Some(Arc::new(std::io::Error::from_raw_os_error(errno))),
        }
    }

    /// A call that failed for a reason other than the source's answer (an RPC failure, a task
    /// that died): `errno` for the caller, `cause` for the log.
    pub fn failed(
        op: &'static str,
        errno: i32,
        message: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        SourceError::Status {
            op,
            errno,
            message: message.into(),
            cause: Some(Arc::new(cause)),
        }
    }

    /// The source named `source_name` cannot be reached; `message` says where, `cause` why.
    pub fn unavailable(
        source_name: impl Into<String>,
        message: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        SourceError::Unavailable {
            source_name: source_name.into(),
            message: message.into(),
            cause: Some(Arc::new(cause)),
        }
    }
}

pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// A remote dataset: reading it here, changing it through [`SourceWrite`] (read-write
/// volumes). Every call is bounded by the source timeout given when the source was opened;
/// implementations retry transient transport errors themselves.
#[async_trait]
pub trait Source: SourceWrite + Send + Sync + 'static {
    /// A stable identity of the dataset (normalised URL or canonical path). Cached bytes and
    /// metadata are keyed by it, so two mounts of the same dataset share them.
    fn id(&self) -> &str;

    /// The root of the volume (the export path plus any path inside it).
    async fn root(&self) -> Result<(Handle, Attr)>;

    /// Looks `name` up in directory `dir`. `name` is a single path component.
    async fn lookup(&self, dir: &Handle, name: &[u8]) -> Result<(Handle, Attr)>;

    async fn getattr(&self, node: &Handle) -> Result<Attr>;

    /// Lists a whole directory, with attributes; `.` and `..` are not included.
    async fn read_dir(&self, dir: &Handle) -> Result<Vec<DirEntry>>;

    /// Reads `len` bytes at `offset`; fewer only at end of file.
    async fn read(&self, file: &Handle, offset: u64, len: u32) -> Result<Vec<u8>>;

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>>;
}

/// Changes to a source (read-write volumes): data, names and attributes. Each call reaches the
/// source before it returns ([`SourceWrite::write_sent`]: is sent to it). A source that cannot
/// write keeps the defaults, which refuse with EROFS.
#[async_trait]
pub trait SourceWrite: Send + Sync {
    /// Writes `data` at `offset`. The bytes are on the source when this returns (an NFS
    /// UNSTABLE write is enough); [`SourceWrite::commit`] makes them durable. Returns the file's
    /// attributes after the write when the source reports them.
    async fn write(&self, file: &Handle, offset: u64, data: &[u8]) -> Result<Option<Attr>> {
        let _ = (file, offset, data);
        Err(read_only("write"))
    }

    /// Writes `data` at `offset` and returns as soon as the request has been handed to the
    /// source (for NFS: the whole WRITE request is written to the connection), with the outcome
    /// still to come in [`Landing::InFlight`]. Sources that cannot overlap writes keep this
    /// default, which waits for the write to land. An error here means the write failed before
    /// it was sent in full.
    async fn write_sent(&self, file: &Handle, offset: u64, data: Vec<u8>) -> Result<Landing> {
        self.write(file, offset, &data).await.map(Landing::Landed)
    }

    /// Opens `file` for one writer handle, for sources whose writes are quick system calls on a
    /// descriptor (a directory). `None`: the source writes through [`SourceWrite::write_sent`].
    async fn open_writer(&self, file: &Handle) -> Result<Option<Arc<dyn FileWriter>>> {
        let _ = file;
        Ok(None)
    }

    /// Opens `file` for reading and writing on the calling thread, as the file a writer's
    /// `write()` may go to directly (FUSE passthrough). `None`: the source has no such file
    /// (NFS), or cannot open one on this thread now.
    fn open_passthrough(&self, file: &Handle) -> Option<Result<OwnedFd>> {
        let _ = file;
        None
    }

    /// Makes everything written to `file` durable (NFS COMMIT, fsync).
    async fn commit(&self, file: &Handle) -> Result<()> {
        let _ = file;
        Err(read_only("commit"))
    }

    /// Creates a regular file `name` in `dir`, owned by `owner`. With `exclusive`, an existing
    /// name is EEXIST; without, an existing file is opened as it is.
    async fn create(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Handle, Attr)> {
        let _ = (dir, name, mode, owner, exclusive);
        Err(read_only("create"))
    }

    async fn mkdir(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        let _ = (dir, name, mode, owner);
        Err(read_only("mkdir"))
    }

    async fn symlink(
        &self,
        dir: &Handle,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        let _ = (dir, name, target, owner);
        Err(read_only("symlink"))
    }

    /// Removes a name that is not a directory.
    async fn remove(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        let _ = (dir, name);
        Err(read_only("remove"))
    }

    /// Removes an empty directory.
    async fn rmdir(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        let _ = (dir, name);
        Err(read_only("rmdir"))
    }

    /// Renames, replacing an existing target as rename(2) does.
    async fn rename(
        &self,
        from_dir: &Handle,
        from: &[u8],
        to_dir: &Handle,
        to: &[u8],
    ) -> Result<()> {
        let _ = (from_dir, from, to_dir, to);
        Err(read_only("rename"))
    }

    /// Changes attributes (mode, owner, size, times); returns the attributes after.
    async fn setattr(&self, node: &Handle, changes: &SetAttr) -> Result<Attr> {
        let _ = (node, changes);
        Err(read_only("setattr"))
    }
}

/// The outcome of a write whose request has been sent: the attributes after it (when the
/// source reports them), or the error the source answered with.
pub type WriteOutcome = Pin<Box<dyn Future<Output = Result<Option<Attr>>> + Send>>;

/// How far a write got when [`SourceWrite::write_sent`] returned.
pub enum Landing {
    /// Done: the bytes are on the source.
    Landed(Option<Attr>),
    /// Sent, not yet answered.
    InFlight(WriteOutcome),
}

/// A file kept open on the source by one writer handle (see [`SourceWrite::open_writer`]),
/// closed when the last reference is dropped. It writes to the file it opened, even after a
/// rename.
#[async_trait]
pub trait FileWriter: Send + Sync {
    /// Writes on the calling thread when that is allowed now; `None` asks the caller to use
    /// [`FileWriter::write`] instead (the source bounds how many callers' threads it may hold, so
    /// that a hung source cannot take them all).
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<Attr>>;

    /// Writes away from the caller's thread, bounded by the source timeout.
    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<Attr>;

    /// Makes what was written durable (fsync).
    async fn commit(&self) -> Result<()>;
}

/// A name the kernel hands us is a single component, but the source API is public: refuse
/// anything that could walk somewhere else.
pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(SourceError::status(
            "lookup",
            libc::EINVAL,
            format!("invalid file name {:?}", String::from_utf8_lossy(name)),
        ));
    }
    if name.len() > 255 {
        return Err(SourceError::status(
            "lookup",
            libc::ENAMETOOLONG,
            "name too long",
        ));
    }
    Ok(())
}

fn read_only(op: &'static str) -> SourceError {
    SourceError::status(op, libc::EROFS, "this source is read-only")
}

/// Who a new file, directory or symlink belongs to: the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: now (by the source's clock) or a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timestamp),
}

/// Attribute changes; `None` leaves an attribute as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (including setuid, setgid, sticky).
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncates or extends.
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// Settings shared by all source kinds.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Upper bound for any single call to the source.
    pub timeout: Duration,
    /// Connections kept to an NFS server (each carries one call at a time).
    pub connections: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            timeout: Duration::from_secs(30),
            connections: 16,
        }
    }
}

/// Opens the source a spec names, checking that it is reachable and that its root exists.
/// Every request to it is timed for the metrics endpoint ([`crate::metrics::source::Timed`]).
pub async fn open(spec: &SourceSpec, options: &SourceOptions) -> Result<Arc<dyn Source>> {
    let source: Arc<dyn Source> = match spec {
        SourceSpec::Nfs(url) => Arc::new(nfs::NfsSource::connect(url, options).await?),
        SourceSpec::Local(path) => Arc::new(local::LocalSource::open(path, options).await?),
    };
    Ok(crate::metrics::source::Timed::wrap(source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(check_name(bad).unwrap_err().errno(), libc::EINVAL);
        }
        assert_eq!(
            check_name(&[b'x'; 256]).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        assert!(check_name(b"ok name").is_ok());
    }
}
