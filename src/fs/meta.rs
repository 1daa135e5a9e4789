//! The namespace seen so far: inode numbers, names, attributes, source handles and directory
//! listings, kept in memory and persisted through a journal in the cache directory.
//!
//! Inode numbers are assigned once per (parent, name, source handle) and persisted, so a
//! remount (or, later, a restarted daemon resuming a FUSE connection) sees the same numbers.
//! Freshness is wall-clock time of the source's last confirmation, so that it also survives a
//! restart: within the metadata TTL a remount does not ask the source again.
//!
//! Memory is bounded by the kernel's lookup counts. Every entry handed to the kernel (a
//! lookup, a created node, a `READDIRPLUS` entry) is a reference the kernel holds until it
//! sends `FORGET`. Nodes nobody references are a cache of the namespace: at most
//! `idle_limit` of them stay (the table holds more only while the kernel references more),
//! evicted oldest-unreferenced first, so the table never exceeds the larger of `idle_limit`
//! and the referenced nodes with their ancestors. An evicted node's number is never given
//! again: looked up again, the name gets a new one. A daemon that resumes a connection does not
//! know the kernel's counts: every node it loads stays pinned for the life of the process.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::journal::Journal;
use crate::source::{Attr, DirEntry, Handle, Kind};

pub type Ino = u64;
pub const ROOT: Ino = 1;
/// The time of a `Listed` record that says the directory's listing is no longer complete.
const NOT_LISTED_MS: u64 = 0;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long ago `ms` was.
pub fn age(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

pub struct Node {
    pub parent: Ino,
    pub name: Box<[u8]>,
    pub handle: Handle,
    pub attr: Attr,
    /// When the source last confirmed `attr`.
    pub checked_ms: u64,
    /// Directories only; boxed because most nodes are files.
    pub dir: Option<Box<DirState>>,
    /// A symlink's target, once read.
    pub link: Option<Box<[u8]>>,
    /// Entries for this node the kernel holds (handed to it, not yet forgotten). Taken under
    /// the table's read lock; eviction, under the write lock, sees every reference taken.
    lookups: AtomicU64,
    /// Loaded by a daemon that resumed a connection: the kernel may reference it with a count
    /// this process does not know, so it is never evicted.
    pinned: bool,
}

#[derive(Default)]
pub struct DirState {
    pub children: HashMap<Box<[u8]>, Ino>,
    /// When a complete listing was last read from the source; `None` if it never was, in which
    /// case `children` holds only names looked up one by one.
    pub listed_ms: Option<u64>,
}

/// One entry of a directory listing snapshot.
#[derive(Clone, Debug)]
pub struct ListedEntry {
    pub name: Box<[u8]>,
    pub ino: Ino,
    pub kind: Kind,
}

#[derive(Serialize, Deserialize)]
pub enum MetaRecord {
    Node {
        ino: Ino,
        parent: Ino,
        name: Box<[u8]>,
        handle: Handle,
        attr: Attr,
        checked_ms: u64,
    },
    Listed {
        ino: Ino,
        at_ms: u64,
    },
    Link {
        ino: Ino,
        target: Box<[u8]>,
    },
    Removed {
        ino: Ino,
    },
}

struct Table {
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    /// Nodes that became unreferenced (created without a reference, or forgotten), oldest
    /// first: the candidates for eviction. Entries of nodes referenced again since, or gone,
    /// are skipped when reached.
    idle: VecDeque<Ino>,
}

impl Table {
    fn child(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.nodes
            .get(&parent)?
            .dir
            .as_ref()?
            .children
            .get(name)
            .copied()
    }
}

pub struct MetaStore {
    table: RwLock<Table>,
    journal: Option<Journal<MetaRecord>>,
    /// Inode numbers were assigned since the journal was last handed to the kernel's page
    /// cache ([`MetaStore::persist_inodes`]).
    new_inodes: AtomicBool,
    /// Unreferenced nodes kept, at most.
    idle_limit: usize,
    /// Nodes the kernel references (a count above zero).
    referenced: AtomicUsize,
}

impl MetaStore {
    /// An empty store that persists nothing (uncached mounts).
    pub fn in_memory(idle_limit: usize) -> Self {
        MetaStore {
            table: RwLock::new(Table {
                nodes: HashMap::new(),
                next_ino: ROOT + 1,
                idle: VecDeque::new(),
            }),
            journal: None,
            new_inodes: AtomicBool::new(false),
            idle_limit,
            referenced: AtomicUsize::new(0),
        }
    }

    /// A store persisted through `journal`, loaded from the records it held.
    pub fn persistent(
        journal: Journal<MetaRecord>,
        records: Vec<MetaRecord>,
        idle_limit: usize,
    ) -> Self {
        let mut nodes: HashMap<Ino, Node> = HashMap::new();
        // Every number ever given out, removed ones included: the kernel may still hold them,
        // so they are never given again.
        let mut highest = ROOT;
        for record in records {
            match &record {
                MetaRecord::Node { ino, .. } | MetaRecord::Removed { ino } => {
                    highest = highest.max(*ino);
                }
                MetaRecord::Listed { .. } | MetaRecord::Link { .. } => {}
            }
            match record {
                MetaRecord::Node {
                    ino,
                    parent,
                    name,
                    handle,
                    attr,
                    checked_ms,
                } => {
                    let previous = nodes.remove(&ino);
                    let dir = (attr.kind == Kind::Directory)
                        .then(|| {
                            previous
                                .as_ref()
                                .and_then(|p| p.dir.as_ref())
                                .map(|d| d.listed_ms)
                        })
                        .map(|listed_ms| {
                            Box::new(DirState {
                                children: HashMap::new(),
                                listed_ms: listed_ms.flatten(),
                            })
                        });
                    let link = previous.and_then(|p| p.link);
                    nodes.insert(
                        ino,
                        Node {
                            parent,
                            name,
                            handle,
                            attr,
                            checked_ms,
                            dir,
                            link,
                            lookups: AtomicU64::new(0),
                            pinned: false,
                        },
                    );
                }
                MetaRecord::Listed { ino, at_ms } => {
                    if let Some(dir) = nodes.get_mut(&ino).and_then(|n| n.dir.as_mut()) {
                        dir.listed_ms = (at_ms != NOT_LISTED_MS).then_some(at_ms);
                    }
                }
                MetaRecord::Link { ino, target } => {
                    if let Some(node) = nodes.get_mut(&ino) {
                        node.link = Some(target);
                    }
                }
                MetaRecord::Removed { ino } => {
                    nodes.remove(&ino);
                }
            }
        }
        // Children maps follow from the parent links (a later inode under a name replaces an
        // earlier one); then only what is reachable from the root is kept.
        let mut links: Vec<(Ino, Ino, Box<[u8]>)> = nodes
            .iter()
            .filter(|(ino, _)| **ino != ROOT)
            .map(|(ino, node)| (*ino, node.parent, node.name.clone()))
            .collect();
        links.sort_unstable_by_key(|(ino, ..)| *ino);
        for (ino, parent, name) in links {
            if let Some(dir) = nodes.get_mut(&parent).and_then(|p| p.dir.as_mut()) {
                dir.children.insert(name, ino);
            }
        }
        let mut reachable = HashSet::new();
        let mut pending = vec![ROOT];
        while let Some(ino) = pending.pop() {
            if reachable.insert(ino)
                && let Some(dir) = nodes.get(&ino).and_then(|n| n.dir.as_ref())
            {
                pending.extend(dir.children.values().copied());
            }
        }
        nodes.retain(|ino, _| reachable.contains(ino));
        // Nothing loaded is referenced by a new connection; older numbers are evicted first.
        let mut idle: Vec<Ino> = nodes.keys().copied().filter(|&ino| ino != ROOT).collect();
        idle.sort_unstable();
        let store = MetaStore {
            table: RwLock::new(Table {
                nodes,
                next_ino: highest + 1,
                idle: idle.into(),
            }),
            journal: Some(journal),
            new_inodes: AtomicBool::new(false),
            idle_limit,
            referenced: AtomicUsize::new(0),
        };
        store.rewrite(&store.write());
        store
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record (in memory; see [`MetaStore::flush`]). Called under the table's write
    /// lock, which orders the records with the table; `_table` is the proof.
    fn append(&self, _table: &Table, record: MetaRecord) {
        self.append_quiet(record);
    }

    fn append_quiet(&self, record: MetaRecord) {
        if let Some(journal) = &self.journal
            && let Err(e) = journal.append(&record)
        {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot persist metadata; it will be fetched again after a restart");
        }
    }

    /// Replaces the journal by a snapshot of the table once it has grown enough: encoded under
    /// the read lock (appends, made under the write lock, are ordered with it), written, synced
    /// and renamed after the lock is released, so that no request waits for the disk.
    fn compact_if_wanted(&self) {
        let Some(journal) = &self.journal else {
            return;
        };
        if !journal.wants_rewrite() {
            return;
        }
        let snapshot = {
            let table = self.read();
            journal.snapshot(snapshot_records(&table))
        };
        let installed = match snapshot {
            Ok(Some(snapshot)) => snapshot.install(),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = installed {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot compact the metadata journal");
        }
    }

    /// Replaces the journal by the table now (at load, and when the root changed).
    fn rewrite(&self, table: &Table) {
        let Some(journal) = &self.journal else {
            return;
        };
        if let Err(e) = journal.rewrite(snapshot_records(table)) {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot compact the metadata journal");
        }
    }

    /// Hands the records of newly numbered inodes to the kernel's page cache (write(2), no
    /// fsync), so that a successor daemon knows every number the kernel may hold: called before
    /// a reply gives new numbers to the kernel. A crash of the node ends the connection anyway.
    pub fn persist_inodes(&self) {
        if self.new_inodes.swap(false, Ordering::AcqRel)
            && let Some(journal) = &self.journal
            && let Err(e) = journal.flush(false)
        {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot flush the metadata journal");
        }
    }

    /// Writes the records appended so far (and syncs them with `sync`), compacting the
    /// journal first if it has grown enough. Called periodically, outside every request.
    pub fn flush(&self, sync: bool) {
        self.compact_if_wanted();
        if let Some(journal) = &self.journal
            && let Err(e) = journal.flush(sync)
        {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot flush the metadata journal");
        }
    }

    /// Runs `f` on a node, if it exists.
    pub fn with<T>(&self, ino: Ino, f: impl FnOnce(&Node) -> T) -> Option<T> {
        self.read().nodes.get(&ino).map(f)
    }

    /// The root's handle, if the store knows the root.
    pub fn root_handle(&self) -> Option<Handle> {
        self.with(ROOT, |n| n.handle.clone())
    }

    /// Installs the root as the source reports it. If the source's root is not the one the
    /// store was built from (another export, a recreated file system), everything known is
    /// dropped: handles from the old one would be meaningless.
    pub fn set_root(&self, handle: Handle, attr: Attr) {
        let mut table = self.write();
        let known = table.nodes.get(&ROOT).map(|n| n.handle == handle);
        if known == Some(false) {
            tracing::warn!(
                "the source's root changed since the metadata was cached; forgetting it"
            );
            table.nodes.clear();
            table.idle.clear();
            self.referenced.store(0, Ordering::Relaxed);
            table.next_ino = ROOT + 1;
            self.rewrite(&table);
        }
        let now = now_ms();
        match table.nodes.get_mut(&ROOT) {
            Some(root) => {
                let changed = root.attr != attr;
                root.attr = attr;
                root.checked_ms = now;
                if changed {
                    let record = node_record(ROOT, &table.nodes[&ROOT]);
                    self.append(&table, record);
                }
            }
            None => {
                let node = new_node(ROOT, Box::default(), handle, attr, now);
                let record = node_record(ROOT, &node);
                table.nodes.insert(ROOT, node);
                self.append(&table, record);
            }
        }
    }

    /// The inode a name in `parent` has, if known.
    pub fn child(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.read().child(parent, name)
    }

    /// Whether a complete listing of `dir` checked at or after `since_ms` says `name` is absent.
    pub fn known_absent(&self, dir: Ino, name: &[u8], fresh: impl Fn(u64) -> bool) -> bool {
        let table = self.read();
        table
            .nodes
            .get(&dir)
            .and_then(|n| n.dir.as_ref())
            .is_some_and(|d| d.listed_ms.is_some_and(&fresh) && !d.children.contains_key(name))
    }

    /// Records what the source said about `name` in `parent`; returns its inode. A different
    /// source handle under the same name is a different file and gets a new inode. With
    /// `reference`, the kernel is about to be given the node: it holds a reference from now
    /// on (see [`MetaStore::forget`]).
    pub fn upsert_child(
        &self,
        parent: Ino,
        name: &[u8],
        handle: Handle,
        attr: Attr,
        reference: bool,
    ) -> Option<Ino> {
        let mut table = self.write();
        let now = now_ms();
        let ino = self.upsert_locked(&mut table, parent, name, handle, attr, now)?;
        if reference {
            self.take_reference(&table.nodes[&ino]);
        }
        self.trim_locked(&mut table);
        Some(ino)
    }

    fn upsert_locked(
        &self,
        table: &mut Table,
        parent: Ino,
        name: &[u8],
        handle: Handle,
        attr: Attr,
        now: u64,
    ) -> Option<Ino> {
        table.nodes.get(&parent)?.dir.as_ref()?;
        if let Some(ino) = table.child(parent, name) {
            if let Some(node) = table.nodes.get_mut(&ino)
                && node.handle == handle
                && same_kind(&node.attr, &attr)
            {
                let changed = node.attr != attr;
                node.attr = attr;
                node.checked_ms = now;
                if changed {
                    if node.attr.kind == Kind::Symlink {
                        node.link = None;
                    }
                    let record = node_record(ino, node);
                    self.append(table, record);
                }
                return Some(ino);
            }
            self.detach_locked(table, ino);
        }
        let ino = table.next_ino;
        table.next_ino += 1;
        let node = new_node(parent, name.into(), handle, attr, now);
        let record = node_record(ino, &node);
        table.nodes.insert(ino, node);
        table.idle.push_back(ino);
        if let Some(dir) = table.nodes.get_mut(&parent).and_then(|p| p.dir.as_mut()) {
            dir.children.insert(name.into(), ino);
        }
        self.append(table, record);
        self.new_inodes.store(true, Ordering::Release);
        Some(ino)
    }

    /// Counts a reference the kernel is given to `node` (under either lock).
    fn take_reference(&self, node: &Node) {
        if node.lookups.fetch_add(1, Ordering::AcqRel) == 0 {
            self.referenced.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `f` on a node the kernel is about to be given, counting the reference; `None` if
    /// the node is not known.
    pub fn reference<T>(&self, ino: Ino, f: impl FnOnce(&Node) -> T) -> Option<T> {
        let table = self.read();
        let node = table.nodes.get(&ino)?;
        self.take_reference(node);
        Some(f(node))
    }

    /// The kernel dropped `count` references to `ino` (FUSE `FORGET`), or a reference taken
    /// was not handed to it after all. Returns whether the kernel holds none any more (the
    /// inode has no open file and no cached pages: what the volume keeps for it can go).
    pub fn forget(&self, ino: Ino, count: u64) -> bool {
        let mut table = self.write();
        let Some(node) = table.nodes.get(&ino) else {
            return true;
        };
        let pinned = node.pinned;
        let before = node
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(count))
            })
            .unwrap_or(0);
        if before == 0 || before > count {
            // Not referenced by this process's count (a pinned node), or still referenced.
            return before == 0;
        }
        self.referenced.fetch_sub(1, Ordering::Relaxed);
        if !pinned && ino != ROOT {
            table.idle.push_back(ino);
            self.trim_locked(&mut table);
        }
        true
    }

    /// A resumed connection: the kernel may hold any node known, with counts this process
    /// does not know. All of them stay for the life of the process.
    pub fn pin_all(&self) {
        let mut table = self.write();
        for node in table.nodes.values_mut() {
            node.pinned = true;
        }
        table.idle.clear();
    }

    /// Evicts unreferenced nodes, oldest first, while the table holds more than the limit.
    /// A directory goes only after its children; a listing that loses an entry is no longer
    /// complete (and is recorded so, for a restart).
    fn trim_locked(&self, table: &mut Table) {
        let mut budget = table.idle.len();
        while table.nodes.len() > self.idle_limit && budget > 0 {
            budget -= 1;
            let Some(ino) = table.idle.pop_front() else {
                break;
            };
            let Some(node) = table.nodes.get(&ino) else {
                continue;
            };
            if ino == ROOT || node.pinned || node.lookups.load(Ordering::Acquire) > 0 {
                continue;
            }
            if node.dir.as_ref().is_some_and(|d| !d.children.is_empty()) {
                table.idle.push_back(ino);
                continue;
            }
            let Some(node) = table.nodes.remove(&ino) else {
                continue;
            };
            // A later replay must not bring it back (with a handle a rename may have changed).
            self.append_quiet(MetaRecord::Removed { ino });
            let parent = node.parent;
            let Some(dir) = table.nodes.get_mut(&parent).and_then(|p| p.dir.as_mut()) else {
                continue;
            };
            if dir.children.get(&node.name) != Some(&ino) {
                continue;
            }
            dir.children.remove(&node.name);
            if dir.listed_ms.take().is_some() {
                self.append_quiet(MetaRecord::Listed {
                    ino: parent,
                    at_ms: NOT_LISTED_MS,
                });
            }
        }
        // Entries of nodes referenced again or gone pile up while nothing is evicted.
        if table.idle.len() > 2 * table.nodes.len() + 1024 {
            let mut seen = HashSet::new();
            let nodes = &table.nodes;
            table.idle.retain(|ino| {
                nodes.get(ino).is_some_and(|n| {
                    !n.pinned && n.lookups.load(Ordering::Acquire) == 0 && seen.insert(*ino)
                })
            });
        }
    }

    /// Forgets that `name` exists in `parent` (the source says it does not).
    pub fn remove_child(&self, parent: Ino, name: &[u8]) {
        let mut table = self.write();
        if let Some(ino) = table.child(parent, name) {
            self.detach_locked(&mut table, ino);
        }
    }

    /// Forgets what is known of `name` in `dir` when the source changed it in a way not known
    /// (a rename whose result could not be looked up): the name is detached, and the
    /// directory's listing is no longer complete, so the name is asked of the source again
    /// instead of being answered absent.
    pub fn unknown_child(&self, dir: Ino, name: &[u8]) {
        let mut table = self.write();
        if let Some(ino) = table.child(dir, name) {
            self.detach_locked(&mut table, ino);
        }
        let listed = table
            .nodes
            .get_mut(&dir)
            .and_then(|n| n.dir.as_mut())
            .and_then(|d| d.listed_ms.take());
        if listed.is_some() {
            self.append(
                &table,
                MetaRecord::Listed {
                    ino: dir,
                    at_ms: NOT_LISTED_MS,
                },
            );
        }
    }

    /// Unlinks a node from its parent. The node itself stays, because the kernel may still
    /// hold its inode number; it is no longer reachable by name and is dropped at the next
    /// journal rewrite after a restart.
    fn detach_locked(&self, table: &mut Table, ino: Ino) {
        let Some(node) = table.nodes.get(&ino) else {
            return;
        };
        let (parent, name) = (node.parent, node.name.clone());
        if let Some(dir) = table.nodes.get_mut(&parent).and_then(|p| p.dir.as_mut())
            && dir.children.get(&name) == Some(&ino)
        {
            dir.children.remove(&name);
        }
        self.append(table, MetaRecord::Removed { ino });
    }

    /// Records fresh attributes of a node; returns whether they changed.
    pub fn update_attr(&self, ino: Ino, attr: Attr) -> bool {
        let mut table = self.write();
        // A node detached from its name (removed, replaced by a rename) lives on for the
        // kernel only: journaling it again would bring it back under that name at a restart.
        let attached = ino == ROOT
            || table
                .nodes
                .get(&ino)
                .is_some_and(|n| table.child(n.parent, &n.name) == Some(ino));
        let Some(node) = table.nodes.get_mut(&ino) else {
            return false;
        };
        node.checked_ms = now_ms();
        if node.attr == attr {
            return false;
        }
        node.attr = attr;
        if node.attr.kind == Kind::Symlink {
            node.link = None;
        }
        if attached {
            let record = node_record(ino, node);
            self.append(&table, record);
        }
        true
    }

    /// Makes a node's attributes stale, so that the next request for them asks the source.
    pub fn expire(&self, ino: Ino) {
        if let Some(node) = self.write().nodes.get_mut(&ino) {
            node.checked_ms = 0;
        }
    }

    /// Records a rename done on the source: `name` in `parent` is now `new_name` in
    /// `new_parent` (replacing what was there) with `handle` and `attr`. The moved node keeps
    /// its inode number. Directory sources address nodes by path, so when the handle changed,
    /// the handles of known descendants are rewritten too.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        handle: Handle,
        attr: Attr,
    ) {
        let mut table = self.write();
        let Some(ino) = table.child(parent, name) else {
            // The moved node was not known: it is a new node under the new name, and what it
            // replaced keeps its number to itself (a number is never given to another file).
            if let Some(replaced) = table.child(new_parent, new_name) {
                self.detach_locked(&mut table, replaced);
            }
            drop(table);
            self.upsert_child(new_parent, new_name, handle, attr, false);
            return;
        };
        if let Some(replaced) = table.child(new_parent, new_name)
            && replaced != ino
        {
            self.detach_locked(&mut table, replaced);
        }
        if let Some(dir) = table.nodes.get_mut(&parent).and_then(|p| p.dir.as_mut()) {
            dir.children.remove(name);
        }
        let now = now_ms();
        let old_handle = match table.nodes.get_mut(&ino) {
            Some(node) => {
                node.parent = new_parent;
                node.name = new_name.into();
                node.attr = attr;
                node.checked_ms = now;
                std::mem::replace(&mut node.handle, handle.clone())
            }
            None => return,
        };
        if let Some(dir) = table
            .nodes
            .get_mut(&new_parent)
            .and_then(|p| p.dir.as_mut())
        {
            dir.children.insert(new_name.into(), ino);
        }
        let mut changed = vec![ino];
        if old_handle != handle {
            let mut prefix = old_handle.as_bytes().to_vec();
            prefix.push(b'/');
            let mut pending: Vec<Ino> = table
                .nodes
                .get(&ino)
                .and_then(|n| n.dir.as_ref())
                .map(|d| d.children.values().copied().collect())
                .unwrap_or_default();
            while let Some(child) = pending.pop() {
                if let Some(node) = table.nodes.get_mut(&child) {
                    if let Some(rest) = node.handle.as_bytes().strip_prefix(prefix.as_slice()) {
                        let mut path = handle.as_bytes().to_vec();
                        path.push(b'/');
                        path.extend_from_slice(rest);
                        node.handle = Handle(path.into_boxed_slice());
                        changed.push(child);
                    }
                    if let Some(dir) = &node.dir {
                        pending.extend(dir.children.values().copied());
                    }
                }
            }
        }
        for ino in changed {
            if let Some(node) = table.nodes.get(&ino) {
                let record = node_record(ino, node);
                self.append(&table, record);
            }
        }
    }

    /// Replaces what is known of a directory's contents by a complete listing; returns it.
    /// (Entries may be evicted from the table right away if the listing is bigger than the
    /// limit; the listing returned is complete all the same.)
    pub fn set_listing(&self, dir: Ino, entries: Vec<DirEntry>) -> Vec<ListedEntry> {
        let mut table = self.write();
        let now = now_ms();
        let mut seen = HashSet::with_capacity(entries.len());
        let mut listed = Vec::with_capacity(entries.len());
        for entry in entries {
            let kind = entry.attr.kind;
            if let Some(ino) =
                self.upsert_locked(&mut table, dir, &entry.name, entry.handle, entry.attr, now)
            {
                seen.insert(ino);
                listed.push(ListedEntry {
                    name: entry.name.into(),
                    ino,
                    kind,
                });
            }
        }
        let gone: Vec<Ino> = table
            .nodes
            .get(&dir)
            .and_then(|n| n.dir.as_ref())
            .map(|d| {
                d.children
                    .values()
                    .filter(|ino| !seen.contains(ino))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for ino in gone {
            self.detach_locked(&mut table, ino);
        }
        if let Some(state) = table.nodes.get_mut(&dir).and_then(|n| n.dir.as_mut()) {
            state.listed_ms = Some(now);
            self.append(
                &table,
                MetaRecord::Listed {
                    ino: dir,
                    at_ms: now,
                },
            );
        }
        self.trim_locked(&mut table);
        listed
    }

    /// The listing of a directory, if a complete one was ever read; with its time.
    pub fn listing(&self, dir: Ino) -> Option<(Vec<ListedEntry>, u64)> {
        let table = self.read();
        let state = table.nodes.get(&dir)?.dir.as_ref()?;
        let listed_ms = state.listed_ms?;
        let entries = state
            .children
            .iter()
            .filter_map(|(name, ino)| {
                let kind = table.nodes.get(ino)?.attr.kind;
                Some(ListedEntry {
                    name: name.clone(),
                    ino: *ino,
                    kind,
                })
            })
            .collect();
        Some((entries, listed_ms))
    }

    pub fn set_link(&self, ino: Ino, target: &[u8]) {
        let mut table = self.write();
        if let Some(node) = table.nodes.get_mut(&ino) {
            node.link = Some(target.into());
            self.append(
                &table,
                MetaRecord::Link {
                    ino,
                    target: target.into(),
                },
            );
        }
    }

    /// Number of nodes known.
    pub fn len(&self) -> usize {
        self.read().nodes.len()
    }

    /// Number of nodes the kernel holds references to (by this process's count; pinned nodes
    /// of a resumed connection are not counted).
    pub fn referenced(&self) -> usize {
        self.referenced.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The table as journal records: every node, then its listing time and link target; the highest
/// number given out survives even if its node is gone. Parents come before children, so that
/// replay rebuilds children maps in one pass.
fn snapshot_records(table: &Table) -> Vec<MetaRecord> {
    let mut records = Vec::with_capacity(table.nodes.len() * 2);
    for (ino, node) in &table.nodes {
        records.push(node_record(*ino, node));
        if let Some(at_ms) = node.dir.as_ref().and_then(|d| d.listed_ms) {
            records.push(MetaRecord::Listed { ino: *ino, at_ms });
        }
        if let Some(target) = &node.link {
            records.push(MetaRecord::Link {
                ino: *ino,
                target: target.clone(),
            });
        }
    }
    // The highest number given out survives the rewrite even if its node is gone (a
    // removal of it is what replay counts).
    let highest = table.next_ino - 1;
    if highest > ROOT && !table.nodes.contains_key(&highest) {
        records.push(MetaRecord::Removed { ino: highest });
    }
    // Parents before children, so that replay can rebuild children maps in one pass.
    records.sort_by_key(|r| match r {
        MetaRecord::Node { ino, .. } => (*ino, 0),
        MetaRecord::Listed { ino, .. } | MetaRecord::Link { ino, .. } => (*ino, 1),
        MetaRecord::Removed { ino } => (*ino, 2),
    });
    records
}

fn same_kind(a: &Attr, b: &Attr) -> bool {
    a.kind == b.kind
}

fn new_node(parent: Ino, name: Box<[u8]>, handle: Handle, attr: Attr, now: u64) -> Node {
    let dir = (attr.kind == Kind::Directory).then(Box::default);
    Node {
        parent,
        name,
        handle,
        attr,
        checked_ms: now,
        dir,
        link: None,
        lookups: AtomicU64::new(0),
        pinned: false,
    }
}

fn node_record(ino: Ino, node: &Node) -> MetaRecord {
    MetaRecord::Node {
        ino,
        parent: node.parent,
        name: node.name.clone(),
        handle: node.handle.clone(),
        attr: node.attr.clone(),
        checked_ms: node.checked_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Timestamp;

    fn attr(kind: Kind, size: u64) -> Attr {
        Attr {
            kind,
            size,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            rdev: 0,
            fileid: size,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
        }
    }

    fn handle(s: &str) -> Handle {
        Handle(s.as_bytes().into())
    }

    fn entry(name: &str, kind: Kind, size: u64) -> DirEntry {
        DirEntry {
            name: name.as_bytes().to_vec(),
            handle: handle(name),
            attr: attr(kind, size),
        }
    }

    #[test]
    fn the_namespace_and_its_inode_numbers_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let (sub, file, link);
        {
            let (journal, records) = Journal::open(&path).unwrap();
            let store = MetaStore::persistent(journal, records, usize::MAX);
            store.set_root(handle(""), attr(Kind::Directory, 0));
            store.set_listing(
                ROOT,
                vec![
                    entry("sub", Kind::Directory, 0),
                    entry("l", Kind::Symlink, 3),
                ],
            );
            sub = store.child(ROOT, b"sub").unwrap();
            link = store.child(ROOT, b"l").unwrap();
            store.set_link(link, b"../x");
            file = store
                .upsert_child(sub, b"f", handle("sub/f"), attr(Kind::File, 42), false)
                .unwrap();
            store.flush(true);
        }
        let (journal, records) = Journal::open(&path).unwrap();
        let store = MetaStore::persistent(journal, records, usize::MAX);
        assert_eq!(store.child(ROOT, b"sub"), Some(sub));
        assert_eq!(store.child(sub, b"f"), Some(file));
        assert_eq!(store.with(file, |n| n.attr.size), Some(42));
        assert_eq!(
            store.with(link, |n| n.link.clone()).flatten().as_deref(),
            Some(&b"../x"[..])
        );
        let (listing, _) = store.listing(ROOT).unwrap();
        assert_eq!(listing.len(), 2);
        // `sub` was never listed completely, only looked up into.
        assert!(store.listing(sub).is_none());
        // New inodes do not reuse old numbers.
        let other = store
            .upsert_child(sub, b"g", handle("sub/g"), attr(Kind::File, 1), false)
            .unwrap();
        assert!(other > file);
    }

    #[test]
    fn numbers_of_removed_nodes_are_never_given_again_even_after_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let removed;
        {
            let (journal, records) = Journal::open(&path).unwrap();
            let store = MetaStore::persistent(journal, records, usize::MAX);
            store.set_root(handle(""), attr(Kind::Directory, 0));
            removed = store
                .upsert_child(ROOT, b"gone", handle("gone"), attr(Kind::File, 1), false)
                .unwrap();
            store.remove_child(ROOT, b"gone");
            store.persist_inodes();
        }
        for _ in 0..2 {
            // The first reload drops the node and rewrites the journal; the second replays
            // only that rewrite.
            let (journal, records) = Journal::open(&path).unwrap();
            let store = MetaStore::persistent(journal, records, usize::MAX);
            assert!(store.with(removed, |_| ()).is_none());
            let next = store
                .upsert_child(ROOT, b"new", handle("new"), attr(Kind::File, 2), false)
                .unwrap();
            assert!(next > removed, "{next} reuses a number up to {removed}");
            store.remove_child(ROOT, b"new");
            store.persist_inodes();
        }
    }

    #[test]
    fn a_relisting_drops_vanished_names_and_a_replaced_file_gets_a_new_inode() {
        let store = MetaStore::in_memory(usize::MAX);
        store.set_root(handle(""), attr(Kind::Directory, 0));
        store.set_listing(
            ROOT,
            vec![entry("a", Kind::File, 1), entry("b", Kind::File, 2)],
        );
        let a = store.child(ROOT, b"a").unwrap();
        let b = store.child(ROOT, b"b").unwrap();
        let mut replaced = entry("a", Kind::File, 1);
        replaced.handle = handle("a-new");
        store.set_listing(ROOT, vec![replaced]);
        assert_eq!(store.child(ROOT, b"b"), None);
        let new_a = store.child(ROOT, b"a").unwrap();
        assert_ne!(new_a, a);
        assert!(store.known_absent(ROOT, b"b", |_| true));
        assert!(!store.known_absent(ROOT, b"a", |_| true));
        // The kernel may still hold the old numbers: their nodes stay readable.
        assert!(store.with(b, |_| ()).is_some());
    }

    #[test]
    fn a_different_root_resets_everything() {
        let store = MetaStore::in_memory(usize::MAX);
        store.set_root(handle("r1"), attr(Kind::Directory, 0));
        store.set_listing(ROOT, vec![entry("a", Kind::File, 1)]);
        store.set_root(handle("r2"), attr(Kind::Directory, 0));
        assert_eq!(store.child(ROOT, b"a"), None);
        assert!(store.listing(ROOT).is_none());
    }

    #[test]
    fn forgotten_nodes_beyond_the_limit_go_and_their_numbers_are_never_given_again() {
        let store = MetaStore::in_memory(10);
        store.set_root(handle(""), attr(Kind::Directory, 0));
        let names: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        let mut inos = Vec::new();
        for name in &names {
            let ino = store
                .upsert_child(
                    ROOT,
                    name.as_bytes(),
                    handle(name),
                    attr(Kind::File, 1),
                    true,
                )
                .unwrap();
            inos.push(ino);
        }
        // Every one is referenced by the kernel: none may go, whatever the limit.
        assert_eq!(store.len(), 101);
        assert_eq!(store.referenced(), 100);
        for &ino in &inos {
            assert!(store.forget(ino, 1));
        }
        assert_eq!(store.referenced(), 0);
        assert!(store.len() <= 10, "{} nodes kept", store.len());
        // The newest forgotten stay; the oldest went.
        assert!(store.with(inos[99], |_| ()).is_some());
        assert!(store.with(inos[0], |_| ()).is_none());
        let again = store
            .upsert_child(ROOT, b"f0", handle("f0"), attr(Kind::File, 1), true)
            .unwrap();
        assert!(
            again > inos[99],
            "{again} reuses a number up to {}",
            inos[99]
        );
    }

    #[test]
    fn a_node_stays_until_its_last_reference_is_forgotten() {
        let store = MetaStore::in_memory(0);
        store.set_root(handle(""), attr(Kind::Directory, 0));
        let dir = store
            .upsert_child(ROOT, b"d", handle("d"), attr(Kind::Directory, 0), true)
            .unwrap();
        let file = store
            .upsert_child(dir, b"f", handle("d/f"), attr(Kind::File, 1), true)
            .unwrap();
        assert!(store.reference(file, |_| ()).is_some());
        assert!(!store.forget(file, 1));
        assert!(store.with(file, |_| ()).is_some());
        // The directory goes only after its child.
        assert!(store.forget(dir, 1));
        assert!(store.with(dir, |_| ()).is_some());
        assert!(store.forget(file, 1));
        assert!(store.with(file, |_| ()).is_none());
        assert!(store.forget(ROOT, 0));
        store.upsert_child(ROOT, b"other", handle("other"), attr(Kind::File, 1), false);
        assert!(store.with(dir, |_| ()).is_none());
        assert!(store.with(ROOT, |_| ()).is_some());
    }

    #[test]
    fn a_resumed_connection_pins_every_node_loaded() {
        let store = MetaStore::in_memory(0);
        store.set_root(handle(""), attr(Kind::Directory, 0));
        store.set_listing(ROOT, vec![entry("a", Kind::File, 1)]);
        // Unreferenced, beyond the limit: gone with the listing's end.
        assert_eq!(store.child(ROOT, b"a"), None);
        let b = store
            .upsert_child(ROOT, b"b", handle("b"), attr(Kind::File, 1), true)
            .unwrap();
        store.pin_all();
        // The kernel's count is unknown: even a forget of more than was counted keeps it.
        store.forget(b, 5);
        store.upsert_child(ROOT, b"c", handle("c"), attr(Kind::File, 1), false);
        assert_eq!(store.child(ROOT, b"b"), Some(b));
    }

    #[test]
    fn a_listing_that_lost_an_entry_to_eviction_is_incomplete_also_after_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        {
            let (journal, records) = Journal::open(&path).unwrap();
            let store = MetaStore::persistent(journal, records, 3);
            store.set_root(handle(""), attr(Kind::Directory, 0));
            let names = ["a", "b", "c", "d", "e"];
            let listed = store.set_listing(
                ROOT,
                names.iter().map(|n| entry(n, Kind::File, 1)).collect(),
            );
            // The listing returned is complete; what is kept is not.
            assert_eq!(listed.len(), 5);
            assert!(store.len() <= 3);
            assert!(store.listing(ROOT).is_none());
            assert!(!store.known_absent(ROOT, b"a", |_| true));
            store.flush(true);
        }
        let (journal, records) = Journal::open(&path).unwrap();
        let store = MetaStore::persistent(journal, records, usize::MAX);
        assert!(store.listing(ROOT).is_none());
        assert!(!store.known_absent(ROOT, b"a", |_| true));
        assert_eq!(store.child(ROOT, b"a"), None);
        assert!(store.child(ROOT, b"e").is_some());
    }

    /// The journal's compaction waits for the disk outside the table's locks: while it is
    /// stalled, lookups, new names, references and forgets answer.
    #[cfg(debug_assertions)]
    #[test]
    fn a_compaction_stalled_on_the_disk_never_holds_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, records) = Journal::open(&dir.path().join("meta")).unwrap();
        let store = std::sync::Arc::new(MetaStore::persistent(journal, records, usize::MAX));
        store.set_root(handle(""), attr(Kind::Directory, 0));
        let journal = || store.journal.as_ref().unwrap();
        let mut i = 0;
        while !journal().wants_rewrite() {
            let name = format!("f{i}");
            store.upsert_child(
                ROOT,
                name.as_bytes(),
                handle(&name),
                attr(Kind::File, 1),
                false,
            );
            i += 1;
            assert!(i < 1_000_000, "the journal never wants a rewrite");
        }
        journal().fault().arm();
        let compacting = {
            let store = store.clone();
            std::thread::spawn(move || store.flush(false))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while journal().fault().waiting() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the compaction never reached the disk"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = std::time::Instant::now();
        let new = store
            .upsert_child(ROOT, b"new", handle("new"), attr(Kind::File, 1), true)
            .unwrap();
        assert!(store.child(ROOT, b"f0").is_some());
        assert!(store.reference(new, |_| ()).is_some());
        store.forget(new, 2);
        store.set_listing(ROOT, vec![entry("only", Kind::File, 1)]);
        let took = started.elapsed();
        journal().fault().release();
        compacting.join().unwrap();
        assert!(
            took < Duration::from_secs(1),
            "the namespace waited {took:?} for the disk"
        );
    }
}
