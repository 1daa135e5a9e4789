//! The namespace of a volume: lookups, attributes, listings and symlinks, answered from what
//! is known while it is fresh and asked of the source otherwise, and the kernel's references
//! to nodes (lookup counts, see [`super::meta`]).

use super::meta::{Ino, ListedEntry, ROOT};
use super::{FsError, NodeEntry, Result, STALE_TTL, Volume};
use crate::source::{Handle, Kind};

impl Volume {
    pub(super) fn entry(&self, ino: Ino, fresh: bool) -> Option<NodeEntry> {
        let attr = self.meta.with(ino, |n| n.attr.clone())?;
        let ttl = if fresh { self.kernel_ttl() } else { STALE_TTL };
        Some(NodeEntry { ino, attr, ttl })
    }

    /// [`Volume::entry`] for the kernel: the reference it is given is counted.
    pub(super) fn referenced_entry(&self, ino: Ino, fresh: bool) -> Option<NodeEntry> {
        let attr = self.meta.reference(ino, |n| n.attr.clone())?;
        let ttl = if fresh { self.kernel_ttl() } else { STALE_TTL };
        Some(NodeEntry { ino, attr, ttl })
    }

    /// The kernel dropped `count` references to `ino` (FUSE `FORGET`), or a reference an
    /// entry carried was not handed to it. Once none is left, what the volume kept for the
    /// inode goes (its node stays while the namespace cache has room, see [`meta`]).
    pub fn forget(&self, ino: Ino, count: u64) {
        if !self.meta.forget(ino, count) {
            return;
        }
        // No open file and no page of it left in the kernel.
        self.page_cache_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
        self.drop_idle_write_state(ino);
    }

    /// A resumed connection: the kernel may hold any node known (see [`MetaStore::pin_all`]).
    pub fn kernel_resumed(&self) {
        self.meta.pin_all();
    }

    pub(super) fn node_handle(&self, ino: Ino) -> Result<Handle> {
        self.meta
            .with(ino, |n| n.handle.clone())
            .ok_or(FsError::unknown_inode(ino))
    }

    // ---- lookup and attributes -------------------------------------------------------------

    /// Answers a lookup from fresh metadata; `None` when the source must be asked. The entry
    /// found carries a reference for the kernel ([`Volume::forget`] it if it is not handed on).
    pub fn try_lookup(&self, parent: Ino, name: &[u8]) -> Option<Result<NodeEntry>> {
        if let Some(ino) = self.meta.child(parent, name) {
            if self.writes_in_flight(ino) {
                return None;
            }
            let checked = self.meta.with(ino, |n| n.checked_ms)?;
            return self.fresh(checked).then(|| {
                self.referenced_entry(ino, true)
                    .ok_or(FsError::unknown_inode(ino))
            });
        }
        if self.meta.known_absent(parent, name, |ms| self.fresh(ms)) {
            return Some(Err(FsError::not_found()));
        }
        None
    }

    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<NodeEntry> {
        if let Some(answer) = self.try_lookup(parent, name) {
            return answer;
        }
        let dir = self.node_handle(parent)?;
        if let Some(ino) = self.meta.child(parent, name) {
            self.settle_writes(ino).await;
        }
        let result = match self.source() {
            Ok(source) => source.lookup(&dir, name).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        match result {
            Ok((handle, attr)) => {
                let ino = self
                    .meta
                    .upsert_child(parent, name, handle, attr.clone(), true)
                    .ok_or(FsError::new(libc::ENOTDIR, "not a directory"))?;
                self.cover_writes_in_flight(ino);
                Ok(NodeEntry {
                    ino,
                    attr,
                    ttl: self.kernel_ttl(),
                })
            }
            Err(e) if e.errno() == libc::ENOENT => {
                self.meta.remove_child(parent, name);
                Err(e.into())
            }
            Err(e) if e.is_unavailable() => {
                if let Some(ino) = self.meta.child(parent, name) {
                    return self
                        .referenced_entry(ino, false)
                        .ok_or(FsError::unknown_inode(ino));
                }
                if self.meta.known_absent(parent, name, |_| true) {
                    return Err(FsError::not_found());
                }
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn try_getattr(&self, ino: Ino) -> Option<Result<NodeEntry>> {
        let Some(checked) = self.meta.with(ino, |n| n.checked_ms) else {
            return Some(Err(FsError::unknown_inode(ino)));
        };
        if self.writes_in_flight(ino) {
            return None;
        }
        self.fresh(checked)
            .then(|| self.entry(ino, true).ok_or(FsError::unknown_inode(ino)))
    }

    pub async fn getattr(&self, ino: Ino) -> Result<NodeEntry> {
        if let Some(answer) = self.try_getattr(ino) {
            return answer;
        }
        self.revalidate(ino).await
    }

    /// Asks the source for a node's attributes (serving the known ones if it cannot answer).
    pub(super) async fn revalidate(&self, ino: Ino) -> Result<NodeEntry> {
        let handle = self.node_handle(ino)?;
        // The source must not be asked before the writes it has not seen yet land.
        self.settle_writes(ino).await;
        let result = match self.source() {
            Ok(source) => source.getattr(&handle).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        match result {
            Ok(attr) => {
                self.meta.update_attr(ino, attr.clone());
                self.cover_writes_in_flight(ino);
                Ok(NodeEntry {
                    ino,
                    attr,
                    ttl: self.kernel_ttl(),
                })
            }
            Err(e) if e.is_unavailable() => self.entry(ino, false).ok_or(e.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// The directory a node was found in.
    pub fn parent_of(&self, ino: Ino) -> Option<Ino> {
        self.meta.with(ino, |n| n.parent)
    }

    /// The attributes of a node, as known.
    pub fn known_entry(&self, ino: Ino) -> Option<NodeEntry> {
        let checked = self.meta.with(ino, |n| n.checked_ms)?;
        self.entry(ino, self.fresh(checked))
    }

    /// [`Volume::known_entry`] for the kernel (a listing with attributes, a resent CREATE):
    /// the reference it is given is counted.
    pub fn referenced_known_entry(&self, ino: Ino) -> Option<NodeEntry> {
        let (checked, attr) = self
            .meta
            .reference(ino, |n| (n.checked_ms, n.attr.clone()))?;
        let ttl = if self.fresh(checked) {
            self.kernel_ttl()
        } else {
            STALE_TTL
        };
        Some(NodeEntry { ino, attr, ttl })
    }

    // ---- directories and symlinks ----------------------------------------------------------

    pub fn try_list(&self, dir: Ino) -> Option<Result<Vec<ListedEntry>>> {
        let (entries, listed_ms) = self.meta.listing(dir)?;
        self.fresh(listed_ms).then_some(Ok(entries))
    }

    pub async fn list(&self, dir: Ino) -> Result<Vec<ListedEntry>> {
        if let Some(answer) = self.try_list(dir) {
            return answer;
        }
        let (handle, kind) = self
            .meta
            .with(dir, |n| (n.handle.clone(), n.attr.kind))
            .ok_or(FsError::unknown_inode(dir))?;
        if kind != Kind::Directory {
            return Err(FsError::new(libc::ENOTDIR, "not a directory"));
        }
        let result = match self.source() {
            Ok(source) => source.read_dir(&handle).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        match result {
            Ok(entries) => Ok(self.meta.set_listing(dir, entries)),
            Err(e) if e.is_unavailable() => match self.meta.listing(dir) {
                Some((entries, _)) => Ok(entries),
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    pub fn try_read_link(&self, ino: Ino) -> Option<Result<Vec<u8>>> {
        self.meta
            .with(ino, |n| n.link.as_ref().map(|t| t.to_vec()))
            .flatten()
            .map(Ok)
    }

    pub async fn read_link(&self, ino: Ino) -> Result<Vec<u8>> {
        if let Some(answer) = self.try_read_link(ino) {
            return answer;
        }
        let handle = self.node_handle(ino)?;
        let result = match self.source() {
            Ok(source) => source.read_link(&handle).await,
            Err(e) => Err(e),
        };
        self.observe(&result);
        let target = result?;
        self.meta.set_link(ino, &target);
        Ok(target)
    }

    /// Resolves a path relative to the volume root, component by component (used by preload).
    /// The entry carries a reference (unless it is the root): [`Volume::forget`] it when done.
    pub async fn resolve(&self, path: &[u8]) -> Result<NodeEntry> {
        let mut entry = match self.try_getattr(ROOT) {
            Some(answer) => answer?,
            None => self.getattr(ROOT).await?,
        };
        for component in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            if component == b".." {
                return Err(FsError::new(libc::EINVAL, "'..' is not allowed in a path"));
            }
            let next = self.lookup(entry.ino, component).await;
            if entry.ino != ROOT {
                self.forget(entry.ino, 1);
            }
            entry = next?;
        }
        Ok(entry)
    }
}
