//! This project's own FUSE transport, written from the kernel's documented interface
//! (`include/uapi/linux/fuse.h`, `Documentation/filesystems/fuse*.rst`).
//!
//! It exists because a connection must outlive the process serving it: a successor takes over
//! the /dev/fuse descriptors of a live connection without a new INIT, with the parameters
//! agreed at the first one, and asks the kernel to resend what its predecessor left unanswered
//! (`FUSE_NOTIFY_RESEND`). No crate offered that together with mainline passthrough (see
//! docs/architecture.md). It also serves each connection on several cloned channels, one
//! thread each, and registers passthrough backing files.

pub mod abi;
mod channel;
mod reply;
mod request;
mod session;

pub use channel::Channel;
pub use reply::{Attributes, DirectoryBuffer, EntryOut, OpenOut, Reply, StatfsOut};
pub use request::{Header, Operation, Request, SetattrIn, TimeChange};
pub use session::{
    Connection, ConnectionError, Filesystem, KernelParams, MAX_WRITE, MountOptions, Session,
};
