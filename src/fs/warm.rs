//! Preloading: walks trees of a volume and fetches every file into the cache, in parallel,
//! keeping an exact account (loaded, already cached, failed with the reason) that status
//! reports show while it runs. Files already complete are skipped, so a second run resumes
//! where an interrupted one stopped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::meta::{Ino, ListedEntry, ROOT};
use super::{FsError, NodeEntry, Result, Volume, content_key};
use crate::cache::policy::Priority;
use crate::error::Chain;
use crate::source::Kind;

/// Directories listed at once while walking.
const PARALLEL_LISTINGS: usize = 8;
/// Blocks of one file fetched at once.
const BLOCKS_PER_FILE: usize = 4;
/// Failures kept with their paths (the count stays exact beyond it).
const MAX_REPORTED_FAILURES: usize = 10_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub paths: Vec<String>,
    /// Still discovering files: totals may grow.
    pub scanning: bool,
    pub done: bool,
    pub files_total: u64,
    pub bytes_total: u64,
    /// Files fetched by this preload, and the bytes fetched for them.
    pub files_loaded: u64,
    pub bytes_loaded: u64,
    /// Files (and bytes) found already in the cache.
    pub files_cached: u64,
    pub bytes_cached: u64,
    pub files_failed: u64,
    /// `(path, reason)` of failures, the first [`MAX_REPORTED_FAILURES`].
    pub failures: Vec<(String, String)>,
    pub elapsed_ms: u64,
}

impl Progress {
    /// Files accounted for so far (loaded, cached or failed).
    pub fn files_done(&self) -> u64 {
        self.files_loaded + self.files_cached + self.files_failed
    }
}

/// Shared progress of one running preload.
pub struct Tracker {
    started: Instant,
    progress: Mutex<Progress>,
}

impl Tracker {
    fn new(paths: Vec<String>) -> Self {
        Tracker {
            started: Instant::now(),
            progress: Mutex::new(Progress {
                paths,
                scanning: true,
                ..Progress::default()
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn fail(&self, path: &str, error: impl std::fmt::Display) {
        tracing::debug!(path, %error, "preload failed");
        self.update(|p| {
            p.files_failed += 1;
            if p.failures.len() < MAX_REPORTED_FAILURES {
                p.failures.push((path.to_string(), error.to_string()));
            }
        });
    }

    pub fn snapshot(&self) -> Progress {
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        progress
    }
}

/// What one preload is asked to do.
pub struct PreloadRequest {
    /// Paths relative to the volume root (`""` or `/` for all of it).
    pub paths: Vec<String>,
    /// Files fetched at once.
    pub parallel: usize,
}

impl Volume {
    /// Starts a preload in the background and returns its tracker. Status reports show the
    /// latest one.
    pub fn start_warm(self: &Arc<Self>, request: PreloadRequest) -> Arc<Tracker> {
        let tracker = Arc::new(Tracker::new(request.paths.clone()));
        *self.preload.lock().unwrap_or_else(|p| p.into_inner()) = Some(tracker.clone());
        let volume = self.clone();
        let running = tracker.clone();
        self.runtime.spawn(async move {
            volume.warm(request, &running).await;
            running.update(|p| {
                p.scanning = false;
                p.done = true;
            });
        });
        tracker
    }

    async fn warm(self: &Arc<Self>, request: PreloadRequest, tracker: &Arc<Tracker>) {
        let parallel = request.parallel.clamp(1, 256);
        let (files_tx, files_rx) = tokio::sync::mpsc::channel::<(Ino, String)>(parallel * 4);
        let files_rx = Arc::new(tokio::sync::Mutex::new(files_rx));
        let mut workers = JoinSet::new();
        for _ in 0..parallel {
            let (volume, tracker, files_rx) = (self.clone(), tracker.clone(), files_rx.clone());
            workers.spawn(async move {
                loop {
                    let next = files_rx.lock().await.recv().await;
                    let Some((ino, path)) = next else { break };
                    volume.warm_file(ino, &path, &tracker).await;
                    volume.release_node(ino);
                }
            });
        }

        let mut pending: VecDeque<(Ino, String)> = VecDeque::new();
        for path in &request.paths {
            let trimmed = path.trim_matches('/');
            // Every node queued holds a reference, so that the namespace cache cannot evict it
            // before it is loaded or listed; released when done.
            match self.resolve(trimmed.as_bytes()).await {
                Ok(entry) => match entry.attr.kind {
                    Kind::Directory => pending.push_back((entry.ino, trimmed.to_string())),
                    Kind::File => {
                        self.count_file(tracker, entry.attr.size);
                        if let Err(unsent) = files_tx.send((entry.ino, trimmed.to_string())).await {
                            self.release_node(unsent.0.0);
                            break;
                        }
                    }
                    _ => {
                        self.release_node(entry.ino);
                        tracker.fail(path, "not a regular file or directory")
                    }
                },
                Err(e) => tracker.fail(path, Chain(&e)),
            }
        }
        let mut listings = JoinSet::new();
        while !pending.is_empty() || !listings.is_empty() {
            while listings.len() < PARALLEL_LISTINGS {
                let Some((dir, path)) = pending.pop_front() else {
                    break;
                };
                let volume = self.clone();
                listings.spawn(async move {
                    let listing = volume.list(dir).await;
                    volume.release_node(dir);
                    (listing, path, dir)
                });
            }
            let Some(Ok((listing, dir_path, dir))) = listings.join_next().await else {
                continue;
            };
            let entries = match listing {
                Ok(entries) => entries,
                Err(e) => {
                    tracker.fail(&dir_path, Chain(&e));
                    continue;
                }
            };
            for entry in entries {
                let name = String::from_utf8_lossy(&entry.name);
                let path = if dir_path.is_empty() {
                    name.into_owned()
                } else {
                    format!("{dir_path}/{name}")
                };
                if !matches!(entry.kind, Kind::Directory | Kind::File) {
                    // Symlinks are not followed; special files hold no data.
                    continue;
                }
                let held = match self.hold(dir, &entry).await {
                    Ok(held) => held,
                    Err(e) => {
                        tracker.fail(&path, Chain(&e));
                        continue;
                    }
                };
                if held.attr.kind == Kind::Directory {
                    pending.push_back((held.ino, path));
                    continue;
                }
                self.count_file(tracker, held.attr.size);
                if let Err(unsent) = files_tx.send((held.ino, path)).await {
                    self.release_node(unsent.0.0);
                    return;
                }
            }
        }
        tracker.update(|p| p.scanning = false);
        drop(files_tx);
        while workers.join_next().await.is_some() {}
    }

    /// A reference to a listed entry for the preload: the node listed, or, if the namespace
    /// cache evicted it since, the name looked up again.
    async fn hold(&self, dir: Ino, entry: &ListedEntry) -> Result<NodeEntry> {
        if let Some(held) = self.referenced_known_entry(entry.ino) {
            return Ok(held);
        }
        self.lookup(dir, &entry.name).await
    }

    /// Releases a reference [`Volume::hold`] or [`Volume::resolve`] took.
    fn release_node(&self, ino: Ino) {
        if ino != ROOT {
            self.forget(ino, 1);
        }
    }

    fn count_file(&self, tracker: &Tracker, size: u64) {
        tracker.update(|p| {
            p.files_total += 1;
            p.bytes_total += size;
        });
    }

    async fn warm_file(self: &Arc<Self>, ino: Ino, path: &str, tracker: &Tracker) {
        let Some(cache) = self.cache.clone() else {
            tracker.fail(path, "this mount has no cache (--no-cache)");
            return;
        };
        // Revalidate like an open would, so that what is loaded is the current version.
        let entry = match self.getattr(ino).await {
            Ok(entry) => entry,
            Err(e) => return tracker.fail(path, Chain(&e)),
        };
        let Some(handle) = self.meta.with(ino, |n| n.handle.clone()) else {
            return tracker.fail(path, FsError::unknown_inode(ino));
        };
        if self.has_writers(ino) {
            return tracker.fail(path, "being written through this volume");
        }
        let size = entry.attr.size;
        let key = content_key(&self.source_id, &handle, &entry.attr);
        if cache.contains_complete(key, size) {
            tracker.update(|p| {
                p.files_cached += 1;
                p.bytes_cached += size;
            });
            return;
        }
        let lease = match cache.lease(key, size, Priority::Preload) {
            Ok(Some(lease)) => Arc::new(lease),
            Ok(None) => return tracker.fail(path, "not cached: the cache is full of files in use"),
            Err(e) => return tracker.fail(path, Chain(&e)),
        };
        let file = super::OpenFile {
            ino,
            handle,
            size,
            key,
            lease: Some(lease.clone()),
            passthrough_ready: false,
            keep_cache: false,
            writable: false,
            opened_epoch: self.write_epoch.load(std::sync::atomic::Ordering::Acquire),
            readahead: Mutex::default(),
            writes: Default::default(),
        };
        let missing = cache.missing_blocks(&lease, 0, lease.block_count().saturating_sub(1));
        let already = size
            - missing
                .iter()
                .map(|&b| lease.block_range(b).1 as u64)
                .sum::<u64>();
        let mut fetches = futures_util::stream::iter(missing)
            .map(|block| self.block(&file, &lease, block, true))
            .buffer_unordered(BLOCKS_PER_FILE);
        let mut failure = None;
        while let Some(result) = fetches.next().await {
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
        }
        drop(fetches);
        if let Some(e) = failure {
            return tracker.fail(path, Chain(&e));
        }
        if size > 0 && !cache.is_complete(&lease) {
            return tracker.fail(
                path,
                "evicted while loading: the cache is too small for this preload",
            );
        }
        tracker.update(|p| {
            p.files_loaded += 1;
            p.bytes_loaded += size - already;
            p.bytes_cached += already;
        });
    }
}
