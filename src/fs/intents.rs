//! Changes started on the source, by the id of the request that asked for them, for a successor
//! daemon: the kernel resends a request whose answer never reached it, and a change the dead
//! daemon had already made must then give the answer it would have given (a directory it
//! created exists: success, not `EEXIST`; a name it removed is gone: success, not `ENOENT`).
//!
//! Only requests that would answer differently the second time are recorded (create, mkdir,
//! symlink, unlink, rmdir, rename); writes at an offset and attribute changes give the same
//! result when repeated. Each id is written with write(2) before the source is asked; the log is
//! emptied when a successor has read it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use crate::journal::{Journal, JournalError};

pub struct Intents {
    log: Option<Journal<u64>>,
    /// Requests the previous daemon had started.
    inherited: Mutex<HashSet<u64>>,
    /// Requests being served now (kept through a compaction of the log).
    in_flight: Mutex<HashSet<u64>>,
}

impl Intents {
    pub fn in_memory() -> Self {
        Intents {
            log: None,
            inherited: Mutex::default(),
            in_flight: Mutex::default(),
        }
    }

    /// The log at `path`, with what a previous daemon recorded there.
    pub fn logged(path: &Path) -> Result<Self, JournalError> {
        let (log, records) = Journal::open(path)?;
        log.rewrite(Vec::new())?;
        Ok(Intents {
            log: Some(log),
            inherited: Mutex::new(records.into_iter().collect()),
            in_flight: Mutex::default(),
        })
    }

    /// Whether the previous daemon had started request `unique` (and may have made the change).
    pub fn inherited(&self, unique: u64) -> bool {
        lock(&self.inherited).contains(&unique)
    }

    /// Records that request `unique` is about to change the source.
    pub fn begin(&self, unique: u64) {
        lock(&self.in_flight).insert(unique);
        let Some(log) = &self.log else {
            return;
        };
        if let Err(e) = log.append(&unique).and_then(|()| log.flush(false)) {
            tracing::error!(error = %crate::error::Chain(&e), "cannot record a change: if the daemon dies now, its resent request may fail");
        }
    }

    /// The answer to request `unique` was sent.
    pub fn end(&self, unique: u64) {
        let mut in_flight = lock(&self.in_flight);
        in_flight.remove(&unique);
        lock(&self.inherited).remove(&unique);
        let Some(log) = &self.log else {
            return;
        };
        if log.wants_rewrite() {
            let live: Vec<u64> = in_flight.iter().copied().collect();
            if let Err(e) = log.rewrite(live) {
                tracing::warn!(error = %crate::error::Chain(&e), "cannot compact the change log");
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

    #[test]
    fn a_successor_knows_the_changes_its_predecessor_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("intents");
        {
            let intents = Intents::logged(&path).unwrap();
            intents.begin(10);
            intents.begin(12);
            intents.end(10);
            // Killed here: 12 was being served.
        }
        let successor = Intents::logged(&path).unwrap();
        // The log holds every id begun; 10 was answered, so the kernel never resends it.
        assert!(successor.inherited(12));
        assert!(!successor.inherited(14));
        successor.end(12);
        assert!(!successor.inherited(12));
        // The successor emptied the log: a third daemon inherits nothing of the first.
        drop(successor);
        let third = Intents::logged(&path).unwrap();
        assert!(!third.inherited(12));
    }
}
