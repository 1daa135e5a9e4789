//! The node's cache daemon (`reservoir daemon`): one process that owns the node's cache and
//! hosts one FUSE session per volume, driven through a control socket (see [`crate::control`]
//! for the protocol and [`Client`] for the typed client the CSI node service uses).
//!
//! Each volume is a [`Volume`] over its source, seen through its own owner's view of the shared
//! cache (so that its quota holds inside the node-wide capacity), mounted by a FUSE session
//! whose request loop runs on its own thread. A volume also has its own small async runtime:
//! everything it starts in the background (source requests, readahead, preloads, reconnects)
//! runs there, so unmounting it stops all of that at once, and a volume whose source hangs
//! cannot starve the others.
//!
//! Operations are idempotent and may run concurrently. The registry of volumes records each
//! one's phase (mounting, mounted, unmounting); a request that finds its volume (or its target)
//! in the middle of a change waits for the change to finish, then decides.
//!
//! Nothing but the cache outlives the daemon: its volumes are unmounted when it stops
//! (SIGTERM), and a daemon that crashed leaves dead mounts that the next `unmount` (or a
//! `mount` at the same path) clears.

mod client;
mod session;
mod spec;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::cache::{Cache, CacheConfig, CacheError};
use crate::control::{
    self, ControlRequest, DaemonStatus, DaemonVolume, MountRequest, PendingVolume, Refusal,
    RefusalKind, Response,
};
use crate::fs::fuse::{self as fuse_adapter, MountConfig, Served, SessionLogs};
use crate::fs::meta::now_ms;
use crate::fs::warm::PreloadRequest;
use crate::fs::{Volume, VolumeConfig};
use crate::fuse::{Channel, Connection, Session};
use crate::keeper;
use crate::mountpoint::{check_mountpoint, mount_at, set_read_ahead, unmount_or_detach};
use crate::source::SourceOptions;
pub use session::{SessionDir, SessionRecord};

pub use client::{Client, ClientError, Mounted, SpawnOptions, Timeouts, ensure_running};
pub use spec::{BadRequest, VolumeSpec, target_path as normalize_target, volume_paths};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/reservoir/daemon.sock";
/// Worker threads of each volume's runtime.
const VOLUME_WORKERS: usize = 2;
/// How long an unmount waits for the kernel to end a FUSE session before aborting it.
const SESSION_END_WAIT: Duration = Duration::from_secs(10);
/// How long background work of an unmounted volume gets to stop.
const RUNTIME_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// How long SIGTERM waits for mounts and unmounts in progress.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// How long a daemon handing over lets the requests being served finish.
const HAND_OVER_WAIT: Duration = Duration::from_secs(5);
/// How long a new daemon waits for the previous one, killed or handing over, to finish
/// exiting (the cache lock is released only then); a daemon still holding it after this is a
/// running one, and the new daemon is refused.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(10);
/// How long a spawned keeper gets to answer.
const KEEPER_START_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the daemon")]
    Cache(#[from] CacheError),
    #[error(
        "cannot start the daemon: socket {path}: {cause} (is another reservoir daemon running? one daemon per socket and per cache directory)"
    )]
    Socket {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot start the daemon's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the daemon: state directory {path}: {cause}")]
    State {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Everything `reservoir daemon` needs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The node's cache: its size is the node-wide cap of all volumes together.
    pub cache: CacheConfig,
    pub socket: PathBuf,
    pub source_options: SourceOptions,
    /// Threads serving FUSE requests, per volume.
    pub threads: usize,
    pub passthrough: bool,
    /// Where each volume's connection is described for a successor (a tmpfs such as /run).
    pub state_dir: PathBuf,
    /// The descriptor keeper; `None`: volumes end with the daemon.
    pub keeper: Option<KeeperOptions>,
}

#[derive(Clone, Debug)]
pub struct KeeperOptions {
    pub socket: PathBuf,
    /// Start `reservoir keeper` when none answers (single-host use; in Kubernetes the keeper
    /// is its own DaemonSet).
    pub spawn: bool,
}

/// Runs the daemon until SIGTERM or SIGINT. First it takes over the volumes a previous daemon
/// served (their connections held by the keeper). At the end it hands every volume over to
/// its successor if the keeper holds them all, and otherwise unmounts them.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    // The cache lock first: a second daemon on the same cache directory is refused before it
    // touches the socket of the first, and a successor waits here until its predecessor has
    // fully exited (the kernel releases the lock only then), so that no request it had read is
    // served twice.
    let cache = open_cache_waiting(&config.cache)?;
    let socket_path = config.socket.clone();
    let socket_error = move |cause| DaemonError::Socket {
        path: socket_path.clone(),
        cause,
    };
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(socket_error(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "{} is served by another running process",
                config.socket.display()
            ),
        )));
    }
    // The sessions are this daemon's alone too: a daemon of another cache directory pointed
    // at the same state directory would otherwise serve the same connections.
    let _sessions_lock = lock_waiting(&config.state_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("reservoir-daemon")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let socket = config.socket.clone();
    let (ended_tx, ended_rx) = mpsc::unbounded_channel();
    let keeper = config.keeper.as_ref().map(|options| {
        if options.spawn {
            ensure_keeper(options);
        }
        keeper::KeeperClient::new(&options.socket)
    });
    let daemon = Arc::new(Daemon {
        cache,
        config,
        registry: Mutex::new(Registry::default()),
        changed: Notify::new(),
        shutting_down: AtomicBool::new(false),
        ended: ended_tx,
        keeper,
        lost: Mutex::new(Vec::new()),
    });
    runtime.block_on(daemon.resume_all());
    // Only now: a client that reaches the daemon finds every volume taken over.
    let listener = {
        let _guard = runtime.enter();
        control::bind(&socket).map_err(socket_error)?
    };
    if daemon.keeper.is_some() {
        let watched = daemon.clone();
        let _ = std::thread::Builder::new()
            .name("keeper-watch".into())
            .spawn(move || watched.watch_keeper());
    }
    tracing::info!(
        socket = %socket.display(),
        cache = %daemon.cache.config().dir.display(),
        capacity = daemon.cache.config().capacity,
        "daemon ready"
    );
    let reason = runtime.block_on(async {
        let server = tokio::spawn(serve(listener, daemon.clone()));
        let flusher = tokio::spawn(daemon.clone().flush_periodically());
        let reaper = tokio::spawn(daemon.clone().reap(ended_rx));
        let reason = wait_for_signal().await;
        server.abort();
        if daemon.all_kept() {
            tracing::info!(
                reason,
                "stopping: handing every volume over to the next daemon"
            );
            daemon.hand_over().await;
            let _ = std::fs::remove_file(&daemon.config.socket);
            // Nothing is torn down: the mounts stay, the keeper holds their connections, and
            // the next daemon serves them.
            std::process::exit(0);
        }
        tracing::info!(reason, "stopping: unmounting every volume");
        daemon.shutdown().await;
        flusher.abort();
        reaper.abort();
        reason
    });
    if let Err(e) = daemon.cache.flush(true) {
        tracing::warn!(error = %e, "cannot flush the cache index");
    }
    let _ = std::fs::remove_file(&socket);
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    tracing::info!(reason, "daemon stopped");
    Ok(())
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            tracing::warn!("cannot handle signals; the daemon will stop only when killed");
            std::future::pending().await
        }
    }
}

/// The daemon's state: the node's cache and its volumes.
pub struct Daemon {
    /// The default owner's view; each volume has its own view ([`Cache::for_owner`]).
    cache: Arc<Cache>,
    config: DaemonConfig,
    registry: Mutex<Registry>,
    /// Signalled whenever a volume changes phase.
    changed: Notify,
    shutting_down: AtomicBool,
    /// FUSE session threads report here when their session ends: `(volume id, generation)`.
    ended: mpsc::UnboundedSender<(String, u64)>,
    keeper: Option<keeper::KeeperClient>,
    /// Volumes a previous daemon served that could not be taken over, and why.
    lost: Mutex<Vec<control::LostVolume>>,
}

#[derive(Default)]
struct Registry {
    volumes: HashMap<String, Slot>,
    next_generation: u64,
}

struct Slot {
    spec: Arc<VolumeSpec>,
    /// Tells apart successive mounts of one volume id.
    generation: u64,
    phase: Phase,
}

enum Phase {
    Mounting,
    Mounted(Box<Hosted>),
    Unmounting,
}

/// A mounted volume: what serving it holds.
struct Hosted {
    target: PathBuf,
    volume: Arc<Volume>,
    runtime: tokio::runtime::Runtime,
    session: Session,
    /// The mount's device number, to abort its FUSE connection if it will not end.
    dev: Option<u64>,
    /// Where the connection is described for a successor.
    state: SessionDir,
    record: SessionRecord,
    /// The keeper holds the connection's descriptors.
    kept: AtomicBool,
}

enum Found {
    Done(Result<bool, Refusal>),
    Wait,
    Proceed(u64),
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts a volume; `Ok(true)` when it was mounted already with these parameters.
    pub async fn mount(self: &Arc<Self>, request: MountRequest) -> Result<bool, Refusal> {
        let spec = Arc::new(
            VolumeSpec::new(request)
                .map_err(|e| Refusal::new(RefusalKind::Invalid, e.to_string()))?,
        );
        let id = spec.request.volume_id.clone();
        let target = spec.request.target_path.clone();
        let generation = loop {
            let notified = self.changed.notified();
            let found = {
                let mut registry = self.lock();
                if self.shutting_down.load(Ordering::Relaxed) {
                    return Err(Refusal::new(
                        RefusalKind::Unavailable,
                        "the daemon is shutting down",
                    ));
                }
                self.find_for_mount(&mut registry, &spec)
            };
            match found {
                Found::Done(result) => return result,
                Found::Wait => notified.await,
                Found::Proceed(generation) => break generation,
            }
        };
        tracing::info!(volume = %id, target = %target.display(), source = %spec.root, "mounting");
        let result = self.start(&spec, generation).await;
        let mut registry = self.lock();
        let outcome = match result {
            Ok(hosted) => {
                if let Some(slot) = registry.volumes.get_mut(&id) {
                    slot.phase = Phase::Mounted(hosted);
                }
                tracing::info!(volume = %id, target = %target.display(), "mounted");
                Ok(false)
            }
            Err(message) => {
                registry.volumes.remove(&id);
                tracing::warn!(volume = %id, target = %target.display(), error = %message, "mount failed");
                Err(message)
            }
        };
        drop(registry);
        self.changed.notify_waiters();
        outcome
    }

    fn find_for_mount(&self, registry: &mut Registry, spec: &Arc<VolumeSpec>) -> Found {
        let id = &spec.request.volume_id;
        let target = &spec.request.target_path;
        if let Some(slot) = registry.volumes.get(id) {
            if slot.spec.request.target_path != *target {
                return Found::Done(Err(Refusal::new(
                    RefusalKind::Conflict,
                    format!(
                        "volume {id} is already mounted with other parameters: at {} (asked: {}); unmount it first",
                        slot.spec.request.target_path.display(),
                        target.display()
                    ),
                )));
            }
            let differences = slot.spec.differences(spec);
            if !differences.is_empty() {
                return Found::Done(Err(Refusal::new(
                    RefusalKind::Conflict,
                    format!(
                        "volume {id} is already mounted at {} with other parameters ({}); unmount it first",
                        target.display(),
                        differences.join(", ")
                    ),
                )));
            }
            return match slot.phase {
                Phase::Mounted(_) => Found::Done(Ok(true)),
                Phase::Mounting | Phase::Unmounting => Found::Wait,
            };
        }
        if let Some((other, slot)) = registry
            .volumes
            .iter()
            .find(|(_, slot)| slot.spec.request.target_path == *target)
        {
            return match slot.phase {
                // Being unmounted: the path is about to be free.
                Phase::Unmounting => Found::Wait,
                _ => Found::Done(Err(Refusal::new(
                    RefusalKind::Conflict,
                    format!("{} is already used by volume {other}", target.display()),
                ))),
            };
        }
        registry.next_generation += 1;
        let generation = registry.next_generation;
        registry.volumes.insert(
            id.clone(),
            Slot {
                spec: spec.clone(),
                generation,
                phase: Phase::Mounting,
            },
        );
        Found::Proceed(generation)
    }

    /// Opens the volume and mounts it; on failure, leaves nothing behind.
    async fn start(
        self: &Arc<Self>,
        spec: &Arc<VolumeSpec>,
        generation: u64,
    ) -> Result<Box<Hosted>, Refusal> {
        let target = spec.request.target_path.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare_target(&target))
            .await
            .map_err(|e| format!("preparing the target path failed: {e}"))?;
        let target = prepared?;

        let id = &spec.request.volume_id;
        let (runtime, volume) = self.open_volume(spec).await?;
        let state = SessionDir::for_volume(&self.config.state_dir, id);
        let logs = match state
            .create()
            .map_err(|e| e.to_string())
            .and_then(|()| state.logs().map_err(|e| e.to_string()))
        {
            Ok(logs) => logs,
            Err(message) => {
                tracing::warn!(volume = %id, error = message, "cannot keep the volume's session state; it will not survive a daemon restart");
                SessionLogs::in_memory()
            }
        };

        let mount_config = MountConfig {
            fs_name: spec.root.id(),
            threads: self.config.threads,
            passthrough: self.config.passthrough,
            read_write: spec.request.read_write,
        };
        let (volume_for_mount, on_end) = (volume.clone(), self.on_end(id, generation));
        let target_owned = target.clone();
        let mounted = tokio::task::spawn_blocking(move || {
            fuse_adapter::mount(volume_for_mount, &target_owned, &mount_config, logs, on_end)
                .map_err(|e| format!("cannot mount {}: {e}", target_owned.display()))
        })
        .await;
        let served = match mounted {
            Ok(Ok(served)) => served,
            Ok(Err(message)) => {
                state.remove();
                volume.cache().inspect(|c| c.discard_journals_on_release());
                drop(volume);
                runtime.shutdown_background();
                return Err(message.into());
            }
            Err(e) => {
                state.remove();
                runtime.shutdown_background();
                return Err(format!("mounting {} failed: {e}", target.display()).into());
            }
        };
        set_read_ahead(&target);
        let dev = std::fs::metadata(&target).ok().map(|m| m.dev());
        let record = SessionRecord {
            format: session::FORMAT,
            request: spec.request.clone(),
            params: served.params,
            channels: served.session.channels().len(),
            device: dev.map_or((0, 0), |d| (libc::major(d), libc::minor(d))),
            mounted_at_ms: now_ms(),
            recoveries: 0,
            last_recovery_ms: None,
        };
        if let Err(e) = state.write(&record) {
            tracing::warn!(volume = %id, error = %e, "cannot record the volume's session; it will not survive a daemon restart");
        }
        let kept = self.deposit(&state, served.session.channels());
        if !spec.preload.is_empty() {
            volume.start_warm(PreloadRequest {
                paths: spec.preload.clone(),
                parallel: control::DEFAULT_PARALLEL,
            });
        }
        Ok(Box::new(Hosted {
            target,
            volume,
            runtime,
            session: served.session,
            dev,
            state,
            record,
            kept: AtomicBool::new(kept),
        }))
    }

    /// Opens a volume's source over its view of the node's cache, with a runtime of its own.
    async fn open_volume(
        &self,
        spec: &VolumeSpec,
    ) -> Result<(tokio::runtime::Runtime, Arc<Volume>), Refusal> {
        let id = &spec.request.volume_id;
        let view = self
            .cache
            .for_owner(id, spec.quota)
            .map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(VOLUME_WORKERS)
            .thread_name(format!("rsv-{}", short(id)))
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the volume's runtime: {e}"))?;
        let opened = runtime
            .spawn(Volume::open(
                spec.root.clone(),
                self.config.source_options.clone(),
                Some(view),
                VolumeConfig {
                    metadata_ttl: spec.request.metadata_ttl,
                    read_write: spec.request.read_write,
                    idle_nodes: crate::fs::DEFAULT_IDLE_NODES,
                },
            ))
            .await;
        match opened {
            Ok(Ok(volume)) => Ok((runtime, volume)),
            Ok(Err(e)) => {
                runtime.shutdown_background();
                Err(format!("volume {id}: {}", crate::error::Chain(&e)).into())
            }
            Err(e) => {
                runtime.shutdown_background();
                Err(format!("volume {id}: opening the source failed: {e}").into())
            }
        }
    }

    /// What a session's threads do when the connection ends: tell the reaper.
    fn on_end(&self, id: &str, generation: u64) -> impl FnOnce() + Send + 'static {
        let (ended, id) = (self.ended.clone(), id.to_string());
        move || {
            let _ = ended.send((id, generation));
        }
    }

    /// Gives the keeper copies of a connection's descriptors; whether it took them.
    fn deposit(&self, state: &SessionDir, channels: &[Arc<Channel>]) -> bool {
        let Some(keeper) = &self.keeper else {
            return false;
        };
        let fds: Vec<_> = channels.iter().map(|c| c.fd()).collect();
        match keeper.keep(&state.name(), &fds) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(session = state.name(), error = %e, "the keeper does not hold this volume's connection: it will not survive a daemon restart until the keeper is back");
                false
            }
        }
    }

    /// Takes over every volume a previous daemon left in the state directory.
    async fn resume_all(self: &Arc<Self>) {
        for state in SessionDir::all(&self.config.state_dir) {
            match self.resume(&state).await {
                Ok((id, hosted)) => {
                    let target = hosted.target.clone();
                    let spec = match VolumeSpec::new(hosted.record.request.clone()) {
                        Ok(spec) => Arc::new(spec),
                        Err(e) => {
                            self.give_up(&state, &id, &target, e.to_string());
                            continue;
                        }
                    };
                    let mut registry = self.lock();
                    registry.next_generation += 1;
                    let generation = registry.next_generation;
                    registry.volumes.insert(
                        id,
                        Slot {
                            spec,
                            generation,
                            phase: Phase::Mounted(hosted),
                        },
                    );
                }
                Err((id, target, reason)) => self.give_up(&state, &id, &target, reason),
            }
        }
    }

    /// Serves a connection a previous daemon left: its record, its descriptors from the
    /// keeper, its handle log.
    async fn resume(
        self: &Arc<Self>,
        state: &SessionDir,
    ) -> Result<(String, Box<Hosted>), (String, PathBuf, String)> {
        let mut record = state
            .read()
            .map_err(|e| (state.name(), PathBuf::new(), e.to_string()))?;
        let id = record.request.volume_id.clone();
        let target = record.request.target_path.clone();
        let fail = |reason: String| (id.clone(), target.clone(), reason);
        if session::mount_device(&target) != Some(record.device) {
            return Err(fail(format!(
                "the mount at {} is gone (unmounted while no daemon ran)",
                target.display()
            )));
        }
        let Some(keeper) = &self.keeper else {
            return Err(fail(
                "no keeper is configured, so the connection ended with the previous daemon".into(),
            ));
        };
        let fds = match keeper.give(&state.name()) {
            Ok(Some(fds)) if !fds.is_empty() => fds,
            Ok(_) => {
                return Err(fail(
                    "the keeper holds no descriptors for it: the connection ended with the previous daemon".into(),
                ));
            }
            Err(e) => return Err(fail(format!("the keeper did not answer: {e}"))),
        };
        let spec = VolumeSpec::new(record.request.clone()).map_err(|e| fail(e.to_string()))?;
        let logs = state.logs().map_err(|e| {
            fail(format!(
                "its file handles cannot be read ({e}): open files would not be recognised"
            ))
        })?;
        let (runtime, volume) = self
            .open_volume(&spec)
            .await
            .map_err(|refusal| fail(refusal.message))?;
        let generation = {
            let registry = self.lock();
            registry.next_generation + 1
        };
        // Counted before serving: a daemon killed while it takes over has taken over.
        record.recoveries += 1;
        record.last_recovery_ms = Some(now_ms());
        if let Err(e) = state.write(&record) {
            tracing::warn!(volume = %id, error = %e, "cannot update the volume's session record");
        }
        let connection = Connection::resume(fds, record.params);
        let on_end = self.on_end(&id, generation);
        let served: Served = match fuse_adapter::resume(volume.clone(), connection, logs, on_end) {
            Ok(served) => served,
            Err(e) => {
                runtime.shutdown_background();
                return Err(fail(format!("cannot serve the connection: {e}")));
            }
        };
        tracing::info!(
            volume = %id,
            target = %target.display(),
            recoveries = record.recoveries,
            channels = served.session.channels().len(),
            "took the volume over from the previous daemon"
        );
        let dev = Some(libc::makedev(record.device.0, record.device.1));
        Ok((
            id,
            Box::new(Hosted {
                target,
                volume,
                runtime,
                session: served.session,
                dev,
                state: state.clone(),
                record,
                kept: AtomicBool::new(true),
            }),
        ))
    }

    /// A volume that cannot be taken over: ends its connection (readers get errors instead
    /// of waiting forever), frees its mount point, and reports it.
    fn give_up(&self, state: &SessionDir, id: &str, target: &Path, reason: String) {
        tracing::error!(volume = %id, target = %target.display(), reason, "cannot take the volume over from the previous daemon");
        if let Some(keeper) = &self.keeper {
            let _ = keeper.release(&state.name());
        }
        if !target.as_os_str().is_empty() {
            clear_dead_mount(target);
        }
        state.remove();
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(control::LostVolume {
                volume_id: id.to_string(),
                target_path: target.to_path_buf(),
                reason,
                at_ms: now_ms(),
            });
    }

    /// Whether the keeper holds every volume's connection, so that this daemon may stop
    /// without ending them.
    fn all_kept(&self) -> bool {
        let Some(keeper) = &self.keeper else {
            return false;
        };
        let Ok(held) = keeper.list() else {
            return false;
        };
        self.lock().volumes.values().all(|slot| match &slot.phase {
            Phase::Mounted(hosted) => held.contains(&hosted.state.name()),
            Phase::Mounting | Phase::Unmounting => false,
        })
    }

    /// SIGTERM with the keeper holding every connection: stop taking requests, let those
    /// being served finish (a while), and persist what a successor reads. Requests read and not
    /// answered by then are resent to the successor.
    async fn hand_over(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let volumes: Vec<Arc<Volume>> = {
            let registry = self.lock();
            registry
                .volumes
                .values()
                .filter_map(|slot| match &slot.phase {
                    Phase::Mounted(hosted) => {
                        hosted.session.hand_over();
                        Some(hosted.volume.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        let deadline = tokio::time::Instant::now() + HAND_OVER_WAIT;
        loop {
            let busy: usize = {
                let registry = self.lock();
                registry
                    .volumes
                    .values()
                    .map(|slot| match &slot.phase {
                        Phase::Mounted(hosted) => hosted.session.in_flight(),
                        _ => 0,
                    })
                    .sum()
            };
            if busy == 0 || tokio::time::Instant::now() >= deadline {
                if busy > 0 {
                    tracing::info!(busy, "leaving requests being served to the next daemon");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cache = self.cache.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for volume in volumes {
                volume.flush(true);
            }
            if let Err(e) = cache.flush(true) {
                tracing::warn!(error = %e, "cannot flush the cache index");
            }
        })
        .await;
    }

    /// Deposits every connection again whenever a keeper (re)appears.
    fn watch_keeper(self: Arc<Self>) {
        let Some(keeper) = &self.keeper else {
            return;
        };
        let spawn = self.config.keeper.as_ref().is_some_and(|k| k.spawn);
        loop {
            match keeper.watch() {
                Ok(watch) => {
                    let hosted: Vec<(SessionDir, Vec<Arc<Channel>>)> = self
                        .lock()
                        .volumes
                        .values()
                        .filter_map(|slot| match &slot.phase {
                            Phase::Mounted(h) if !h.kept.load(Ordering::Relaxed) => {
                                Some((h.state.clone(), h.session.channels().to_vec()))
                            }
                            _ => None,
                        })
                        .collect();
                    for (state, channels) in hosted {
                        if self.deposit(&state, &channels) {
                            tracing::info!(
                                session = state.name(),
                                "the keeper holds the volume's connection again"
                            );
                            self.mark_kept(&state, true);
                        }
                    }
                    watch.wait();
                    tracing::warn!(
                        "the keeper stopped; volumes survive a daemon restart again once it is back"
                    );
                    for slot in self.lock().volumes.values() {
                        if let Phase::Mounted(hosted) = &slot.phase {
                            hosted.kept.store(false, Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => {
                    if spawn && let Some(options) = &self.config.keeper {
                        ensure_keeper(options);
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn mark_kept(&self, state: &SessionDir, kept: bool) {
        for slot in self.lock().volumes.values() {
            if let Phase::Mounted(hosted) = &slot.phase
                && hosted.state.name() == state.name()
            {
                hosted.kept.store(kept, Ordering::Relaxed);
            }
        }
    }

    /// Unmounts whatever volume is at `target`; `Ok(false)` when nothing was mounted there.
    pub async fn unmount(self: &Arc<Self>, target: &Path) -> Result<bool, Refusal> {
        let target = spec::target_path(target)
            .map_err(|e| Refusal::new(RefusalKind::Invalid, e.to_string()))?;
        let (id, hosted) = loop {
            let notified = self.changed.notified();
            let found = {
                let mut registry = self.lock();
                let slot = registry
                    .volumes
                    .iter_mut()
                    .find(|(_, slot)| slot.spec.request.target_path == target);
                match slot {
                    None => None,
                    Some((id, slot)) => match std::mem::replace(&mut slot.phase, Phase::Unmounting)
                    {
                        Phase::Mounted(hosted) => Some(Some((id.clone(), hosted))),
                        other => {
                            slot.phase = other;
                            Some(None)
                        }
                    },
                }
            };
            match found {
                None => {
                    let target = target.clone();
                    let cleared = tokio::task::spawn_blocking(move || clear_dead_mount(&target))
                        .await
                        .unwrap_or(false);
                    return Ok(cleared);
                }
                Some(None) => notified.await,
                Some(Some(found)) => break found,
            }
        };
        tracing::info!(volume = %id, target = %target.display(), "unmounting");
        let daemon_keeper = self.keeper.clone();
        let _ =
            tokio::task::spawn_blocking(move || teardown(*hosted, true, daemon_keeper.as_ref()))
                .await;
        self.lock().volumes.remove(&id);
        self.changed.notify_waiters();
        tracing::info!(volume = %id, target = %target.display(), "unmounted");
        Ok(true)
    }

    /// Every mounted volume's status.
    pub fn status(&self) -> DaemonStatus {
        let (mounted, pending): (Vec<_>, Vec<_>) = {
            let registry = self.lock();
            registry
                .volumes
                .values()
                .map(|slot| match &slot.phase {
                    Phase::Mounted(hosted) => Ok((
                        slot.spec.clone(),
                        hosted.volume.clone(),
                        control::Recovery {
                            kept: hosted.kept.load(Ordering::Relaxed),
                            recoveries: hosted.record.recoveries,
                            last_recovery_ms: hosted.record.last_recovery_ms,
                        },
                    )),
                    Phase::Mounting => Err((slot.spec.clone(), "mounting")),
                    Phase::Unmounting => Err((slot.spec.clone(), "unmounting")),
                })
                .partition(Result::is_ok)
        };
        let mut volumes: Vec<DaemonVolume> = mounted
            .into_iter()
            .filter_map(Result::ok)
            .map(|(spec, volume, recovery)| DaemonVolume {
                volume_id: spec.request.volume_id.clone(),
                target_path: spec.request.target_path.clone(),
                requested_source: spec.request.source.clone(),
                origin: spec.request.origin.clone(),
                sub_path: spec.request.sub_path.clone(),
                cache_size: spec.request.cache_size,
                read_write: spec.request.read_write,
                recovery,
                volume: volume.status(),
            })
            .collect();
        volumes.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        let mut pending: Vec<PendingVolume> = pending
            .into_iter()
            .filter_map(Result::err)
            .map(|(spec, state)| PendingVolume {
                volume_id: spec.request.volume_id.clone(),
                target_path: spec.request.target_path.clone(),
                state: state.into(),
            })
            .collect();
        pending.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        DaemonStatus {
            pid: std::process::id(),
            socket: self.config.socket.clone(),
            cache: self.cache.usage(),
            owners: self.cache.owners(),
            volumes,
            pending,
            lost: self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            keeper_pid: self.keeper.as_ref().and_then(|k| k.pid()),
        }
    }

    /// The volume called `id`, once mounted.
    async fn volume(&self, id: &str) -> Result<Arc<Volume>, Refusal> {
        loop {
            let notified = self.changed.notified();
            {
                let registry = self.lock();
                match registry.volumes.get(id).map(|slot| &slot.phase) {
                    Some(Phase::Mounted(hosted)) => return Ok(hosted.volume.clone()),
                    Some(Phase::Unmounting) => {
                        return Err(Refusal::new(
                            RefusalKind::Unavailable,
                            format!("volume {id} is being unmounted"),
                        ));
                    }
                    Some(Phase::Mounting) => {}
                    None => {
                        let mut known: Vec<&str> =
                            registry.volumes.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        return Err(Refusal::new(
                            RefusalKind::NotFound,
                            format!(
                                "no volume {id:?} is mounted by this daemon (mounted: {})",
                                if known.is_empty() {
                                    "none".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    }
                }
            }
            notified.await;
        }
    }

    /// SIGTERM: refuses new mounts, lets the operations in progress finish, and unmounts
    /// every volume (their metadata stays in the cache for a later mount of the same volume).
    async fn shutdown(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        let hosted: Vec<(String, Box<Hosted>)> = loop {
            let notified = self.changed.notified();
            {
                let mut registry = self.lock();
                let busy = registry
                    .volumes
                    .values()
                    .any(|slot| !matches!(slot.phase, Phase::Mounted(_)));
                if !busy || tokio::time::Instant::now() >= deadline {
                    break registry
                        .volumes
                        .iter_mut()
                        .filter_map(|(id, slot)| {
                            match std::mem::replace(&mut slot.phase, Phase::Unmounting) {
                                Phase::Mounted(hosted) => Some((id.clone(), hosted)),
                                other => {
                                    slot.phase = other;
                                    None
                                }
                            }
                        })
                        .collect();
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        };
        let teardowns: Vec<_> = hosted
            .into_iter()
            .map(|(id, hosted)| {
                let daemon_keeper = self.keeper.clone();
                tokio::task::spawn_blocking(move || {
                    let target = teardown(*hosted, false, daemon_keeper.as_ref());
                    tracing::info!(volume = %id, target = %target.display(), "unmounted");
                })
            })
            .collect();
        for teardown in teardowns {
            let _ = teardown.await;
        }
        self.lock().volumes.clear();
        self.changed.notify_waiters();
    }

    /// Forgets volumes whose FUSE session ended without an unmount request (unmounted from
    /// outside, or the connection was aborted).
    async fn reap(self: Arc<Self>, mut ended: mpsc::UnboundedReceiver<(String, u64)>) {
        while let Some((id, generation)) = ended.recv().await {
            let hosted = {
                let mut registry = self.lock();
                match registry.volumes.get_mut(&id) {
                    Some(slot)
                        if slot.generation == generation
                            && matches!(slot.phase, Phase::Mounted(_)) =>
                    {
                        match std::mem::replace(&mut slot.phase, Phase::Unmounting) {
                            Phase::Mounted(hosted) => Some(hosted),
                            _ => None,
                        }
                    }
                    _ => None,
                }
            };
            let Some(hosted) = hosted else {
                continue;
            };
            tracing::warn!(volume = %id, "the volume was unmounted from outside the daemon; forgetting it");
            let daemon_keeper = self.keeper.clone();
            let _ = tokio::task::spawn_blocking(move || {
                teardown(*hosted, false, daemon_keeper.as_ref())
            })
            .await;
            self.lock().volumes.remove(&id);
            self.changed.notify_waiters();
        }
    }

    async fn flush_periodically(self: Arc<Self>) {
        let mut ticks = 0u64;
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            interval.tick().await;
            ticks += 1;
            let sync = ticks.is_multiple_of(30);
            let volumes: Vec<Arc<Volume>> = self
                .lock()
                .volumes
                .values()
                .filter_map(|slot| match &slot.phase {
                    Phase::Mounted(hosted) => Some(hosted.volume.clone()),
                    _ => None,
                })
                .collect();
            let cache = self.cache.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for volume in volumes {
                    volume.flush(sync);
                }
                if let Err(e) = cache.flush(sync) {
                    tracing::warn!(error = %e, "cannot flush the cache index");
                }
            })
            .await;
        }
    }
}

/// A short, path-safe form of a volume id for thread names.
fn short(id: &str) -> String {
    let cleaned: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let tail = cleaned.len().saturating_sub(10);
    cleaned[tail..].to_string()
}

/// Makes the target a directory that nothing is mounted on: creates it if missing, and
/// detaches a dead mount left there by an earlier daemon. Returns its canonical path.
fn prepare_target(target: &Path) -> Result<PathBuf, Refusal> {
    match std::fs::metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(target)
                .map_err(|e| format!("cannot create the target {}: {e}", target.display()))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            clear_dead_mount(target);
        }
        _ => {}
    }
    check_mountpoint(target).map_err(|e| Refusal::from(crate::error::Chain(&e).to_string()))
}

/// Detaches a reservoir FUSE mount at `target` that no live session of this daemon serves
/// (left by a daemon that died). Returns whether there was one.
fn clear_dead_mount(target: &Path) -> bool {
    let Some(existing) = mount_at(target) else {
        return false;
    };
    if !existing.starts_with("fuse.reservoir ") {
        tracing::warn!(target = %target.display(), mount = existing, "not unmounting a mount this daemon did not make");
        return false;
    }
    tracing::info!(target = %target.display(), "detaching a reservoir mount left by an earlier daemon");
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(target = %target.display(), error = %e, "cannot detach the dead mount");
            false
        }
    }
}

/// Unmounts a hosted volume and stops everything it runs; returns its target path. With
/// `discard`, the volume's metadata journals are removed from the cache (it was unmounted for
/// good); its cached files stay.
fn teardown(hosted: Hosted, discard: bool, keeper: Option<&keeper::KeeperClient>) -> PathBuf {
    let Hosted {
        target,
        volume,
        runtime,
        mut session,
        dev,
        state,
        ..
    } = hosted;
    // A busy mount is detached; its session ends with the last close, or when the connection
    // is aborted below.
    unmount_or_detach(&target);
    let mut ended = session.wait_ended(SESSION_END_WAIT);
    if !ended {
        // Files still open keep a detached mount's connection alive: abort it, so that the
        // session ends (those files' readers get ENOTCONN).
        if let Some(dev) = dev {
            abort_connection(dev);
        }
        ended = session.wait_ended(SESSION_END_WAIT);
    }
    if !ended {
        tracing::warn!("the FUSE session did not end; leaving its threads behind");
    }
    if let Some(keeper) = keeper
        && let Err(e) = keeper.release(&state.name())
    {
        tracing::warn!(session = state.name(), error = %e, "cannot tell the keeper to drop an unmounted volume's connection");
    }
    state.remove();
    volume.finish();
    if discard && let Some(cache) = volume.cache() {
        cache.discard_journals_on_release();
    }
    drop(volume);
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    target
}

/// Aborts the FUSE connection of the mount with device number `dev` (fusectl, mounted here if
/// the host has not).
fn abort_connection(dev: u64) {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let id = (u64::from(major) << 20) | u64::from(minor);
    let connections = Path::new("/sys/fs/fuse/connections");
    let path = connections.join(id.to_string()).join("abort");
    if !path.exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            connections,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    match std::fs::write(&path, "1") {
        Ok(()) => tracing::warn!(
            connection = id,
            "aborted a FUSE connection that would not end"
        ),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot abort the FUSE connection")
        }
    }
}

/// An error with its causes, for a message that leaves the process.
/// Opens the node's cache, waiting while a previous daemon still holds it.
fn open_cache_waiting(config: &CacheConfig) -> Result<Arc<Cache>, DaemonError> {
    let deadline = std::time::Instant::now() + PREDECESSOR_WAIT;
    let mut told = false;
    loop {
        match Cache::open(config.clone()) {
            Err(CacheError::Locked { holder, .. }) if std::time::Instant::now() < deadline => {
                if !told {
                    tracing::info!(holder, "waiting for the previous daemon to exit");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// Takes the state directory's lock, waiting while a previous daemon still holds it.
fn lock_waiting(state_dir: &Path) -> Result<crate::lockfile::LockFile, DaemonError> {
    let fail = |cause: std::io::Error| DaemonError::State {
        path: state_dir.to_path_buf(),
        cause,
    };
    std::fs::create_dir_all(state_dir).map_err(fail)?;
    let deadline = std::time::Instant::now() + PREDECESSOR_WAIT;
    loop {
        match crate::lockfile::take(&state_dir.join("lock")) {
            Ok(lock) => return Ok(lock),
            Err(crate::lockfile::LockError::Held { .. })
                if std::time::Instant::now() < deadline => {}
            Err(crate::lockfile::LockError::Held { holder }) => {
                return Err(fail(std::io::Error::other(format!(
                    "in use by another reservoir daemon ({holder}); give each daemon its own --state-dir"
                ))));
            }
            Err(crate::lockfile::LockError::Io { what, cause }) => {
                return Err(fail(std::io::Error::new(
                    cause.kind(),
                    format!("{what}: {cause}"),
                )));
            }
        }
    }
}

/// Starts `reservoir keeper` on the configured socket unless one answers there. It runs in a
/// session of its own, so that it outlives this daemon.
fn ensure_keeper(options: &KeeperOptions) {
    let client = keeper::KeeperClient::new(&options.socket);
    if client.list().is_ok() {
        return;
    }
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a keeper: this program's path is unknown");
            return;
        }
    };
    let log_path = options.socket.with_extension("log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path);
    let mut command = std::process::Command::new(program);
    command
        .arg("keeper")
        .arg("--socket")
        .arg(&options.socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    match log {
        Ok(log) => command.stderr(log),
        Err(_) => command.stderr(std::process::Stdio::null()),
    };
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    match command.spawn() {
        Ok(mut child) => {
            tracing::info!(pid = child.id(), socket = %options.socket.display(), log = %log_path.display(), "started a keeper");
            // Reaped when it ends, so that no zombie stays behind while this daemon runs.
            let _ = std::thread::Builder::new()
                .name("keeper-reaper".into())
                .spawn(move || child.wait());
            let deadline = std::time::Instant::now() + KEEPER_START_WAIT;
            while client.list().is_err() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot start a keeper"),
    }
}

/// Serves the control socket until the task is dropped.
async fn serve(listener: tokio::net::UnixListener, daemon: Arc<Daemon>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &daemon).await {
                tracing::debug!(error = %e, "control connection ended with an error");
            }
        });
    }
}

async fn handle(stream: tokio::net::UnixStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let (request, mut write) = control::read_request(stream).await?;
    let Some(request) = request else {
        return Ok(());
    };
    tracing::debug!(?request, "control request");
    let response = match request {
        ControlRequest::Status => Response::DaemonStatus(Box::new(daemon.status())),
        ControlRequest::Mount(request) => {
            let (volume_id, target_path) = (request.volume_id.clone(), request.target_path.clone());
            // Run to the end even if the client goes away: a half-done mount helps nobody,
            // and the client's retry finds the volume mounted.
            let daemon = daemon.clone();
            let mounted = tokio::spawn(async move { daemon.mount(request).await }).await;
            match mounted {
                Ok(Ok(already_mounted)) => Response::Mounted {
                    volume_id,
                    target_path,
                    already_mounted,
                },
                Ok(Err(refusal)) => refusal.into(),
                Err(e) => Refusal::from(format!("mount of volume {volume_id} failed: {e}")).into(),
            }
        }
        ControlRequest::Unmount { target_path } => {
            let daemon = daemon.clone();
            let target = target_path.clone();
            let unmounted = tokio::spawn(async move { daemon.unmount(&target).await }).await;
            match unmounted {
                Ok(Ok(was_mounted)) => Response::Unmounted {
                    target_path,
                    was_mounted,
                },
                Ok(Err(refusal)) => refusal.into(),
                Err(e) => {
                    Refusal::from(format!("unmount of {} failed: {e}", target_path.display()))
                        .into()
                }
            }
        }
        ControlRequest::Warm {
            paths,
            parallel,
            volume_id,
            detach,
        } => {
            let Some(volume_id) = volume_id else {
                let message = "warm needs a volume_id: this daemon serves many volumes";
                return control::refuse(&mut write, Refusal::new(RefusalKind::Invalid, message))
                    .await;
            };
            let paths = match spec::volume_paths(&paths) {
                Ok(paths) if paths.is_empty() => vec![String::new()],
                Ok(paths) => paths,
                Err(e) => {
                    let refusal = Refusal::new(RefusalKind::Invalid, format!("warm: {e}"));
                    return control::refuse(&mut write, refusal).await;
                }
            };
            let volume = match daemon.volume(&volume_id).await {
                Ok(volume) => volume,
                Err(refusal) => return control::refuse(&mut write, refusal).await,
            };
            let tracker = volume.start_warm(PreloadRequest {
                paths,
                parallel: parallel.clamp(1, 256),
            });
            return control::follow_warm(&mut write, &tracker, detach).await;
        }
    };
    control::send(&mut write, &response).await
}
