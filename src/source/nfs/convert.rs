//! Conversions between NFSv3 and the source's types: attributes, times, kinds, device
//! numbers, status codes as errnos, file handles.

use std::fmt;

use nfs3_client::nfs3_types::nfs3::{
    Nfs3Option, fattr3, ftype3, nfs_fh3, nfsstat3, nfstime3, post_op_attr, sattr3, set_atime,
    set_mtime, specdata3,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

use crate::source::{Attr, Handle, Kind, Result, SetAttr, SetTime, SourceError, Timestamp};

/// A file handle as hex, for messages and logs.
pub(super) struct Fh<'a>(pub(super) &'a [u8]);

impl fmt::Display for Fh<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fh:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

pub(super) fn fh_of(handle: &Handle) -> nfs_fh3 {
    nfs_fh3 {
        data: Opaque::owned(handle.as_bytes().to_vec()),
    }
}

pub(super) fn errno_of(status: nfsstat3) -> i32 {
    match status {
        nfsstat3::NFS3_OK => 0,
        nfsstat3::NFS3ERR_PERM => libc::EPERM,
        nfsstat3::NFS3ERR_NOENT => libc::ENOENT,
        nfsstat3::NFS3ERR_NXIO => libc::ENXIO,
        nfsstat3::NFS3ERR_ACCES => libc::EACCES,
        nfsstat3::NFS3ERR_EXIST => libc::EEXIST,
        nfsstat3::NFS3ERR_XDEV => libc::EXDEV,
        nfsstat3::NFS3ERR_NODEV => libc::ENODEV,
        nfsstat3::NFS3ERR_NOTDIR => libc::ENOTDIR,
        nfsstat3::NFS3ERR_ISDIR => libc::EISDIR,
        nfsstat3::NFS3ERR_INVAL => libc::EINVAL,
        nfsstat3::NFS3ERR_FBIG => libc::EFBIG,
        nfsstat3::NFS3ERR_NOSPC => libc::ENOSPC,
        nfsstat3::NFS3ERR_ROFS => libc::EROFS,
        nfsstat3::NFS3ERR_MLINK => libc::EMLINK,
        nfsstat3::NFS3ERR_NAMETOOLONG => libc::ENAMETOOLONG,
        nfsstat3::NFS3ERR_NOTEMPTY => libc::ENOTEMPTY,
        nfsstat3::NFS3ERR_DQUOT => libc::EDQUOT,
        nfsstat3::NFS3ERR_STALE | nfsstat3::NFS3ERR_BADHANDLE => libc::ESTALE,
        nfsstat3::NFS3ERR_NOTSUPP => libc::EOPNOTSUPP,
        nfsstat3::NFS3ERR_IO
        | nfsstat3::NFS3ERR_REMOTE
        | nfsstat3::NFS3ERR_NOT_SYNC
        | nfsstat3::NFS3ERR_BAD_COOKIE
        | nfsstat3::NFS3ERR_TOOSMALL
        | nfsstat3::NFS3ERR_SERVERFAULT
        | nfsstat3::NFS3ERR_BADTYPE
        | nfsstat3::NFS3ERR_JUKEBOX => libc::EIO,
    }
}

fn kind_of(kind: ftype3) -> Kind {
    match kind {
        ftype3::NF3REG => Kind::File,
        ftype3::NF3DIR => Kind::Directory,
        ftype3::NF3BLK => Kind::BlockDevice,
        ftype3::NF3CHR => Kind::CharDevice,
        ftype3::NF3LNK => Kind::Symlink,
        ftype3::NF3SOCK => Kind::Socket,
        ftype3::NF3FIFO => Kind::Fifo,
    }
}

/// Major and minor as the kernel's 32-bit device number (`new_encode_dev`), which is what FUSE
/// passes on: `(minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)`.
fn rdev_of(spec: &specdata3) -> u32 {
    let (major, minor) = (spec.specdata1, spec.specdata2);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

pub(super) fn timestamp_of(time: &nfstime3) -> Timestamp {
    Timestamp {
        secs: i64::from(time.seconds),
        nanos: time.nseconds.min(999_999_999),
    }
}

pub(super) fn attr_from_fattr(attr: &fattr3) -> Attr {
    Attr {
        kind: kind_of(attr.type_),
        size: attr.size,
        perm: (attr.mode & 0o7777) as u16,
        uid: attr.uid,
        gid: attr.gid,
        nlink: attr.nlink,
        rdev: rdev_of(&attr.rdev),
        fileid: attr.fileid,
        atime: timestamp_of(&attr.atime),
        mtime: timestamp_of(&attr.mtime),
        ctime: timestamp_of(&attr.ctime),
    }
}

pub(super) fn handle_of(fh: nfs_fh3) -> Handle {
    Handle(fh.data.into_owned().into_boxed_slice())
}

/// NFSv3 times are unsigned 32-bit seconds: anything else cannot be sent.
fn nfstime_of(time: Timestamp) -> Result<nfstime3> {
    let seconds = u32::try_from(time.secs).map_err(|_| {
        SourceError::status(
            "setattr",
            libc::EINVAL,
            format!(
                "time {}s is outside what NFSv3 can carry (0 to {})",
                time.secs,
                u32::MAX
            ),
        )
    })?;
    Ok(nfstime3 {
        seconds,
        nseconds: time.nanos.min(999_999_999),
    })
}

pub(super) fn sattr_of(changes: &SetAttr) -> Result<sattr3> {
    let option = |value: Option<u32>| match value {
        Some(v) => Nfs3Option::Some(v),
        None => Nfs3Option::None,
    };
    Ok(sattr3 {
        mode: option(changes.perm.map(|p| u32::from(p & 0o7777))),
        uid: option(changes.uid),
        gid: option(changes.gid),
        size: match changes.size {
            Some(size) => Nfs3Option::Some(size),
            None => Nfs3Option::None,
        },
        atime: match changes.atime {
            None => set_atime::DONT_CHANGE,
            Some(SetTime::Now) => set_atime::SET_TO_SERVER_TIME,
            Some(SetTime::At(t)) => set_atime::SET_TO_CLIENT_TIME(nfstime_of(t)?),
        },
        mtime: match changes.mtime {
            None => set_mtime::DONT_CHANGE,
            Some(SetTime::Now) => set_mtime::SET_TO_SERVER_TIME,
            Some(SetTime::At(t)) => set_mtime::SET_TO_CLIENT_TIME(nfstime_of(t)?),
        },
    })
}

pub(super) fn post_op(attr: post_op_attr) -> Option<Attr> {
    match attr {
        Nfs3Option::Some(attr) => Some(attr_from_fattr(&attr)),
        Nfs3Option::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_errnos() {
        for (status, errno) in [
            (nfsstat3::NFS3ERR_NOENT, libc::ENOENT),
            (nfsstat3::NFS3ERR_ACCES, libc::EACCES),
            (nfsstat3::NFS3ERR_PERM, libc::EPERM),
            (nfsstat3::NFS3ERR_NOTDIR, libc::ENOTDIR),
            (nfsstat3::NFS3ERR_ISDIR, libc::EISDIR),
            (nfsstat3::NFS3ERR_STALE, libc::ESTALE),
            (nfsstat3::NFS3ERR_BADHANDLE, libc::ESTALE),
            (nfsstat3::NFS3ERR_ROFS, libc::EROFS),
            (nfsstat3::NFS3ERR_NOSPC, libc::ENOSPC),
            (nfsstat3::NFS3ERR_NAMETOOLONG, libc::ENAMETOOLONG),
            (nfsstat3::NFS3ERR_NOTEMPTY, libc::ENOTEMPTY),
            (nfsstat3::NFS3ERR_EXIST, libc::EEXIST),
            (nfsstat3::NFS3ERR_DQUOT, libc::EDQUOT),
            (nfsstat3::NFS3ERR_IO, libc::EIO),
            (nfsstat3::NFS3ERR_SERVERFAULT, libc::EIO),
            (nfsstat3::NFS3ERR_BAD_COOKIE, libc::EIO),
        ] {
            assert_eq!(errno_of(status), errno, "{status}");
        }
    }

    #[test]
    fn attributes_map_from_fattr3() {
        let attr = fattr3 {
            type_: ftype3::NF3CHR,
            mode: 0o104755,
            nlink: 3,
            uid: 1000,
            gid: 100,
            size: 1 << 40,
            used: 0,
            rdev: specdata3 {
                specdata1: 259,
                specdata2: 0x1234,
            },
            fsid: 7,
            fileid: 42,
            atime: nfstime3 {
                seconds: 1,
                nseconds: 2,
            },
            mtime: nfstime3 {
                seconds: u32::MAX,
                nseconds: 2_000_000_000,
            },
            ctime: nfstime3 {
                seconds: 5,
                nseconds: 6,
            },
        };
        let mapped = attr_from_fattr(&attr);
        assert_eq!(mapped.kind, Kind::CharDevice);
        assert_eq!(mapped.perm, 0o4755);
        assert_eq!((mapped.uid, mapped.gid, mapped.nlink), (1000, 100, 3));
        assert_eq!(mapped.size, 1 << 40);
        assert_eq!(mapped.fileid, 42);
        assert_eq!(mapped.atime, Timestamp { secs: 1, nanos: 2 });
        assert_eq!(
            mapped.mtime,
            Timestamp {
                secs: i64::from(u32::MAX),
                nanos: 999_999_999
            }
        );
        // The kernel's encoding: minor low byte, 12 bits of major, then the rest of the minor.
        assert_eq!(mapped.rdev, 0x34 | (259 << 8) | (0x1200 << 12));
        assert_eq!(
            rdev_of(&specdata3 {
                specdata1: 8,
                specdata2: 1
            }),
            0x801
        );
        for (nfs, kind) in [
            (ftype3::NF3REG, Kind::File),
            (ftype3::NF3DIR, Kind::Directory),
            (ftype3::NF3LNK, Kind::Symlink),
            (ftype3::NF3BLK, Kind::BlockDevice),
            (ftype3::NF3SOCK, Kind::Socket),
            (ftype3::NF3FIFO, Kind::Fifo),
        ] {
            assert_eq!(kind_of(nfs), kind);
        }
    }

    #[test]
    fn attribute_changes_map_to_sattr3() {
        let changes = SetAttr {
            perm: Some(0o104755),
            uid: Some(1),
            gid: None,
            size: Some(7),
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::At(Timestamp { secs: 5, nanos: 6 })),
        };
        let sattr = sattr_of(&changes).unwrap();
        assert!(matches!(sattr.mode, Nfs3Option::Some(0o4755)));
        assert!(matches!(sattr.uid, Nfs3Option::Some(1)));
        assert!(matches!(sattr.gid, Nfs3Option::None));
        assert!(matches!(sattr.size, Nfs3Option::Some(7)));
        assert!(matches!(sattr.atime, set_atime::SET_TO_SERVER_TIME));
        assert!(matches!(
            sattr.mtime,
            set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                seconds: 5,
                nseconds: 6
            })
        ));
        let empty = sattr_of(&SetAttr::default()).unwrap();
        assert!(matches!(empty.atime, set_atime::DONT_CHANGE));
        assert!(matches!(empty.mode, Nfs3Option::None));
        // NFSv3 carries unsigned 32-bit seconds.
        for secs in [-1, i64::from(u32::MAX) + 1] {
            let changes = SetAttr {
                atime: Some(SetTime::At(Timestamp { secs, nanos: 0 })),
                ..SetAttr::default()
            };
            assert_eq!(sattr_of(&changes).unwrap_err().errno(), libc::EINVAL);
        }
    }
}
