//! Admission and eviction: which files the cache keeps.
//!
//! Plain LRU fails the workload this cache exists for: a shuffled epoch over a dataset larger
//! than the cache evicts every file before its next use, so nothing ever hits. Instead, like
//! TinyLFU, every access is counted in a small frequency sketch (which also remembers files that
//! are not cached), and once the cache is full a new file only gets in by displacing files that
//! are clearly less used than it. In shuffled epochs every file is read equally often, so the
//! files already cached stay and keep hitting (about cache/dataset of the reads), instead of
//! churning. Counts are halved periodically so that yesterday's hot set can be replaced.

use std::collections::BTreeSet;

use super::ContentKey;

/// How much an access is worth when competing for space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A read by a workload: must be used more than a victim by a clear margin.
    Access,
    /// An explicit preload (`reservoir warm`): displaces only files used at most once.
    Preload,
}

/// The frequency a preloaded file competes with.
const PRELOAD_FREQUENCY: u32 = 2;

/// A count-min sketch of 4 rows of saturating 8-bit counters.
pub struct Sketch {
    rows: Vec<u8>,
    width_mask: usize,
    additions: u64,
    aging_period: u64,
}

const ROWS: usize = 4;

impl Sketch {
    pub fn new(width_log2: u32) -> Self {
        let width = 1usize << width_log2;
        Sketch {
            rows: vec![0; width * ROWS],
            width_mask: width - 1,
            additions: 0,
            aging_period: (width as u64) * 8,
        }
    }

    fn slots(&self, key: ContentKey) -> [usize; ROWS] {
        let hash = key.0;
        let width = self.width_mask + 1;
        std::array::from_fn(|row| {
            let part = (hash >> (row * 32)) as usize;
            row * width + (part & self.width_mask)
        })
    }

    pub fn estimate(&self, key: ContentKey) -> u32 {
        self.slots(key)
            .iter()
            .map(|&slot| u32::from(self.rows[slot]))
            .min()
            .unwrap_or(0)
    }

    /// Counts one access; returns true when the counters were just halved (aging).
    pub fn increment(&mut self, key: ContentKey) -> bool {
        let slots = self.slots(key);
        let current = slots.iter().map(|&s| self.rows[s]).min().unwrap_or(0);
        // Conservative update: only the counters at the minimum grow, which keeps
        // overestimates from collisions small.
        for slot in slots {
            if self.rows[slot] == current {
                self.rows[slot] = current.saturating_add(1);
            }
        }
        self.additions += 1;
        if self.additions >= self.aging_period {
            self.additions = 0;
            for counter in &mut self.rows {
                *counter /= 2;
            }
            return true;
        }
        false
    }
}

/// The order in which resident files are evicted: least frequently used first, least recently
/// used among equals.
#[derive(Default)]
pub struct EvictionOrder {
    order: BTreeSet<(u32, u64, ContentKey)>,
}

/// Where a resident file stands in the eviction order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub frequency: u32,
    pub last_access: u64,
}

impl EvictionOrder {
    pub fn insert(&mut self, key: ContentKey, rank: Rank) {
        self.order.insert((rank.frequency, rank.last_access, key));
    }

    pub fn remove(&mut self, key: ContentKey, rank: Rank) {
        self.order.remove(&(rank.frequency, rank.last_access, key));
    }

    pub fn clear(&mut self) {
        self.order.clear();
    }

    /// Residents from the first to be evicted to the last.
    pub fn victims(&self) -> impl Iterator<Item = (ContentKey, Rank)> + '_ {
        self.order.iter().map(|&(frequency, last_access, key)| {
            (
                key,
                Rank {
                    frequency,
                    last_access,
                },
            )
        })
    }
}

/// Whether making room for a candidate frees down to the low watermark, or only what the
/// candidate needs. A read frees only its own room: the room beyond it would go to the next
/// files read, which get in without competing, so one candidate that wins (truly hot, or
/// overcounted by a collision in the sketch) would let a tenth of the cache churn. A preload
/// frees down to the low watermark, since the room goes to the files it loads next.
pub fn frees_down_to_low(priority: Priority) -> bool {
    priority == Priority::Preload
}

/// Whether a candidate with `candidate_frequency` (its count including the access that made
/// it a candidate) may displace a resident ranked `victim`.
pub fn displaces(priority: Priority, candidate_frequency: u32, victim: Rank) -> bool {
    match priority {
        // Ties keep the resident: in cyclic scans everything ties, and keeping the incumbents
        // is what makes the cache hit at all. The candidate's own current access does not count.
        Priority::Access => candidate_frequency > victim.frequency + 1,
        Priority::Preload => victim.frequency < PRELOAD_FREQUENCY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> ContentKey {
        ContentKey(u128::from(xxhash_rust::xxh3::xxh3_64(&n.to_le_bytes())) * 0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn sketch_counts_and_ages() {
        let mut sketch = Sketch::new(10);
        for _ in 0..5 {
            sketch.increment(key(1));
        }
        sketch.increment(key(2));
        assert_eq!(sketch.estimate(key(1)), 5);
        assert_eq!(sketch.estimate(key(2)), 1);
        assert_eq!(sketch.estimate(key(3)), 0);
        // Age by counting other keys until the period passes.
        let mut aged = false;
        for n in 0..(1u64 << 13) {
            aged |= sketch.increment(key(1000 + n));
            if aged {
                break;
            }
        }
        assert!(aged);
        assert!(sketch.estimate(key(1)) <= 3);
    }

    #[test]
    fn eviction_order_is_lfu_then_lru() {
        let mut order = EvictionOrder::default();
        let rank = |frequency, last_access| Rank {
            frequency,
            last_access,
        };
        order.insert(key(1), rank(3, 1));
        order.insert(key(2), rank(1, 5));
        order.insert(key(3), rank(1, 2));
        let victims: Vec<_> = order.victims().map(|(k, _)| k).collect();
        assert_eq!(victims, [key(3), key(2), key(1)]);
        order.remove(key(3), rank(1, 2));
        assert_eq!(order.victims().next().map(|(k, _)| k), Some(key(2)));
    }

    #[test]
    fn ties_keep_the_resident() {
        let resident = Rank {
            frequency: 3,
            last_access: 0,
        };
        // Epoch 4 of a cyclic scan: the candidate was seen 3 times before plus now.
        assert!(!displaces(Priority::Access, 4, resident));
        assert!(displaces(Priority::Access, 5, resident));
        assert!(!displaces(Priority::Preload, 0, resident));
        assert!(displaces(
            Priority::Preload,
            0,
            Rank {
                frequency: 1,
                last_access: 9
            }
        ));
    }
}
