//! Latency of every request a volume sends to its source, as Prometheus histograms.
//!
//! [`Timed`] wraps any [`Source`] and times each call it forwards; [`crate::source::open`]
//! wraps every source it opens, so the NFS and directory sources need no code of their own.
//! Each wrapped source registers its [`SourceTimings`] in a process-wide list that the
//! metrics endpoint reads; an entry goes away with the last volume that used it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::source::{
    Attr, DirEntry, FileWriter, Handle, Landing, Owner, Result, SetAttr, Source, SourceError,
    SourceWrite,
};

/// Upper bounds of the histogram buckets, in seconds: from a local directory's sub-millisecond
/// calls to an NFS server at the end of a slow link (the default source timeout is 30 s).
pub const BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// A latency histogram: counts per bucket (not cumulative; rendering accumulates), the sum in
/// nanoseconds, and the count. Lock-free: recording is three atomic additions.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    /// Observations above the last bucket.
    overflow: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A copy of a histogram's counters, mergeable across sources with the same id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts per bucket of [`BUCKETS`] (`le` semantics).
    pub cumulative: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        match BUCKETS.iter().position(|&bound| seconds <= bound) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut out = HistogramSnapshot::default();
        let mut running = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            running += bucket.load(Ordering::Relaxed);
            out.cumulative[i] = running;
        }
        out.count = running + self.overflow.load(Ordering::Relaxed);
        out.sum_seconds = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        out
    }
}

impl HistogramSnapshot {
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (mine, theirs) in self.cumulative.iter_mut().zip(other.cumulative) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_seconds += other.sum_seconds;
    }
}

/// The kinds of source requests, each with its own histogram (the `op` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Root,
    Lookup,
    Getattr,
    ReadDir,
    Read,
    ReadLink,
    Write,
    Commit,
    Create,
    Mkdir,
    Symlink,
    Remove,
    Rmdir,
    Rename,
    Setattr,
}

impl Op {
    pub const ALL: [Op; 15] = [
        Op::Root,
        Op::Lookup,
        Op::Getattr,
        Op::ReadDir,
        Op::Read,
        Op::ReadLink,
        Op::Write,
        Op::Commit,
        Op::Create,
        Op::Mkdir,
        Op::Symlink,
        Op::Remove,
        Op::Rmdir,
        Op::Rename,
        Op::Setattr,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Op::Root => "root",
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::ReadDir => "readdir",
            Op::Read => "read",
            Op::ReadLink => "readlink",
            Op::Write => "write",
            Op::Commit => "commit",
            Op::Create => "create",
            Op::Mkdir => "mkdir",
            Op::Symlink => "symlink",
            Op::Remove => "remove",
            Op::Rmdir => "rmdir",
            Op::Rename => "rename",
            Op::Setattr => "setattr",
        }
    }
}

/// The histograms of one opened source.
pub struct SourceTimings {
    source: String,
    ops: [Histogram; Op::ALL.len()],
}

impl SourceTimings {
    fn histogram(&self, op: Op) -> &Histogram {
        &self.ops[op as usize]
    }
}

/// Every live source's timings (weak: a source that is dropped leaves the list at the next
/// snapshot).
static REGISTRY: LazyLock<Mutex<Vec<Weak<SourceTimings>>>> = LazyLock::new(Mutex::default);

/// The latency histograms of every source in use, merged by source id, in a stable order:
/// `(source id, [(op, histogram)])`, ops without requests left out.
pub fn snapshot() -> Vec<(String, Vec<(Op, HistogramSnapshot)>)> {
    let live: Vec<Arc<SourceTimings>> = {
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry.retain(|w| w.strong_count() > 0);
        registry.iter().filter_map(Weak::upgrade).collect()
    };
    let mut merged: std::collections::BTreeMap<String, Vec<HistogramSnapshot>> = Default::default();
    for timings in live {
        let entry = merged
            .entry(timings.source.clone())
            .or_insert_with(|| vec![HistogramSnapshot::default(); Op::ALL.len()]);
        for op in Op::ALL {
            entry[op as usize].merge(&timings.histogram(op).snapshot());
        }
    }
    merged
        .into_iter()
        .map(|(source, histograms)| {
            let ops = Op::ALL
                .into_iter()
                .zip(histograms)
                .filter(|(_, h)| h.count > 0)
                .collect();
            (source, ops)
        })
        .collect()
}

/// A source whose every request is timed.
pub struct Timed {
    inner: Arc<dyn Source>,
    timings: Arc<SourceTimings>,
}

impl Timed {
    /// Wraps `inner` and registers its histograms.
    pub fn wrap(inner: Arc<dyn Source>) -> Arc<dyn Source> {
        let timings = Arc::new(SourceTimings {
            source: inner.id().to_string(),
            ops: Default::default(),
        });
        REGISTRY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&timings));
        Arc::new(Timed { inner, timings })
    }

    async fn timed<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, SourceError> {
        let started = Instant::now();
        let result = call.await;
        self.timings.histogram(op).observe(started.elapsed());
        result
    }
}

#[async_trait]
impl Source for Timed {
    fn id(&self) -> &str {
        self.inner.id()
    }

    async fn root(&self) -> Result<(Handle, Attr)> {
        self.timed(Op::Root, self.inner.root()).await
    }

    async fn lookup(&self, dir: &Handle, name: &[u8]) -> Result<(Handle, Attr)> {
        self.timed(Op::Lookup, self.inner.lookup(dir, name)).await
    }

    async fn getattr(&self, node: &Handle) -> Result<Attr> {
        self.timed(Op::Getattr, self.inner.getattr(node)).await
    }

    async fn read_dir(&self, dir: &Handle) -> Result<Vec<DirEntry>> {
        self.timed(Op::ReadDir, self.inner.read_dir(dir)).await
    }

    async fn read(&self, file: &Handle, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.timed(Op::Read, self.inner.read(file, offset, len))
            .await
    }

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>> {
        self.timed(Op::ReadLink, self.inner.read_link(link)).await
    }
}

#[async_trait]
impl SourceWrite for Timed {
    async fn write(&self, file: &Handle, offset: u64, data: &[u8]) -> Result<Option<Attr>> {
        self.timed(Op::Write, self.inner.write(file, offset, data))
            .await
    }

    // The time until the request is sent; its landing is the caller's to wait for.
    async fn write_sent(&self, file: &Handle, offset: u64, data: Vec<u8>) -> Result<Landing> {
        self.timed(Op::Write, self.inner.write_sent(file, offset, data))
            .await
    }

    async fn open_writer(&self, file: &Handle) -> Result<Option<Arc<dyn FileWriter>>> {
        self.inner.open_writer(file).await
    }

    fn open_passthrough(&self, file: &Handle) -> Option<Result<OwnedFd>> {
        self.inner.open_passthrough(file)
    }

    async fn commit(&self, file: &Handle) -> Result<()> {
        self.timed(Op::Commit, self.inner.commit(file)).await
    }

    async fn create(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Handle, Attr)> {
        self.timed(
            Op::Create,
            self.inner.create(dir, name, mode, owner, exclusive),
        )
        .await
    }

    async fn mkdir(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        self.timed(Op::Mkdir, self.inner.mkdir(dir, name, mode, owner))
            .await
    }

    async fn symlink(
        &self,
        dir: &Handle,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        self.timed(Op::Symlink, self.inner.symlink(dir, name, target, owner))
            .await
    }

    async fn remove(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        self.timed(Op::Remove, self.inner.remove(dir, name)).await
    }

    async fn rmdir(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        self.timed(Op::Rmdir, self.inner.rmdir(dir, name)).await
    }

    async fn rename(
        &self,
        from_dir: &Handle,
        from: &[u8],
        to_dir: &Handle,
        to: &[u8],
    ) -> Result<()> {
        self.timed(Op::Rename, self.inner.rename(from_dir, from, to_dir, to))
            .await
    }

    async fn setattr(&self, node: &Handle, changes: &SetAttr) -> Result<Attr> {
        self.timed(Op::Setattr, self.inner.setattr(node, changes))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_accumulate_and_overflow_counts() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50)); // <= 0.0001
        h.observe(Duration::from_millis(3)); // <= 0.005
        h.observe(Duration::from_secs(60)); // above every bucket
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], 1);
        let le_5ms = BUCKETS.iter().position(|&b| b == 0.005).unwrap();
        assert_eq!(s.cumulative[le_5ms - 1], 1);
        assert_eq!(s.cumulative[le_5ms], 2);
        assert_eq!(*s.cumulative.last().unwrap(), 2);
        assert!((s.sum_seconds - 60.00305).abs() < 1e-6, "{}", s.sum_seconds);
        let mut merged = s.clone();
        merged.merge(&s);
        assert_eq!(merged.count, 6);
        assert_eq!(merged.cumulative[0], 2);
    }

    #[test]
    fn ops_index_their_own_histograms() {
        for (i, op) in Op::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i, "{op:?}");
        }
    }
}
