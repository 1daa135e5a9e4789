//! Control sockets: JSON lines over a unix socket (mode 0600), one request per connection.
//! The answer is one line, or for a followed preload (warm) a stream of progress lines ending
//! with a final one. Two kinds of process serve this protocol:
//!
//! - a `reservoir mount` (one volume): `status`, `warm`;
//! - a `reservoir daemon` (the node's volumes, see [`crate::daemon`]): `status` of every
//!   volume, `mount`, `unmount`, and `warm` of one volume named by `volume_id`.
//!
//! Every bad request gets an `{"kind":"error","message":...}` line that names the problem.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::cache::{OwnerUsage, Usage};
use crate::fs::warm::{PreloadRequest, Progress};
use crate::fs::{Volume, VolumeStatus};
use crate::units::{Size, Ttl};

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
    #[error("no reservoir daemon answers on {socket}: {cause}")]
    DaemonNotRunning {
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("control socket {socket}: unexpected answer: {detail}")]
    Protocol { socket: PathBuf, detail: String },
    #[error("{0}")]
    Refused(String),
}

/// Files a preload fetches at once unless the request says otherwise.
pub const DEFAULT_PARALLEL: usize = 16;

fn default_parallel() -> usize {
    DEFAULT_PARALLEL
}

fn is_false(value: &bool) -> bool {
    !*value
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// A mount: its status. A daemon: every volume's.
    Status,
    /// Loads `paths` (relative to the volume's root; none: all of it) into the cache.
    Warm {
        #[serde(default)]
        paths: Vec<String>,
        #[serde(default = "default_parallel")]
        parallel: usize,
        /// The volume (daemon sockets); a mount's socket serves its one volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume_id: Option<String>,
        /// Answer at once with the preload's progress instead of following it to the end.
        #[serde(default, skip_serializing_if = "is_false")]
        detach: bool,
    },
    /// Daemon: mount a volume (idempotent).
    Mount(MountRequest),
    /// Daemon: unmount whatever volume is at `target_path` (idempotent).
    Unmount { target_path: PathBuf },
}

/// A volume to mount, as the CSI node service asks for it. Field names are the protocol's;
/// unknown fields are refused, so that a misspelt setting is an error and not a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    pub volume_id: String,
    /// An absolute path; created if missing.
    pub target_path: PathBuf,
    /// `nfs://HOST[:PORT]/PATH[?nfsport=N&mountport=N]`, `local:///PATH` or `/PATH`.
    pub source: String,
    /// A relative directory inside the source that becomes the volume's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    /// The volume's quota inside the node's cache, in bytes (a number, or a quantity such as
    /// `"10Gi"`). Absent: only the node's cache size bounds it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "size_or_quantity"
    )]
    pub cache_size: Option<u64>,
    /// Fractions of `cache_size` at which the volume's own files start / stop being evicted.
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,
    /// How long names and attributes are trusted: `"60s"`, `"5m"`, `"forever"`.
    #[serde(default = "default_metadata_ttl", with = "ttl_text")]
    pub metadata_ttl: Ttl,
    /// Writes go through to the source; otherwise the mount is read-only.
    #[serde(default)]
    pub read_write: bool,
    /// Paths inside the volume loaded into the cache in the background after mounting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preload: Vec<String>,
    /// Where `source` came from when the user named something else: the claim it was
    /// resolved from and how it is read (`pvc://ns/claim -> PersistentVolume pv-1 (in-tree
    /// nfs): ...`). Shown in the status; never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

fn default_high_watermark() -> f64 {
    0.95
}

fn default_low_watermark() -> f64 {
    0.85
}

fn default_metadata_ttl() -> Ttl {
    Ttl::Finite(Duration::from_secs(60))
}

fn size_or_quantity<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Bytes(u64),
        Quantity(String),
    }
    match Option::<Value>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Value::Bytes(bytes)) => Ok(Some(bytes)),
        Some(Value::Quantity(text)) => text
            .parse::<Size>()
            .map(|size| Some(size.0))
            .map_err(serde::de::Error::custom),
    }
}

mod ttl_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::units::Ttl;

    pub fn serialize<S: Serializer>(ttl: &Ttl, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(ttl)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Ttl, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Status(Box<MountStatus>),
    Progress(Progress),
    Done(Progress),
    Error {
        message: String,
        /// Added after the first release; an answer without it (an older daemon) reads as
        /// [`RefusalKind::Other`].
        #[serde(default)]
        refusal: RefusalKind,
    },
    DaemonStatus(Box<DaemonStatus>),
    /// The volume is mounted; `already_mounted` when it was before this request.
    Mounted {
        volume_id: String,
        target_path: PathBuf,
        already_mounted: bool,
    },
    /// Nothing is mounted at `target_path` any more; `was_mounted` when something was.
    Unmounted {
        target_path: PathBuf,
        was_mounted: bool,
    },
}

/// Why a request was refused, kept apart from the message so that a client decides by kind,
/// never by wording. The kinds are part of the protocol: a node plugin and a daemon of
/// different releases (during an upgrade) read each other's answers, and a kind this release
/// does not know reads as [`RefusalKind::Other`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The request itself is wrong (a bad path, a bad parameter).
    Invalid,
    /// The volume or the target is already in use with other parameters.
    Conflict,
    /// What the request names does not exist.
    NotFound,
    /// Not now (the daemon is shutting down, the volume is being unmounted); retry.
    Unavailable,
    /// The operation was tried and failed (the source, the mount).
    #[default]
    #[serde(other)]
    Other,
}

/// A refused request: its kind and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

/// A failure of the operation itself ([`RefusalKind::Other`]).
impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Refusal::new(RefusalKind::Other, message)
    }
}

impl From<Refusal> for Response {
    fn from(refusal: Refusal) -> Self {
        Response::Error {
            message: refusal.message,
            refusal: refusal.kind,
        }
    }
}

/// A daemon's account of the node's cache and of every volume it serves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub socket: PathBuf,
    /// The node's cache, all volumes together.
    pub cache: Usage,
    /// Each owner's part of the cache: the volumes, and files of volumes no longer mounted.
    pub owners: Vec<OwnerUsage>,
    pub volumes: Vec<DaemonVolume>,
    /// Volumes being mounted or unmounted right now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingVolume>,
    /// Volumes a previous daemon served that this one could not take over, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<LostVolume>,
    /// The descriptor keeper: its pid when it answers (`None`: none answers, or none is
    /// configured, and volumes end with this daemon).
    #[serde(default)]
    pub keeper_pid: Option<u32>,
}

/// A volume whose connection could not be taken over from a previous daemon: its readers
/// get errors (the connection was ended), and it must be staged again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LostVolume {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub reason: String,
    pub at_ms: u64,
}

/// How a volume's connection stands against a daemon restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Recovery {
    /// The keeper holds the connection: a restarted daemon takes it over.
    pub kept: bool,
    /// Times a daemon took the connection over from a previous one.
    pub recoveries: u64,
    /// When that last happened (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery_ms: Option<u64>,
}

/// One mounted volume of a daemon. `cache.owner` is the volume's own part of the cache.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonVolume {
    pub volume_id: String,
    pub target_path: PathBuf,
    /// The source as requested (`source` in the flattened status is the volume's root, with
    /// the sub-path joined).
    pub requested_source: String,
    /// The claim the source was resolved from, and how it is read (see `MountRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<u64>,
    pub read_write: bool,
    #[serde(default)]
    pub recovery: Recovery,
    #[serde(flatten)]
    pub volume: VolumeStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingVolume {
    pub volume_id: String,
    pub target_path: PathBuf,
    /// `mounting` or `unmounting`.
    pub state: String,
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

/// Decodes one request line (JSON, surrounding white space ignored).
pub fn decode_request(line: &[u8]) -> Result<ControlRequest, serde_json::Error> {
    serde_json::from_slice(line.trim_ascii())
}

/// Reads the one request of a connection. A request that cannot be read is answered with an
/// error line here, and `None` returned.
pub(crate) async fn read_request(
    stream: tokio::net::UnixStream,
) -> std::io::Result<(Option<ControlRequest>, tokio::net::unix::OwnedWriteHalf)> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_until(b'\n', &mut line).await?;
    if !line.ends_with(b"\n") && line.len() >= MAX_REQUEST {
        let message = format!("bad request: longer than {MAX_REQUEST} bytes");
        send(
            &mut write,
            &Refusal::new(RefusalKind::Invalid, message).into(),
        )
        .await?;
        return Ok((None, write));
    }
    match decode_request(&line) {
        Ok(request) => Ok((Some(request), write)),
        Err(e) => {
            let message = format!("bad request: {e}");
            send(
                &mut write,
                &Refusal::new(RefusalKind::Invalid, message).into(),
            )
            .await?;
            Ok((None, write))
        }
    }
}

/// Reports a preload's progress every [`PROGRESS_EVERY`] until it is done (or, `detach`ed, its
/// progress once). A client that goes away does not stop the preload.
pub(crate) async fn follow_warm(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    tracker: &crate::fs::warm::Tracker,
    detach: bool,
) -> std::io::Result<()> {
    if detach {
        return send(write, &Response::Progress(tracker.snapshot())).await;
    }
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let progress = tracker.snapshot();
        if progress.done {
            return send(write, &Response::Done(progress)).await;
        }
        send(write, &Response::Progress(progress)).await?;
    }
}

/// Sends an error line.
pub(crate) async fn refuse(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    refusal: Refusal,
) -> std::io::Result<()> {
    send(write, &refusal.into()).await
}

#[tracing::instrument(skip_all)]
async fn handle(
    stream: tokio::net::UnixStream,
    volume: &Arc<Volume>,
    mountpoint: &Path,
) -> std::io::Result<()> {
    let (request, mut write) = read_request(stream).await?;
    let Some(request) = request else {
        return Ok(());
    };
    tracing::debug!(?request, "control request");
    match request {
        ControlRequest::Status => {
            let status = MountStatus {
                mountpoint: mountpoint.to_path_buf(),
                pid: std::process::id(),
                volume: volume.status(),
            };
            send(&mut write, &Response::Status(Box::new(status))).await
        }
        // A mount's socket serves its one volume, whatever volume id the request names.
        ControlRequest::Warm {
            paths,
            parallel,
            detach,
            volume_id: _,
        } => {
            if volume.cache().is_none() {
                let message = "this mount has no cache (--no-cache): nothing to warm";
                return refuse(&mut write, Refusal::new(RefusalKind::Invalid, message)).await;
            }
            let paths = if paths.is_empty() {
                vec![String::new()]
            } else {
                paths
            };
            let tracker = volume.start_warm(PreloadRequest { paths, parallel });
            follow_warm(&mut write, &tracker, detach).await
        }
        ControlRequest::Mount(_) | ControlRequest::Unmount { .. } => {
            let message = format!(
                "this socket serves the single `reservoir mount` at {}; mount and unmount requests go to a `reservoir daemon`",
                mountpoint.display()
            );
            refuse(&mut write, Refusal::new(RefusalKind::Invalid, message)).await
        }
    }
}

pub(crate) async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

/// A client connection to a mount's control socket.
pub struct ControlClient {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connects to the control socket at `socket`: a daemon's, or a mount's.
    pub fn connect_to(socket: &Path) -> Result<ControlClient, ControlError> {
        let stream =
            UnixStream::connect(socket).map_err(|cause| ControlError::DaemonNotRunning {
                socket: socket.to_path_buf(),
                cause,
            })?;
        Ok(ControlClient {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
        })
    }

    /// Connects to the mount at `mountpoint`, or to an explicit socket.
    pub fn connect(
        mountpoint: &Path,
        socket: Option<&Path>,
    ) -> Result<ControlClient, ControlError> {
        let socket = socket.map_or_else(|| socket_for(mountpoint), Path::to_path_buf);
        let stream = UnixStream::connect(&socket).map_err(|cause| ControlError::NotRunning {
            mountpoint: mountpoint.to_path_buf(),
            socket: socket.clone(),
            cause,
        })?;
        Ok(ControlClient {
            socket,
            reader: BufReader::new(stream),
        })
    }

    pub fn send(&mut self, request: &ControlRequest) -> Result<(), ControlError> {
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
            Ok(Response::Error { message, .. }) => Err(ControlError::Refused(message)),
            Ok(response) => Ok(response),
            Err(e) => Err(ControlError::Protocol {
                socket: self.socket.clone(),
                detail: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn refusal_kinds_survive_releases_that_do_not_know_them() {
        let sent: Response = Refusal::new(RefusalKind::Conflict, "taken").into();
        let line = serde_json::to_string(&sent).unwrap();
        match serde_json::from_str(&line).unwrap() {
            Response::Error { refusal, message } => {
                assert_eq!(
                    (refusal, message.as_str()),
                    (RefusalKind::Conflict, "taken")
                )
            }
            other => panic!("{other:?}"),
        }
        // An older daemon sends no kind; a newer one may send a kind this release lacks.
        for line in [
            r#"{"kind":"error","message":"m"}"#,
            r#"{"kind":"error","message":"m","refusal":"from_the_future"}"#,
        ] {
            match serde_json::from_str(line).unwrap() {
                Response::Error { refusal, .. } => assert_eq!(refusal, RefusalKind::Other),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `control_request` fuzz target: serde_json's default float parsing is
    /// best-effort, so a watermark it had printed could read back one unit in the last place
    /// off, and a request (or a session record) was not the same after a round trip.
    #[test]
    fn a_request_reads_back_exactly_as_it_was_written() {
        let line = format!(
            r#"{{"op":"mount","volume_id":"v","target_path":"/mnt/x","source":"/srv","high_watermark":{}0.9}}"#,
            "1".repeat(94)
        );
        let request = decode_request(line.as_bytes()).unwrap();
        let again = decode_request(&serde_json::to_vec(&request).unwrap()).unwrap();
        let (ControlRequest::Mount(first), ControlRequest::Mount(second)) = (request, again) else {
            panic!("not a mount");
        };
        assert_eq!(first, second);
    }
}
