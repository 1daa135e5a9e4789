//! `reservoir mount`: one volume in the foreground, with its own cache directory, until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{Cache, CacheConfig, CacheError};
use crate::control;
use crate::fs::fuse::{self, MountConfig, SessionLogs};
use crate::fs::{FsError, Volume, VolumeConfig};
use crate::fuse::{ConnectionError, Session};
use crate::mountpoint::{MountPointError, check_mountpoint, set_read_ahead, unmount_or_detach};
use crate::source::{SourceOptions, SourceSpec};
use crate::units::Ttl;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    MountPoint(#[from] MountPointError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Volume(#[from] FsError),
    #[error("cannot mount {mountpoint}")]
    Fuse {
        mountpoint: PathBuf,
        #[source]
        cause: ConnectionError,
    },
    #[error("control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("{0}")]
    Settings(String),
}

/// Everything `reservoir mount` needs.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub source: SourceSpec,
    pub mountpoint: PathBuf,
    /// `None` serves the source without a cache (the "direct" baseline).
    pub cache: Option<CacheConfig>,
    pub metadata_ttl: Ttl,
    /// Nodes the kernel does not reference kept in memory, at most.
    pub metadata_nodes: usize,
    pub source_options: SourceOptions,
    pub threads: usize,
    pub passthrough: bool,
    /// Writes go through to the source.
    pub read_write: bool,
    pub control_socket: Option<PathBuf>,
}

/// Mounts and serves until SIGINT/SIGTERM or an external unmount; unmounts before returning.
pub fn run(options: MountOptions) -> Result<(), MountError> {
    if let Some(cache) = &options.cache {
        cache.validate()?;
    }
    if options.read_write && options.metadata_ttl == Ttl::Forever {
        return Err(MountError::Settings(
            "--read-write cannot be combined with --metadata-ttl forever, which declares the dataset immutable; give a finite TTL (e.g. 60s)".into(),
        ));
    }
    let mountpoint = check_mountpoint(&options.mountpoint)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("reservoir-io")
        .enable_all()
        .build()
        .map_err(MountError::Runtime)?;

    let cache = match &options.cache {
        Some(config) => Some(Cache::open(config.clone())?),
        None => None,
    };
    let volume = runtime.block_on(Volume::open(
        options.source.clone(),
        options.source_options.clone(),
        cache,
        VolumeConfig {
            metadata_ttl: options.metadata_ttl,
            read_write: options.read_write,
            idle_nodes: options.metadata_nodes,
        },
    ))?;

    let socket = options
        .control_socket
        .clone()
        .unwrap_or_else(|| control::socket_for(&mountpoint));
    let listener = {
        let _guard = runtime.enter();
        control::bind(&socket).map_err(|cause| MountError::Control {
            path: socket.clone(),
            cause,
        })?
    };

    let mount_config = MountConfig {
        fs_name: options.source.id(),
        threads: options.threads,
        passthrough: options.passthrough,
        read_write: options.read_write,
    };
    let served = fuse::mount(
        volume.clone(),
        &mountpoint,
        &mount_config,
        SessionLogs::in_memory(),
        || {},
    )
    .map_err(|cause| {
        let _ = std::fs::remove_file(&socket);
        MountError::Fuse {
            mountpoint: mountpoint.clone(),
            cause,
        }
    })?;
    let mut session = served.session;
    // The session's threads end when the connection does; one waits for them, for the
    // runtime to notice an unmount from outside.
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<Session>();
    let session_thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            while !session.wait_ended(Duration::from_secs(3600)) {}
            let _ = ended_tx.send(session);
        })
        .map_err(MountError::Runtime)?;

    set_read_ahead(&mountpoint);
    tracing::info!(
        source = %options.source,
        mountpoint = %mountpoint.display(),
        control = %socket.display(),
        "mounted"
    );

    let ended_by = runtime.block_on(async {
        let control = tokio::spawn(control::serve(listener, volume.clone(), mountpoint.clone()));
        let flusher = tokio::spawn(flush_periodically(volume.clone()));
        let reason = wait_for_end(ended_rx).await;
        control.abort();
        flusher.abort();
        reason
    });
    tracing::info!(reason = ended_by, "unmounting");
    unmount_or_detach(&mountpoint);
    let _ = session_thread.join();
    volume.finish();
    let _ = std::fs::remove_file(&socket);
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn wait_for_end(ended: tokio::sync::oneshot::Receiver<Session>) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = ended.await;
        return "session ended";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = ended => "unmounted externally",
    }
}

async fn flush_periodically(volume: Arc<Volume>) {
    let mut ticks = 0u64;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        ticks += 1;
        let volume = volume.clone();
        let sync = ticks.is_multiple_of(30);
        let _ = tokio::task::spawn_blocking(move || volume.flush(sync)).await;
    }
}
