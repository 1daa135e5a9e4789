//! Ownership and quotas: each cached file is charged to the volume that admitted it, a volume
//! may be held to a quota inside the node's capacity, and admission makes room by evicting
//! first among the owner's own files, then among everyone's.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::blocks::Tally;
use super::index::{Index, IndexRecord, budget};
use super::policy::{self, EvictionOrder, Priority, Rank};
use super::{Cache, ContentKey};

/// Who admitted a cache entry: a hash of the volume's name, persisted with the entry.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OwnerTag(pub u64);

impl OwnerTag {
    /// The cache's own owner: a `reservoir mount`, and entries written before owners existed.
    pub const DEFAULT: OwnerTag = OwnerTag(0);

    /// The tag of the owner called `name` (a volume id).
    pub fn of(name: &str) -> OwnerTag {
        match xxh3_64(name.as_bytes()) {
            0 => OwnerTag(1),
            hash => OwnerTag(hash),
        }
    }
}

impl fmt::Display for OwnerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for OwnerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerTag({self})")
    }
}

/// How much of the node's cache one owner (a volume) may hold: its files' disk budgets, not
/// counting the shared overhead (directories, index, metadata journals).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub bytes: u64,
    /// Fraction of `bytes` at which the owner's own files start being evicted.
    pub high_watermark: f64,
    /// Fraction of `bytes` down to which they are evicted.
    pub low_watermark: f64,
}

impl Quota {
    pub(super) fn high(&self) -> u64 {
        (self.bytes as f64 * self.high_watermark) as u64
    }

    fn low(&self) -> u64 {
        (self.bytes as f64 * self.low_watermark) as u64
    }
}

/// One owner's share of the cache.
#[derive(Default)]
pub(super) struct OwnerState {
    /// The name given by the live view(s); `None` for files whose owner is not mounted.
    pub name: Option<String>,
    pub quota: Option<Quota>,
    /// Live views ([`Cache::for_owner`]); the owner's files may be adopted by others at 0.
    pub views: usize,
    /// Sum of the budgets of the owner's files.
    pub used: u64,
    pub files: u64,
    /// Bytes present and files complete, kept by the files' blocks.
    pub tally: Arc<Tally>,
    pub order: EvictionOrder,
    pub admitted: u64,
    pub rejected: u64,
    pub evicted_files: u64,
    pub evicted_bytes: u64,
}

/// One owner's part of the cache, for status reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OwnerUsage {
    /// The volume's name; `None` for files whose volume is not mounted.
    pub name: Option<String>,
    pub tag: String,
    /// The owner's quota in bytes (`None`: only the node's capacity bounds it).
    pub quota: Option<u64>,
    /// Disk budgets of the owner's files (what counts against the quota).
    pub used: u64,
    /// Bytes of the owner's file data present.
    pub data_bytes: u64,
    pub files: u64,
    pub complete_files: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub evicted_files: u64,
    pub evicted_bytes: u64,
}

impl Index {
    pub fn owner_mut(&mut self, owner: OwnerTag) -> &mut OwnerState {
        self.owners.entry(owner).or_default()
    }

    /// Adds a file to its owner's books (not to `files`).
    pub fn charge(&mut self, key: ContentKey, owner: OwnerTag, budget: u64, rank: Rank) {
        let state = self.owner_mut(owner);
        state.used += budget;
        state.files += 1;
        state.order.insert(key, rank);
    }

    /// Removes a file from its owner's books.
    pub fn discharge(&mut self, key: ContentKey, owner: OwnerTag, budget: u64, rank: Rank) {
        if let Some(state) = self.owners.get_mut(&owner) {
            state.used -= budget;
            state.files -= 1;
            state.order.remove(key, rank);
            if state.files == 0 && state.views == 0 && owner != OwnerTag::DEFAULT {
                self.owners.remove(&owner);
            }
        }
    }

    pub fn rerank(&mut self, key: ContentKey, rank: Rank) {
        let Some(file) = self.files.get_mut(&key) else {
            return;
        };
        let old = std::mem::replace(&mut file.rank, rank);
        if let Some(owner) = self.owners.get_mut(&file.owner) {
            owner.order.remove(key, old);
            owner.order.insert(key, rank);
        }
    }

    /// Residents of every owner, from the first to be evicted to the last (a merge of the
    /// owners' orders, which are few).
    pub(super) fn victims(&self) -> impl Iterator<Item = (ContentKey, Rank)> + '_ {
        let mut heads: Vec<_> = self
            .owners
            .values()
            .map(|o| o.order.victims().peekable())
            .collect();
        std::iter::from_fn(move || {
            let best = heads
                .iter_mut()
                .enumerate()
                .filter_map(|(i, it)| {
                    it.peek()
                        .map(|(key, rank)| ((rank.frequency, rank.last_access, *key), i))
                })
                .min()?
                .1;
            heads[best].next()
        })
    }

    /// The report of one owner: counters and tallies, no walk over the files.
    pub fn owner_usage(&self, tag: OwnerTag) -> Option<OwnerUsage> {
        let owner = self.owners.get(&tag)?;
        Some(OwnerUsage {
            name: owner.name.clone(),
            tag: tag.to_string(),
            quota: owner.quota.map(|q| q.bytes),
            used: owner.used,
            data_bytes: owner.tally.present_bytes.load(Ordering::Relaxed),
            files: owner.files,
            complete_files: owner.tally.complete_files.load(Ordering::Relaxed),
            admitted: owner.admitted,
            rejected: owner.rejected,
            evicted_files: owner.evicted_files,
            evicted_bytes: owner.evicted_bytes,
        })
    }
}

impl Cache {
    /// Takes over a file whose owner has no live view (its volume was unmounted), if it fits
    /// in this owner's quota. A file whose owner is mounted stays with it: the first admitter
    /// is charged, and others read it for free.
    pub(super) fn adopt_locked(&self, index: &mut Index, key: ContentKey) {
        let Some(file) = index.files.get(&key) else {
            return;
        };
        let (from, budget, rank, generation) =
            (file.owner, file.budget, file.rank, file.generation);
        if from == self.owner || index.owners.get(&from).is_some_and(|o| o.views > 0) {
            return;
        }
        let to = index.owner_mut(self.owner);
        if to.quota.is_some_and(|q| to.used + budget > q.high()) {
            return;
        }
        let tally = to.tally.clone();
        index.discharge(key, from, budget, rank);
        index.charge(key, self.owner, budget, rank);
        if let Some(file) = index.files.get_mut(&key) {
            file.owner = self.owner;
            file.blocks.lock().move_to(tally);
        }
        if let Err(e) = self.node.journal.append(&IndexRecord::Owned {
            key,
            generation,
            owner: self.owner,
        }) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot record a change of owner"
            );
        }
    }

    /// Decides whether a file of `size` gets in, evicting what must go to make room: first
    /// among the owner's own files if it would go over its quota, then among everyone's if the
    /// node would go over its capacity. Nothing is evicted unless both limits can be met.
    pub(super) fn make_room_locked(
        &self,
        index: &mut Index,
        key: ContentKey,
        size: u64,
        priority: Priority,
    ) -> bool {
        let node = &*self.node;
        let need = budget(size);
        let candidate = index.sketch.estimate(key);
        let mut victims = Vec::new();

        // The owner's quota.
        let mut freed_by_owner = 0u64;
        index.owner_mut(self.owner);
        let owner = &index.owners[&self.owner];
        if let Some(quota) = owner.quota {
            if need > quota.low() {
                return false;
            }
            if owner.used + need > quota.high() {
                let must_free = owner.used + need - quota.high();
                let would_free = if policy::frees_down_to_low(priority) {
                    owner.used + need - quota.low()
                } else {
                    must_free
                };
                for (victim, rank) in owner.order.victims() {
                    if freed_by_owner >= would_free || !policy::displaces(priority, candidate, rank)
                    {
                        break;
                    }
                    if let Some(file) = index.files.get(&victim) {
                        freed_by_owner += file.budget;
                        victims.push(victim);
                    }
                }
                if freed_by_owner < must_free {
                    return false;
                }
            }
        }

        // The node's capacity.
        let capacity = node.config.capacity;
        let high = (capacity as f64 * node.config.high_watermark) as u64;
        let low = (capacity as f64 * node.config.low_watermark) as u64;
        let overhead = node.overhead_bytes();
        if overhead + need > low {
            return false;
        }
        let used = overhead + index.data_bytes - freed_by_owner;
        if used + need > high {
            let must_free = used + need - high;
            let would_free = if policy::frees_down_to_low(priority) {
                used + need - low
            } else {
                must_free
            };
            let chosen: HashSet<ContentKey> = victims.iter().copied().collect();
            let mut freed = 0u64;
            for (victim, rank) in index.victims() {
                if chosen.contains(&victim) {
                    continue;
                }
                if freed >= would_free || !policy::displaces(priority, candidate, rank) {
                    break;
                }
                if let Some(file) = index.files.get(&victim) {
                    freed += file.budget;
                    victims.push(victim);
                }
            }
            if freed < must_free {
                return false;
            }
        }
        for victim in victims {
            node.evict_locked(index, victim);
        }
        true
    }
}
