//! The typed client of a daemon's control socket, for the CSI node service (async, with a
//! timeout on every call), and [`ensure_running`], which starts a detached daemon when nothing
//! answers on the socket (single-host use: in Kubernetes the daemon has its own container).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::control::{ControlRequest, DaemonStatus, MountRequest, Refusal, Response};
use crate::fs::warm::Progress;

/// How long each kind of call may take.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// Connecting to the socket.
    pub connect: Duration,
    /// `status`, and starting a detached preload.
    pub status: Duration,
    /// `mount`: the daemon reaches the source first, which may take up to its source timeout.
    pub mount: Duration,
    /// `unmount`: the kernel may take a while to end a busy session.
    pub unmount: Duration,
    /// Between two progress lines of a followed preload.
    pub progress: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            status: Duration::from_secs(15),
            mount: Duration::from_secs(120),
            unmount: Duration::from_secs(60),
            progress: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no reservoir daemon answers on {socket}: {cause}")]
    NotRunning {
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("reservoir daemon on {socket}: no answer to {what} within {after:?}")]
    Timeout {
        socket: PathBuf,
        what: &'static str,
        after: Duration,
    },
    #[error("reservoir daemon on {socket}: {cause}")]
    Io {
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("reservoir daemon on {socket}: unexpected answer: {detail}")]
    Protocol { socket: PathBuf, detail: String },
    /// The daemon refused the request; the message says why.
    #[error("{0}")]
    Refused(Refusal),
    #[error("cannot start a reservoir daemon ({program}): {detail}")]
    Spawn { program: PathBuf, detail: String },
}

/// A client of the daemon at one socket. Each call is one connection.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeouts: Timeouts,
}

/// The outcome of a mount request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// The volume was mounted with these parameters before the request (an idempotent repeat).
    pub already_mounted: bool,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeouts: Timeouts::default(),
        }
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Client {
        self.timeouts = timeouts;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every volume of the daemon, and the node's cache.
    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        match self
            .call(&ControlRequest::Status, "status", self.timeouts.status)
            .await?
        {
            Response::DaemonStatus(status) => Ok(*status),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Mounts a volume (idempotent: the same request again is `Ok`; the same volume with other
    /// parameters, or its target used by another volume, is [`ClientError::Refused`]).
    pub async fn mount(&self, request: &MountRequest) -> Result<Mounted, ClientError> {
        let request = ControlRequest::Mount(request.clone());
        match self.call(&request, "mount", self.timeouts.mount).await? {
            Response::Mounted {
                already_mounted, ..
            } => Ok(Mounted { already_mounted }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Unmounts whatever volume is at `target_path` (idempotent). Returns whether something
    /// was mounted there.
    pub async fn unmount(&self, target_path: &Path) -> Result<bool, ClientError> {
        let request = ControlRequest::Unmount {
            target_path: target_path.to_path_buf(),
        };
        match self
            .call(&request, "unmount", self.timeouts.unmount)
            .await?
        {
            Response::Unmounted { was_mounted, .. } => Ok(was_mounted),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Loads `paths` of a volume (relative to its root; none: all of it) into the cache. With
    /// `wait`, follows the preload to its end and returns the final account; otherwise returns
    /// as soon as it started (its progress shows in [`Client::status`]).
    pub async fn warm(
        &self,
        volume_id: &str,
        paths: &[String],
        wait: bool,
    ) -> Result<Progress, ClientError> {
        let request = ControlRequest::Warm {
            paths: paths.to_vec(),
            parallel: crate::control::DEFAULT_PARALLEL,
            volume_id: Some(volume_id.to_string()),
            detach: !wait,
        };
        let mut connection = self.connect().await?;
        connection.send(&request).await?;
        loop {
            let limit = if wait {
                self.timeouts.progress
            } else {
                self.timeouts.status
            };
            match connection.receive("warm", limit).await? {
                Response::Done(progress) => return Ok(progress),
                Response::Progress(progress) if !wait => return Ok(progress),
                Response::Progress(_) => {}
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    async fn call(
        &self,
        request: &ControlRequest,
        what: &'static str,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let mut connection = self.connect().await?;
        connection.send(request).await?;
        connection.receive(what, limit).await
    }

    async fn connect(&self) -> Result<Connection, ClientError> {
        let connect = UnixStream::connect(&self.socket);
        let stream = match tokio::time::timeout(self.timeouts.connect, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(cause)) => {
                return Err(ClientError::NotRunning {
                    socket: self.socket.clone(),
                    cause,
                });
            }
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    what: "connect",
                    after: self.timeouts.connect,
                });
            }
        };
        Ok(Connection {
            socket: self.socket.clone(),
            stream: BufReader::new(stream),
        })
    }

    fn unexpected(&self, response: &Response) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            detail: format!("{response:?}"),
        }
    }
}

struct Connection {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Connection {
    async fn send(&mut self, request: &ControlRequest) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            detail: e.to_string(),
        })?;
        line.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&line)
            .await
            .map_err(|cause| ClientError::Io {
                socket: self.socket.clone(),
                cause,
            })
    }

    /// The next answer line; an error answer becomes [`ClientError::Refused`].
    async fn receive(
        &mut self,
        what: &'static str,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let mut line = String::new();
        let read = match tokio::time::timeout(limit, self.stream.read_line(&mut line)).await {
            Ok(Ok(read)) => read,
            Ok(Err(cause)) => {
                return Err(ClientError::Io {
                    socket: self.socket.clone(),
                    cause,
                });
            }
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    what,
                    after: limit,
                });
            }
        };
        if read == 0 {
            return Err(ClientError::Protocol {
                socket: self.socket.clone(),
                detail: format!("connection closed before an answer to {what}"),
            });
        }
        match serde_json::from_str(line.trim()) {
            Ok(Response::Error { message, refusal }) => {
                Err(ClientError::Refused(Refusal::new(refusal, message)))
            }
            Ok(response) => Ok(response),
            Err(e) => Err(ClientError::Protocol {
                socket: self.socket.clone(),
                detail: e.to_string(),
            }),
        }
    }
}

/// How [`ensure_running`] starts a daemon.
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    /// The `reservoir` binary; default: the running executable.
    pub program: Option<PathBuf>,
    /// Its arguments, e.g. `daemon --cache-dir /var/cache/reservoir --socket SOCKET`.
    pub args: Vec<OsString>,
    /// Where its output goes (appended).
    pub log: PathBuf,
    /// How long to wait for it to answer.
    pub wait: Duration,
}

/// Returns a client of the daemon at `socket`, starting one first if nothing answers there:
/// `program args...` in a new session (detached from the caller's terminal and process
/// group, so that it outlives the caller), stdin from /dev/null and its output appended to
/// `log`. Waits until it answers a status request. If another caller started one meanwhile,
/// the loser exits (the socket and the cache lock each admit one daemon) and the winner
/// answers.
pub async fn ensure_running(socket: &Path, spawn: &SpawnOptions) -> Result<Client, ClientError> {
    let client = Client::new(socket);
    if client.status().await.is_ok() {
        return Ok(client);
    }
    let program = match &spawn.program {
        Some(program) => program.clone(),
        None => std::env::current_exe().map_err(|e| ClientError::Spawn {
            program: PathBuf::from("reservoir"),
            detail: format!("cannot find the running executable: {e}"),
        })?,
    };
    let fail = |detail: String| ClientError::Spawn {
        program: program.clone(),
        detail,
    };
    if let Some(dir) = spawn.log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spawn.log)
        .map_err(|e| fail(format!("cannot open the log {}: {e}", spawn.log.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| fail(format!("cannot open the log {}: {e}", spawn.log.display())))?;
    let mut command = std::process::Command::new(&program);
    command
        .args(&spawn.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    tracing::info!(pid = child.id(), socket = %socket.display(), log = %spawn.log.display(), "started a reservoir daemon");

    let deadline = tokio::time::Instant::now() + spawn.wait;
    let mut exited = None;
    loop {
        if client.status().await.is_ok() {
            break;
        }
        if exited.is_none() {
            exited = child.try_wait().ok().flatten();
        }
        if let Some(status) = exited {
            // It may have lost a race to another daemon that answers now; else it failed.
            if client.status().await.is_ok() {
                break;
            }
            return Err(fail(format!(
                "it exited ({status}) without answering on {}; its log {} ends with:\n{}",
                socket.display(),
                spawn.log.display(),
                log_tail(&spawn.log)
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(format!(
                "it did not answer on {} within {:?}; see its log {}",
                socket.display(),
                spawn.wait,
                spawn.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if exited.is_none() {
        // Reap it when it exits, so that it leaves no zombie behind while the caller lives.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
    Ok(client)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
