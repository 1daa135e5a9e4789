//! The control socket of a mount: status and preload requests as JSON lines over a unix
//! socket. One request per connection; the answer is one line (status) or a stream of
//! progress lines ending with a final one (warm).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::fs::warm::{Progress, Request as WarmRequest};
use crate::fs::{Volume, VolumeStatus};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;
/// How often a running preload reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "{mountpoint} is not served by a running reservoir mount (no control socket at {socket}: {cause})"
    )]
    NotRunning {
        mountpoint: PathBuf,
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {socket}: {cause}")]
    Io {
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {socket}: unexpected answer: {detail}")]
    Protocol { socket: PathBuf, detail: String },
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Warm { paths: Vec<String>, parallel: usize },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Status(Box<MountStatus>),
    Progress(Progress),
    Done(Progress),
    Error { message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStatus {
    pub mountpoint: PathBuf,
    pub pid: u32,
    #[serde(flatten)]
    pub volume: VolumeStatus,
}

/// Where the control socket of the mount at `mountpoint` lives. Derived from the mount point
/// so that `reservoir status MOUNTPOINT` finds it without asking the mount itself.
pub fn socket_for(mountpoint: &Path) -> PathBuf {
    let normalized = normalize(mountpoint);
    let hash = xxhash_rust::xxh3::xxh3_64(normalized.as_os_str().as_encoded_bytes());
    run_dir().join(format!("mount-{hash:016x}.sock"))
}

/// The directory for control sockets: `$RESERVOIR_RUN_DIR`, else `/run/reservoir`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("RESERVOIR_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/reservoir"))
}

/// An absolute path with its parent resolved, without touching the mount point itself (which
/// may be a FUSE mount whose daemon is busy).
pub fn normalize(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// Serves the control socket of one mounted volume until the task is dropped.
pub async fn serve(listener: UnixListener, volume: Arc<Volume>, mountpoint: PathBuf) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (volume, mountpoint) = (volume.clone(), mountpoint.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &volume, &mountpoint).await {
                tracing::debug!(error = %e, "control connection ended with an error");
            }
        });
    }
}

/// Binds the control socket, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by another running process", path.display()),
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[tracing::instrument(skip_all)]
async fn handle(
    stream: tokio::net::UnixStream,
    volume: &Arc<Volume>,
    mountpoint: &Path,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("bad request: {e}");
            return send(&mut write, &Response::Error { message }).await;
        }
    };
    tracing::debug!(?request, "control request");
    match request {
        Request::Status => {
            let status = MountStatus {
                mountpoint: mountpoint.to_path_buf(),
                pid: std::process::id(),
                volume: volume.status(),
            };
            send(&mut write, &Response::Status(Box::new(status))).await
        }
        Request::Warm { paths, parallel } => {
            if volume.cache().is_none() {
                let message = "this mount has no cache (--no-cache): nothing to warm".to_string();
                return send(&mut write, &Response::Error { message }).await;
            }
            let paths = if paths.is_empty() {
                vec![String::new()]
            } else {
                paths
            };
            let tracker = volume.start_warm(WarmRequest { paths, parallel });
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let progress = tracker.snapshot();
                if progress.done {
                    return send(&mut write, &Response::Done(progress)).await;
                }
                // A client that went away does not stop the preload.
                send(&mut write, &Response::Progress(progress)).await?;
            }
        }
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

/// A client connection to a mount's control socket.
pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the mount at `mountpoint`, or to an explicit socket.
    pub fn connect(mountpoint: &Path, socket: Option<&Path>) -> Result<Client, ControlError> {
        let socket = socket.map_or_else(|| socket_for(mountpoint), Path::to_path_buf);
        let stream = UnixStream::connect(&socket).map_err(|cause| ControlError::NotRunning {
            mountpoint: mountpoint.to_path_buf(),
            socket: socket.clone(),
            cause,
        })?;
        Ok(Client {
            socket,
            reader: BufReader::new(stream),
        })
    }

    pub fn send(&mut self, request: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ControlError::Protocol {
            socket: self.socket.clone(),
            detail: e.to_string(),
        })?;
        line.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&line)
            .map_err(|cause| ControlError::Io {
                socket: self.socket.clone(),
                cause,
            })
    }

    /// The next answer line; an `Error` answer becomes [`ControlError::Refused`].
    pub fn receive(&mut self) -> Result<Response, ControlError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|cause| ControlError::Io {
                socket: self.socket.clone(),
                cause,
            })?;
        if read == 0 {
            return Err(ControlError::Protocol {
                socket: self.socket.clone(),
                detail: "connection closed before an answer".into(),
            });
        }
        match serde_json::from_str(line.trim()) {
            Ok(Response::Error { message }) => Err(ControlError::Refused(message)),
            Ok(response) => Ok(response),
            Err(e) => Err(ControlError::Protocol {
                socket: self.socket.clone(),
                detail: e.to_string(),
            }),
        }
    }
}
