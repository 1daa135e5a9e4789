//! A FUSE connection: mounting (with the INIT handshake) or resuming one that an earlier process
//! served, and the threads that read its requests.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::abi::{self, Encoder, init};
use super::channel::{Channel, Received};
use super::reply::Reply;
use super::request::{Operation, Request};

/// The largest WRITE the kernel sends (and READ it asks for); 256 pages.
pub const MAX_WRITE: u32 = 1 << 20;
const MAX_PAGES: u16 = 256;
/// Room for a request's headers beyond its data.
const HEADER_ROOM: usize = 4096;

/// What the daemon serves; called on the connection's threads.
pub trait Filesystem: Send + Sync + 'static {
    /// The INIT flags wanted, among those the kernel offers ([`init`]).
    fn init_flags(&self, offered: u64) -> u64;
    /// Serves one request; every request but FORGET is answered through `reply`, now or later
    /// from another thread.
    fn handle(self: &Arc<Self>, request: Request<'_>, reply: Reply);
    /// The kernel dropped `nlookup` references to `nodeid`.
    fn forget(&self, nodeid: u64, nlookup: u64);
}

/// What was agreed at INIT: a successor continues with the same parameters (the kernel sends
/// INIT once per connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelParams {
    pub minor: u32,
    /// The flags in force (offered by the kernel and asked for).
    pub flags: u64,
    pub max_write: u32,
}

impl KernelParams {
    pub fn passthrough(&self) -> bool {
        self.flags & init::PASSTHROUGH != 0
    }

    pub fn can_resend(&self) -> bool {
        self.flags & init::HAS_RESEND != 0
    }
}

/// How a new connection is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
    pub read_only: bool,
    /// Readers may be any user (the kernel checks modes: `default_permissions`).
    pub allow_other: bool,
}

/// A connection with its channels, not yet served.
pub struct Connection {
    channels: Vec<Arc<Channel>>,
    params: KernelParams,
    resumed: bool,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot open /dev/fuse: {0}")]
    Device(io::Error),
    #[error("mount(2) failed: {0}")]
    Mount(io::Error),
    #[error("the FUSE handshake failed: {0}")]
    Handshake(String),
    #[error("cannot clone the FUSE channel: {0}")]
    Clone(io::Error),
}

impl Connection {
    /// Mounts a new connection at `mountpoint` and completes the INIT handshake; `threads`
    /// channels are opened for serving.
    pub fn mount<F: Filesystem>(
        mountpoint: &Path,
        options: &MountOptions,
        threads: usize,
        fs: &F,
    ) -> Result<Connection, ConnectionError> {
        let master = Arc::new(Channel::open().map_err(ConnectionError::Device)?);
        mount_fuse(mountpoint, options, &master).map_err(ConnectionError::Mount)?;
        let params = match handshake(&master, fs) {
            Ok(params) => params,
            Err(e) => {
                let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
                return Err(e);
            }
        };
        let mut channels = vec![master];
        for _ in 1..threads.max(1) {
            match channels[0].clone_channel() {
                Ok(clone) => channels.push(Arc::new(clone)),
                Err(e) => {
                    let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
                    return Err(ConnectionError::Clone(e));
                }
            }
        }
        Ok(Connection {
            channels,
            params,
            resumed: false,
        })
    }

    /// A connection an earlier process served: its channels and what was agreed at INIT.
    /// Serving it first asks the kernel to resend what that process left unanswered.
    pub fn resume(channels: Vec<OwnedFd>, params: KernelParams) -> Connection {
        Connection {
            channels: channels
                .into_iter()
                .map(|fd| Arc::new(Channel::from_fd(fd)))
                .collect(),
            params,
            resumed: true,
        }
    }

    pub fn params(&self) -> KernelParams {
        self.params
    }

    pub fn channels(&self) -> &[Arc<Channel>] {
        &self.channels
    }

    /// Starts one thread per channel; `on_end` runs once the last of them has stopped (the
    /// connection ended). For a resumed connection, the requests the previous process had read
    /// and not answered are queued again first.
    pub fn serve<F: Filesystem>(
        self,
        fs: Arc<F>,
        name: &str,
        on_end: impl FnOnce() + Send + 'static,
    ) -> io::Result<Session> {
        if self.resumed {
            if self.params.can_resend() {
                self.channels[0].resend_unanswered()?;
            } else {
                tracing::warn!(
                    "the kernel cannot resend requests (Linux 6.9 or later can): requests the previous daemon was serving stay unanswered"
                );
            }
        }
        let (ended_tx, ended_rx) = mpsc::channel();
        let buffer_size = self.params.max_write as usize + HEADER_ROOM;
        let mut threads = Vec::with_capacity(self.channels.len());
        let last = Arc::new(LastOut {
            running: AtomicUsize::new(self.channels.len()),
            on_end: Mutex::new(Some(Box::new(on_end))),
        });
        for (index, channel) in self.channels.iter().enumerate() {
            let (channel, fs, ended) = (channel.clone(), fs.clone(), ended_tx.clone());
            let last_out = last.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    serve_channel(&channel, &fs, buffer_size);
                    let _ = ended.send(());
                    last_out.leave();
                });
            match thread {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // The threads already started keep serving; fewer threads is not fatal.
                    tracing::warn!(error = %e, "cannot start a FUSE thread");
                    for _ in index..self.channels.len() {
                        last.leave();
                    }
                    break;
                }
            }
        }
        if threads.is_empty() {
            return Err(io::Error::other("no FUSE thread could be started"));
        }
        Ok(Session {
            remaining: threads.len(),
            threads,
            ended: ended_rx,
            channels: self.channels,
        })
    }
}

/// Runs a callback when the last thread of a session stops.
struct LastOut {
    running: AtomicUsize,
    on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl LastOut {
    fn leave(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            let on_end = self.on_end.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(on_end) = on_end {
                on_end();
            }
        }
    }
}

/// The threads serving a connection.
pub struct Session {
    threads: Vec<JoinHandle<()>>,
    channels: Vec<Arc<Channel>>,
    ended: mpsc::Receiver<()>,
    remaining: usize,
}

impl Session {
    /// Waits up to `timeout` for the connection to end (unmounted or aborted); whether it did.
    pub fn wait_ended(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.remaining > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.ended.recv_timeout(left) {
                Ok(()) => self.remaining -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
                Err(mpsc::RecvTimeoutError::Disconnected) => self.remaining = 0,
            }
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        true
    }

    /// From now on requests are left unanswered for a successor.
    pub fn hand_over(&self) {
        for channel in &self.channels {
            channel.hand_over();
        }
    }

    pub fn channels(&self) -> &[Arc<Channel>] {
        &self.channels
    }

    /// Requests being served (read and not yet answered).
    pub fn in_flight(&self) -> usize {
        self.channels.iter().map(|c| c.in_flight()).sum()
    }
}

fn mount_fuse(mountpoint: &Path, options: &MountOptions, master: &Channel) -> io::Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    if options.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        master.fd().as_raw_fd()
    );
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let source = CString::new(options.fs_name.replace('\0', "_"))
        .map_err(|_| io::Error::other("file system name"))?;
    let target = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("mount point holds a NUL byte"))?;
    nix::mount::mount(
        Some(source.as_c_str()),
        target.as_c_str(),
        Some("fuse.reservoir"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(())
}

/// Reads the kernel's INIT and answers it.
fn handshake<F: Filesystem>(
    master: &Arc<Channel>,
    fs: &F,
) -> Result<KernelParams, ConnectionError> {
    let mut buffer = vec![0u8; MAX_WRITE as usize + HEADER_ROOM];
    loop {
        let n = match master.receive(&mut buffer) {
            Ok(Received::Message(n)) => n,
            Ok(Received::Again) => continue,
            Ok(Received::Ended) => {
                return Err(ConnectionError::Handshake(
                    "the connection ended before INIT".into(),
                ));
            }
            Err(e) => return Err(ConnectionError::Handshake(e.to_string())),
        };
        let request =
            Request::parse(&buffer[..n]).map_err(|e| ConnectionError::Handshake(e.to_string()))?;
        let reply = Reply::new(master.clone(), request.header.unique);
        let Operation::Init {
            major,
            minor,
            max_readahead,
            flags: offered,
        } = request.operation
        else {
            reply.error(libc::EIO);
            continue;
        };
        if major > abi::KERNEL_MAJOR {
            // The kernel sends INIT again with our major version.
            let mut e = Encoder::default();
            e.u32(abi::KERNEL_MAJOR).u32(abi::KERNEL_MINOR);
            reply.init(&e.bytes);
            continue;
        }
        if major < abi::KERNEL_MAJOR || minor < abi::OLDEST_MINOR {
            reply.error(libc::EPROTO);
            return Err(ConnectionError::Handshake(format!(
                "the kernel speaks FUSE {major}.{minor}; reservoir needs 7.{} or later",
                abi::OLDEST_MINOR
            )));
        }
        let mut flags = fs.init_flags(offered) & offered;
        flags |= offered & (init::INIT_EXT | init::HAS_RESEND | init::MAX_PAGES);
        let passthrough = flags & init::PASSTHROUGH != 0;
        let mut e = Encoder::with_capacity(abi::INIT_OUT);
        e.u32(abi::KERNEL_MAJOR)
            .u32(abi::KERNEL_MINOR)
            .u32(max_readahead);
        e.u32(flags as u32);
        e.u16(256).u16(192); // max_background, congestion_threshold
        e.u32(MAX_WRITE).u32(1); // max_write, time_gran (nanoseconds)
        e.u16(MAX_PAGES).u16(0); // max_pages, map_alignment
        e.u32((flags >> 32) as u32);
        e.u32(u32::from(passthrough)); // max_stack_depth: backing files on a plain file system
        e.zeros(abi::INIT_OUT - e.len());
        reply.init(&e.bytes);
        return Ok(KernelParams {
            minor: minor.min(abi::KERNEL_MINOR),
            flags,
            max_write: MAX_WRITE,
        });
    }
}

fn serve_channel<F: Filesystem>(channel: &Arc<Channel>, fs: &Arc<F>, buffer_size: usize) {
    let mut buffer = vec![0u8; buffer_size];
    loop {
        let n = match channel.receive(&mut buffer) {
            Ok(Received::Message(n)) => n,
            Ok(Received::Again) => continue,
            Ok(Received::Ended) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read FUSE requests; this thread stops");
                return;
            }
        };
        if channel.handing_over() {
            // Read but never answered: the kernel gives it to the successor.
            continue;
        }
        let message = &buffer[..n];
        let request = match Request::parse(message) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(error = %e, "malformed FUSE request");
                answer_malformed(channel, message);
                continue;
            }
        };
        match request.operation {
            Operation::Forget { nlookup } => fs.forget(request.header.nodeid, nlookup),
            Operation::BatchForget(ref forgets) => {
                for (nodeid, nlookup) in forgets {
                    fs.forget(*nodeid, *nlookup);
                }
            }
            // Requests are not cancelled: an interrupted one is answered when it is done.
            Operation::Interrupt => {}
            _ => {
                let reply = Reply::new(channel.clone(), request.header.unique);
                fs.handle(request, reply);
            }
        }
    }
}

/// Fails a request that could not be parsed, if it expects an answer.
fn answer_malformed(channel: &Arc<Channel>, message: &[u8]) {
    if message.len() < abi::IN_HEADER {
        return;
    }
    let opcode = u32::from_ne_bytes([message[4], message[5], message[6], message[7]]);
    if matches!(
        opcode,
        abi::opcode::FORGET | abi::opcode::BATCH_FORGET | abi::opcode::INTERRUPT
    ) {
        return;
    }
    let mut unique = [0u8; 8];
    unique.copy_from_slice(&message[8..16]);
    Reply::new(channel.clone(), u64::from_ne_bytes(unique)).error(libc::EIO);
}
