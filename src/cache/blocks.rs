//! Block leases and verification: what a reader holds while it uses one cached file, and how
//! blocks are read, stored and checked against their checksums.
//!
//! Each cached file's blocks (present or not, checksum, verified by this process) sit behind a
//! lock of their own ([`BlockMap`]), shared by the node's books and every lease on the file, so
//! that reading, storing and verifying never take the node's lock; disk I/O happens with no
//! lock held at all.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use xxhash_rust::xxh3::xxh3_64;

use super::index::{IndexRecord, block_count};
use super::{Cache, CacheError, ContentKey, Result};

/// Bytes of file data present and files complete, of one owner or of the whole node: kept as
/// blocks come and go, so that reports never walk the files.
#[derive(Default)]
pub(super) struct Tally {
    pub present_bytes: AtomicU64,
    pub complete_files: AtomicU64,
}

impl Tally {
    fn add(&self, bytes: u64, complete: bool) {
        self.present_bytes.fetch_add(bytes, Ordering::Relaxed);
        if complete {
            self.complete_files.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove(&self, bytes: u64, complete: bool) {
        self.present_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if complete {
            self.complete_files.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The blocks of one cached file.
pub(super) struct BlockMap {
    size: u64,
    block_size: u32,
    state: Mutex<Blocks>,
}

pub(super) struct Blocks {
    /// Checksum of each block; `None` where the block is not cached.
    checksums: Box<[Option<u64>]>,
    /// Blocks whose bytes were checked (or written) by this process. Bytes written by an
    /// earlier process are verified before they are first used.
    verified: Box<[bool]>,
    present: u32,
    present_bytes: u64,
    /// Removed from the books: nothing more is stored, and reads miss.
    evicted: bool,
    /// The tallies the file counts in: its owner's and the node's.
    owner_tally: Arc<Tally>,
    node_tally: Arc<Tally>,
}

impl BlockMap {
    /// The blocks of a file of `size`, with the `checksums` known of it (`None` for a file just
    /// admitted), counted in the given tallies.
    pub fn new(
        size: u64,
        block_size: u32,
        checksums: Option<Box<[Option<u64>]>>,
        owner_tally: Arc<Tally>,
        node_tally: Arc<Tally>,
    ) -> Self {
        let count = block_count(size, block_size);
        let checksums = checksums.unwrap_or_else(|| vec![None; count].into_boxed_slice());
        let mut blocks = Blocks {
            verified: vec![false; checksums.len()].into_boxed_slice(),
            checksums,
            present: 0,
            present_bytes: 0,
            evicted: false,
            owner_tally,
            node_tally,
        };
        for block in 0..blocks.checksums.len() {
            if blocks.checksums[block].is_some() {
                blocks.present += 1;
                blocks.present_bytes += block_len(size, block_size, block as u32) as u64;
            }
        }
        let complete = blocks.is_complete();
        blocks.owner_tally.add(blocks.present_bytes, complete);
        blocks.node_tally.add(blocks.present_bytes, complete);
        BlockMap {
            size,
            block_size,
            state: Mutex::new(blocks),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Blocks> {
        // Every change under this lock is a few assignments that leave it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored blocks and their checksums, for a snapshot of the index.
    pub fn stored(&self) -> Vec<(u32, u64)> {
        self.lock()
            .checksums
            .iter()
            .enumerate()
            .filter_map(|(b, sum)| sum.map(|sum| (b as u32, sum)))
            .collect()
    }

    fn block_len(&self, block: u32) -> u64 {
        block_len(self.size, self.block_size, block) as u64
    }
}

impl Blocks {
    /// Bytes of the file's blocks present on disk.
    pub fn present_bytes(&self) -> u64 {
        self.present_bytes
    }

    pub fn is_complete(&self) -> bool {
        self.present as usize == self.checksums.len()
    }

    /// The file was evicted: nothing is stored under it any more.
    pub fn is_released(&self) -> bool {
        self.evicted
    }

    pub fn all_verified(&self) -> bool {
        self.verified.iter().all(|v| *v)
    }

    /// The file left the books (evicted): it counts nowhere any more.
    pub fn release(&mut self) {
        if std::mem::replace(&mut self.evicted, true) {
            return;
        }
        let complete = self.is_complete();
        self.owner_tally.remove(self.present_bytes, complete);
        self.node_tally.remove(self.present_bytes, complete);
    }

    /// The file changed owners: its bytes move to the new owner's tally.
    pub fn move_to(&mut self, owner_tally: Arc<Tally>) {
        if self.evicted {
            return;
        }
        let complete = self.is_complete();
        self.owner_tally.remove(self.present_bytes, complete);
        owner_tally.add(self.present_bytes, complete);
        self.owner_tally = owner_tally;
    }

    fn is_missing(&self, block: u32) -> bool {
        !self.evicted
            && self
                .checksums
                .get(block as usize)
                .is_some_and(|sum| sum.is_none())
    }

    /// Records a stored block; false if it was present already or the file was evicted.
    fn store(&mut self, block: u32, checksum: u64, len: u64) -> bool {
        if !self.is_missing(block) {
            return false;
        }
        self.checksums[block as usize] = Some(checksum);
        self.verified[block as usize] = true;
        self.present += 1;
        self.present_bytes += len;
        let complete = self.is_complete();
        self.owner_tally.add(len, complete);
        self.node_tally.add(len, complete);
        true
    }

    /// Drops a block that failed verification.
    fn drop_block(&mut self, block: u32, len: u64) {
        if self.checksums[block as usize].take().is_none() {
            return;
        }
        let was_complete = self.is_complete();
        self.present -= 1;
        self.present_bytes -= len;
        if !self.evicted {
            self.owner_tally.remove(len, was_complete);
            self.node_tally.remove(len, was_complete);
        }
    }
}

fn block_len(size: u64, block_size: u32, block: u32) -> usize {
    let start = u64::from(block) * u64::from(block_size);
    (size - start).min(u64::from(block_size)) as usize
}

/// What a caller holds while it uses one cached file: the file's blocks and an open descriptor
/// of its data file. A file just admitted has no data file until its first block is stored:
/// creating one costs an inode, which a cold open should not wait for.
pub struct Lease {
    pub key: ContentKey,
    pub(super) generation: u64,
    pub size: u64,
    pub block_size: u32,
    /// Every block was cached when the lease was taken.
    pub complete: bool,
    /// ... and every block had been verified by this process.
    pub verified: bool,
    pub(super) blocks: Arc<BlockMap>,
    pub(super) file: OnceLock<File>,
}

impl Lease {
    pub fn block_count(&self) -> u32 {
        block_count(self.size, self.block_size) as u32
    }

    /// The byte range of `block`.
    pub fn block_range(&self, block: u32) -> (u64, usize) {
        let start = u64::from(block) * u64::from(self.block_size);
        (start, block_len(self.size, self.block_size, block))
    }

    /// The data file, for FUSE passthrough. Only meaningful once the file is complete and
    /// verified ([`Cache::prepare_passthrough`]).
    pub fn data_file(&self) -> Option<&File> {
        self.file.get()
    }
}

impl Cache {
    /// The lease's data file; with `create`, created (empty and sparse) if it does not exist
    /// yet. `None` when it does not exist (and not `create`) or the file was evicted.
    ///
    /// Created outside any lock: creating an inode can take a millisecond (ext4 without a
    /// journal scans past every recently deleted inode), and concurrent cold reads must not
    /// queue behind it.
    pub(super) fn data_file<'a>(&self, lease: &'a Lease, create: bool) -> Result<Option<&'a File>> {
        if let Some(file) = lease.file.get() {
            return Ok(Some(file));
        }
        let path = self.node.data_path(lease.key, lease.generation);
        let existing = || File::options().read(true).write(true).open(&path);
        let opened = if create {
            // Two stores of one file may race here: the second opens what the first created.
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => existing(),
                other => other.and_then(|file| file.set_len(lease.size).map(|()| file)),
            }
        } else {
            match existing() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                other => other,
            }
        };
        // An eviction marks the blocks before it unlinks the file (after the node lock is
        // released): a file created after that unlink is found here and removed.
        if lease.blocks.lock().evicted {
            if create {
                let _ = std::fs::remove_file(&path);
            }
            return Ok(None);
        }
        let file =
            opened.map_err(|cause| self.io_error(format!("open {}", path.display()), cause))?;
        Ok(Some(lease.file.get_or_init(|| file)))
    }

    /// Reads `[offset, offset + len)` (clipped to the file) from the cache if every block it
    /// touches is present, verifying blocks written by an earlier process before their first
    /// use. `Ok(None)` means a block is missing (or just failed verification and was dropped).
    /// Takes only the file's own lock, never the node's.
    pub fn read(&self, lease: &Lease, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let end = (offset + len as u64).min(lease.size);
        if offset >= end {
            return Ok(Some(Vec::new()));
        }
        let first = (offset / u64::from(lease.block_size)) as u32;
        let last = ((end - 1) / u64::from(lease.block_size)) as u32;
        let mut unverified = Vec::new();
        {
            let blocks = lease.blocks.lock();
            if blocks.evicted {
                return Ok(None);
            }
            for block in first..=last {
                match blocks.checksums[block as usize] {
                    None => return Ok(None),
                    Some(sum) if !blocks.verified[block as usize] => unverified.push((block, sum)),
                    Some(_) => {}
                }
            }
        }
        for (block, checksum) in unverified {
            if !self.verify_block(lease, block, checksum)? {
                return Ok(None);
            }
        }
        let Some(file) = self.data_file(lease, false)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; (end - offset) as usize];
        file.read_exact_at(&mut buf, offset).map_err(|cause| {
            self.io_error(format!("read cached file {} at {offset}", lease.key), cause)
        })?;
        Ok(Some(buf))
    }

    /// Checks one block against its checksum; a mismatch drops the block so that it is
    /// fetched again.
    fn verify_block(&self, lease: &Lease, block: u32, checksum: u64) -> Result<bool> {
        let node = &*self.node;
        let (start, len) = lease.block_range(block);
        let mut buf = vec![0u8; len];
        let Some(file) = self.data_file(lease, false)? else {
            return Ok(false);
        };
        let intact = match file.read_exact_at(&mut buf, start) {
            Ok(()) => xxh3_64(&buf) == checksum,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(cause) => {
                return Err(self.io_error(
                    format!("read block {block} of cached file {}", lease.key),
                    cause,
                ));
            }
        };
        let mut blocks = lease.blocks.lock();
        if blocks.evicted {
            return Ok(false);
        }
        if intact {
            blocks.verified[block as usize] = true;
            return Ok(true);
        }
        // Concurrent readers of one block verify it in parallel: only the first to see the
        // mismatch drops and counts it; a block stored again since then is the good copy.
        if blocks.checksums[block as usize].is_none() {
            return Ok(false);
        }
        if blocks.verified[block as usize] {
            return Ok(true);
        }
        tracing::warn!(key = %lease.key, block, "cached block failed its checksum; fetching it again");
        node.counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        blocks.drop_block(block, lease.blocks.block_len(block));
        // Recorded under the file's lock, after the change: a snapshot of the index that does
        // not see the change is followed by this record.
        node.journal.append(&IndexRecord::Dropped {
            key: lease.key,
            generation: lease.generation,
            block,
        })?;
        Ok(false)
    }

    /// Blocks in `first..=last` that are not cached (none once the file was evicted: nothing
    /// more will be stored under this lease).
    pub fn missing_blocks(&self, lease: &Lease, first: u32, last: u32) -> Vec<u32> {
        let blocks = lease.blocks.lock();
        (first..=last).filter(|&b| blocks.is_missing(b)).collect()
    }

    /// Stores one fetched block. `data` must be the whole block (shorter only for the last).
    /// Returns false when the block was not stored (the file was evicted meanwhile, or the
    /// block was already present). A block the disk does not take (full, failing) stays
    /// missing, so its readers are answered from the source; such failures are counted, and
    /// logged at the first and then at every power of two.
    pub fn store_block(&self, lease: &Lease, block: u32, data: &[u8]) -> Result<bool> {
        let result = self.write_block(lease, block, data);
        if let Err(e @ CacheError::Io { .. }) = &result {
            let failures = self
                .node
                .counters
                .store_failures
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if failures.is_power_of_two() {
                tracing::warn!(failures, error = %crate::error::Chain(e), "the cache disk does not take blocks; reading from the source");
            }
        }
        result
    }

    fn write_block(&self, lease: &Lease, block: u32, data: &[u8]) -> Result<bool> {
        let node = &*self.node;
        let (start, len) = lease.block_range(block);
        if data.len() != len {
            return Err(CacheError::BlockSize {
                key: lease.key,
                block,
                got: data.len(),
                expected: len,
            });
        }
        if !lease.blocks.lock().is_missing(block) {
            return Ok(false);
        }
        let Some(file) = self.data_file(lease, true)? else {
            return Ok(false);
        };
        file.write_all_at(data, start).map_err(|cause| {
            self.io_error(
                format!("write block {block} of cached file {}", lease.key),
                cause,
            )
        })?;
        let checksum = xxh3_64(data);
        let mut blocks = lease.blocks.lock();
        if !blocks.store(block, checksum, len as u64) {
            return Ok(false);
        }
        // Recorded under the file's lock, after the change (see `verify_block`).
        node.journal.append(&IndexRecord::Stored {
            key: lease.key,
            generation: lease.generation,
            block,
            checksum,
        })?;
        drop(blocks);
        node.counters
            .bytes_stored
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether the leased file is complete in the cache now.
    pub fn is_complete(&self, lease: &Lease) -> bool {
        let blocks = lease.blocks.lock();
        !blocks.evicted && blocks.is_complete()
    }

    /// True when the file is complete and every block has been verified by this process, so
    /// that the kernel may read the data file directly. Verifies what needs it (reads the
    /// blocks written by an earlier process: call off the request threads for big files).
    pub fn prepare_passthrough(&self, lease: &Lease) -> Result<bool> {
        let pending: Vec<(u32, u64)> = {
            let blocks = lease.blocks.lock();
            if blocks.evicted || !blocks.is_complete() {
                return Ok(false);
            }
            blocks
                .checksums
                .iter()
                .zip(blocks.verified.iter())
                .enumerate()
                .filter(|(_, (_, verified))| !**verified)
                .filter_map(|(block, (sum, _))| sum.map(|sum| (block as u32, sum)))
                .collect()
        };
        for (block, checksum) in pending {
            if !self.verify_block(lease, block, checksum)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
