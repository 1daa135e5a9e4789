//! What a successor daemon needs to take over a mounted volume's FUSE connection, kept in the
//! daemon's state directory (by default under /run, which lives exactly as long as the node's
//! connections do): one directory per volume, holding
//!
//! - `session.json`: the volume as it was asked for, where it is mounted, what was agreed with
//!   the kernel at INIT, and how many channels serve it (the keeper holds their descriptors
//!   under the directory's name);
//! - `handles`: the file handle log ([`crate::fs::handles`]);
//! - `intents`: the changes being made on the source ([`crate::fs::intents`]).
//!
//! Inode numbers live with the volume's metadata in the cache directory. Files are written
//! with write(2) and renamed into place, never fsynced: a daemon crash keeps them in the page
//! cache, and a node crash ends the connections they describe anyway.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::MountRequest;
use crate::fs::fuse::SessionLogs;
use crate::fs::handles::Handles;
use crate::fs::intents::Intents;
use crate::fuse::KernelParams;
use crate::journal::JournalError;

/// The layout of `session.json`; a daemon refuses to resume a format it does not know.
pub const FORMAT: u32 = 1;
const RECORD: &str = "session.json";
const HANDLES: &str = "handles";
const INTENTS: &str = "intents";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session state {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("session state {path}: unreadable ({cause}); the volume cannot be resumed")]
    Corrupt {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error(
        "session state {path}: format {found}, this daemon knows format {FORMAT}; the volume cannot be resumed by this version"
    )]
    Format { path: PathBuf, found: u32 },
}

/// One mounted volume's connection, as recorded for a successor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub format: u32,
    pub request: MountRequest,
    pub params: KernelParams,
    /// Descriptors the keeper holds for the connection (one per serving thread).
    pub channels: usize,
    /// The mount's device number (`major:minor` in mountinfo), to recognise the mount.
    pub device: (u32, u32),
    pub mounted_at_ms: u64,
    /// Times a daemon has taken the connection over, and when it last did.
    #[serde(default)]
    pub recoveries: u64,
    #[serde(default)]
    pub last_recovery_ms: Option<u64>,
}

/// The state directory of one volume.
#[derive(Clone, Debug)]
pub struct SessionDir {
    path: PathBuf,
}

impl SessionDir {
    /// The directory for `volume_id` under `root` (named by a hash: volume ids are arbitrary
    /// strings).
    pub fn for_volume(root: &Path, volume_id: &str) -> SessionDir {
        let name = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(volume_id.as_bytes()));
        SessionDir {
            path: root.join(name),
        }
    }

    /// Every volume directory under `root` (named as [`SessionDir::for_volume`] names them;
    /// anything else there is left alone).
    pub fn all(root: &Path) -> Vec<SessionDir> {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let ours = |name: &str| name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit());
        let mut dirs: Vec<SessionDir> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| ours(&e.file_name().to_string_lossy()))
            .map(|e| SessionDir { path: e.path() })
            .collect();
        dirs.sort_by(|a, b| a.path.cmp(&b.path));
        dirs
    }

    /// The name the keeper holds the connection's descriptors under.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The connection's handle and change logs, with what an earlier daemon logged.
    pub fn logs(&self) -> Result<SessionLogs, JournalError> {
        Ok(SessionLogs {
            handles: Handles::logged(&self.path.join(HANDLES))?,
            intents: Intents::logged(&self.path.join(INTENTS))?,
        })
    }

    fn io(&self, cause: std::io::Error) -> SessionError {
        SessionError::Io {
            path: self.path.clone(),
            cause,
        }
    }

    /// A fresh directory for a new connection (whatever an earlier one left is removed).
    pub fn create(&self) -> Result<(), SessionError> {
        self.remove();
        std::fs::create_dir_all(&self.path).map_err(|e| self.io(e))
    }

    pub fn write(&self, record: &SessionRecord) -> Result<(), SessionError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| self.io(e.into()))?;
        let temporary = self.path.join(format!("{RECORD}.new"));
        std::fs::write(&temporary, bytes).map_err(|e| self.io(e))?;
        std::fs::rename(&temporary, self.path.join(RECORD)).map_err(|e| self.io(e))
    }

    pub fn read(&self) -> Result<SessionRecord, SessionError> {
        let path = self.path.join(RECORD);
        let bytes = std::fs::read(&path).map_err(|e| self.io(e))?;
        #[derive(Deserialize)]
        struct Versioned {
            format: u32,
        }
        let corrupt = |cause| SessionError::Corrupt {
            path: path.clone(),
            cause,
        };
        let found = serde_json::from_slice::<Versioned>(&bytes)
            .map_err(corrupt)?
            .format;
        if found != FORMAT {
            return Err(SessionError::Format { path, found });
        }
        serde_json::from_slice(&bytes).map_err(corrupt)
    }

    pub fn remove(&self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a session's state");
            }
        }
    }
}

/// The device number (`major`, `minor`) of the mount at `target`, read from mountinfo, never
/// from the mount itself (a connection nobody serves would not answer a stat).
pub fn mount_device(target: &Path) -> Option<(u32, u32)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = target.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if crate::mountpoint::unescape_mountinfo(fields.get(4)?) != wanted {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_other_formats_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = SessionDir::for_volume(root.path(), "vol/ume 1");
        assert_eq!(dir.name().len(), 16);
        dir.create().unwrap();
        let record = SessionRecord {
            format: FORMAT,
            request: serde_json::from_str(
                r#"{"volume_id":"vol/ume 1","target_path":"/mnt/x","source":"/data"}"#,
            )
            .unwrap(),
            params: KernelParams {
                minor: 40,
                flags: 1 << 37,
                max_write: 1 << 20,
            },
            channels: 4,
            device: (0, 77),
            mounted_at_ms: 1,
            recoveries: 0,
            last_recovery_ms: None,
        };
        dir.write(&record).unwrap();
        assert_eq!(dir.read().unwrap(), record);
        assert_eq!(SessionDir::all(root.path()).len(), 1);
        std::fs::create_dir(root.path().join("volumes")).unwrap();
        assert_eq!(
            SessionDir::all(root.path()).len(),
            1,
            "others' directories are not ours"
        );

        let mut future = serde_json::to_value(&record).unwrap();
        future["format"] = 2.into();
        std::fs::write(dir.path.join(RECORD), future.to_string()).unwrap();
        assert!(matches!(
            dir.read(),
            Err(SessionError::Format { found: 2, .. })
        ));
        std::fs::write(dir.path.join(RECORD), b"{").unwrap();
        assert!(matches!(dir.read(), Err(SessionError::Corrupt { .. })));
        dir.remove();
        assert!(SessionDir::all(root.path()).is_empty());
    }

    #[test]
    fn the_device_of_a_mount_comes_from_mountinfo() {
        let (major, minor) = mount_device(Path::new("/proc")).expect("/proc is a mount");
        let meta = std::fs::metadata("/proc").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (major, minor),
            (libc::major(meta.dev()), libc::minor(meta.dev()))
        );
        assert!(mount_device(Path::new("/proc/self")).is_none());
    }
}

/// The state every released format writes, checked against what this build reads: a daemon of
/// this release must take over volumes from a daemon of any earlier one (an upgrade) and from a
/// later one of the same format (a rollback). Each release's fixtures are written once, by
/// `cargo test --lib write_state_fixture -- --ignored`, and committed.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::fs::passthrough::{BackingKind, Decision, OpenMode};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state")
    }

    /// What the format-1 fixture holds: a read-write volume with a passthrough reader of inode
    /// 5 (backing id 3, two handles), a daemon-served writer of inode 9, one handle released,
    /// and a mkdir (request 40) that was being made.
    fn record_v1() -> SessionRecord {
        SessionRecord {
            format: 1,
            request: serde_json::from_str(
                r#"{"volume_id":"pvc-fixture","target_path":"/var/lib/kubelet/plugins/kubernetes.io/csi/reservoir.csi.dev/x/globalmount","source":"nfs://10.0.0.5/exports/data","sub_path":"train","cache_size":10737418240,"metadata_ttl":"60s","read_write":true}"#,
            )
            .unwrap(),
            params: KernelParams {
                minor: 40,
                flags: (1 << 37) | (1 << 39) | (1 << 30) | (1 << 13),
                max_write: 1 << 20,
            },
            channels: 4,
            device: (0, 61),
            mounted_at_ms: 1_796_000_000_000,
            recoveries: 2,
            last_recovery_ms: Some(1_796_000_100_000),
        }
    }

    #[test]
    #[ignore = "writes this release's fixtures; run once per new format"]
    fn write_state_fixture() {
        let dir = fixtures().join(format!("format-{FORMAT}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let session = SessionDir { path: dir.clone() };
        session.write(&record_v1()).unwrap();
        let logs = session.logs().unwrap();
        let cache_file = |backing| OpenMode::Passthrough {
            backing,
            kind: BackingKind::Cache,
        };
        logs.handles
            .record_for_fixture(1, 5, false, cache_file(3), 10);
        logs.handles
            .record_for_fixture(2, 5, false, cache_file(3), 12);
        logs.handles
            .record_for_fixture(3, 9, true, OpenMode::Daemon, 14);
        logs.handles
            .record_for_fixture(4, 11, false, OpenMode::Daemon, 16);
        logs.handles.release_for_fixture(4);
        logs.intents.begin(40);
    }

    #[test]
    fn every_released_state_format_is_read() {
        let mut formats = 0;
        for entry in std::fs::read_dir(fixtures()).expect("tests/fixtures/state") {
            let fixture = entry.unwrap().path();
            formats += 1;
            // Reading rewrites the logs: work on a copy.
            let copy = tempfile::tempdir().unwrap();
            for file in std::fs::read_dir(&fixture).unwrap() {
                let file = file.unwrap().path();
                std::fs::copy(&file, copy.path().join(file.file_name().unwrap())).unwrap();
            }
            let session = SessionDir {
                path: copy.path().to_path_buf(),
            };
            assert_eq!(
                session.read().unwrap(),
                record_v1(),
                "{}",
                fixture.display()
            );
            let logs = session.logs().unwrap();
            let reader = logs.handles.file(2).expect("handle 2");
            assert_eq!((reader.ino, reader.writable), (5, false));
            assert!(logs.handles.file(4).is_none(), "released");
            assert_eq!(logs.handles.file(3).map(|h| h.writable), Some(true));
            assert_eq!(logs.handles.answered(12).map(|(fh, _)| fh), Some(2));
            assert_eq!(logs.handles.next_handle(), 5);
            assert_eq!(
                logs.handles.opens.lock().unwrap().decide(5, false),
                Decision::Share {
                    backing: 3,
                    kind: BackingKind::Cache
                }
            );
            assert!(logs.intents.inherited(40));
        }
        assert!(formats >= 1, "no fixture");
    }
}
