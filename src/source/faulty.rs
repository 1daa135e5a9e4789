//! A [`Source`] wrapper for tests that fails and delays calls at random, from a seeded RNG, so
//! that a failure found by a property test replays from its seed.
//!
//! A failure is injected *before* the call is forwarded: a failed call never reached the
//! source, so a test's model of the source stays exact (a change either happened and was
//! answered `Ok`, or did not happen). The kinds injected are the ones callers treat
//! differently: an error the source answered with (`EIO`), a timeout and an unreachable
//! source (both of which let the file system serve what it knows).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Attr, DirEntry, FileWriter, Handle, Landing, Owner, Result, SetAttr, Source, SourceError,
    SourceWrite,
};

/// How often and how badly a [`FaultySource`] misbehaves.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Out of 1000 calls, how many fail.
    pub errors_per_mille: u32,
    /// Out of 1000 calls, how many are delayed (by up to `max_delay`).
    pub delays_per_mille: u32,
    pub max_delay: Duration,
}

pub struct FaultySource {
    inner: Arc<dyn Source>,
    faults: Faults,
    rng: Mutex<fastrand::Rng>,
    /// Off: every call is forwarded as it is (a test's set-up and final checks).
    enabled: AtomicBool,
    injected: AtomicU64,
}

impl FaultySource {
    pub fn wrap(inner: Arc<dyn Source>, faults: Faults, seed: u64) -> Arc<FaultySource> {
        Arc::new(FaultySource {
            inner,
            faults,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            enabled: AtomicBool::new(true),
            injected: AtomicU64::new(0),
        })
    }

    /// Failures injected so far: a test compares it before and after an operation to know
    /// whether an error it got may be an injected one.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::SeqCst);
    }

    /// Draws this call's fate: `Err` to fail it, otherwise a delay (possibly zero) to wait.
    fn draw(&self, op: &'static str) -> Result<Duration> {
        if !self.enabled.load(Ordering::SeqCst) {
            return Ok(Duration::ZERO);
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        if rng.u32(0..1000) < self.faults.errors_per_mille {
            self.injected.fetch_add(1, Ordering::SeqCst);
            let name = self.inner.id().to_string();
            return Err(match rng.u8(0..3) {
                0 => SourceError::status(op, libc::EIO, "injected failure"),
                1 => SourceError::Timeout {
                    op,
                    source_name: name,
                    after: Duration::from_millis(1),
                },
                _ => SourceError::Unavailable {
                    source_name: name,
                    message: "injected: unreachable".into(),
                    cause: None,
                },
            });
        }
        if rng.u32(0..1000) < self.faults.delays_per_mille {
            let max = self.faults.max_delay.as_micros() as u64;
            return Ok(Duration::from_micros(rng.u64(0..=max)));
        }
        Ok(Duration::ZERO)
    }

    async fn fault(&self, op: &'static str) -> Result<()> {
        let delay = self.draw(op)?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Source for FaultySource {
    fn id(&self) -> &str {
        self.inner.id()
    }

    async fn root(&self) -> Result<(Handle, Attr)> {
        self.fault("root").await?;
        self.inner.root().await
    }

    async fn lookup(&self, dir: &Handle, name: &[u8]) -> Result<(Handle, Attr)> {
        self.fault("lookup").await?;
        self.inner.lookup(dir, name).await
    }

    async fn getattr(&self, node: &Handle) -> Result<Attr> {
        self.fault("getattr").await?;
        self.inner.getattr(node).await
    }

    async fn read_dir(&self, dir: &Handle) -> Result<Vec<DirEntry>> {
        self.fault("readdir").await?;
        self.inner.read_dir(dir).await
    }

    async fn read(&self, file: &Handle, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.fault("read").await?;
        self.inner.read(file, offset, len).await
    }

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>> {
        self.fault("readlink").await?;
        self.inner.read_link(link).await
    }
}

#[async_trait]
impl SourceWrite for FaultySource {
    async fn write(&self, file: &Handle, offset: u64, data: &[u8]) -> Result<Option<Attr>> {
        self.fault("write").await?;
        self.inner.write(file, offset, data).await
    }

    async fn write_sent(&self, file: &Handle, offset: u64, data: Vec<u8>) -> Result<Landing> {
        self.fault("write").await?;
        self.inner.write_sent(file, offset, data).await
    }

    async fn open_writer(&self, file: &Handle) -> Result<Option<Arc<dyn FileWriter>>> {
        self.fault("open").await?;
        self.inner.open_writer(file).await
    }

    fn open_passthrough(&self, file: &Handle) -> Option<Result<OwnedFd>> {
        if let Err(e) = self.draw("open") {
            return Some(Err(e));
        }
        self.inner.open_passthrough(file)
    }

    async fn commit(&self, file: &Handle) -> Result<()> {
        self.fault("commit").await?;
        self.inner.commit(file).await
    }

    async fn create(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Handle, Attr)> {
        self.fault("create").await?;
        self.inner.create(dir, name, mode, owner, exclusive).await
    }

    async fn mkdir(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        self.fault("mkdir").await?;
        self.inner.mkdir(dir, name, mode, owner).await
    }

    async fn symlink(
        &self,
        dir: &Handle,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        self.fault("symlink").await?;
        self.inner.symlink(dir, name, target, owner).await
    }

    async fn remove(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        self.fault("remove").await?;
        self.inner.remove(dir, name).await
    }

    async fn rmdir(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        self.fault("rmdir").await?;
        self.inner.rmdir(dir, name).await
    }

    async fn rename(
        &self,
        from_dir: &Handle,
        from: &[u8],
        to_dir: &Handle,
        to: &[u8],
    ) -> Result<()> {
        self.fault("rename").await?;
        self.inner.rename(from_dir, from, to_dir, to).await
    }

    async fn setattr(&self, node: &Handle, changes: &SetAttr) -> Result<Attr> {
        self.fault("setattr").await?;
        self.inner.setattr(node, changes).await
    }
}
