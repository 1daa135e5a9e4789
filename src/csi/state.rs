//! The controller's durable record of the volumes it created.
//!
//! Layout of `--state-dir`:
//!
//! ```text
//! lock                  flock(2)-ed by the one controller using the directory (holds its pid)
//! volumes/<id>.json     one record per volume, replaced atomically
//! ```
//!
//! A record is written to `volumes/.<id>.json.tmp`, fsync-ed, renamed over `<id>.json`, and the
//! directory is fsync-ed: after a crash a volume is either fully recorded or absent. Records
//! of different volumes are independent files, so a damaged one costs only that volume (it is
//! reported and skipped at start). Callers serialise operations on one volume id; the store
//! itself is safe to share between tasks.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::lockfile::{self, LockError, LockFile};
use tracing::warn;

/// Version of the record format, written into every record.
pub const RECORD_VERSION: u32 = 1;

/// What the controller remembers about one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub volume_id: String,
    /// The CO's name for the volume (the idempotency key of CreateVolume).
    pub name: String,
    /// The capacity reported to the CO (the requested one; 0 when none was requested).
    pub capacity_bytes: i64,
    /// The CreateVolume parameters as given (no secrets travel there). A repeated
    /// CreateVolume is compared with these, parsed by the running version, so that a change of
    /// a default between versions does not turn a retry into a conflict.
    pub parameters: BTreeMap<String, String>,
    /// The canonical parameters, as handed to the CO in `volume_context`.
    pub volume_context: BTreeMap<String, String>,
    /// Access modes requested at creation (names from the CSI specification).
    pub access_modes: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

pub struct StateStore {
    volumes_dir: PathBuf,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    /// Held for the life of the store: one controller per state directory.
    _lock: LockFile,
}

impl StateStore {
    /// Opens (creating if needed) a state directory and loads its records. Fails if another
    /// process holds the directory.
    pub fn open(dir: &Path) -> io::Result<Arc<StateStore>> {
        let volumes_dir = dir.join("volumes");
        fs::create_dir_all(&volumes_dir).map_err(|e| context(e, "create", &volumes_dir))?;
        let lock = take_lock(&dir.join("lock"))?;
        let mut volumes = BTreeMap::new();
        for entry in fs::read_dir(&volumes_dir).map_err(|e| context(e, "read", &volumes_dir))? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write that a crash interrupted; its volume was never acknowledged.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            match load(&entry.path()) {
                Ok(record) if record.volume_id == id => {
                    volumes.insert(record.volume_id.clone(), record);
                }
                Ok(record) => warn!(
                    file = %entry.path().display(),
                    volume_id = %record.volume_id,
                    "volume record does not match its file name; skipped"
                ),
                Err(e) => warn!(
                    file = %entry.path().display(),
                    error = %e,
                    "unreadable volume record; skipped"
                ),
            }
        }
        Ok(Arc::new(StateStore {
            volumes_dir,
            volumes: Mutex::new(volumes),
            _lock: lock,
        }))
    }

    pub fn get(&self, volume_id: &str) -> Option<VolumeRecord> {
        self.map().get(volume_id).cloned()
    }

    /// Up to `limit` records (all if `None`) with ids at or after `start`, in id order, and
    /// the id that follows the last one returned, if any.
    pub fn page(&self, start: &str, limit: Option<usize>) -> (Vec<VolumeRecord>, Option<String>) {
        let map = self.map();
        let mut records = map.range(start.to_string()..).map(|(_, r)| r);
        let taken: Vec<VolumeRecord> = match limit {
            Some(n) => records.by_ref().take(n).cloned().collect(),
            None => records.by_ref().cloned().collect(),
        };
        let next = records.next().map(|r| r.volume_id.clone());
        (taken, next)
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Durably records a volume (replacing any record with the same id).
    pub async fn put(&self, record: VolumeRecord) -> io::Result<()> {
        let dir = self.volumes_dir.clone();
        let written = record.clone();
        blocking(move || write_atomically(&dir, &written)).await?;
        self.map().insert(record.volume_id.clone(), record);
        Ok(())
    }

    /// Durably forgets a volume. Returns whether it was known.
    pub async fn remove(&self, volume_id: &str) -> io::Result<bool> {
        let path = self.volumes_dir.join(format!("{volume_id}.json"));
        let dir = self.volumes_dir.clone();
        let existed = blocking(move || match fs::remove_file(&path) {
            Ok(()) => sync_dir(&dir).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(context(e, "remove", &path)),
        })
        .await?;
        let known = self.map().remove(volume_id).is_some();
        Ok(existed || known)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VolumeRecord>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still usable.
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("state writer task failed: {e}")))?
}

fn load(path: &Path) -> io::Result<VolumeRecord> {
    let bytes = fs::read(path)?;
    let record: VolumeRecord = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if record.version != RECORD_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record version {} is not {RECORD_VERSION}", record.version),
        ));
    }
    Ok(record)
}

fn write_atomically(dir: &Path, record: &VolumeRecord) -> io::Result<()> {
    let final_path = dir.join(format!("{}.json", record.volume_id));
    let temp_path = dir.join(format!(".{}.json.tmp", record.volume_id));
    let mut bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let result = (|| {
        let mut file = File::create(&temp_path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&temp_path, &final_path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp_path);
    }
    result.map_err(|e| context(e, "write", &final_path))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn take_lock(path: &Path) -> io::Result<LockFile> {
    lockfile::take(path).map_err(|e| match e {
        LockError::Held { holder } => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "state directory {} is in use by another reservoir controller ({holder})",
                path.parent().unwrap_or(path).display()
            ),
        ),
        LockError::Io { what, cause } => context(cause, what, path),
    })
}

fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            volume_id: id.to_string(),
            name: format!("name-of-{id}"),
            capacity_bytes: 1 << 30,
            parameters: BTreeMap::from([("source".to_string(), "/d/".to_string())]),
            volume_context: BTreeMap::from([("source".to_string(), "/d".to_string())]),
            access_modes: vec!["MULTI_NODE_READER_ONLY".to_string()],
            created_at: 1,
        }
    }

    #[tokio::test]
    async fn survives_reopen_and_excludes_a_second_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert!(StateStore::open(dir.path()).is_err(), "second owner");
        for id in ["b", "a", "c"] {
            store.put(record(id)).await.unwrap();
        }
        assert!(store.remove("b").await.unwrap());
        assert!(!store.remove("b").await.unwrap());
        let (page, next) = store.page("", Some(1));
        assert_eq!(page, vec![record("a")]);
        assert_eq!(next.as_deref(), Some("c"));
        drop(store);

        std::fs::write(dir.path().join("volumes/.x.json.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join("volumes/broken.json"), b"{not json").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let (all, next) = store.page("", None);
        assert_eq!(all, vec![record("a"), record("c")]);
        assert_eq!(next, None);
        assert!(!dir.path().join("volumes/.x.json.tmp").exists());
    }
}
