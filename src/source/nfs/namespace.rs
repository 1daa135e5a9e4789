//! Namespace operations: attributes, lookups, listings, and changes to names (create, mkdir,
//! symlink, remove, rename, setattr). Non-idempotent calls interpret what a retry meets (see
//! the module above).

use std::fmt;

use nfs3_client::nfs3_types::nfs3::{
    CREATE3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result, READDIRPLUS3args,
    READDIRPLUS3res, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args,
    SYMLINK3args, cookieverf3, createhow3, diropargs3, filename3, nfs_fh3, nfspath3, nfsstat3,
    post_op_attr, sattr3, symlinkdata3,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use tokio::time::Instant;
use tracing::debug;

use super::Server;
use super::convert::{Fh, attr_from_fattr, post_op, sattr_of};
use super::pool::Reply;
use super::replies::{EmptyPage, Listed, ListingProgress, listing_page};
use crate::source::{Attr, DirEntry, Handle, Kind, Owner, Result, SetAttr, SourceError};

/// How often a non-exclusive CREATE goes round when the name it found is removed before it could
/// be looked up.
const CREATE_ATTEMPTS: u32 = 3;
/// READDIRPLUS sizes: ganesha returns about 3,000 entries with attributes and handles per page.
const READDIR_DIRCOUNT: u32 = 64 * 1024;
const READDIR_MAXCOUNT: u32 = 1 << 20;
/// How often a listing is restarted when the server says the cookie went bad (the directory changed).
const READDIR_RESTARTS: u32 = 3;

/// `'name' in directory fh:...`, for messages.
struct InDir<'a> {
    dir: &'a nfs_fh3,
    name: &'a [u8],
}

impl fmt::Display for InDir<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' in directory {}",
            String::from_utf8_lossy(self.name).escape_debug(),
            Fh(&self.dir.data)
        )
    }
}

fn dirop<'a>(dir: &nfs_fh3, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name)),
    }
}

/// The attributes of a new object: its permission bits (none for a symlink) and its owner.
fn new_sattr(perm: Option<u16>, owner: Owner) -> sattr3 {
    sattr3 {
        mode: match perm {
            Some(perm) => Nfs3Option::Some(u32::from(perm & 0o7777)),
            None => Nfs3Option::None,
        },
        uid: Nfs3Option::Some(owner.uid),
        gid: Nfs3Option::Some(owner.gid),
        ..sattr3::default()
    }
}

/// What a retried CREATE, MKDIR or SYMLINK expects to find under its name if its first attempt
/// (whose reply was lost) went through: an object of its type, owned by the caller, with the mode
/// asked for, and for a symlink the same target.
struct Ours<'a> {
    kind: Kind,
    perm: Option<u16>,
    owner: Owner,
    target: Option<&'a [u8]>,
}

impl Ours<'_> {
    fn looks_like(&self, attr: &Attr) -> bool {
        attr.kind == self.kind
            && attr.uid == self.owner.uid
            && attr.gid == self.owner.gid
            && self.perm.is_none_or(|perm| attr.perm == perm & 0o7777)
    }
}

impl Server {
    pub(super) async fn getattr_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<Attr> {
        let args = GETATTR3args { object: fh.clone() };
        let reply = self
            .call("getattr", deadline, procedure!(getattr, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(attr_from_fattr(&ok.obj_attributes)),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("getattr", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    pub(super) async fn lookup_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let args = LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: filename3(Opaque::borrowed(name)),
            },
        };
        let reply = self
            .call("lookup", deadline, procedure!(lookup, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => {
                let attr = match ok.obj_attributes {
                    Nfs3Option::Some(attr) => attr_from_fattr(&attr),
                    Nfs3Option::None => self.getattr_fh(&ok.object, deadline).await?,
                };
                Ok((ok.object, attr))
            }
            Nfs3Result::Err((status, _)) => Err(self.status_error(
                "lookup",
                status,
                format_args!(
                    "'{}' in directory {}",
                    String::from_utf8_lossy(name).escape_debug(),
                    Fh(&dir.data)
                ),
            )),
        }
    }

    /// One READDIRPLUS page.
    async fn readdir_page(
        &self,
        dir: &nfs_fh3,
        cookie: u64,
        verifier: cookieverf3,
    ) -> Result<READDIRPLUS3res<'static>> {
        let args = READDIRPLUS3args {
            dir: dir.clone(),
            cookie,
            cookieverf: verifier,
            dircount: READDIR_DIRCOUNT,
            maxcount: READDIR_MAXCOUNT,
        };
        self.call(
            "readdir",
            Instant::now() + self.timeout,
            procedure!(readdirplus, args),
        )
        .await
    }

    pub(super) async fn read_dir(&self, dir: &nfs_fh3) -> Result<Vec<DirEntry>> {
        let mut restarts = 0;
        'listing: loop {
            let mut entries = Vec::new();
            let mut cookie = 0u64;
            let mut verifier = cookieverf3::default();
            let mut pages = 0u32;
            let mut progress = ListingProgress::default();
            loop {
                let reply = self.readdir_page(dir, cookie, verifier).await?;
                let ok = match reply {
                    Nfs3Result::Ok(ok) => ok,
                    Nfs3Result::Err((nfsstat3::NFS3ERR_BAD_COOKIE, _))
                        if restarts < READDIR_RESTARTS =>
                    {
                        restarts += 1;
                        debug!(restarts, "directory changed while listing; starting again");
                        continue 'listing;
                    }
                    Nfs3Result::Err((status, _)) => {
                        return Err(self.status_error(
                            "readdir",
                            status,
                            format_args!("directory {}", Fh(&dir.data)),
                        ));
                    }
                };
                pages += 1;
                let page = listing_page(ok, cookie).map_err(|EmptyPage| {
                    SourceError::status(
                        "readdir",
                        libc::EIO,
                        format!(
                            "{}: directory {}: the server returned an empty page before the end",
                            self.id,
                            Fh(&dir.data)
                        ),
                    )
                })?;
                (cookie, verifier) = (page.cookie, page.verifier);
                let eof = page.eof;
                if !eof {
                    progress.next_page(cookie, page.received).map_err(|why| {
                        SourceError::status(
                            "readdir",
                            libc::EIO,
                            format!(
                                "{}: directory {}: the server does not end its listing ({why})",
                                self.id,
                                Fh(&dir.data)
                            ),
                        )
                    })?;
                }
                for listed in page.entries {
                    match listed {
                        Listed::Entry(entry) => entries.push(entry),
                        Listed::LookUp(name) => match self
                            .lookup_fh(dir, &name, Instant::now() + self.timeout)
                            .await
                        {
                            Ok((fh, attr)) => entries.push(DirEntry {
                                name,
                                handle: Handle(fh.data.into_owned().into_boxed_slice()),
                                attr,
                            }),
                            // Removed between the listing and the lookup: it is simply not there.
                            Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {}
                            Err(e) => return Err(e),
                        },
                    }
                }
                if eof {
                    debug!(entries = entries.len(), pages, "listed");
                    return Ok(entries);
                }
            }
        }
    }

    /// The handle and attributes of an object just made, asking for what the reply left out.
    async fn made(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        obj: Nfs3Option<nfs_fh3>,
        attr: post_op_attr,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        match (obj, post_op(attr)) {
            (Nfs3Option::Some(fh), Some(attr)) if !fh.data.is_empty() => Ok((fh, attr)),
            (Nfs3Option::Some(fh), None) if !fh.data.is_empty() => {
                let attr = self.getattr_fh(&fh, deadline).await?;
                Ok((fh, attr))
            }
            _ => self.lookup_fh(dir, name, deadline).await,
        }
    }

    /// Gives a new object to its owner (and mode) when the server did not apply them at creation.
    async fn settle_owner(
        &self,
        op: &'static str,
        fh: &nfs_fh3,
        attr: Attr,
        perm: Option<u16>,
        owner: Owner,
        deadline: Instant,
    ) -> Result<Attr> {
        let perm = perm.map(|p| p & 0o7777);
        let wrong_owner = attr.uid != owner.uid || attr.gid != owner.gid;
        let wrong_perm = perm.is_some_and(|p| attr.perm != p);
        if !wrong_owner && !wrong_perm {
            return Ok(attr);
        }
        debug!(
            op,
            uid = attr.uid,
            gid = attr.gid,
            perm = attr.perm,
            "the server did not apply the attributes of a new object; setting them"
        );
        let changes = SetAttr {
            // Changing the owner may clear set-id bits: the mode goes with it.
            perm,
            uid: Some(owner.uid),
            gid: Some(owner.gid),
            ..SetAttr::default()
        };
        self.setattr_fh(fh, &changes, deadline).await
    }

    pub(super) async fn setattr_fh(
        &self,
        fh: &nfs_fh3,
        changes: &SetAttr,
        deadline: Instant,
    ) -> Result<Attr> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: sattr_of(changes)?,
            guard: Nfs3Option::None,
        };
        // SETATTR without a guard is idempotent (times set to "now" move a little on a retry).
        let reply = self
            .call("setattr", deadline, procedure!(setattr, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => match post_op(ok.obj_wcc.after) {
                Some(attr) => Ok(attr),
                None => self.getattr_fh(fh, deadline).await,
            },
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("setattr", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    /// CREATE, always GUARDED so that the attributes we send (mode, owner) only ever apply to a
    /// file this call made: an UNCHECKED create of an existing file would, on some servers, chmod
    /// and chown someone else's file. Without `exclusive`, EXIST is answered by looking the name
    /// up and opening the existing file as it is.
    pub(super) async fn create_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        perm: u16,
        owner: Owner,
        exclusive: bool,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let target = InDir { dir, name };
        let exists = || {
            SourceError::status(
                "create",
                libc::EEXIST,
                format!("{}: {target}: {}", self.id, nfsstat3::NFS3ERR_EXIST),
            )
        };
        for _ in 0..CREATE_ATTEMPTS {
            let args = CREATE3args {
                where_: dirop(dir, name),
                how: createhow3::GUARDED(new_sattr(Some(perm), owner)),
            };
            let (reply, retried) = self
                .call_tracked("create", deadline, procedure!(create, args))
                .await?;
            match reply {
                Nfs3Result::Ok(ok) => {
                    let (fh, attr) = self
                        .made(dir, name, ok.obj, ok.obj_attributes, deadline)
                        .await?;
                    let attr = self
                        .settle_owner("create", &fh, attr, Some(perm), owner, deadline)
                        .await?;
                    return Ok((fh, attr));
                }
                Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                    let (fh, attr) = match self.lookup_fh(dir, name, deadline).await {
                        Ok(found) => found,
                        // Removed since: create again (an exclusive create did meet a file).
                        Err(SourceError::Status { errno, .. })
                            if errno == libc::ENOENT && !exclusive =>
                        {
                            continue;
                        }
                        Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {
                            return Err(exists());
                        }
                        Err(e) => return Err(e),
                    };
                    let ours = Ours {
                        kind: Kind::File,
                        perm: Some(perm),
                        owner,
                        target: None,
                    };
                    if retried && ours.looks_like(&attr) {
                        debug!(%target, "a retried CREATE found the file of its first attempt");
                        return Ok((fh, attr));
                    }
                    return match attr.kind {
                        _ if exclusive => Err(exists()),
                        Kind::File => Ok((fh, attr)),
                        Kind::Directory => Err(SourceError::status(
                            "create",
                            libc::EISDIR,
                            format!("{}: {target} is a directory", self.id),
                        )),
                        _ => Err(exists()),
                    };
                }
                Nfs3Result::Err((status, _)) => {
                    return Err(self.status_error("create", status, format_args!("{target}")));
                }
            }
        }
        Err(exists())
    }

    /// On EXIST from a retried MKDIR/SYMLINK: the object of the first attempt, if it is there.
    async fn ours_after_retry(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        ours: Ours<'_>,
        deadline: Instant,
    ) -> Result<Option<(nfs_fh3, Attr)>> {
        let (fh, attr) = match self.lookup_fh(dir, name, deadline).await {
            Ok(found) => found,
            Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => return Ok(None),
            Err(e) => return Err(e),
        };
        if !ours.looks_like(&attr) {
            return Ok(None);
        }
        if let Some(target) = ours.target
            && self.readlink_fh(&fh, deadline).await? != target
        {
            return Ok(None);
        }
        debug!(target = %InDir { dir, name }, kind = ?ours.kind, "a retried call found the object of its first attempt");
        Ok(Some((fh, attr)))
    }

    pub(super) async fn readlink_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<Vec<u8>> {
        let args = READLINK3args {
            symlink: fh.clone(),
        };
        let reply = self
            .call("readlink", deadline, procedure!(readlink, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(ok.data.0.into_owned()),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("readlink", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    pub(super) async fn mkdir_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        perm: u16,
        owner: Owner,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes: new_sattr(Some(perm), owner),
        };
        let (reply, retried) = self
            .call_tracked("mkdir", deadline, procedure!(mkdir, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => {
                let (fh, attr) = self
                    .made(dir, name, ok.obj, ok.obj_attributes, deadline)
                    .await?;
                let attr = self
                    .settle_owner("mkdir", &fh, attr, Some(perm), owner, deadline)
                    .await?;
                Ok((fh, attr))
            }
            Nfs3Result::Err((status, _)) => {
                if status == nfsstat3::NFS3ERR_EXIST && retried {
                    let found = self
                        .ours_after_retry(
                            dir,
                            name,
                            Ours {
                                kind: Kind::Directory,
                                perm: Some(perm),
                                owner,
                                target: None,
                            },
                            deadline,
                        )
                        .await?;
                    if let Some(found) = found {
                        return Ok(found);
                    }
                }
                Err(self.status_error("mkdir", status, format_args!("{}", InDir { dir, name })))
            }
        }
    }

    pub(super) async fn symlink_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        target: &[u8],
        owner: Owner,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: new_sattr(None, owner),
                symlink_data: nfspath3(Opaque::borrowed(target)),
            },
        };
        let (reply, retried) = self
            .call_tracked("symlink", deadline, procedure!(symlink, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => {
                let (fh, attr) = self
                    .made(dir, name, ok.obj, ok.obj_attributes, deadline)
                    .await?;
                let attr = self
                    .settle_owner("symlink", &fh, attr, None, owner, deadline)
                    .await?;
                Ok((fh, attr))
            }
            Nfs3Result::Err((status, _)) => {
                if status == nfsstat3::NFS3ERR_EXIST && retried {
                    let found = self
                        .ours_after_retry(
                            dir,
                            name,
                            Ours {
                                kind: Kind::Symlink,
                                perm: None,
                                owner,
                                target: Some(target),
                            },
                            deadline,
                        )
                        .await?;
                    if let Some(found) = found {
                        return Ok(found);
                    }
                }
                Err(self.status_error("symlink", status, format_args!("{}", InDir { dir, name })))
            }
        }
    }

    /// REMOVE or RMDIR. NOENT in answer to a retry is the first attempt's success.
    pub(super) async fn remove_name(
        &self,
        op: &'static str,
        dir: &nfs_fh3,
        name: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let object = dirop(dir, name);
        let (status, retried) = if op == "rmdir" {
            let args = RMDIR3args { object };
            let (reply, retried) = self
                .call_tracked(op, deadline, procedure!(rmdir, args))
                .await?;
            (reply.status(), retried)
        } else {
            let args = REMOVE3args { object };
            let (reply, retried) = self
                .call_tracked(op, deadline, procedure!(remove, args))
                .await?;
            (reply.status(), retried)
        };
        match status {
            nfsstat3::NFS3_OK => Ok(()),
            nfsstat3::NFS3ERR_NOENT if retried => {
                debug!(op, target = %InDir { dir, name }, "NOENT after a retry: the first attempt removed it");
                Ok(())
            }
            status => Err(self.status_error(op, status, format_args!("{}", InDir { dir, name }))),
        }
    }

    pub(super) async fn rename_names(
        &self,
        from_dir: &nfs_fh3,
        from: &[u8],
        to_dir: &nfs_fh3,
        to: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let args = RENAME3args {
            from: dirop(from_dir, from),
            to: dirop(to_dir, to),
        };
        let (reply, retried) = self
            .call_tracked("rename", deadline, procedure!(rename, args))
            .await?;
        let status = reply.status();
        if status == nfsstat3::NFS3_OK {
            return Ok(());
        }
        if status == nfsstat3::NFS3ERR_NOENT && retried {
            // The first attempt may have moved it: the source name is gone and the target is there.
            match self.lookup_fh(to_dir, to, deadline).await {
                Ok(_) => {
                    debug!(from = %InDir { dir: from_dir, name: from }, "NOENT after a retried RENAME, and the target exists: the first attempt renamed it");
                    return Ok(());
                }
                Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {}
                Err(e) => return Err(e),
            }
        }
        Err(self.status_error(
            "rename",
            status,
            format_args!(
                "{} to {}",
                InDir {
                    dir: from_dir,
                    name: from
                },
                InDir {
                    dir: to_dir,
                    name: to
                }
            ),
        ))
    }
}
