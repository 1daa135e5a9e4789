//! An append-only log of checksummed records, rewritten from a snapshot when it has grown.
//!
//! The cache index and the metadata store persist through it. Frames are
//! `[len: u32 LE][xxh3-64 of payload: u64 LE][payload: postcard]`. Replay stops at the first
//! torn or corrupt frame and truncates there, so a crash loses at most the unflushed tail and
//! never yields a misread record. Nothing here is fsynced on the hot path: what a lost tail
//! forgets is re-learnt from the source, and cached bytes are verified by checksum before use.
//!
//! **Appends never wait for the disk.** Callers append while holding locks that requests need
//! (the cache's node lock, taken by every open), so [`Journal::append`] only encodes the record
//! into a buffer in memory. [`Journal::flush`] (a background task, once a second) moves the
//! buffer to the file and, now and then, syncs it; it waits for the disk behind a lock of its
//! own, which appends never take. A snapshot is taken in two steps for the same reason:
//! [`Journal::snapshot`] under the caller's lock (memory only: it takes the buffer and encodes
//! the live state), [`Snapshot::install`] outside it (write, sync, rename, directory sync).
//!
//! If the disk stops taking records for long (a stalled sync), the buffer would grow without
//! bound: past [`MAX_BUFFERED`] it is dropped and appends are ignored until the next snapshot,
//! which [`Journal::wants_rewrite`] then asks for. The log on disk stays a prefix of the
//! history, as after a crash.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
/// The most encoded records kept in memory waiting for the disk (about 400,000 records of the
/// cache index; a flush empties the buffer every second while the disk answers).
pub const MAX_BUFFERED: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        cause: std::io::Error,
    },
    #[error("journal {path}: cannot encode a record")]
    Encode {
        path: PathBuf,
        #[source]
        cause: postcard::Error,
    },
}

pub struct Journal<R> {
    path: PathBuf,
    /// Records appended and not yet written to the file. Held only to copy bytes in or out.
    buffer: Mutex<Buffer>,
    /// The file, held across writes and syncs (by flushes and snapshot installs only).
    file: Mutex<LogFile>,
    /// Bytes in the file, as last written.
    on_disk: AtomicU64,
    /// Bytes of the last snapshot, to decide when to take the next.
    snapshot_bytes: AtomicU64,
    /// Bytes the log occupies (in the file and buffered), shared with whoever accounts for disk
    /// use.
    bytes: Arc<AtomicU64>,
    /// Bytes after the first torn or corrupt frame, cut off when the log was opened.
    dropped_at_open: u64,
    #[cfg(debug_assertions)]
    fault: fault::DiskStall,
    _records: PhantomData<fn(R) -> R>,
}

struct Buffer {
    frames: Vec<u8>,
    /// Which file the buffered frames continue: the snapshot they follow. A snapshot taken and
    /// not yet installed moves it ahead of the file's, and flushes wait for the new file.
    epoch: u64,
    /// A snapshot is taken and not yet installed (or abandoned).
    snapshot_outstanding: bool,
    /// Bytes of the buffer that a snapshot not yet installed took (they go back if it fails).
    held_by_snapshot: usize,
    /// Records were lost (the buffer overflowed, or a write failed): the file is no longer the
    /// whole history, so appends are ignored until a snapshot replaces it.
    incomplete: bool,
}

struct LogFile {
    file: File,
    /// The snapshot the file starts with.
    epoch: u64,
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
            buffer: Mutex::new(Buffer {
                frames: Vec::new(),
                epoch: 0,
                snapshot_outstanding: false,
                held_by_snapshot: 0,
                incomplete: false,
            }),
            file: Mutex::new(LogFile { file, epoch: 0 }),
            on_disk: AtomicU64::new(valid as u64),
            snapshot_bytes: AtomicU64::new(valid as u64),
            bytes: Arc::new(AtomicU64::new(valid as u64)),
            dropped_at_open: (contents.len() - valid) as u64,
            #[cfg(debug_assertions)]
            fault: fault::DiskStall::from_env(),
            _records: PhantomData,
        };
        Ok((journal, records))
    }

    /// Adds a record to the log: in memory, written by the next [`Journal::flush`].
    pub fn append(&self, record: &R) -> Result<(), JournalError> {
        let mut buffer = self.lock_buffer();
        if buffer.incomplete {
            return Ok(());
        }
        let start = buffer.frames.len();
        if let Err(cause) = encode_frame(record, &mut buffer.frames) {
            buffer.frames.truncate(start);
            return Err(JournalError::Encode {
                path: self.path.clone(),
                cause,
            });
        }
        if buffer.frames.len() > MAX_BUFFERED {
            tracing::warn!(
                journal = %self.path.display(),
                buffered = buffer.frames.len(),
                "the disk has not taken this journal's records for a while; dropping them until \
                 the next snapshot (a restart now would re-learn them)"
            );
            buffer.frames = Vec::new();
            buffer.incomplete = true;
        }
        self.account(&buffer);
        Ok(())
    }
}

impl<R> Journal<R> {
    /// Writes buffered records to the file; with `sync`, also to stable storage. Waits for the
    /// disk, and for a snapshot being installed, but never holds up appends.
    pub fn flush(&self, sync: bool) -> Result<(), JournalError> {
        let mut log = self.lock_file();
        let frames = {
            let mut buffer = self.lock_buffer();
            if buffer.epoch != log.epoch {
                // A snapshot is taken and not yet installed: the buffer continues the new file.
                return Ok(());
            }
            std::mem::take(&mut buffer.frames)
        };
        if frames.is_empty() && !sync {
            return Ok(());
        }
        self.before_disk_io();
        let io = |what| {
            move |cause| JournalError::Io {
                path: self.path.clone(),
                what,
                cause,
            }
        };
        if let Err(e) = log.file.write_all(&frames).map_err(io("append")) {
            // Part of a frame may be in the file: nothing after it would replay.
            let mut buffer = self.lock_buffer();
            buffer.incomplete = true;
            buffer.frames = Vec::new();
            self.account(&buffer);
            return Err(e);
        }
        self.on_disk
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        if sync {
            log.file.sync_data().map_err(io("sync"))?;
        }
        Ok(())
    }

    /// Bytes the log occupies on disk (including what is still buffered).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the log that were cut off at open: a torn tail after a crash, or damage.
    pub fn dropped_at_open(&self) -> u64 {
        self.dropped_at_open
    }

    /// A shared counter of [`Journal::bytes`], for disk accounting elsewhere.
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    /// True when the log has grown enough past its last snapshot to be worth rewriting, or has
    /// lost records that only a snapshot brings back.
    pub fn wants_rewrite(&self) -> bool {
        if self.lock_buffer().incomplete {
            return true;
        }
        let snapshot = self.snapshot_bytes.load(Ordering::Relaxed);
        let bytes = self.bytes();
        bytes >= MIN_COMPACT_BYTES && bytes > snapshot.saturating_mul(GROWTH_BEFORE_COMPACTION)
    }
}

impl<R: Serialize + DeserializeOwned> Journal<R> {
    /// Replaces the whole log by `records` (the live state), atomically: a crash leaves either
    /// the old log or the new one. [`Journal::snapshot`] and [`Snapshot::install`] in one call,
    /// for callers that may wait for the disk where they are.
    pub fn rewrite(&self, records: impl IntoIterator<Item = R>) -> Result<(), JournalError> {
        match self.snapshot(records)? {
            Some(snapshot) => snapshot.install(),
            None => Ok(()),
        }
    }

    /// The first half of a rewrite, in memory: takes what is buffered (the snapshot reflects
    /// it) and encodes `records`. Call it under the lock that orders the caller's appends with
    /// the state `records` is read from, and read that state lazily (the iterator runs after
    /// the buffer is taken): a record appended before this call must be reflected in
    /// `records`, and one appended after it goes to the new log. `None` when another snapshot
    /// is still being installed.
    pub fn snapshot(
        &self,
        records: impl IntoIterator<Item = R>,
    ) -> Result<Option<Snapshot<'_, R>>, JournalError> {
        let (epoch, before, was_incomplete) = {
            let mut buffer = self.lock_buffer();
            if buffer.snapshot_outstanding {
                return Ok(None);
            }
            buffer.snapshot_outstanding = true;
            buffer.epoch += 1;
            let before = std::mem::take(&mut buffer.frames);
            buffer.held_by_snapshot = before.len();
            let was_incomplete = std::mem::replace(&mut buffer.incomplete, false);
            (buffer.epoch, before, was_incomplete)
        };
        let mut snapshot = Snapshot {
            journal: self,
            epoch,
            frames: Vec::new(),
            before,
            was_incomplete,
            installed: false,
        };
        for record in records {
            let start = snapshot.frames.len();
            if let Err(cause) = encode_frame(&record, &mut snapshot.frames) {
                snapshot.frames.truncate(start);
                // Dropping the snapshot gives the buffer back.
                return Err(JournalError::Encode {
                    path: self.path.clone(),
                    cause,
                });
            }
        }
        Ok(Some(snapshot))
    }
}

impl<R> Journal<R> {
    /// Updates the shared count of bytes (call with the buffer locked).
    fn account(&self, buffer: &Buffer) {
        let bytes = self.on_disk.load(Ordering::Relaxed)
            + (buffer.frames.len() + buffer.held_by_snapshot) as u64;
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    fn lock_buffer(&self) -> MutexGuard<'_, Buffer> {
        // Appends leave the buffer whole or truncate what they added: a panic elsewhere while
        // it was held leaves nothing half-done; keep going rather than poison every caller.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_file(&self) -> MutexGuard<'_, LogFile> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a test may make the disk stop answering (debug builds only).
    fn before_disk_io(&self) {
        #[cfg(debug_assertions)]
        self.fault.wait_while_stalled(&self.path);
    }

    /// The test switch that stalls this journal's writes to disk.
    #[cfg(debug_assertions)]
    pub fn fault(&self) -> &fault::DiskStall {
        &self.fault
    }
}

/// A snapshot of the live state, encoded and waiting to replace the log
/// ([`Journal::snapshot`]). Dropped without being installed, it gives the buffer back.
#[must_use = "a snapshot replaces the log only once installed"]
pub struct Snapshot<'a, R> {
    journal: &'a Journal<R>,
    epoch: u64,
    frames: Vec<u8>,
    /// What was buffered when the snapshot was taken: reflected in it, and owed to the old
    /// file if the snapshot fails.
    before: Vec<u8>,
    was_incomplete: bool,
    installed: bool,
}

impl<R> Snapshot<'_, R> {
    /// Writes the snapshot to a new file, syncs it and puts it in place of the log. Waits for
    /// the disk: call it outside any lock that requests need.
    pub fn install(mut self) -> Result<(), JournalError> {
        let journal = self.journal;
        let path = &journal.path;
        let io = |what| {
            move |cause| JournalError::Io {
                path: path.clone(),
                what,
                cause,
            }
        };
        let mut log = journal.lock_file();
        journal.before_disk_io();
        let tmp = path.with_extension("rewrite");
        let written = (|| {
            let mut file = File::create(&tmp).map_err(io("create a snapshot"))?;
            file.write_all(&self.frames)
                .map_err(io("write a snapshot"))?;
            file.sync_all().map_err(io("sync a snapshot"))?;
            std::fs::rename(&tmp, path).map_err(io("replace the log with a snapshot"))?;
            Ok(file)
        })();
        let mut file = written.inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        // In place from here on: a failure to sync the directory only weakens durability.
        if let Some(parent) = path.parent()
            && let Err(cause) = File::open(parent).and_then(|dir| dir.sync_all())
        {
            tracing::warn!(journal = %path.display(), error = &cause as &dyn std::error::Error, "cannot sync the directory of a rewritten journal");
        }
        file.seek(SeekFrom::End(0)).map_err(io("seek"))?;
        *log = LogFile {
            file,
            epoch: self.epoch,
        };
        let written = self.frames.len() as u64;
        journal.on_disk.store(written, Ordering::Relaxed);
        journal.snapshot_bytes.store(written, Ordering::Relaxed);
        self.installed = true;
        let mut buffer = journal.lock_buffer();
        buffer.snapshot_outstanding = false;
        buffer.held_by_snapshot = 0;
        journal.account(&buffer);
        Ok(())
    }
}

impl<R> Drop for Snapshot<'_, R> {
    fn drop(&mut self) {
        if self.installed {
            return;
        }
        // Not installed: the old file stays, and what was buffered before the snapshot goes
        // back ahead of what came since.
        let journal = self.journal;
        let mut buffer = journal.lock_buffer();
        buffer.snapshot_outstanding = false;
        buffer.held_by_snapshot = 0;
        buffer.epoch = self.epoch - 1;
        if self.was_incomplete || buffer.incomplete {
            buffer.incomplete = true;
            buffer.frames = Vec::new();
        } else {
            let since = std::mem::take(&mut buffer.frames);
            let mut frames = std::mem::take(&mut self.before);
            frames.extend_from_slice(&since);
            buffer.frames = frames;
        }
        journal.account(&buffer);
    }
}

impl<R> Drop for Journal<R> {
    /// Writes out what is buffered (without syncing), as a closed file would.
    fn drop(&mut self) {
        if let Err(e) = self.flush(false) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot write a journal's last records"
            );
        }
    }
}

/// Appends one frame to `out`.
fn encode_frame<R: Serialize>(record: &R, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    postcard::to_io(record, &mut *out)?;
    let payload = &out[start + FRAME_HEADER..];
    if payload.len() > MAX_RECORD {
        return Err(postcard::Error::SerializeBufferFull);
    }
    let len = (payload.len() as u32).to_le_bytes();
    let checksum = xxh3_64(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + FRAME_HEADER].copy_from_slice(&checksum);
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

/// Fault injection for tests: a journal's writes to its file can be made to wait, as on a disk
/// that stopped answering. Compiled into debug builds only, so that nothing in the environment
/// of the shipped (release) binary can stall it, while `cargo test` builds and runs debug
/// binaries: tests stall the journals of a `reservoir` process they start through
/// [`STALL_SWITCH_ENV`] (an environment variable rather than a cargo feature, so that the plain
/// `cargo test` runs those tests), and a journal in their own process through
/// [`DiskStall::arm`].
#[cfg(debug_assertions)]
pub mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    /// Names a file: while it exists, the journals of the process wait before writing to disk
    /// (all of them if the file is empty, else those whose file name it holds, e.g. `index`),
    /// and say so once per wait in the log ("journal writes stalled by the test switch").
    pub const STALL_SWITCH_ENV: &str = "RESERVOIR_TEST_STALL_JOURNAL_WRITES";

    /// The switch of one journal.
    #[derive(Default)]
    pub struct DiskStall {
        armed: AtomicBool,
        waiting: AtomicUsize,
        switch: Option<PathBuf>,
    }

    impl DiskStall {
        pub(super) fn from_env() -> Self {
            DiskStall {
                switch: std::env::var_os(STALL_SWITCH_ENV).map(PathBuf::from),
                ..DiskStall::default()
            }
        }

        /// Makes writes to disk wait from now until [`DiskStall::release`].
        pub fn arm(&self) {
            self.armed.store(true, Ordering::SeqCst);
        }

        pub fn release(&self) {
            self.armed.store(false, Ordering::SeqCst);
        }

        /// How many writers are waiting now.
        pub fn waiting(&self) -> usize {
            self.waiting.load(Ordering::SeqCst)
        }

        fn stalled(&self, journal: &Path) -> bool {
            if self.armed.load(Ordering::SeqCst) {
                return true;
            }
            let Some(switch) = &self.switch else {
                return false;
            };
            match std::fs::read_to_string(switch) {
                Ok(name) => {
                    let name = name.trim();
                    name.is_empty() || journal.file_name().is_some_and(|n| n == name)
                }
                Err(_) => false,
            }
        }

        pub(super) fn wait_while_stalled(&self, journal: &Path) {
            if !self.stalled(journal) {
                return;
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(journal = %journal.display(), "journal writes stalled by the test switch");
            while self.stalled(journal) {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
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

    /// Runs `f` on another thread; its result, or `None` if it did not return within 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).ok()
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[cfg(debug_assertions)]
    #[test]
    fn appends_and_snapshots_never_wait_for_a_stalled_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (journal, _) = Journal::<Rec>::open(&path).unwrap();
        let journal = Arc::new(journal);
        journal.append(&Rec::A(0)).unwrap();
        journal.fault().arm();
        let flusher = {
            let journal = journal.clone();
            std::thread::spawn(move || journal.flush(true))
        };
        wait_for("the flush waits for the disk", || {
            journal.fault().waiting() == 1
        });
        // The flush holds the file; appends and a snapshot are memory only.
        let appended = within_10s({
            let journal = journal.clone();
            move || {
                for i in 1..1000 {
                    journal.append(&Rec::A(i)).unwrap();
                }
                journal.snapshot([Rec::A(42)]).unwrap().is_some()
            }
        });
        assert_eq!(
            appended,
            Some(true),
            "appends waited for a stalled disk write"
        );
        journal.fault().release();
        flusher.join().unwrap().unwrap();
    }

    /// A flush that took records before a snapshot writes them to the old file; records
    /// appended after the snapshot must reach the new one, not the file it replaces.
    #[cfg(debug_assertions)]
    #[test]
    fn records_after_a_snapshot_land_in_the_new_log_even_past_a_flush_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (journal, _) = Journal::<Rec>::open(&path).unwrap();
        let journal = Arc::new(journal);
        journal.append(&Rec::A(1)).unwrap();
        journal.fault().arm();
        let flusher = {
            let journal = journal.clone();
            std::thread::spawn(move || journal.flush(false))
        };
        wait_for("the flush waits for the disk", || {
            journal.fault().waiting() == 1
        });
        let snapshot = journal.snapshot([Rec::A(10), Rec::A(11)]).unwrap().unwrap();
        journal.append(&Rec::A(12)).unwrap();
        // A flush now has nothing it may write: the buffer continues the new log.
        let second = {
            let journal = journal.clone();
            std::thread::spawn(move || journal.flush(false))
        };
        journal.fault().release();
        flusher.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        snapshot.install().unwrap();
        journal.append(&Rec::A(13)).unwrap();
        journal.flush(false).unwrap();
        assert_eq!(journal.bytes(), std::fs::metadata(&path).unwrap().len());
        drop(journal);
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, [10, 11, 12, 13].map(Rec::A));
    }

    #[test]
    fn an_abandoned_snapshot_gives_the_buffer_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (journal, _) = Journal::<Rec>::open(&path).unwrap();
        journal.append(&Rec::A(1)).unwrap();
        let snapshot = journal.snapshot([Rec::A(9)]).unwrap().unwrap();
        assert!(
            journal.snapshot([Rec::A(8)]).unwrap().is_none(),
            "one snapshot at a time"
        );
        journal.append(&Rec::A(2)).unwrap();
        drop(snapshot);
        journal.append(&Rec::A(3)).unwrap();
        journal.flush(false).unwrap();
        drop(journal);
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, [1, 2, 3].map(Rec::A));
    }

    #[test]
    fn an_overflowing_buffer_is_dropped_until_a_snapshot_restores_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (journal, _) = Journal::<Rec>::open(&path).unwrap();
        journal.append(&Rec::A(1)).unwrap();
        journal.flush(false).unwrap();
        let big = "x".repeat(1 << 20);
        for _ in 0..=MAX_BUFFERED >> 20 {
            journal.append(&Rec::B { name: big.clone() }).unwrap();
        }
        assert!(journal.wants_rewrite(), "records were lost");
        assert!(journal.bytes() < 1 << 20, "the buffer was let go");
        journal.append(&Rec::A(2)).unwrap();
        journal.flush(false).unwrap();
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, [Rec::A(1)], "nothing after the gap is written");
        journal.rewrite([Rec::A(5)]).unwrap();
        assert!(!journal.wants_rewrite());
        journal.append(&Rec::A(6)).unwrap();
        drop(journal);
        let (_, records) = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(records, [5, 6].map(Rec::A));
    }
}
