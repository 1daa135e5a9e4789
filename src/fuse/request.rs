//! A request from the kernel, parsed into a typed operation.

use super::abi::{self, Fields, Malformed, opcode};

/// Who asked, and about what.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub opcode: u32,
    /// The request's id; [`abi::UNIQUE_RESEND`] is set when the kernel queued it again after a
    /// daemon died holding it.
    pub unique: u64,
    /// The inode the request is about (the parent directory for name operations).
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Header {
    /// Whether an earlier daemon had read this request and may have acted on it.
    pub fn resent(&self) -> bool {
        self.unique & abi::UNIQUE_RESEND != 0
    }
}

/// A time in a SETATTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeChange {
    Now,
    At { secs: i64, nanos: u32 },
}

/// The fields a SETATTR changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetattrIn {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeChange>,
    pub mtime: Option<TimeChange>,
    pub fh: Option<u64>,
}

/// The operations this file system serves; anything else is [`Operation::Unsupported`].
#[derive(Debug)]
pub enum Operation<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        /// Every flag the kernel offers (`flags` and `flags2`).
        flags: u64,
    },
    Destroy,
    Lookup {
        name: &'a [u8],
    },
    Forget {
        nlookup: u64,
    },
    /// `(nodeid, nlookup)` pairs.
    BatchForget(Vec<(u64, u64)>),
    Getattr {
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
    Mknod {
        name: &'a [u8],
    },
    Mkdir {
        name: &'a [u8],
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a [u8],
    },
    Rmdir {
        name: &'a [u8],
    },
    Rename {
        name: &'a [u8],
        new_parent: u64,
        new_name: &'a [u8],
        flags: u32,
    },
    Link {
        new_name: &'a [u8],
    },
    Open {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    Statfs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
    },
    Flush {
        fh: u64,
    },
    Opendir,
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir,
    Access {
        mask: u32,
    },
    Create {
        name: &'a [u8],
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Interrupt,
    Getxattr,
    Listxattr,
    Setxattr,
    Removexattr,
    Fallocate,
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    Unsupported,
}

impl Operation<'_> {
    /// Whether the kernel waits for an answer (FORGET and INTERRUPT get none).
    pub fn wants_reply(&self) -> bool {
        !matches!(
            self,
            Operation::Forget { .. } | Operation::BatchForget(_) | Operation::Interrupt
        )
    }
}

pub struct Request<'a> {
    pub header: Header,
    pub operation: Operation<'a>,
}

impl<'a> Request<'a> {
    /// Parses one message as read from /dev/fuse.
    pub fn parse(message: &'a [u8]) -> Result<Request<'a>, Malformed> {
        let mut fields = Fields::new(message, 0);
        let len = fields.u32()? as usize;
        let opcode = fields.u32()?;
        let header = Header {
            opcode,
            unique: fields.u64()?,
            nodeid: fields.u64()?,
            uid: fields.u32()?,
            gid: fields.u32()?,
            pid: fields.u32()?,
        };
        fields.skip(4)?;
        if len != message.len() {
            return Err(Malformed {
                opcode,
                what: "length does not match the message",
            });
        }
        let fields = Fields::new(&message[abi::IN_HEADER..], opcode);
        let operation = parse_operation(opcode, fields)?;
        Ok(Request { header, operation })
    }
}

fn parse_operation(opcode: u32, mut body: Fields<'_>) -> Result<Operation<'_>, Malformed> {
    Ok(match opcode {
        opcode::INIT => {
            let (major, minor, max_readahead) = (body.u32()?, body.u32()?, body.u32()?);
            let mut flags = u64::from(body.u32()?);
            if flags & abi::init::INIT_EXT != 0 && body.remaining() >= 4 {
                flags |= u64::from(body.u32()?) << 32;
            }
            Operation::Init {
                major,
                minor,
                max_readahead,
                flags,
            }
        }
        opcode::DESTROY => Operation::Destroy,
        opcode::LOOKUP => Operation::Lookup { name: body.name()? },
        opcode::FORGET => Operation::Forget {
            nlookup: body.u64()?,
        },
        opcode::BATCH_FORGET => {
            let count = body.u32()? as usize;
            body.skip(4)?;
            if count > body.remaining() / 16 {
                return Err(Malformed {
                    opcode,
                    what: "more forgets than the message holds",
                });
            }
            let mut forgets = Vec::with_capacity(count);
            for _ in 0..count {
                forgets.push((body.u64()?, body.u64()?));
            }
            Operation::BatchForget(forgets)
        }
        opcode::GETATTR => {
            let flags = body.u32()?;
            body.skip(4)?;
            let fh = body.u64()?;
            Operation::Getattr {
                fh: (flags & abi::GETATTR_FH != 0).then_some(fh),
            }
        }
        opcode::SETATTR => Operation::Setattr(parse_setattr(&mut body)?),
        opcode::READLINK => Operation::Readlink,
        opcode::SYMLINK => Operation::Symlink {
            name: body.name()?,
            target: body.name()?,
        },
        opcode::MKNOD => {
            body.skip(16)?;
            Operation::Mknod { name: body.name()? }
        }
        opcode::MKDIR => Operation::Mkdir {
            mode: body.u32()?,
            umask: body.u32()?,
            name: body.name()?,
        },
        opcode::UNLINK => Operation::Unlink { name: body.name()? },
        opcode::RMDIR => Operation::Rmdir { name: body.name()? },
        opcode::RENAME => Operation::Rename {
            new_parent: body.u64()?,
            flags: 0,
            name: body.name()?,
            new_name: body.name()?,
        },
        opcode::RENAME2 => {
            let new_parent = body.u64()?;
            let flags = body.u32()?;
            body.skip(4)?;
            Operation::Rename {
                new_parent,
                flags,
                name: body.name()?,
                new_name: body.name()?,
            }
        }
        opcode::LINK => {
            body.skip(8)?;
            Operation::Link {
                new_name: body.name()?,
            }
        }
        opcode::OPEN => Operation::Open { flags: body.u32()? },
        opcode::OPENDIR => Operation::Opendir,
        opcode::READ | opcode::READDIR | opcode::READDIRPLUS => {
            let (fh, offset, size) = (body.u64()?, body.u64()?, body.u32()?);
            if opcode == opcode::READ {
                Operation::Read { fh, offset, size }
            } else {
                Operation::Readdir {
                    fh,
                    offset,
                    size,
                    plus: opcode == opcode::READDIRPLUS,
                }
            }
        }
        opcode::WRITE => {
            let (fh, offset, size) = (body.u64()?, body.u64()?, body.u32()? as usize);
            body.skip(20)?;
            let data = body.rest();
            if data.len() != size {
                return Err(Malformed {
                    opcode,
                    what: "write size does not match its data",
                });
            }
            Operation::Write { fh, offset, data }
        }
        opcode::STATFS => Operation::Statfs,
        opcode::RELEASE => Operation::Release { fh: body.u64()? },
        opcode::RELEASEDIR => Operation::Releasedir { fh: body.u64()? },
        opcode::FSYNC => Operation::Fsync { fh: body.u64()? },
        opcode::FSYNCDIR => Operation::Fsyncdir,
        opcode::FLUSH => Operation::Flush { fh: body.u64()? },
        opcode::ACCESS => Operation::Access { mask: body.u32()? },
        opcode::CREATE => Operation::Create {
            flags: body.u32()?,
            mode: body.u32()?,
            umask: body.u32()?,
            name: {
                body.skip(4)?;
                body.name()?
            },
        },
        opcode::INTERRUPT => Operation::Interrupt,
        opcode::GETXATTR => Operation::Getxattr,
        opcode::LISTXATTR => Operation::Listxattr,
        opcode::SETXATTR => Operation::Setxattr,
        opcode::REMOVEXATTR => Operation::Removexattr,
        opcode::FALLOCATE => Operation::Fallocate,
        opcode::LSEEK => {
            let (fh, offset, whence) = (body.u64()?, body.u64()?, body.u32()?);
            Operation::Lseek { fh, offset, whence }
        }
        _ => Operation::Unsupported,
    })
}

fn parse_setattr(body: &mut Fields<'_>) -> Result<SetattrIn, Malformed> {
    use abi::fattr;
    let valid = body.u32()?;
    body.skip(4)?;
    let fh = body.u64()?;
    let size = body.u64()?;
    body.skip(8)?; // lock owner
    let (atime, mtime) = (body.u64()? as i64, body.u64()? as i64);
    body.skip(8)?; // ctime
    let (atime_nanos, mtime_nanos) = (body.u32()?, body.u32()?);
    body.skip(4)?; // ctime nanoseconds
    let mode = body.u32()?;
    body.skip(4)?;
    let (uid, gid) = (body.u32()?, body.u32()?);
    let set = |bit: u32| valid & bit != 0;
    let time = |bit: u32, now: u32, secs: i64, nanos: u32| {
        if set(now) {
            Some(TimeChange::Now)
        } else {
            set(bit).then_some(TimeChange::At { secs, nanos })
        }
    };
    Ok(SetattrIn {
        mode: set(fattr::MODE).then_some(mode),
        uid: set(fattr::UID).then_some(uid),
        gid: set(fattr::GID).then_some(gid),
        size: set(fattr::SIZE).then_some(size),
        atime: time(fattr::ATIME, fattr::ATIME_NOW, atime, atime_nanos),
        mtime: time(fattr::MTIME, fattr::MTIME_NOW, mtime, mtime_nanos),
        fh: set(fattr::FH).then_some(fh),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((abi::IN_HEADER + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&opcode.to_ne_bytes());
        m.extend_from_slice(&unique.to_ne_bytes());
        m.extend_from_slice(&nodeid.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_lookup_names_its_parent_and_name() {
        let m = message(opcode::LOOKUP, 2, 7, b"train\0");
        let request = Request::parse(&m).unwrap();
        assert_eq!(request.header.nodeid, 7);
        assert!(!request.header.resent());
        assert!(matches!(request.operation, Operation::Lookup { name } if name == b"train"));
    }

    #[test]
    fn a_resent_request_is_marked() {
        let m = message(opcode::STATFS, 4 | abi::UNIQUE_RESEND, 1, b"");
        assert!(Request::parse(&m).unwrap().header.resent());
    }

    #[test]
    fn a_write_carries_exactly_its_data() {
        let mut body = Vec::new();
        body.extend_from_slice(&9u64.to_ne_bytes());
        body.extend_from_slice(&4096u64.to_ne_bytes());
        body.extend_from_slice(&3u32.to_ne_bytes());
        body.extend_from_slice(&[0u8; 20]);
        body.extend_from_slice(b"xyz");
        let m = message(opcode::WRITE, 6, 3, &body);
        match Request::parse(&m).unwrap().operation {
            Operation::Write { fh, offset, data } => {
                assert_eq!((fh, offset, data), (9, 4096, &b"xyz"[..]));
            }
            other => panic!("parsed as {other:?}"),
        }
        // A size that disagrees with the data is refused.
        let mut short = m.clone();
        short.pop();
        let len = short.len() as u32;
        short[0..4].copy_from_slice(&len.to_ne_bytes());
        assert!(Request::parse(&short).is_err());
    }

    #[test]
    fn truncated_messages_are_refused() {
        let m = message(opcode::GETATTR, 2, 1, &[0u8; 8]);
        assert!(Request::parse(&m).is_err());
        let mut lying = message(opcode::STATFS, 2, 1, b"");
        lying[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(Request::parse(&lying).is_err());
        let count = message(
            opcode::BATCH_FORGET,
            2,
            0,
            &[255, 255, 255, 255, 0, 0, 0, 0],
        );
        assert!(Request::parse(&count).is_err());
    }

    #[test]
    fn setattr_keeps_only_the_fields_marked_valid() {
        let mut body = Vec::new();
        let valid = abi::fattr::SIZE | abi::fattr::MTIME_NOW;
        body.extend_from_slice(&valid.to_ne_bytes());
        body.extend_from_slice(&[0u8; 4]);
        body.extend_from_slice(&0u64.to_ne_bytes()); // fh
        body.extend_from_slice(&123u64.to_ne_bytes()); // size
        body.extend_from_slice(&[0u8; 88 - 24]);
        let m = message(opcode::SETATTR, 2, 5, &body);
        let Operation::Setattr(set) = Request::parse(&m).unwrap().operation else {
            panic!("not a setattr");
        };
        assert_eq!(set.size, Some(123));
        assert_eq!(set.mtime, Some(TimeChange::Now));
        assert_eq!(
            (set.mode, set.uid, set.atime, set.fh),
            (None, None, None, None)
        );
    }
}
