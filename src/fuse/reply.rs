//! Answers to requests. A [`Reply`] is consumed by the answer; one dropped unanswered fails its
//! request with `EIO` (so a bug never leaves an application waiting forever), unless the
//! connection is being handed over, in which case the successor gets the request again.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use super::abi::{self, Encoder};
use super::channel::Channel;

/// What the kernel is told about a node (`struct fuse_attr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// File type bits and permissions, as in `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// A name's node and how long the kernel may keep the name and the attributes.
#[derive(Clone, Copy, Debug)]
pub struct EntryOut {
    /// 0 for a negative entry (the name does not exist).
    pub nodeid: u64,
    pub ttl: Duration,
    pub attr: Attributes,
}

/// How an opened file is to be read.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOut {
    pub fh: u64,
    /// `FOPEN_*` flags; [`abi::fopen::PASSTHROUGH`] is added when `backing_id` is set.
    pub flags: u32,
    pub backing_id: Option<u32>,
}

/// File system usage for `statfs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub struct Reply {
    channel: Arc<Channel>,
    unique: u64,
    sent: bool,
}

fn encode_attr(e: &mut Encoder, a: &Attributes) {
    e.u64(a.ino).u64(a.size).u64(a.blocks);
    e.u64(a.atime.0 as u64)
        .u64(a.mtime.0 as u64)
        .u64(a.ctime.0 as u64);
    e.u32(a.atime.1).u32(a.mtime.1).u32(a.ctime.1);
    e.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid).u32(a.rdev);
    e.u32(a.blksize).u32(0);
}

fn encode_entry(e: &mut Encoder, entry: &EntryOut) {
    let (secs, nanos) = (entry.ttl.as_secs(), entry.ttl.subsec_nanos());
    e.u64(entry.nodeid)
        .u64(0)
        .u64(secs)
        .u64(secs)
        .u32(nanos)
        .u32(nanos);
    encode_attr(e, &entry.attr);
}

fn encode_open(e: &mut Encoder, open: &OpenOut) {
    let mut flags = open.flags;
    if open.backing_id.is_some() {
        flags |= abi::fopen::PASSTHROUGH;
    }
    e.u64(open.fh).u32(flags).u32(open.backing_id.unwrap_or(0));
}

impl Reply {
    pub fn new(channel: Arc<Channel>, unique: u64) -> Reply {
        channel.request_started();
        Reply {
            channel,
            unique,
            sent: false,
        }
    }

    pub fn unique(&self) -> u64 {
        self.unique
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    fn send(mut self, error: i32, parts: &[&[u8]]) {
        self.sent = true;
        self.channel.request_ended();
        let len = abi::OUT_HEADER + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = abi::out_header(len, error, self.unique);
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&header));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        if let Err(e) = self.channel.send(&slices) {
            tracing::warn!(unique = self.unique, error = %e, "cannot send a FUSE reply");
        }
    }

    /// Fails the request with `errno`.
    pub fn error(self, errno: i32) {
        self.send(-errno, &[]);
    }

    /// Success without data.
    pub fn ok(self) {
        self.send(0, &[]);
    }

    pub fn entry(self, entry: &EntryOut) {
        let mut e = Encoder::with_capacity(abi::ENTRY_OUT);
        encode_entry(&mut e, entry);
        self.send(0, &[&e.bytes]);
    }

    pub fn attr(self, ttl: Duration, attr: &Attributes) {
        let mut e = Encoder::with_capacity(abi::ATTR_OUT);
        e.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
        encode_attr(&mut e, attr);
        self.send(0, &[&e.bytes]);
    }

    pub fn opened(self, open: &OpenOut) {
        let mut e = Encoder::with_capacity(abi::OPEN_OUT);
        encode_open(&mut e, open);
        self.send(0, &[&e.bytes]);
    }

    pub fn created(self, entry: &EntryOut, open: &OpenOut) {
        let mut e = Encoder::with_capacity(abi::ENTRY_OUT + abi::OPEN_OUT);
        encode_entry(&mut e, entry);
        encode_open(&mut e, open);
        self.send(0, &[&e.bytes]);
    }

    /// Bytes read, a link's target, or a directory listing.
    pub fn data(self, data: &[u8]) {
        self.send(0, &[data]);
    }

    pub fn written(self, size: u32) {
        let mut e = Encoder::with_capacity(8);
        e.u32(size).u32(0);
        self.send(0, &[&e.bytes]);
    }

    pub fn statfs(self, s: &StatfsOut) {
        let mut e = Encoder::with_capacity(abi::STATFS_OUT);
        e.u64(s.blocks)
            .u64(s.bfree)
            .u64(s.bavail)
            .u64(s.files)
            .u64(s.ffree);
        e.u32(s.bsize).u32(s.namelen).u32(s.frsize).u32(0).zeros(24);
        self.send(0, &[&e.bytes]);
    }

    pub fn offset(self, offset: u64) {
        self.send(0, &[&offset.to_ne_bytes()]);
    }

    /// The INIT reply.
    pub(super) fn init(self, body: &[u8]) {
        self.send(0, &[body]);
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        self.channel.request_ended();
        if !self.channel.handing_over() {
            tracing::warn!(
                unique = self.unique,
                "a FUSE request was dropped unanswered; failing it with EIO"
            );
            let header = abi::out_header(abi::OUT_HEADER, -libc::EIO, self.unique);
            let _ = self.channel.send(&[IoSlice::new(&header)]);
        }
    }
}

/// Entries of a READDIR or READDIRPLUS reply, up to the size the kernel asked for.
pub struct DirectoryBuffer {
    encoder: Encoder,
    limit: usize,
}

impl DirectoryBuffer {
    pub fn new(limit: u32) -> Self {
        let limit = limit as usize;
        DirectoryBuffer {
            encoder: Encoder::with_capacity(limit.min(64 << 10)),
            limit,
        }
    }

    /// Adds an entry; `false` (and nothing added) when it does not fit. `offset` is what the
    /// kernel passes back to continue after this entry; `kind` is a `DT_*` value.
    pub fn add(&mut self, ino: u64, offset: u64, kind: u32, name: &[u8]) -> bool {
        let size = (abi::DIRENT + name.len()).next_multiple_of(8);
        if self.encoder.len() + size > self.limit {
            return false;
        }
        self.dirent(ino, offset, kind, name);
        true
    }

    /// Adds an entry with its attributes (READDIRPLUS); `false` when it does not fit.
    pub fn add_plus(&mut self, entry: &EntryOut, offset: u64, kind: u32, name: &[u8]) -> bool {
        let size = (abi::DIRENTPLUS + name.len()).next_multiple_of(8);
        if self.encoder.len() + size > self.limit {
            return false;
        }
        encode_entry(&mut self.encoder, entry);
        self.dirent(entry.attr.ino, offset, kind, name);
        true
    }

    fn dirent(&mut self, ino: u64, offset: u64, kind: u32, name: &[u8]) {
        self.encoder
            .u64(ino)
            .u64(offset)
            .u32(name.len() as u32)
            .u32(kind)
            .raw(name)
            .align8();
    }

    pub fn bytes(&self) -> &[u8] {
        &self.encoder.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_entries_stop_at_the_limit() {
        let mut buffer = DirectoryBuffer::new(64);
        assert!(buffer.add(1, 1, 4, b"."));
        assert!(buffer.add(1, 2, 4, b".."));
        // 24 + 5 rounds up to 32: 32 + 32 + 32 > 64.
        assert!(!buffer.add(5, 3, 8, b"hello"));
        assert_eq!(buffer.bytes().len(), 64);
        let entry = EntryOut {
            nodeid: 5,
            ttl: Duration::from_secs(1),
            attr: Attributes::default(),
        };
        let mut plus = DirectoryBuffer::new(abi::DIRENTPLUS as u32 + 8);
        assert!(plus.add_plus(&entry, 1, 8, b"a"));
        assert!(!plus.add_plus(&entry, 2, 8, b"b"));
    }
}
