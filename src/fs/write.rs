//! Read-write volumes: every change goes through to the source before it is acknowledged.
//!
//! The contract is NFS's close-to-open consistency. A `write` reaches the source before it
//! returns (an NFS UNSTABLE write), and `flush` (every `close()`) and `fsync` make it durable
//! (COMMIT, or fsync on a directory source). Nothing is ever written into the cache. Instead,
//! the cached copy of a file that is being written is dropped, and every handle opened before
//! the write reads from the source from then on. The next open after the writers are gone sees
//! the new version (new attributes, so a new content key) and caches it afresh.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::meta::Ino;
use super::{Entry, FsError, OpenFile, Result, Volume, content_key};
use crate::cache::ContentKey;
use crate::source::{Attr, Handle, Kind, Owner, SetAttr};

/// What the volume knows of the writing done to one inode.
#[derive(Default)]
pub(super) struct WriteState {
    /// Handles open for writing.
    writers: u32,
    /// The write epoch of the last change: handles opened before it hold a stale lease.
    epoch: u64,
}

impl Volume {
    fn check_writable(&self) -> Result<()> {
        if self.config.read_write {
            Ok(())
        } else {
            Err(FsError::Errno(libc::EROFS, "read-only volume"))
        }
    }

    /// Whether a handle's cached copy still holds the file's current bytes.
    pub(super) fn cache_current(&self, file: &OpenFile) -> bool {
        if !self.config.read_write {
            return true;
        }
        let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        writes
            .get(&file.ino)
            .is_none_or(|w| w.writers == 0 && w.epoch <= file.opened_epoch)
    }

    pub(super) fn has_writers(&self, ino: Ino) -> bool {
        self.config.read_write
            && self
                .writes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ino)
                .is_some_and(|w| w.writers > 0)
    }

    /// Marks the inode as changed: handles opened before now stop using their cached copy.
    /// Returns the new epoch.
    fn changed(&self, state: &mut WriteState) -> u64 {
        let epoch = self.write_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        state.epoch = epoch;
        epoch
    }

    /// Registers a writer of `ino` whose current version is `key`; drops that version from
    /// the cache. Returns the epoch the writer's handle starts at.
    pub(super) fn begin_writing(&self, ino: Ino, key: ContentKey) -> u64 {
        let epoch = {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            state.writers += 1;
            self.changed(state)
        };
        if let Some(cache) = &self.cache {
            cache.forget(key);
        }
        epoch
    }

    /// Notes a change to the data of `ino` outside an open writer (a truncate).
    fn data_changed(&self, ino: Ino, key: ContentKey) {
        {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(ino).or_default();
            self.changed(state);
        }
        if let Some(cache) = &self.cache {
            cache.forget(key);
        }
    }

    fn current_key(&self, ino: Ino) -> Option<ContentKey> {
        self.meta
            .with(ino, |n| content_key(&self.source_id, &n.handle, &n.attr))
    }

    /// Records the attributes a source returned after a change, or, if it returned none,
    /// makes the next getattr ask it.
    fn note_attr(&self, ino: Ino, attr: Option<Attr>) {
        match attr {
            Some(attr) => {
                self.meta.update_attr(ino, attr);
            }
            None => self.meta.expire(ino),
        }
    }

    /// Writes `data` at `offset` through to the source.
    #[tracing::instrument(skip(self, file, data), fields(ino = file.ino, len = data.len()))]
    pub async fn write(&self, file: &OpenFile, offset: u64, data: &[u8]) -> Result<u32> {
        if !file.writable {
            return Err(FsError::Errno(libc::EBADF, "not open for writing"));
        }
        let source = self.source()?;
        let result = source.write(&file.handle, offset, data).await;
        self.observe(&result);
        let attr = result?;
        {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(file.ino).or_default();
            self.changed(state);
        }
        self.note_attr(file.ino, attr);
        Ok(data.len() as u32)
    }

    /// Makes what was written through `file` durable (flush on close, fsync).
    #[tracing::instrument(skip(self, file), fields(ino = file.ino))]
    pub async fn commit(&self, file: &OpenFile) -> Result<()> {
        if !file.writable {
            return Ok(());
        }
        let source = self.source()?;
        let result = source.commit(&file.handle).await;
        self.observe(&result);
        Ok(result?)
    }

    /// A handle is closed for good. For the last writer of an inode, the file's attributes
    /// are read again so that the next open sees (and caches) the version it left.
    pub async fn release(&self, file: &OpenFile) {
        if !file.writable {
            return;
        }
        let last = {
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            let state = writes.entry(file.ino).or_default();
            state.writers = state.writers.saturating_sub(1);
            state.writers == 0
        };
        if last {
            self.meta.expire(file.ino);
            if let Err(e) = self.getattr(file.ino).await {
                tracing::debug!(ino = file.ino, error = %e, "cannot read attributes after writing");
            }
        }
    }

    /// Creates and opens a regular file.
    #[tracing::instrument(skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn create(
        self: &Arc<Self>,
        parent: Ino,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Entry, Arc<OpenFile>)> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = source.create(&dir, name, mode, owner, exclusive).await;
        self.observe(&result);
        let (handle, attr) = result?;
        let entry = self.add_child(parent, name, handle.clone(), attr.clone())?;
        let key = content_key(&self.source_id, &handle, &attr);
        let opened_epoch = self.begin_writing(entry.ino, key);
        let file = Arc::new(OpenFile {
            ino: entry.ino,
            handle,
            size: attr.size,
            key,
            lease: None,
            passthrough_ready: false,
            keep_cache: false,
            writable: true,
            opened_epoch,
            readahead: Default::default(),
        });
        Ok((entry, file))
    }

    #[tracing::instrument(skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn mkdir(&self, parent: Ino, name: &[u8], mode: u16, owner: Owner) -> Result<Entry> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = source.mkdir(&dir, name, mode, owner).await;
        self.observe(&result);
        let (handle, attr) = result?;
        self.add_child(parent, name, handle, attr)
    }

    #[tracing::instrument(skip(self, name, target), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<Entry> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = source.symlink(&dir, name, target, owner).await;
        self.observe(&result);
        let (handle, attr) = result?;
        let entry = self.add_child(parent, name, handle, attr)?;
        self.meta.set_link(entry.ino, target);
        Ok(entry)
    }

    fn add_child(&self, parent: Ino, name: &[u8], handle: Handle, attr: Attr) -> Result<Entry> {
        let ino = self
            .meta
            .upsert_child(parent, name, handle, attr.clone())
            .ok_or(FsError::Errno(libc::ENOTDIR, "not a directory"))?;
        Ok(Entry {
            ino,
            attr,
            ttl: self.kernel_ttl(),
        })
    }

    /// Removes a file (`directory` false) or an empty directory.
    #[tracing::instrument(skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub async fn remove(&self, parent: Ino, name: &[u8], directory: bool) -> Result<()> {
        self.check_writable()?;
        let dir = self.node_handle(parent)?;
        let source = self.source()?;
        let result = if directory {
            source.rmdir(&dir, name).await
        } else {
            source.remove(&dir, name).await
        };
        self.observe(&result);
        match result {
            Ok(()) => {}
            // Already gone on the source: the name is gone here too.
            Err(e) if e.errno() == libc::ENOENT => {
                self.meta.remove_child(parent, name);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(key) = self
            .meta
            .child(parent, name)
            .and_then(|ino| self.current_key(ino))
        {
            if let Some(cache) = &self.cache {
                cache.forget(key);
            }
        }
        self.meta.remove_child(parent, name);
        Ok(())
    }

    /// Renames, replacing an existing target.
    #[tracing::instrument(skip(self, name, new_name), fields(
        from = %String::from_utf8_lossy(name),
        to = %String::from_utf8_lossy(new_name),
    ))]
    pub async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
    ) -> Result<()> {
        self.check_writable()?;
        let from_dir = self.node_handle(parent)?;
        let to_dir = self.node_handle(new_parent)?;
        let source = self.source()?;
        let result = source.rename(&from_dir, name, &to_dir, new_name).await;
        self.observe(&result);
        result?;
        // The moved node's handle may change (a directory source addresses nodes by path):
        // ask the source for it under its new name.
        let looked_up = source.lookup(&to_dir, new_name).await;
        self.observe(&looked_up);
        match looked_up {
            Ok((handle, attr)) => {
                if let Some(replaced) = self.meta.child(new_parent, new_name) {
                    if let (Some(cache), Some(key)) = (&self.cache, self.current_key(replaced)) {
                        cache.forget(key);
                    }
                }
                self.meta
                    .rename(parent, name, new_parent, new_name, handle, attr);
            }
            Err(e) => {
                // Renamed, but its new identity is unknown: forget both names; the kernel's
                // next lookup asks the source.
                tracing::debug!(error = %e, "cannot look up a renamed file");
                self.meta.remove_child(parent, name);
                self.meta.remove_child(new_parent, new_name);
            }
        }
        Ok(())
    }

    /// Changes attributes: mode, owner, size (truncate), times.
    #[tracing::instrument(skip(self))]
    pub async fn setattr(&self, ino: Ino, changes: SetAttr) -> Result<Entry> {
        self.check_writable()?;
        let handle = self.node_handle(ino)?;
        let truncates = changes.size.is_some();
        let kind = self.meta.with(ino, |n| n.attr.kind);
        if truncates && kind == Some(Kind::Directory) {
            return Err(FsError::Errno(libc::EISDIR, "is a directory"));
        }
        let key_before = self.current_key(ino);
        let source = self.source()?;
        let result = source.setattr(&handle, &changes).await;
        self.observe(&result);
        let attr = result?;
        if truncates {
            if let Some(key) = key_before {
                self.data_changed(ino, key);
            }
        }
        self.meta.update_attr(ino, attr.clone());
        Ok(Entry {
            ino,
            attr,
            ttl: self.kernel_ttl(),
        })
    }
}
