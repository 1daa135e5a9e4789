//! An append-only log of checksummed records, rewritten from a snapshot when it has grown.
//!
//! The cache index and the metadata store persist through it. Frames are
//! `[len: u32 LE][xxh3-64 of payload: u64 LE][payload: postcard]`. Replay stops at the first
//! torn or corrupt frame and truncates there, so a crash loses at most the unflushed tail and
//! never yields a misread record. Nothing here is fsynced on the hot path: what a lost tail
//! forgets is re-learnt from the source, and cached bytes are verified by checksum before use.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::xxh3_64;

const FRAME_HEADER: usize = 12;
/// Records larger than this are refused on write and treated as corruption on replay.
const MAX_RECORD: usize = 64 << 20;
/// A log is rewritten once it is this many times larger than its last snapshot (and at least
/// [`MIN_COMPACT_BYTES`]).
const GROWTH_BEFORE_COMPACTION: u64 = 3;
const MIN_COMPACT_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {what}: {cause}")]
    Io {
        path: PathBuf,
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("journal {path}: cannot encode a record: {cause}")]
    Encode {
        path: PathBuf,
        cause: postcard::Error,
    },
}

pub struct Journal<R> {
    path: PathBuf,
    writer: Mutex<Writer>,
    /// Bytes the log occupies, shared with whoever accounts for disk use.
    bytes: Arc<AtomicU64>,
    _records: PhantomData<fn(R) -> R>,
}

struct Writer {
    file: BufWriter<File>,
    snapshot_bytes: u64,
    scratch: Vec<u8>,
}

impl<R: Serialize + DeserializeOwned> Journal<R> {
    /// Opens the log at `path` (creating it if absent) and returns it with the records it holds.
    pub fn open(path: &Path) -> Result<(Self, Vec<R>), JournalError> {
        let io = |what: &'static str| {
            move |cause| JournalError::Io {
                path: path.to_path_buf(),
                what,
                cause,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).map_err(io("read"))?;

        let (records, valid) = decode_all::<R>(&contents);
        if valid < contents.len() {
            tracing::warn!(
                journal = %path.display(),
                kept_bytes = valid,
                dropped_bytes = contents.len() - valid,
                "journal ends with a torn or corrupt record; dropping the tail"
            );
            file.set_len(valid as u64).map_err(io("truncate"))?;
        }
        file.seek(SeekFrom::Start(valid as u64))
            .map_err(io("seek"))?;

        let journal = Journal {
            path: path.to_path_buf(),
            writer: Mutex::new(Writer {
                file: BufWriter::with_capacity(256 << 10, file),
                snapshot_bytes: valid as u64,
                scratch: Vec::new(),
            }),
            bytes: Arc::new(AtomicU64::new(valid as u64)),
            _records: PhantomData,
        };
        Ok((journal, records))
    }

    pub fn append(&self, record: &R) -> Result<(), JournalError> {
        let mut writer = self.lock();
        let Writer { file, scratch, .. } = &mut *writer;
        encode_frame(record, scratch).map_err(|cause| JournalError::Encode {
            path: self.path.clone(),
            cause,
        })?;
        file.write_all(scratch).map_err(|cause| JournalError::Io {
            path: self.path.clone(),
            what: "append",
            cause,
        })?;
        self.bytes
            .fetch_add(scratch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes buffered records to the file; with `sync`, also to stable storage.
    pub fn flush(&self, sync: bool) -> Result<(), JournalError> {
        let mut writer = self.lock();
        let io = |what| {
            move |cause| JournalError::Io {
                path: self.path.clone(),
                what,
                cause,
            }
        };
        writer.file.flush().map_err(io("flush"))?;
        if sync {
            writer.file.get_ref().sync_data().map_err(io("sync"))?;
        }
        Ok(())
    }

    /// Bytes the log occupies on disk (including what is still buffered).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A shared counter of [`Journal::bytes`], for disk accounting elsewhere.
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    /// True when the log has grown enough past its last snapshot to be worth rewriting.
    pub fn wants_rewrite(&self) -> bool {
        let snapshot = self.lock().snapshot_bytes;
        let bytes = self.bytes();
        bytes >= MIN_COMPACT_BYTES && bytes > snapshot.saturating_mul(GROWTH_BEFORE_COMPACTION)
    }

    /// Replaces the whole log by `records` (the live state), atomically: a crash leaves either
    /// the old log or the new one. The caller must keep appends that the snapshot does not
    /// reflect from racing with this call (it holds its own state lock).
    pub fn rewrite(&self, records: impl IntoIterator<Item = R>) -> Result<(), JournalError> {
        let mut writer = self.lock();
        let io = |what| {
            move |cause| JournalError::Io {
                path: self.path.clone(),
                what,
                cause,
            }
        };
        let tmp = self.path.with_extension("rewrite");
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io("create"))?);
        let mut frame = Vec::new();
        let mut written = 0u64;
        for record in records {
            encode_frame(&record, &mut frame).map_err(|cause| JournalError::Encode {
                path: self.path.clone(),
                cause,
            })?;
            out.write_all(&frame).map_err(io("write snapshot"))?;
            written += frame.len() as u64;
        }
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io("write snapshot"))?;
        file.sync_all().map_err(io("sync snapshot"))?;
        std::fs::rename(&tmp, &self.path).map_err(io("replace"))?;
        if let Some(parent) = self.path.parent() {
            File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(io("sync directory"))?;
        }
        let mut file = file;
        file.seek(SeekFrom::End(0)).map_err(io("seek"))?;
        // The old buffered writer points at the replaced file: its contents are in the snapshot.
        let old = std::mem::replace(&mut writer.file, BufWriter::with_capacity(256 << 10, file));
        drop(old.into_parts());
        writer.snapshot_bytes = written;
        self.bytes.store(written, Ordering::Relaxed);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves at worst a partly buffered frame, which replay
        // discards; keep going rather than poison every later caller.
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn encode_frame<R: Serialize>(record: &R, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    out.clear();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    let mut out_vec = std::mem::take(out);
    out_vec = postcard::to_extend(record, out_vec)?;
    let payload_len = out_vec.len() - FRAME_HEADER;
    if payload_len > MAX_RECORD {
        return Err(postcard::Error::SerializeBufferFull);
    }
    let checksum = xxh3_64(&out_vec[FRAME_HEADER..]);
    out_vec[..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out_vec[4..FRAME_HEADER].copy_from_slice(&checksum.to_le_bytes());
    *out = out_vec;
    Ok(())
}

/// Decodes frames until the end or the first bad one; returns the records and the length of
/// the valid prefix.
fn decode_all<R: DeserializeOwned>(contents: &[u8]) -> (Vec<R>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while contents.len() - at >= FRAME_HEADER {
        let header = &contents[at..at + FRAME_HEADER];
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&header[4..FRAME_HEADER]);
        let checksum = u64::from_le_bytes(sum);
        let start = at + FRAME_HEADER;
        if len > MAX_RECORD || contents.len() - start < len {
            break;
        }
        let payload = &contents[start..start + len];
        if xxh3_64(payload) != checksum {
            break;
        }
        match postcard::from_bytes::<R>(payload) {
            Ok(record) => records.push(record),
            Err(_) => break,
        }
        at = start + len;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Rec {
        A(u64),
        B { name: String },
    }

    #[test]
    fn appends_survive_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let (journal, records) = Journal::<Rec>::open(&path).unwrap();
            assert!(records.is_empty());
            journal.append(&Rec::A(7)).unwrap();
            journal.append(&Rec::B { name: "x".into() }).unwrap();
            journal.flush(true).unwrap();
            assert_eq!(journal.bytes(), std::fs::metadata(&path).unwrap().len());
        }
        // A torn write: half a frame at the end.
        let good_len = std::fs::metadata(&path).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);

        let (journal, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, [Rec::A(7), Rec::B { name: "x".into() }]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        journal.append(&Rec::A(8)).unwrap();
        journal.flush(false).unwrap();
        drop(journal);
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records.len(), 3);
    }

    #[test]
    fn a_flipped_bit_ends_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (journal, _) = Journal::<Rec>::open(&path).unwrap();
        for i in 0..10 {
            journal.append(&Rec::A(i)).unwrap();
        }
        journal.flush(false).unwrap();
        drop(journal);
        let mut bytes = std::fs::read(&path).unwrap();
        let frame = bytes.len() / 10;
        bytes[frame * 4 + FRAME_HEADER] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, (0..4).map(Rec::A).collect::<Vec<_>>());
    }

    #[test]
    fn rewrite_replaces_the_log_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (journal, _) = Journal::<Rec>::open(&path).unwrap();
        for i in 0..1000 {
            journal.append(&Rec::A(i)).unwrap();
        }
        journal.rewrite([Rec::A(1), Rec::A(2)]).unwrap();
        journal.append(&Rec::A(3)).unwrap();
        journal.flush(false).unwrap();
        assert_eq!(journal.bytes(), std::fs::metadata(&path).unwrap().len());
        drop(journal);
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, [Rec::A(1), Rec::A(2), Rec::A(3)]);
    }
}
