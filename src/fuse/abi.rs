//! The kernel's FUSE wire format, written from `include/uapi/linux/fuse.h` and
//! `Documentation/filesystems/fuse*.rst`: opcodes, flags, and the byte layout of every message
//! this project reads or writes. All integers are in the machine's byte order (the kernel and
//! the daemon share the machine); structures are packed as the header defines them, every one a
//! multiple of 8 bytes. Nothing outside this module handles the protocol as raw numbers.

/// The protocol's major version.
pub const KERNEL_MAJOR: u32 = 7;
/// The minor version this implementation speaks: 7.40 adds passthrough (`backing_id`).
pub const KERNEL_MINOR: u32 = 40;
/// The oldest minor version accepted: 7.31 (Linux 5.6) has `max_pages`, `flags2` came later
/// and is optional.
pub const OLDEST_MINOR: u32 = 31;

pub const ROOT_ID: u64 = 1;

/// Set by the kernel in the `unique` of a request it queues again after `NOTIFY_RESEND`.
pub const UNIQUE_RESEND: u64 = 1 << 63;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
}

/// INIT flags, as one 64-bit set: the kernel sends bits 32-63 in `flags2` when both sides
/// set [`init::INIT_EXT`].
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    /// The kernel can queue again the requests a dead daemon had read (`NOTIFY_RESEND`).
    pub const HAS_RESEND: u64 = 1 << 39;
}

/// Flags of an OPEN, OPENDIR or CREATE reply.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const NOFLUSH: u32 = 1 << 5;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// Which fields of a SETATTR are set.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// Codes of messages the daemon sends unasked (in the `error` field of the header).
pub mod notify {
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const RESEND: i32 = 7;
}

pub const GETATTR_FH: u32 = 1;
pub const FSYNC_FDATASYNC: u32 = 1;

/// `ioctl` numbers on /dev/fuse (magic 229).
pub mod ioctl {
    pub const MAGIC: u8 = 229;
    pub const CLONE: u8 = 0;
    pub const BACKING_OPEN: u8 = 1;
    pub const BACKING_CLOSE: u8 = 2;
}

/// The argument of `FUSE_DEV_IOC_BACKING_OPEN`.
#[repr(C)]
pub struct BackingMap {
    pub fd: i32,
    pub flags: u32,
    pub padding: u64,
}

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;
pub const ATTR: usize = 88;
pub const ENTRY_OUT: usize = 40 + ATTR;
pub const ATTR_OUT: usize = 16 + ATTR;
pub const OPEN_OUT: usize = 16;
pub const INIT_OUT: usize = 64;
/// `fuse_dirent` without its name.
pub const DIRENT: usize = 24;
pub const DIRENTPLUS: usize = ENTRY_OUT + DIRENT;
pub const STATFS_OUT: usize = 80;

/// A malformed message from the kernel (a truncated body, a name without its NUL).
#[derive(Debug, thiserror::Error)]
#[error("malformed FUSE request (opcode {opcode}): {what}")]
pub struct Malformed {
    pub opcode: u32,
    pub what: &'static str,
}

/// Reads fixed-size fields and NUL-terminated names off a request body, in order.
pub struct Fields<'a> {
    bytes: &'a [u8],
    opcode: u32,
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8], opcode: u32) -> Self {
        Fields { bytes, opcode }
    }

    fn malformed(&self, what: &'static str) -> Malformed {
        Malformed {
            opcode: self.opcode,
            what,
        }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(self.malformed("body too short"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let bytes = self.take(4)?;
        Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_ne_bytes(array))
    }

    pub fn skip(&mut self, n: usize) -> Result<(), Malformed> {
        self.take(n).map(|_| ())
    }

    /// A NUL-terminated name, without its NUL.
    pub fn name(&mut self) -> Result<&'a [u8], Malformed> {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.malformed("name without a terminating NUL"))?;
        let name = &self.bytes[..end];
        self.bytes = &self.bytes[end + 1..];
        Ok(name)
    }

    /// Whatever is left (a WRITE's data).
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }
}

/// Appends fixed-size fields to a reply body.
#[derive(Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    pub fn with_capacity(capacity: usize) -> Self {
        Encoder {
            bytes: Vec::with_capacity(capacity),
        }
    }

    pub fn u16(&mut self, value: u16) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_ne_bytes());
        self
    }

    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_ne_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_ne_bytes());
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.bytes.resize(self.bytes.len() + n, 0);
        self
    }

    pub fn raw(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self
    }

    /// Pads to the next multiple of 8 bytes (directory entries are aligned so).
    pub fn align8(&mut self) -> &mut Self {
        let padding = self.bytes.len().next_multiple_of(8) - self.bytes.len();
        self.zeros(padding)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The reply header: total length, a negative errno (or 0, or a notify code), the request id.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut header = [0u8; OUT_HEADER];
    header[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&error.to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_integers_and_names_in_order() {
        let mut body = Vec::new();
        body.extend_from_slice(&7u32.to_ne_bytes());
        body.extend_from_slice(&u64::MAX.to_ne_bytes());
        body.extend_from_slice(b"name\0target\0");
        let mut fields = Fields::new(&body, opcode::SYMLINK);
        assert_eq!(fields.u32().unwrap(), 7);
        assert_eq!(fields.u64().unwrap(), u64::MAX);
        assert_eq!(fields.name().unwrap(), b"name");
        assert_eq!(fields.name().unwrap(), b"target");
        assert_eq!(fields.remaining(), 0);
        assert!(fields.u32().is_err());
    }

    #[test]
    fn a_name_without_its_nul_is_malformed() {
        let mut fields = Fields::new(b"abc", opcode::LOOKUP);
        let error = fields.name().unwrap_err();
        assert_eq!(error.opcode, opcode::LOOKUP);
    }

    #[test]
    fn directory_entries_align_to_eight_bytes() {
        let mut encoder = Encoder::default();
        encoder.raw(b"abc").align8();
        assert_eq!(encoder.len(), 8);
        encoder.align8();
        assert_eq!(encoder.len(), 8);
    }
}
