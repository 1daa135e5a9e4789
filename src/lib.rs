//! reservoir: a remote dataset (an NFS export or a directory) served through a persistent,
//! node-local cache by a FUSE file system, and the CSI driver that gives it to pods.
//!
//! The flow of a read and the parts' rooms are described in `docs/architecture.md`.

pub mod cache;
pub mod control;
pub mod csi;
pub mod daemon;
pub mod error;
pub mod failpoint;
pub mod fs;
pub mod fuse;
pub mod journal;
pub mod keeper;
pub mod lockfile;
pub mod metrics;
pub mod mount;
pub mod mountpoint;
pub mod source;
pub mod units;
