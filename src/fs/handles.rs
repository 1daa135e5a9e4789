//! The handles the kernel holds: open files (with how each is served) and open directories.
//!
//! For a volume whose FUSE connection may outlive the daemon, every open and release is
//! written to a log in the session's state directory (with write(2), before the kernel gets
//! the answer; the page cache keeps it when the process dies), so that a successor knows every
//! handle the kernel may still use, the passthrough backing file each inode's opens share, and
//! which OPEN requests it answered already (the kernel resends the ones whose answer it never
//! got, with the same request id).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde::{Deserialize, Serialize};

use super::OpenFile;
use super::meta::{Ino, ListedEntry};
use super::passthrough::{OpenMode, OpenTable};
use crate::journal::{Journal, JournalError};

/// One entry of the handle log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum HandleRecord {
    Opened {
        fh: u64,
        ino: Ino,
        writable: bool,
        mode: OpenMode,
        /// The OPEN or CREATE request answered with this handle.
        unique: u64,
    },
    Released {
        fh: u64,
    },
}

/// An open file handle. After a restart its [`OpenFile`] is rebuilt on first use: passthrough
/// handles are never read through the daemon, so most never need it.
pub struct FileHandle {
    pub ino: Ino,
    pub writable: bool,
    pub mode: OpenMode,
    /// The request this handle answered.
    unique: u64,
    file: OnceLock<Arc<OpenFile>>,
}

impl FileHandle {
    pub fn file(&self) -> Option<&Arc<OpenFile>> {
        self.file.get()
    }

    /// Installs the rebuilt file of a resumed handle; returns the one in place.
    pub fn set_file(&self, file: Arc<OpenFile>) -> Arc<OpenFile> {
        self.file.get_or_init(|| file).clone()
    }
}

pub struct Handles {
    files: RwLock<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<ListedEntry>>>>,
    /// How each inode is open (the kernel's passthrough rules).
    pub opens: Mutex<OpenTable>,
    next: AtomicU64,
    log: Option<Journal<HandleRecord>>,
    /// Handles given in answer to requests of an earlier process, by request id: a resent
    /// OPEN gets the handle it was given then.
    answered: Mutex<HashMap<u64, u64>>,
}

impl Handles {
    /// A table that remembers nothing beyond this process.
    pub fn in_memory() -> Self {
        Handles {
            files: RwLock::default(),
            dirs: Mutex::default(),
            opens: Mutex::default(),
            next: AtomicU64::new(1),
            log: None,
            answered: Mutex::default(),
        }
    }

    /// A table logged at `path`, holding what an earlier process logged there.
    pub fn logged(path: &Path) -> Result<Self, JournalError> {
        let (log, records) = Journal::open(path)?;
        let handles = Handles {
            log: Some(log),
            ..Handles::in_memory()
        };
        let mut live: HashMap<u64, (HandleRecord, Arc<FileHandle>)> = HashMap::new();
        let mut highest = 0;
        for record in records {
            match record {
                HandleRecord::Opened {
                    fh,
                    ino,
                    writable,
                    mode,
                    unique,
                } => {
                    highest = highest.max(fh);
                    let handle = Arc::new(FileHandle {
                        ino,
                        writable,
                        mode,
                        unique,
                        file: OnceLock::new(),
                    });
                    live.insert(fh, (record, handle));
                }
                HandleRecord::Released { fh } => {
                    live.remove(&fh);
                }
            }
        }
        handles.next.store(highest + 1, Ordering::Relaxed);
        {
            let mut opens = lock(&handles.opens);
            let mut answered = lock(&handles.answered);
            let mut files = handles.files.write().unwrap_or_else(|p| p.into_inner());
            for (fh, (record, handle)) in &live {
                opens.record(handle.ino, handle.mode);
                if let HandleRecord::Opened { unique, .. } = record {
                    answered.insert(*unique, *fh);
                }
                files.insert(*fh, handle.clone());
            }
        }
        if let Some(log) = &handles.log {
            let snapshot: Vec<HandleRecord> = live.into_values().map(|(r, _)| r).collect();
            log.rewrite(snapshot)?;
        }
        Ok(handles)
    }

    pub fn next_handle(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers an open file and logs it; the reply may go out once this returns.
    pub fn insert_file(&self, unique: u64, ino: Ino, mode: OpenMode, file: Arc<OpenFile>) -> u64 {
        let fh = self.next_handle();
        let writable = file.writable;
        let handle = Arc::new(FileHandle {
            ino,
            writable,
            mode,
            unique,
            file: OnceLock::from(file),
        });
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, handle);
        self.log(HandleRecord::Opened {
            fh,
            ino,
            writable,
            mode,
            unique,
        });
        fh
    }

    pub fn file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
    }

    /// The handle an earlier process answered request `unique` with, if it did.
    pub fn answered(&self, unique: u64) -> Option<(u64, Arc<FileHandle>)> {
        let fh = *lock(&self.answered).get(&unique)?;
        Some((fh, self.file(fh)?))
    }

    /// Forgets a file handle (logged); returns it.
    pub fn remove_file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        let handle = self
            .files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)?;
        self.log(HandleRecord::Released { fh });
        Some(handle)
    }

    pub fn insert_dir(&self, fh: u64, entries: Arc<Vec<ListedEntry>>) {
        lock(&self.dirs).insert(fh, entries);
    }

    pub fn dir(&self, fh: u64) -> Option<Arc<Vec<ListedEntry>>> {
        lock(&self.dirs).get(&fh).cloned()
    }

    pub fn remove_dir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Every file handle, for a resumed volume to restore what its handles imply.
    pub fn files(&self) -> Vec<Arc<FileHandle>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn open_files(&self) -> usize {
        self.files.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Logs an open as [`Handles::insert_file`] does, without an open file (fixtures of the
    /// log's format).
    #[cfg(test)]
    pub fn record_for_fixture(
        &self,
        fh: u64,
        ino: Ino,
        writable: bool,
        mode: OpenMode,
        unique: u64,
    ) {
        self.next.fetch_max(fh + 1, Ordering::Relaxed);
        self.log(HandleRecord::Opened {
            fh,
            ino,
            writable,
            mode,
            unique,
        });
    }

    #[cfg(test)]
    pub fn release_for_fixture(&self, fh: u64) {
        self.log(HandleRecord::Released { fh });
    }

    fn log(&self, record: HandleRecord) {
        let Some(log) = &self.log else {
            return;
        };
        let written = log.append(&record).and_then(|()| log.flush(false));
        if let Err(e) = written {
            tracing::error!(error = %crate::error::Chain(&e), "cannot log a file handle: a restarted daemon will not know it");
            return;
        }
        if log.wants_rewrite() {
            let live: Vec<HandleRecord> = self
                .files
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(fh, h)| HandleRecord::Opened {
                    fh: *fh,
                    ino: h.ino,
                    writable: h.writable,
                    mode: h.mode,
                    unique: h.unique,
                })
                .collect();
            if let Err(e) = log.rewrite(live) {
                tracing::warn!(error = %crate::error::Chain(&e), "cannot compact the handle log");
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::passthrough::{BackingKind, Decision};

    #[test]
    fn a_logged_table_comes_back_with_its_open_handles_and_their_backing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handles");
        let cache_file = OpenMode::Passthrough {
            backing: 3,
            kind: BackingKind::Cache,
        };
        {
            let handles = Handles::logged(&path).unwrap();
            for (fh, ino, mode, unique) in [
                (1, 10, cache_file, 100),
                (2, 10, cache_file, 102),
                (3, 11, OpenMode::Daemon, 104),
            ] {
                assert_eq!(handles.next_handle(), fh);
                handles.log(HandleRecord::Opened {
                    fh,
                    ino,
                    writable: false,
                    mode,
                    unique,
                });
            }
            handles.log(HandleRecord::Released { fh: 1 });
            // Dropped without any flush beyond what each record did: as a killed process.
        }
        let handles = Handles::logged(&path).unwrap();
        assert!(handles.file(1).is_none());
        let kept = handles.file(2).unwrap();
        assert_eq!((kept.ino, kept.mode), (10, cache_file));
        assert!(kept.file().is_none(), "rebuilt on first use");
        assert_eq!(handles.answered(102).map(|(fh, _)| fh), Some(2));
        assert!(handles.answered(100).is_none(), "released");
        // New handles do not reuse numbers the kernel may hold.
        assert_eq!(handles.next_handle(), 4);
        let opens = handles.opens.lock().unwrap();
        assert_eq!(
            opens.decide(10, false),
            Decision::Share {
                backing: 3,
                kind: BackingKind::Cache
            }
        );
        assert_eq!(opens.decide(11, false), Decision::Daemon);
    }
}
