//! The kernel's rules for opening an inode through passthrough, as a state machine over the
//! opens of each inode, kept apart from FUSE so that it can be tested alone.
//!
//! - While an inode has a passthrough open, every further open of it must use the same backing
//!   file (the kernel refuses another one), until all of them are closed.
//! - An inode open through the page cache (served by the daemon) cannot also be opened through
//!   passthrough, and the other way round.
//! - While an inode is read through a *cache* file, a writer must not open it: the kernel would
//!   route its writes into the cache file. When the backing file is the source file itself
//!   (a writer on a directory source), writers and readers may share it.

use std::collections::HashMap;

use super::meta::Ino;

/// What kind of file backs an inode's passthrough opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackingKind {
    /// The complete cached copy.
    Cache,
    /// The source file itself, opened for a writer.
    Source,
}

/// How one open of an inode is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OpenMode {
    /// Requests come to the daemon.
    Daemon,
    /// The kernel reads (and writes) the backing file with this id directly.
    Passthrough { backing: u32, kind: BackingKind },
}

/// What an open may do, given how the inode is open already.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// A writer while the inode is read through a cache file (`ETXTBSY`).
    Refuse,
    /// Join the backing file the inode's passthrough opens share.
    Share { backing: u32, kind: BackingKind },
    /// Nothing constrains the open: it may get a backing file of its own ([`OpenTable::record`]
    /// with its mode afterwards), or be served by the daemon.
    Free,
    /// The inode is open through the daemon: this open must be too.
    Daemon,
}

#[derive(Default, Debug)]
struct InodeOpens {
    daemon: u32,
    backing: Option<(u32, BackingKind, u32)>,
}

/// The opens of every inode that has any.
#[derive(Default, Debug)]
pub struct OpenTable {
    inodes: HashMap<Ino, InodeOpens>,
}

impl OpenTable {
    /// What an open of `ino` may do now.
    pub fn decide(&self, ino: Ino, writable: bool) -> Decision {
        let Some(opens) = self.inodes.get(&ino) else {
            return Decision::Free;
        };
        match opens.backing {
            Some((_, BackingKind::Cache, _)) if writable => Decision::Refuse,
            Some((backing, kind, _)) => Decision::Share { backing, kind },
            None if opens.daemon > 0 => Decision::Daemon,
            None => Decision::Free,
        }
    }

    /// Records an open made in `mode` (after [`OpenTable::decide`]).
    pub fn record(&mut self, ino: Ino, mode: OpenMode) {
        let opens = self.inodes.entry(ino).or_default();
        match mode {
            OpenMode::Daemon => opens.daemon += 1,
            OpenMode::Passthrough { backing, kind } => match &mut opens.backing {
                Some((current, _, count)) if *current == backing => *count += 1,
                _ => opens.backing = Some((backing, kind, 1)),
            },
        }
    }

    /// Records a release; returns the backing id to close when its last open is gone.
    pub fn release(&mut self, ino: Ino, mode: OpenMode) -> Option<u32> {
        let opens = self.inodes.get_mut(&ino)?;
        let mut closed = None;
        match mode {
            OpenMode::Daemon => opens.daemon = opens.daemon.saturating_sub(1),
            OpenMode::Passthrough { backing, .. } => {
                if let Some((current, _, count)) = &mut opens.backing
                    && *current == backing
                {
                    *count -= 1;
                    if *count == 0 {
                        opens.backing = None;
                        closed = Some(backing);
                    }
                }
            }
        }
        if opens.daemon == 0 && opens.backing.is_none() {
            self.inodes.remove(&ino);
        }
        closed
    }

    /// Whether `ino` is open through a backing file that is the source file.
    pub fn through_source(&self, ino: Ino) -> bool {
        self.inodes
            .get(&ino)
            .is_some_and(|o| matches!(o.backing, Some((_, BackingKind::Source, _))))
    }

    /// Inodes with opens (a bound on the table's size).
    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE_FILE: OpenMode = OpenMode::Passthrough {
        backing: 7,
        kind: BackingKind::Cache,
    };

    #[test]
    fn passthrough_opens_of_an_inode_share_one_backing_file_until_the_last_closes() {
        let mut table = OpenTable::default();
        assert_eq!(table.decide(1, false), Decision::Free);
        table.record(1, CACHE_FILE);
        assert_eq!(
            table.decide(1, false),
            Decision::Share {
                backing: 7,
                kind: BackingKind::Cache
            }
        );
        table.record(1, CACHE_FILE);
        assert_eq!(table.release(1, CACHE_FILE), None);
        assert_eq!(table.release(1, CACHE_FILE), Some(7));
        assert!(table.is_empty());
        assert_eq!(table.decide(1, false), Decision::Free);
    }

    #[test]
    fn an_inode_open_through_the_daemon_stays_with_the_daemon() {
        let mut table = OpenTable::default();
        table.record(2, OpenMode::Daemon);
        assert_eq!(table.decide(2, false), Decision::Daemon);
        assert_eq!(table.decide(2, true), Decision::Daemon);
        assert_eq!(table.release(2, OpenMode::Daemon), None);
        assert_eq!(table.decide(2, false), Decision::Free);
    }

    #[test]
    fn a_writer_is_refused_while_the_inode_is_read_through_a_cache_file() {
        let mut table = OpenTable::default();
        table.record(3, CACHE_FILE);
        assert_eq!(table.decide(3, true), Decision::Refuse);
        // Other inodes are not affected.
        assert_eq!(table.decide(4, true), Decision::Free);
    }

    #[test]
    fn writers_and_readers_share_a_source_backing_file() {
        let mut table = OpenTable::default();
        let source = OpenMode::Passthrough {
            backing: 9,
            kind: BackingKind::Source,
        };
        table.record(5, source);
        assert!(table.through_source(5));
        let shared = Decision::Share {
            backing: 9,
            kind: BackingKind::Source,
        };
        assert_eq!(table.decide(5, true), shared);
        assert_eq!(table.decide(5, false), shared);
        table.record(5, source);
        assert_eq!(table.release(5, source), None);
        assert_eq!(table.release(5, source), Some(9));
        assert!(!table.through_source(5));
    }

    #[test]
    fn releasing_what_was_never_recorded_changes_nothing() {
        let mut table = OpenTable::default();
        assert_eq!(table.release(6, CACHE_FILE), None);
        table.record(6, OpenMode::Daemon);
        assert_eq!(table.release(6, CACHE_FILE), None);
        assert_eq!(table.decide(6, false), Decision::Daemon);
    }
}
