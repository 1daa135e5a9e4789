//! The descriptor keeper (`reservoir keeper`): a small process that holds a duplicate of every
//! /dev/fuse descriptor the daemon serves, so that a FUSE connection outlives the daemon. While
//! any process holds a connection's descriptors the kernel keeps the mount alive, queueing the
//! requests of readers until a successor daemon takes the descriptors back and serves them.
//!
//! It is deliberately small and almost never changes (its DaemonSet is not updated when the
//! daemon is). It knows nothing of volumes: it keeps descriptors under a session name, gives
//! copies back, and drops them when told. If it restarts, the daemon deposits everything again;
//! only if both are gone at once do the connections end.
//!
//! The protocol: one JSON message per SOCK_SEQPACKET packet, descriptors passed as
//! `SCM_RIGHTS`. The socket is mode 0600 and both sides check that the other runs as root (or
//! as the same user): the descriptors are a key to every pod's data.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

/// Where the keeper listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/reservoir/keeper.sock";
/// The protocol's version, sent with every request.
const PROTOCOL: u32 = 1;
const MAX_MESSAGE: usize = 64 << 10;
/// Descriptors in one message, at most (one per FUSE thread of a volume).
const MAX_FDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("keeper socket {path}: {cause}")]
    Socket { path: PathBuf, cause: io::Error },
    #[error(
        "keeper socket {path}: the peer runs as uid {uid}, not as root or this process's user; refusing to exchange FUSE descriptors"
    )]
    Untrusted { path: PathBuf, uid: u32 },
    #[error("keeper socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum KeeperRequest {
    /// Keeps the descriptors passed with the message under `session` (replacing any).
    Keep { session: String },
    /// Asks for copies of the descriptors kept under `session`.
    Give { session: String },
    /// Closes the descriptors kept under `session`.
    Release { session: String },
    /// The sessions held.
    List,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum Response {
    Kept {
        descriptors: usize,
    },
    /// The descriptors come with the message; none when the session is not held.
    Given {
        held: bool,
    },
    Released {
        held: bool,
    },
    Sessions {
        sessions: Vec<String>,
    },
    Error {
        message: String,
    },
}

/// A connected SOCK_SEQPACKET socket.
struct Packets {
    fd: OwnedFd,
}

impl Packets {
    fn send(&self, message: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        let iov = [IoSlice::new(&bytes)];
        let rights = [ControlMessage::ScmRights(fds)];
        let control: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// The next message and its descriptors; `None` when the peer has closed.
    fn receive<T: for<'de> Deserialize<'de>>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (bytes, fds) = {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let message = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for cmsg in message.cmsgs()? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this process for us;
                    // nothing else owns them.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            if message.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(io::Error::other("too many descriptors in one message"));
            }
            (message.bytes, fds)
        };
        if bytes == 0 {
            return Ok(None);
        }
        let value = serde_json::from_slice(&buffer[..bytes])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some((value, fds)))
    }

    /// Whether the peer runs as root or as this process's user.
    fn peer_uid(&self) -> io::Result<u32> {
        let credentials = socket::getsockopt(&self.fd, sockopt::PeerCredentials)?;
        Ok(credentials.uid())
    }
}

fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Runs the keeper on `path` until SIGTERM or SIGINT.
pub fn run(path: &Path) -> Result<(), KeeperError> {
    let fail = |cause: io::Error| KeeperError::Socket {
        path: path.to_path_buf(),
        cause,
    };
    if KeeperClient::new(path).list().is_ok() {
        return Err(fail(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another keeper is running on it",
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = seqpacket().map_err(fail)?;
    let address = UnixAddr::new(path).map_err(|e| fail(e.into()))?;
    // Created with a closed umask, then bound: no moment where others may connect.
    let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = socket::bind(listener.as_raw_fd(), &address);
    nix::sys::stat::umask(old_mask);
    bound.map_err(|e| fail(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    socket::listen(
        &listener,
        socket::Backlog::new(64).map_err(|e| fail(e.into()))?,
    )
    .map_err(|e| fail(e.into()))?;
    tracing::info!(socket = %path.display(), "keeper ready");

    // Blocked before any thread starts, so that every thread inherits the mask and the
    // signals are taken here only.
    let signals = stop_signals();
    let held: Arc<Mutex<HashMap<String, Vec<OwnedFd>>>> = Arc::default();
    let accept = {
        let held = held.clone();
        std::thread::Builder::new()
            .name("keeper-accept".into())
            .spawn(move || accept_loop(&listener, &held))
            .map_err(fail)?
    };
    drop(accept);
    let _ = signals.wait();
    let sessions = held.lock().unwrap_or_else(|p| p.into_inner()).len();
    tracing::info!(
        sessions,
        "keeper stopping: the daemon, if running, deposits its descriptors with the next keeper"
    );
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        tracing::warn!(error = %e, "cannot block stop signals; the keeper stops at the default action");
    }
    signals
}

fn accept_loop(listener: &OwnedFd, held: &Arc<Mutex<HashMap<String, Vec<OwnedFd>>>>) {
    loop {
        let fd = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(e) => {
                tracing::warn!(error = %e, "keeper accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let held = held.clone();
        let spawned = std::thread::Builder::new()
            .name("keeper-conn".into())
            .spawn(move || serve_connection(Packets { fd }, &held));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve a keeper connection");
        }
    }
}

fn serve_connection(peer: Packets, held: &Mutex<HashMap<String, Vec<OwnedFd>>>) {
    match peer.peer_uid() {
        Ok(uid) if trusted(uid) => {}
        Ok(uid) => {
            tracing::warn!(uid, "refusing a keeper connection from an untrusted user");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a keeper peer's credentials");
            return;
        }
    }
    loop {
        let (request, fds) = match peer.receive::<Envelope<KeeperRequest>>() {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "keeper connection ended");
                return;
            }
        };
        let mut give: Vec<OwnedFd> = Vec::new();
        let response = if request.version != PROTOCOL {
            Response::Error {
                message: format!(
                    "keeper protocol {} is not {PROTOCOL}; update the keeper",
                    request.version
                ),
            }
        } else {
            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
            match request.body {
                KeeperRequest::Keep { session } => {
                    let descriptors = fds.len();
                    tracing::info!(session, descriptors, "keeping FUSE descriptors");
                    held.insert(session, fds);
                    Response::Kept { descriptors }
                }
                KeeperRequest::Give { session } => match held.get(&session) {
                    Some(kept) => {
                        let copies: io::Result<Vec<OwnedFd>> =
                            kept.iter().map(|fd| fd.try_clone()).collect();
                        match copies {
                            Ok(copies) => {
                                give = copies;
                                Response::Given { held: true }
                            }
                            Err(e) => Response::Error {
                                message: format!("cannot duplicate a descriptor: {e}"),
                            },
                        }
                    }
                    None => Response::Given { held: false },
                },
                KeeperRequest::Release { session } => {
                    let was = held.remove(&session).is_some();
                    if was {
                        tracing::info!(session, "released FUSE descriptors");
                    }
                    Response::Released { held: was }
                }
                KeeperRequest::List => {
                    let mut sessions: Vec<String> = held.keys().cloned().collect();
                    sessions.sort();
                    Response::Sessions { sessions }
                }
            }
        };
        let raw: Vec<RawFd> = give.iter().map(|fd| fd.as_raw_fd()).collect();
        let envelope = Envelope {
            version: PROTOCOL,
            body: response,
        };
        if let Err(e) = peer.send(&envelope, &raw) {
            tracing::debug!(error = %e, "cannot answer a keeper request");
            return;
        }
    }
}

/// The daemon's side.
#[derive(Clone, Debug)]
pub struct KeeperClient {
    path: PathBuf,
}

/// A connection whose end says that the keeper has stopped.
pub struct Watch {
    peer: Packets,
}

impl Watch {
    /// Blocks until the keeper goes away.
    pub fn wait(&self) {
        loop {
            match self.peer.receive::<Envelope<Response>>() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }
}

impl KeeperClient {
    pub fn new(path: &Path) -> KeeperClient {
        KeeperClient {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, cause: io::Error) -> KeeperError {
        KeeperError::Socket {
            path: self.path.clone(),
            cause,
        }
    }

    fn connect(&self) -> Result<Packets, KeeperError> {
        let fd = seqpacket().map_err(|e| self.error(e))?;
        let address = UnixAddr::new(&self.path).map_err(|e| self.error(e.into()))?;
        socket::connect(fd.as_raw_fd(), &address).map_err(|e| self.error(e.into()))?;
        let peer = Packets { fd };
        let uid = peer.peer_uid().map_err(|e| self.error(e))?;
        if !trusted(uid) {
            return Err(KeeperError::Untrusted {
                path: self.path.clone(),
                uid,
            });
        }
        Ok(peer)
    }

    fn call(
        &self,
        peer: &Packets,
        request: KeeperRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>), KeeperError> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let envelope = Envelope {
            version: PROTOCOL,
            body: request,
        };
        peer.send(&envelope, &raw).map_err(|e| self.error(e))?;
        match peer.receive::<Envelope<Response>>() {
            Ok(Some((answer, fds))) => match answer.body {
                Response::Error { message } => Err(KeeperError::Protocol {
                    path: self.path.clone(),
                    message,
                }),
                body => Ok((body, fds)),
            },
            Ok(None) => Err(self.error(io::Error::other("the keeper closed the connection"))),
            Err(e) => Err(self.error(e)),
        }
    }

    fn unexpected(&self, response: Response) -> KeeperError {
        KeeperError::Protocol {
            path: self.path.clone(),
            message: format!("unexpected answer {response:?}"),
        }
    }

    /// Deposits (copies of) `fds` under `session`, replacing what was kept under it.
    pub fn keep(&self, session: &str, fds: &[BorrowedFd<'_>]) -> Result<(), KeeperError> {
        let peer = self.connect()?;
        let request = KeeperRequest::Keep {
            session: session.into(),
        };
        match self.call(&peer, request, fds)? {
            (Response::Kept { descriptors }, _) if descriptors == fds.len() => Ok(()),
            (other, _) => Err(self.unexpected(other)),
        }
    }

    /// Copies of the descriptors kept under `session`; `None` if none are.
    pub fn give(&self, session: &str) -> Result<Option<Vec<OwnedFd>>, KeeperError> {
        let peer = self.connect()?;
        let request = KeeperRequest::Give {
            session: session.into(),
        };
        match self.call(&peer, request, &[])? {
            (Response::Given { held: true }, fds) => Ok(Some(fds)),
            (Response::Given { held: false }, _) => Ok(None),
            (other, _) => Err(self.unexpected(other)),
        }
    }

    /// Closes the descriptors kept under `session`; whether there were any.
    pub fn release(&self, session: &str) -> Result<bool, KeeperError> {
        let peer = self.connect()?;
        let request = KeeperRequest::Release {
            session: session.into(),
        };
        match self.call(&peer, request, &[])? {
            (Response::Released { held }, _) => Ok(held),
            (other, _) => Err(self.unexpected(other)),
        }
    }

    /// The keeper's process id, if one answers.
    pub fn pid(&self) -> Option<u32> {
        let peer = self.connect().ok()?;
        let credentials = socket::getsockopt(&peer.fd, sockopt::PeerCredentials).ok()?;
        u32::try_from(credentials.pid()).ok()
    }

    pub fn list(&self) -> Result<Vec<String>, KeeperError> {
        let peer = self.connect()?;
        match self.call(&peer, KeeperRequest::List, &[])? {
            (Response::Sessions { sessions }, _) => Ok(sessions),
            (other, _) => Err(self.unexpected(other)),
        }
    }

    /// A connection that ends when the keeper does.
    pub fn watch(&self) -> Result<Watch, KeeperError> {
        let peer = self.connect()?;
        self.call(&peer, KeeperRequest::List, &[])?;
        Ok(Watch { peer })
    }
}

/// Lets the descriptors of `fds` be kept by the keeper as borrowed values.
pub fn borrow_all<T: AsFd>(fds: &[T]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|fd| fd.as_fd()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn descriptors_kept_come_back_as_copies_of_the_same_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keeper.sock");
        let server = {
            let socket = socket.clone();
            std::thread::spawn(move || {
                // The server runs until the test process ends; the test talks to it only.
                let _ = run(&socket);
            })
        };
        let client = KeeperClient::new(&socket);
        for _ in 0..100 {
            if client.list().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(client.list().unwrap(), Vec::<String>::new());
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"kept").unwrap();
        client.keep("volume-a", &[file.as_fd()]).unwrap();
        drop(file);
        assert_eq!(client.list().unwrap(), vec!["volume-a".to_string()]);
        let given = client.give("volume-a").unwrap().expect("held");
        assert_eq!(given.len(), 1);
        let mut copy = std::fs::File::from(given.into_iter().next().unwrap());
        copy.rewind().unwrap();
        let mut text = String::new();
        copy.read_to_string(&mut text).unwrap();
        assert_eq!(text, "kept");
        assert!(client.give("volume-b").unwrap().is_none());
        assert!(client.release("volume-a").unwrap());
        assert!(!client.release("volume-a").unwrap());
        assert!(client.list().unwrap().is_empty());
        // A second keeper on the same socket is refused.
        assert!(run(&socket).is_err());
        drop(server);
    }
}
