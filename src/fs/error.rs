//! The error of a file-system request.

use std::borrow::Cow;

use super::meta::Ino;
use crate::cache::CacheError;
use crate::source::SourceError;

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

    pub(super) fn not_found() -> Self {
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
