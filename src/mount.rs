//! `reservoir mount`: one volume in the foreground, with its own cache directory, until
//! SIGINT or SIGTERM.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{Cache, CacheConfig, CacheError};
use crate::control;
use crate::fs::fuse::{self, MountConfig, SessionLogs};
use crate::fs::{FsError, Volume, VolumeConfig};
use crate::fuse::{ConnectionError, Session};
use crate::source::{SourceOptions, SourceSpec};
use crate::units::Ttl;

/// Readahead the kernel does on the mount for files served by the daemon.
const READ_AHEAD_KB: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0}: {1}")]
    MountPoint(PathBuf, String),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Volume(#[from] FsError),
    #[error("cannot mount {mountpoint}: {cause}")]
    Fuse {
        mountpoint: PathBuf,
        cause: ConnectionError,
    },
    #[error("control socket {path}: {cause}")]
    Control {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
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

/// Checks that the mount point exists, is a directory and is not already a mount point.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let fail = |why: &str| MountError::MountPoint(path.to_path_buf(), why.to_string());
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(fail("does not exist")),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(fail(
                "is a dead FUSE mount (transport endpoint is not connected); unmount it first (umount -l)",
            ));
        }
        Err(e) => return Err(fail(&e.to_string())),
    };
    if !meta.is_dir() {
        return Err(fail("is not a directory"));
    }
    let canonical = path.canonicalize().map_err(|e| fail(&e.to_string()))?;
    if let Some(existing) = mount_at(&canonical) {
        return Err(fail(&format!(
            "is already a mount point ({existing}); unmount it or choose another directory"
        )));
    }
    Ok(canonical)
}

/// The file system type and source of the mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = unescape_mountinfo(fields.get(4)?);
        if mount_point != wanted {
            return None;
        }
        let separator = fields.iter().position(|f| *f == "-")?;
        let fs_type = fields.get(separator + 1)?;
        let source = fields.get(separator + 2)?;
        Some(format!("{fs_type} from {}", unescape_mountinfo(source)))
    })
}

pub(crate) fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(byte) => out.push(byte as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
        let sync = ticks % 30 == 0;
        let _ = tokio::task::spawn_blocking(move || volume.flush(sync)).await;
    }
}

/// Unmounts a FUSE session's mount point. A busy one (a file open, a working directory inside)
/// is detached instead: the mount point is free at once, and the session keeps serving what is
/// open until the last close ends it.
pub(crate) fn unmount_or_detach(mountpoint: &Path) {
    if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
        tracing::info!(mountpoint = %mountpoint.display(), error = %e, "unmount refused; detaching the mount");
        if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot detach the mount");
        }
    }
}

/// Raises the kernel's readahead on the mount (the FUSE default is 128 KiB), so that a
/// sequential cold read keeps several block fetches in flight.
pub(crate) fn set_read_ahead(mountpoint: &Path) {
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "cannot raise readahead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = check_mountpoint(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = check_mountpoint(&file).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert!(check_mountpoint(dir.path()).is_ok());
        let err = check_mountpoint(Path::new("/proc")).unwrap_err();
        assert!(err.to_string().contains("already a mount point"), "{err}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo(r"/x\\y"), r"/x\\y");
    }
}
