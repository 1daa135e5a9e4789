//! Read-ahead: sequential readers get the blocks after theirs fetched in the background, in a
//! window that grows while the source keeps up and shrinks when fetches queue; small files are
//! fetched whole at open. Bounded across the volume.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::{OpenFile, Volume};

/// Blocks fetched ahead of a sequential reader, at most (see [`ReadAhead::fetched`]).
const MAX_READAHEAD_BLOCKS: u32 = 16;
/// Files up to this many blocks are fetched whole as soon as they are opened.
pub(super) const OPEN_PREFETCH_BLOCKS: u32 = 4;
/// queue at the bottleneck: the read-ahead limit halves.
const SLOW_FETCH: u32 = 3;

impl Volume {
    /// Starts fetching blocks in the background, bounded across the volume.
    pub(super) fn prefetch(self: &Arc<Self>, file: &Arc<OpenFile>, blocks: std::ops::Range<u32>) {
        let (Some(lease), Some(cache)) = (&file.lease, &self.cache) else {
            return;
        };
        let first = blocks.start;
        let Some(last) = blocks.end.checked_sub(1) else {
            return;
        };
        if first > last {
            return;
        }
        for block in cache.missing_blocks(lease, first, last) {
            let (volume, file, lease) = (self.clone(), file.clone(), lease.clone());
            let slots = self.prefetch_slots.clone();
            let task = async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                if let Err(e) = volume.block(&file, &lease, block, false).await {
                    // Nobody waits for this block: the failure is only logged (a reader of it
                    // fetches it again). An unreachable source is logged once, by `observe`.
                    let (offset, size) = lease.block_range(block);
                    let error = crate::error::Chain(&e);
                    let (ino, key) = (file.ino, lease.key);
                    if !volume.is_online() {
                        tracing::debug!(ino, %key, block, offset, size, %error, "prefetch failed");
                    } else {
                        tracing::warn!(ino, %key, block, offset, size, %error, "prefetch failed");
                    }
                }
            };
            self.runtime.spawn(task.in_current_span());
        }
    }

    pub(super) fn read_ahead(self: &Arc<Self>, file: &Arc<OpenFile>, offset: u64, size: u32) {
        let Some(lease) = &file.lease else {
            return;
        };
        let next = file
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .advance(offset, size, lease.block_size, lease.block_count());
        if let Some(blocks) = next {
            self.prefetch(file, blocks);
        }
    }
}

/// Detects sequential reading and decides what to fetch ahead of it.
pub(super) struct ReadAhead {
    /// Where the next sequential read would start.
    next: u64,
    /// Blocks to keep fetched ahead; doubles while reading stays sequential, up to `limit`.
    window: u32,
    /// Blocks below this were already requested.
    requested_until: u32,
    /// The most blocks in flight that still pay.
    limit: u32,
    /// The file's fastest block fetch so far.
    fastest: Option<Duration>,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            next: 0,
            window: 0,
            requested_until: 0,
            limit: MAX_READAHEAD_BLOCKS,
            fastest: None,
        }
    }
}

impl ReadAhead {
    /// Adapts the limit to the path to the source, the way a delay-based TCP congestion control
    /// does. Blocks in flight beyond the path's bandwidth-delay product only wait in its queue,
    /// so each takes longer; on a shallow queue they are dropped, and one TCP retransmission
    /// timeout (at least 200 ms) stalls the reader. Measured over the benchmark's 1 Gbit/s link
    /// with a 2.5 MB queue: 16 blocks in flight read a cold file at 77-84 MiB/s with about 600
    /// drops, 2 blocks at 102-106 MiB/s with 35-60. On a long fat link fetches stay near the
    /// fastest even with 16 in flight, and the limit stays at the maximum.
    pub(super) fn fetched(&mut self, took: Duration) {
        let fastest = self.fastest.map_or(took, |f| f.min(took));
        self.fastest = Some(fastest);
        if took > fastest * SLOW_FETCH {
            self.limit = (self.limit / 2).max(2);
        } else if took < fastest * 3 / 2 {
            self.limit = (self.limit + 1).min(MAX_READAHEAD_BLOCKS);
        }
    }

    pub(super) fn advance(
        &mut self,
        offset: u64,
        size: u32,
        block_size: u32,
        block_count: u32,
    ) -> Option<std::ops::Range<u32>> {
        let block = u64::from(block_size);
        // The kernel issues several reads at once, so "sequential" tolerates a block of reordering.
        let sequential = offset + block >= self.next && offset <= self.next + block;
        self.next = self.next.max(offset + u64::from(size));
        if !sequential {
            self.window = 0;
            return None;
        }
        self.window = (self.window * 2).clamp(2, self.limit);
        let current = ((offset + u64::from(size)).saturating_sub(1) / block) as u32;
        let start = (current + 1).max(self.requested_until);
        let end = (current + 1 + self.window).min(block_count);
        if start >= end {
            return None;
        }
        self.requested_until = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_narrows_when_fetches_queue_and_widens_when_they_stop() {
        let mut ahead = ReadAhead::default();
        let block = 1u32 << 20;
        let mut reads = 0u32;
        // Reads the next block; returns it and what it requested ahead.
        let mut read = |ahead: &mut ReadAhead| {
            let current = reads;
            reads += 1;
            (
                current,
                ahead.advance(u64::from(current) * u64::from(block), block, block, 10_000),
            )
        };
        for _ in 0..6 {
            read(&mut ahead);
        }
        assert_eq!(ahead.window, MAX_READAHEAD_BLOCKS);

        // Fetches take ten times the fastest: blocks in flight are queueing.
        ahead.fetched(Duration::from_millis(10));
        for _ in 0..4 {
            ahead.fetched(Duration::from_millis(100));
        }
        assert_eq!(ahead.limit, 2);
        let mut requested = 0;
        for _ in 0..2 * MAX_READAHEAD_BLOCKS {
            if let (current, Some(next)) = read(&mut ahead) {
                assert!(
                    next.end <= current + 3,
                    "{next:?} requested at block {current}"
                );
                requested += 1;
            }
        }
        assert_eq!(ahead.window, 2);
        assert!(requested > 0, "reading went on without fetching ahead");

        // Near the fastest again: the limit grows back by one per fetch.
        for _ in 0..MAX_READAHEAD_BLOCKS {
            ahead.fetched(Duration::from_millis(11));
        }
        assert_eq!(ahead.limit, MAX_READAHEAD_BLOCKS);
        for _ in 0..4 {
            read(&mut ahead);
        }
        assert_eq!(ahead.window, MAX_READAHEAD_BLOCKS);
    }
}
