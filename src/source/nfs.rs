//! The NFSv3 source: a userspace client (on `nfs3_client`), because nodes and serverless
//! sandboxes often have no kernel NFS client.
//!
//! - **Opening** ([`NfsSource::connect`]): the host name is resolved with the system resolver,
//!   the MOUNT and NFS ports come from the URL or from the server's portmapper, the export is the
//!   longest prefix of the URL path that the server exports (MOUNT `EXPORT`; when the list cannot
//!   be read, `MNT` is tried on successively shorter prefixes), and the rest of the path is walked
//!   with `LOOKUP`. `FSINFO` gives the largest READ the server accepts.
//! - **Calls** go over a pool of NFS connections, created on demand. `nfs3_client` carries one call
//!   at a time per connection, so a call takes a connection, uses it and puts it back. Every call is
//!   bounded by the source timeout. A connection whose call timed out or failed in transport is
//!   dropped, never reused (a late reply would desynchronise it). A call that failed in transport
//!   on a pooled connection (which may have gone stale, e.g. the server restarted) is retried once
//!   on a fresh connection, within the same deadline; a call that timed out is never retried. A
//!   server that is down makes calls fail fast (connection refused) or at the timeout (no answer);
//!   when it is back, calls work again.
//! - **Writes**: see [`Source::write`] and [`Source::commit`] on [`NfsSource`]. WRITE is UNSTABLE,
//!   split into pieces of at most `min(wtmax, MAX_WRITE_PIECE)` issued concurrently over the pool.
//!   [`Source::write_sent`] returns as soon as every piece's request has been written to its
//!   connection (marked by the first read of the reply, through a task-local set around the
//!   piece), leaving the outcome to a future, so that a caller can overlap consecutive writes;
//!   the write verifier of every unstable reply is remembered per file until COMMIT, which fails
//!   with EIO when the server's verifier changed in between (it restarted and may have lost the
//!   unstable data: we keep no copy to send again).
//! - **Retries of non-idempotent calls** (CREATE, MKDIR, SYMLINK, REMOVE, RMDIR, RENAME): the one
//!   retry after a transport failure may meet the effect of a first attempt whose reply was lost.
//!   As the Linux client does without a duplicate request cache, such outcomes are interpreted:
//!   NOENT from a retried REMOVE/RMDIR is success; EXIST from a retried CREATE/MKDIR/SYMLINK is
//!   success when a LOOKUP finds an object that looks like ours (same type, owner, mode, and for a
//!   symlink the same target); NOENT from a retried RENAME is success when the target name exists.
//!   A timed-out call is never retried, so its outcome is unknown to the caller (an error).
//! - **Credentials**: AUTH_SYS as uid 0 / gid 0 with this machine's name, from a privileged source
//!   port when running as root, so the daemon reads like a root kernel client does on a
//!   `no_root_squash` export.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use futures_util::stream::FuturesUnordered;
use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::nfs3_types::mount::{self, dirpath};
use nfs3_client::nfs3_types::nfs3::{
    self, COMMIT3args, CREATE3args, FSINFO3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option,
    Nfs3Result, READ3args, READDIRPLUS3args, READDIRPLUS3res, READLINK3args, REMOVE3args,
    RENAME3args, RMDIR3args, SETATTR3args, SYMLINK3args, WRITE3args, cookieverf3, createhow3,
    diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, nfstime3, post_op_attr,
    sattr3, set_atime, set_mtime, specdata3, stable_how, symlinkdata3, writeverf3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{MountClient, MountError, Nfs3Client, PortmapError, PortmapperClient, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, warn};

use super::{
    Attr, DirEntry, Handle, Kind, Landing, NfsUrl, Owner, Result, SetAttr, SetTime, Source,
    SourceError, SourceOptions, Timestamp, WriteOutcome, check_name,
};

/// The call [`Inner::call`] makes on each attempt: one NFSv3 procedure of the client on the
/// borrowed arguments, handing the connection back with the result.
macro_rules! procedure {
    ($method:ident, $args:expr) => {{
        let args = &$args;
        move |mut c: Client| async move {
            let r = c.$method(args).await;
            (c, r)
        }
    }};
}

/// The largest single READ we issue, even when the server accepts more (ganesha announces
/// `rtmax` = 64 MiB): larger reads are split into pieces of this size and fetched in parallel over
/// the pool, which is faster than one large READ and bounds each reply's buffer.
pub const MAX_READ_PIECE: u32 = 1 << 20;
/// The largest single WRITE we issue, even when the server accepts more: larger writes are split
/// into pieces of this size (or `wtmax` if smaller) sent concurrently over the pool.
pub const MAX_WRITE_PIECE: u32 = 1 << 20;
/// How often a non-exclusive CREATE goes round when the name it found is removed before it could
/// be looked up.
const CREATE_ATTEMPTS: u32 = 3;
/// READDIRPLUS sizes: ganesha returns about 3,000 entries with attributes and handles per page.
const READDIR_DIRCOUNT: u32 = 64 * 1024;
const READDIR_MAXCOUNT: u32 = 1 << 20;
/// How often a listing is restarted when the server says the cookie went bad (the directory changed).
const READDIR_RESTARTS: u32 = 3;
/// The portmapper's well-known port.
const PORTMAPPER_PORT: u16 = 111;
/// Source ports tried for a privileged connection (the range `nfs3_client` uses too).
const PRIVILEGED_PORTS: std::ops::RangeInclusive<u16> = 300..=1023;
/// First and longest pause before retrying a call the server answered with NFS3ERR_JUKEBOX.
const JUKEBOX_FIRST_DELAY: Duration = Duration::from_millis(50);
const JUKEBOX_MAX_DELAY: Duration = Duration::from_secs(1);

/// A source on an NFSv3 server.
pub struct NfsSource {
    inner: Arc<Inner>,
    root: Handle,
    export: String,
    read_size: u32,
    rtmax: u32,
    write_size: u32,
    wtmax: u32,
}

type Client = Nfs3Client<Conn>;

/// What every call needs: where the server is, how to talk to it, and the connection pool.
struct Inner {
    id: String,
    /// The NFS service: pool connections go straight there.
    addr: SocketAddr,
    privileged: bool,
    credential: opaque_auth<'static>,
    timeout: Duration,
    /// Connections that are connected, idle and in a clean state.
    idle: Mutex<Vec<Client>>,
    /// One permit per connection that may exist (idle or busy).
    slots: Arc<Semaphore>,
    /// Files with UNSTABLE writes not yet committed, by file handle.
    unstable: Mutex<Pending>,
}

/// What COMMIT has to check for one file: the write verifier its unstable writes were answered
/// with since the last commit.
#[derive(Clone, Copy, Debug)]
struct Unstable {
    /// The verifier of the latest unstable write.
    verf: writeverf3,
    /// Two unstable writes got different verifiers: the server restarted in between and may have
    /// lost the earlier data.
    lost: bool,
    /// Unstable writes recorded so far (tells a commit whether more came in meanwhile).
    writes: u64,
}

/// Files with unstable writes not yet committed, by file handle. An entry lives from a file's
/// first unstable write until a COMMIT covers it: files written and never committed stay (one
/// small entry each) until they are.
#[derive(Debug, Default)]
struct Pending(HashMap<Box<[u8]>, Unstable>);

impl Pending {
    /// Records an unstable write answered with `verf`; true if the verifier changed since the
    /// previous one (the server restarted in between).
    fn note(&mut self, fh: &[u8], verf: writeverf3) -> bool {
        match self.0.get_mut(fh) {
            Some(entry) => {
                let changed = entry.verf != verf;
                if changed {
                    entry.lost = true;
                    entry.verf = verf;
                }
                entry.writes += 1;
                changed
            }
            None => {
                self.0.insert(
                    fh.into(),
                    Unstable {
                        verf,
                        lost: false,
                        writes: 1,
                    },
                );
                false
            }
        }
    }

    fn get(&self, fh: &[u8]) -> Option<Unstable> {
        self.0.get(fh).copied()
    }

    /// Settles a COMMIT answered with `verf` that started when the file's state was `before`;
    /// true if data written before it may have been lost.
    fn committed(&mut self, fh: &[u8], before: Option<Unstable>, verf: writeverf3) -> bool {
        let Some(before) = before else {
            // No unstable write of ours was pending when the commit started.
            return false;
        };
        if let Some(entry) = self.0.get_mut(fh) {
            if entry.writes == before.writes {
                self.0.remove(fh);
            } else {
                // Writes answered while the commit was in flight may not be covered by it: they
                // stay pending, checked against the verifier seen now.
                entry.lost = entry.verf != verf;
            }
        }
        before.lost || before.verf != verf
    }
}

impl NfsSource {
    /// Connects to the server, mounts the export that contains `url.path` and walks to the volume
    /// root. Fails with [`SourceError::Invalid`] when the export or path does not exist, and with
    /// [`SourceError::Unavailable`] or [`SourceError::Timeout`] when the server cannot be reached.
    pub async fn connect(url: &NfsUrl, options: &SourceOptions) -> Result<Self> {
        let id = url.to_string();
        let span = debug_span!("nfs_connect", source = %id);
        connect(url, id, options).instrument(span).await
    }

    /// The export that was mounted (a prefix of the URL path).
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The largest READ the server accepts, as announced by FSINFO.
    pub fn rtmax(&self) -> u32 {
        self.rtmax
    }

    /// The size of the READ calls a large [`Source::read`] is split into:
    /// `min(rtmax, MAX_READ_PIECE)`.
    pub fn read_size(&self) -> u32 {
        self.read_size
    }

    /// The largest WRITE the server accepts, as announced by FSINFO.
    pub fn wtmax(&self) -> u32 {
        self.wtmax
    }

    /// The size of the WRITE calls a large [`Source::write`] is split into:
    /// `min(wtmax, MAX_WRITE_PIECE)`.
    pub fn write_size(&self) -> u32 {
        self.write_size
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.timeout
    }
}

async fn connect(url: &NfsUrl, id: String, options: &SourceOptions) -> Result<NfsSource> {
    let timeout = options.timeout;
    let ip = resolve(&url.host, &id, timeout).await?;
    let privileged = nix::unistd::geteuid().is_root();
    let credential = root_credential();
    let step = Step { id: &id, timeout };

    let (mount_port, nfs_port) = match (url.mount_port, url.nfs_port) {
        (Some(mount), Some(nfs)) => (mount, nfs),
        (mount, nfs) => {
            let (found_mount, found_nfs) = step.portmap(ip, mount.is_none(), nfs.is_none()).await?;
            (
                mount.or(found_mount).unwrap_or(0),
                nfs.or(found_nfs).unwrap_or(0),
            )
        }
    };
    debug!(%ip, mount_port, nfs_port, "ports");

    let (export, export_fh) = step
        .mount(
            SocketAddr::new(ip, mount_port),
            privileged,
            &credential,
            &url.path,
        )
        .await?;
    debug!(export = %export, "mounted");

    let inner = Arc::new(Inner {
        id: id.clone(),
        addr: SocketAddr::new(ip, nfs_port),
        privileged,
        credential,
        timeout,
        idle: Mutex::new(Vec::new()),
        slots: Arc::new(Semaphore::new(options.connections.max(1))),
        unstable: Mutex::new(Pending::default()),
    });

    let (rtmax, wtmax) = inner.fsinfo(&export_fh).await?;
    let read_size = if rtmax == 0 {
        64 * 1024
    } else {
        rtmax.min(MAX_READ_PIECE)
    };
    let write_size = if wtmax == 0 {
        64 * 1024
    } else {
        wtmax.min(MAX_WRITE_PIECE)
    };

    // Walk from the export to the volume root.
    let mut fh = export_fh;
    let mut walked = export.trim_end_matches('/').to_string();
    for name in remainder(&url.path, &export) {
        let deadline = Instant::now() + timeout;
        match inner.lookup_fh(&fh, name.as_bytes(), deadline).await {
            Ok((child, _)) => fh = child,
            Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {
                let place = if walked == export.trim_end_matches('/') {
                    format!("export {export}")
                } else {
                    format!("{} (export {export})", display_dir(&walked))
                };
                return Err(SourceError::Invalid(format!(
                    "{id}: '{name}' does not exist in {place}"
                )));
            }
            Err(SourceError::Status { errno, .. }) if errno == libc::ENOTDIR => {
                return Err(SourceError::Invalid(format!(
                    "{id}: {} is not a directory",
                    display_dir(&walked)
                )));
            }
            Err(SourceError::Status { errno, .. }) => {
                return Err(SourceError::Invalid(format!(
                    "{id}: cannot look up '{name}' in {}: {}",
                    display_dir(&walked),
                    io::Error::from_raw_os_error(errno)
                )));
            }
            Err(other) => return Err(other),
        }
        walked.push('/');
        walked.push_str(&name);
    }
    let attr = inner.getattr_fh(&fh, Instant::now() + timeout).await?;
    if attr.kind != Kind::Directory {
        return Err(SourceError::Invalid(format!(
            "{id}: {} is not a directory",
            display_dir(&walked)
        )));
    }
    debug!(rtmax, read_size, wtmax, write_size, "volume root found");
    Ok(NfsSource {
        inner,
        root: Handle(fh.data.into_owned().into_boxed_slice()),
        export,
        read_size,
        rtmax,
        write_size,
        wtmax,
    })
}

fn display_dir(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

/// Resolves a host name (or parses an address) with the system resolver.
async fn resolve(host: &str, id: &str, timeout: Duration) -> Result<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let unavailable = |message: String| SourceError::Unavailable {
        source_name: id.to_string(),
        message,
    };
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await {
        Err(_) => Err(SourceError::Timeout {
            op: "resolve host",
            source_name: id.to_string(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(unavailable(format!("cannot resolve host {host}: {e}"))),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| unavailable(format!("host {host} has no address"))),
    }
}

/// AUTH_SYS as root, with this machine's name (RFC 5531 limits it to 255 bytes).
fn root_credential() -> opaque_auth<'static> {
    let mut name = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "reservoir".to_string())
        .into_bytes();
    name.truncate(255);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    opaque_auth::auth_unix(&auth_unix {
        stamp,
        machinename: Opaque::owned(name),
        uid: 0,
        gid: 0,
        gids: vec![],
    })
}

/// The steps of opening a source, each bounded by the source timeout.
struct Step<'a> {
    id: &'a str,
    timeout: Duration,
}

impl Step<'_> {
    async fn bounded<T>(&self, op: &'static str, future: impl Future<Output = T>) -> Result<T> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(output) => Ok(output),
            Err(_) => Err(SourceError::Timeout {
                op,
                source_name: self.id.to_string(),
                after: self.timeout,
            }),
        }
    }

    fn unavailable(&self, message: String) -> SourceError {
        SourceError::Unavailable {
            source_name: self.id.to_string(),
            message,
        }
    }

    /// A transport error means the server went away; anything else is a broken protocol exchange.
    fn rpc_error(&self, op: &'static str, service: &str, e: RpcError) -> SourceError {
        match e {
            RpcError::Io(e) => self.unavailable(format!("{service}: {e}")),
            other => SourceError::Invalid(format!("{}: {op} ({service}): {other}", self.id)),
        }
    }

    async fn open(&self, addr: SocketAddr, privileged: bool, service: &str) -> Result<Conn> {
        self.bounded("connect", connect_tcp(addr, privileged))
            .await?
            .map(Conn)
            .map_err(|e| self.unavailable(format!("{service} at {addr}: {e}")))
    }

    /// Asks the portmapper for the ports that are missing.
    async fn portmap(
        &self,
        ip: IpAddr,
        want_mount: bool,
        want_nfs: bool,
    ) -> Result<(Option<u16>, Option<u16>)> {
        let addr = SocketAddr::new(ip, PORTMAPPER_PORT);
        let conn = self.open(addr, false, "portmapper").await?;
        let mut portmapper = PortmapperClient::new(conn);
        let mount = if want_mount {
            Some(
                self.getport(&mut portmapper, addr, mount::PROGRAM, "MOUNT")
                    .await?,
            )
        } else {
            None
        };
        let nfs = if want_nfs {
            Some(
                self.getport(&mut portmapper, addr, nfs3::PROGRAM, "NFS")
                    .await?,
            )
        } else {
            None
        };
        Ok((mount, nfs))
    }

    async fn getport(
        &self,
        portmapper: &mut PortmapperClient<Conn>,
        addr: SocketAddr,
        program: u32,
        name: &str,
    ) -> Result<u16> {
        const IPPROTO_TCP: u32 = 6;
        let found = self
            .bounded(
                "portmapper GETPORT",
                portmapper.getport(program, 3, IPPROTO_TCP),
            )
            .await?;
        match found {
            Ok(port) => Ok(port),
            Err(PortmapError::ProgramUnavailable) => Err(self.unavailable(format!(
                "{name} v3 over TCP is not registered with the portmapper at {addr}"
            ))),
            Err(PortmapError::Rpc(e)) => Err(self.rpc_error("GETPORT", "portmapper", e)),
            Err(other) => Err(SourceError::Invalid(format!(
                "{}: portmapper at {addr}: {other}",
                self.id
            ))),
        }
    }

    /// Finds and mounts the export that contains `path`; returns it and its root handle.
    async fn mount(
        &self,
        addr: SocketAddr,
        privileged: bool,
        credential: &opaque_auth<'static>,
        path: &str,
    ) -> Result<(String, nfs_fh3)> {
        let conn = self.open(addr, privileged, "MOUNT service").await?;
        let mut client =
            MountClient::new_with_auth(conn, credential.clone(), opaque_auth::default());
        let host = addr.ip();

        let listed = self.bounded("MOUNT EXPORT", client.export()).await?;
        let exports: Vec<String> = match listed {
            Ok(list) => list
                .into_inner()
                .into_iter()
                .map(|node| String::from_utf8_lossy(&node.ex_dir.0).into_owned())
                .collect(),
            Err(RpcError::Io(e)) => return Err(self.unavailable(format!("MOUNT service: {e}"))),
            Err(other) => {
                warn!(error = %other, "the export list cannot be read; trying MNT on each prefix");
                Vec::new()
            }
        };
        debug!(?exports, "export list");

        if !exports.is_empty() {
            let Some(export) = best_export(path, &exports) else {
                return Err(SourceError::Invalid(format!(
                    "{}: no export of {host} contains {path} (exports: {})",
                    self.id,
                    exports.join(", ")
                )));
            };
            let export = export.to_string();
            return match self.mnt(&mut client, &export).await? {
                Ok(fh) => Ok((export, fh)),
                Err(status) => Err(SourceError::Invalid(format!(
                    "{}: {host} refused to mount export {export}: {status}",
                    self.id
                ))),
            };
        }

        let mut refusals = Vec::new();
        for candidate in mount_candidates(path) {
            match self.mnt(&mut client, &candidate).await? {
                Ok(fh) => return Ok((candidate, fh)),
                Err(status) => refusals.push(format!("{candidate}: {status}")),
            }
        }
        Err(SourceError::Invalid(format!(
            "{}: no export of {host} contains {path} (the export list is empty or unreadable, and \
             MNT was refused for every prefix: {})",
            self.id,
            refusals.join(", ")
        )))
    }

    /// MNT: `Ok(Err(status))` when the server refused.
    async fn mnt(
        &self,
        client: &mut MountClient<Conn>,
        path: &str,
    ) -> Result<Result<nfs_fh3, String>> {
        let reply = self
            .bounded(
                "MOUNT MNT",
                client.mnt(dirpath(Opaque::borrowed(path.as_bytes()))),
            )
            .await?;
        match reply {
            Ok(ok) => {
                if !ok.auth_flavors.is_empty() && !ok.auth_flavors.iter().any(|&f| f == 0 || f == 1)
                {
                    warn!(flavors = ?ok.auth_flavors, "the export does not list AUTH_SYS");
                }
                Ok(Ok(nfs_fh3 {
                    data: Opaque::owned(ok.fhandle.0.into_owned()),
                }))
            }
            Err(MountError::Denied(status)) => Ok(Err(status.to_string())),
            Err(MountError::Rpc(e)) => Err(self.rpc_error("MNT", "MOUNT service", e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Export discovery (pure).

fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".")
}

/// The export that is the longest prefix of `path`, counted in path components.
fn best_export<'a>(path: &str, exports: &'a [String]) -> Option<&'a str> {
    exports
        .iter()
        .filter(|export| {
            let mut wanted = components(path);
            components(export).all(|c| wanted.next() == Some(c))
        })
        .max_by_key(|export| components(export).count())
        .map(String::as_str)
}

/// The components of `path` below `export` (which is a prefix of it).
fn remainder(path: &str, export: &str) -> Vec<String> {
    components(path)
        .skip(components(export).count())
        .map(str::to_string)
        .collect()
}

/// `/a/b/c`, `/a/b`, `/a`, `/`: what to try to mount when the export list is not available.
fn mount_candidates(path: &str) -> Vec<String> {
    let parts: Vec<&str> = components(path).collect();
    (0..=parts.len())
        .rev()
        .map(|n| format!("/{}", parts[..n].join("/")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Transport.

/// A TCP connection as `nfs3_client` wants it. Unlike its own tokio wrapper, a closed connection
/// is an error: `nfs3_client` reads with a loop that would spin forever on end of file.
struct Conn(TcpStream);

impl AsyncRead for Conn {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // `nfs3_client` reads only once the whole call has been written: for a WRITE whose
        // sending is awaited, that is the moment it is on the wire.
        let _ = SENT.try_with(|sent| sent.fire());
        let n = self.0.read(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        Ok(n)
    }
}

impl AsyncWrite for Conn {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "connection closed",
            ));
        }
        Ok(n)
    }
}

async fn connect_tcp(addr: SocketAddr, privileged: bool) -> io::Result<TcpStream> {
    if privileged {
        match connect_from_privileged_port(addr).await {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                debug!("no permission to bind a privileged port; using an ordinary one");
            }
            other => return other,
        }
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_from_privileged_port(addr: SocketAddr) -> io::Result<TcpStream> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = *PRIVILEGED_PORTS.start();
    let count = u32::from(*PRIVILEGED_PORTS.end() - low) + 1;
    // Spread processes over the range; within a process, walk it.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..count {
        let index = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % count;
        let port = low + index as u16;
        let (socket, unspecified) = match addr {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        match socket.bind(SocketAddr::new(unspecified, port)) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            other => other?,
        }
        match socket.connect(addr).await {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                continue;
            }
            other => {
                let stream = other?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "no free privileged source port ({}-{})",
            PRIVILEGED_PORTS.start(),
            PRIVILEGED_PORTS.end()
        ),
    ))
}

tokio::task_local! {
    /// Set around the calls that carry one piece of a [`Source::write_sent`] write.
    static SENT: Arc<PieceSent>;
}

/// One piece of a write whose sending is awaited; fires once, even if the call is retried.
struct PieceSent {
    fired: AtomicBool,
    write: Arc<WriteSent>,
}

/// Tells the writer once every piece of its write has been sent.
struct WriteSent {
    pieces_left: AtomicUsize,
    tell: Mutex<Option<oneshot::Sender<()>>>,
}

impl PieceSent {
    fn fire(&self) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.write.pieces_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let tell = self
                .write
                .tell
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(tell) = tell {
                let _ = tell.send(());
            }
        }
    }
}

/// A reply whose status tells whether to ask again later.
trait Reply {
    fn status(&self) -> nfsstat3;
}

impl<T, E> Reply for Nfs3Result<T, E> {
    fn status(&self) -> nfsstat3 {
        match self {
            Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
            Nfs3Result::Err((status, _)) => *status,
        }
    }
}

impl Inner {
    fn timeout_error(&self, op: &'static str) -> SourceError {
        SourceError::Timeout {
            op,
            source_name: self.id.clone(),
            after: self.timeout,
        }
    }

    fn unavailable(&self, op: &'static str, e: impl fmt::Display) -> SourceError {
        SourceError::Unavailable {
            source_name: self.id.clone(),
            message: format!("{op}: {e} ({})", self.addr),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a connection slot, and an idle connection unless `fresh` (or none is idle), in which
    /// case a new connection is made. Returns whether the connection was reused.
    async fn checkout(
        &self,
        op: &'static str,
        deadline: Instant,
        fresh: bool,
    ) -> Result<(OwnedSemaphorePermit, Client, bool)> {
        let permit =
            match tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(closed)) => return Err(self.unavailable(op, closed)),
                Err(_) => return Err(self.timeout_error(op)),
            };
        if !fresh {
            let reused = self.idle().pop();
            if let Some(client) = reused {
                return Ok((permit, client, true));
            }
        }
        match tokio::time::timeout_at(deadline, connect_tcp(self.addr, self.privileged)).await {
            Err(_) => Err(self.timeout_error(op)),
            Ok(Err(e)) => Err(self.unavailable(op, e)),
            Ok(Ok(stream)) => {
                debug!(addr = %self.addr, "new NFS connection");
                let client = Nfs3Client::new_with_auth(
                    Conn(stream),
                    self.credential.clone(),
                    opaque_auth::default(),
                );
                Ok((permit, client, false))
            }
        }
    }

    /// Runs one RPC on a pooled connection before `deadline`. `call` gets the connection and must
    /// give it back with the outcome. Transport failures on a reused connection are retried once
    /// on a fresh one; NFS3ERR_JUKEBOX is retried after a pause until the deadline.
    async fn call<R, F, Fut>(&self, op: &'static str, deadline: Instant, call: F) -> Result<R>
    where
        R: Reply,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = (Client, std::result::Result<R, RpcError>)>,
    {
        Ok(self.call_tracked(op, deadline, call).await?.0)
    }

    /// [`Inner::call`], also telling whether the reply answers a retry after a transport failure,
    /// i.e. whether an earlier attempt may have been carried out by the server without us
    /// getting its reply (what non-idempotent calls need to know).
    async fn call_tracked<R, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        call: F,
    ) -> Result<(R, bool)>
    where
        R: Reply,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = (Client, std::result::Result<R, RpcError>)>,
    {
        let mut may_retry_stale = true;
        let mut retried = false;
        let mut fresh = false;
        let mut jukebox_delay = JUKEBOX_FIRST_DELAY;
        loop {
            let (permit, client, reused) = self.checkout(op, deadline, fresh).await?;
            let started = Instant::now();
            let outcome = tokio::time::timeout_at(deadline, call(client)).await;
            match outcome {
                Err(_) => {
                    // The connection was dropped with the call: a late reply must not be read as
                    // the answer to a later call.
                    debug!(op, "no answer before the deadline; connection dropped");
                    return Err(self.timeout_error(op));
                }
                Ok((client, Ok(reply))) => {
                    self.idle().push(client);
                    drop(permit);
                    debug!(op, elapsed = ?started.elapsed(), status = %reply.status(), "reply");
                    if reply.status() == nfsstat3::NFS3ERR_JUKEBOX {
                        if Instant::now() + jukebox_delay >= deadline {
                            return Err(self.timeout_error(op));
                        }
                        tokio::time::sleep(jukebox_delay).await;
                        jukebox_delay = (jukebox_delay * 2).min(JUKEBOX_MAX_DELAY);
                        continue;
                    }
                    return Ok((reply, retried));
                }
                Ok((client, Err(e))) => {
                    if e.is_connection_reusable() {
                        self.idle().push(client);
                        return Err(rpc_failure(&self.id, op, e));
                    }
                    drop(client);
                    drop(permit);
                    if !matches!(e, RpcError::Io(_)) {
                        return Err(rpc_failure(&self.id, op, e));
                    }
                    // The server closed or reset the connection: the other idle ones are likely
                    // stale too (a server restart closes them all).
                    let stale = std::mem::take(&mut *self.idle());
                    debug!(op, error = %e, reused, dropped_idle = stale.len(), "transport error");
                    drop(stale);
                    if reused && may_retry_stale {
                        may_retry_stale = false;
                        retried = true;
                        fresh = true;
                        continue;
                    }
                    return Err(self.unavailable(op, e));
                }
            }
        }
    }

    fn status_error(
        &self,
        op: &'static str,
        status: nfsstat3,
        target: fmt::Arguments<'_>,
    ) -> SourceError {
        SourceError::status(
            op,
            errno_of(status),
            format!("{}: {target}: {status}", self.id),
        )
    }

    /// FSINFO: (rtmax, wtmax).
    async fn fsinfo(&self, fh: &nfs_fh3) -> Result<(u32, u32)> {
        let args = FSINFO3args { fsroot: fh.clone() };
        let reply = self
            .call(
                "fsinfo",
                Instant::now() + self.timeout,
                procedure!(fsinfo, args),
            )
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok((ok.rtmax, ok.wtmax)),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("fsinfo", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    async fn getattr_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<Attr> {
        let args = GETATTR3args { object: fh.clone() };
        let reply = self
            .call("getattr", deadline, procedure!(getattr, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(attr_from_fattr(&ok.obj_attributes)),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("getattr", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    async fn lookup_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let args = LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: filename3(Opaque::borrowed(name)),
            },
        };
        let reply = self
            .call("lookup", deadline, procedure!(lookup, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => {
                let attr = match ok.obj_attributes {
                    Nfs3Option::Some(attr) => attr_from_fattr(&attr),
                    Nfs3Option::None => self.getattr_fh(&ok.object, deadline).await?,
                };
                Ok((ok.object, attr))
            }
            Nfs3Result::Err((status, _)) => Err(self.status_error(
                "lookup",
                status,
                format_args!(
                    "'{}' in directory {}",
                    String::from_utf8_lossy(name).escape_debug(),
                    Fh(&dir.data)
                ),
            )),
        }
    }

    /// Reads `count` bytes at `offset` (fewer at end of file), in as many READs as the server needs.
    async fn read_range(
        &self,
        fh: &nfs_fh3,
        offset: u64,
        count: u32,
        deadline: Instant,
    ) -> Result<Vec<u8>> {
        let mut out: Vec<u8> = Vec::new();
        while out.len() < count as usize {
            let at = offset.saturating_add(out.len() as u64);
            let want = count - out.len() as u32;
            let args = READ3args {
                file: fh.clone(),
                offset: at,
                count: want,
            };
            let reply = self.call("read", deadline, procedure!(read, args)).await?;
            let ok = match reply {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((status, _)) => {
                    return Err(self.status_error(
                        "read",
                        status,
                        format_args!("{} at {at}+{want}", Fh(&fh.data)),
                    ));
                }
            };
            let mut data = ok.data.0.into_owned();
            data.truncate(want as usize);
            let got = data.len();
            if out.is_empty() {
                out = data;
            } else {
                out.extend_from_slice(&data);
            }
            if ok.eof {
                break;
            }
            if got == 0 {
                return Err(SourceError::status(
                    "read",
                    libc::EIO,
                    format!(
                        "{}: {} at {at}: the server returned no data and no end of file",
                        self.id,
                        Fh(&fh.data)
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// One READDIRPLUS page.
    async fn readdir_page(
        &self,
        dir: &nfs_fh3,
        cookie: u64,
        verifier: cookieverf3,
    ) -> Result<READDIRPLUS3res<'static>> {
        let args = READDIRPLUS3args {
            dir: dir.clone(),
            cookie,
            cookieverf: verifier,
            dircount: READDIR_DIRCOUNT,
            maxcount: READDIR_MAXCOUNT,
        };
        self.call(
            "readdir",
            Instant::now() + self.timeout,
            procedure!(readdirplus, args),
        )
        .await
    }

    async fn read_dir(&self, dir: &nfs_fh3) -> Result<Vec<DirEntry>> {
        let mut restarts = 0;
        'listing: loop {
            let mut entries = Vec::new();
            let mut cookie = 0u64;
            let mut verifier = cookieverf3::default();
            let mut pages = 0u32;
            loop {
                let reply = self.readdir_page(dir, cookie, verifier).await?;
                let ok = match reply {
                    Nfs3Result::Ok(ok) => ok,
                    Nfs3Result::Err((nfsstat3::NFS3ERR_BAD_COOKIE, _))
                        if restarts < READDIR_RESTARTS =>
                    {
                        restarts += 1;
                        debug!(restarts, "directory changed while listing; starting again");
                        continue 'listing;
                    }
                    Nfs3Result::Err((status, _)) => {
                        return Err(self.status_error(
                            "readdir",
                            status,
                            format_args!("directory {}", Fh(&dir.data)),
                        ));
                    }
                };
                pages += 1;
                verifier = ok.cookieverf;
                let eof = ok.reply.eof;
                let page = ok.reply.entries.into_inner();
                if page.is_empty() && !eof {
                    return Err(SourceError::status(
                        "readdir",
                        libc::EIO,
                        format!(
                            "{}: directory {}: the server returned an empty page before the end",
                            self.id,
                            Fh(&dir.data)
                        ),
                    ));
                }
                for entry in page {
                    cookie = entry.cookie;
                    let name = entry.name.0.into_owned();
                    if name == b"." || name == b".." {
                        continue;
                    }
                    if check_name(&name).is_err() {
                        warn!(name = %String::from_utf8_lossy(&name).escape_debug(), "skipping an entry with an invalid name");
                        continue;
                    }
                    match (entry.name_handle, entry.name_attributes) {
                        (Nfs3Option::Some(fh), Nfs3Option::Some(attr)) if !fh.data.is_empty() => {
                            entries.push(DirEntry {
                                name,
                                handle: Handle(fh.data.into_owned().into_boxed_slice()),
                                attr: attr_from_fattr(&attr),
                            });
                        }
                        _ => match self
                            .lookup_fh(dir, &name, Instant::now() + self.timeout)
                            .await
                        {
                            Ok((fh, attr)) => entries.push(DirEntry {
                                name,
                                handle: Handle(fh.data.into_owned().into_boxed_slice()),
                                attr,
                            }),
                            // Removed between the listing and the lookup: it is simply not there.
                            Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {}
                            Err(e) => return Err(e),
                        },
                    }
                }
                if eof {
                    debug!(entries = entries.len(), pages, "listed");
                    return Ok(entries);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// `'name' in directory fh:...`, for messages.
struct InDir<'a> {
    dir: &'a nfs_fh3,
    name: &'a [u8],
}

impl fmt::Display for InDir<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' in directory {}",
            String::from_utf8_lossy(self.name).escape_debug(),
            Fh(&self.dir.data)
        )
    }
}

fn dirop<'a>(dir: &nfs_fh3, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name)),
    }
}

/// The attributes of a new object: its permission bits (none for a symlink) and its owner.
fn new_sattr(perm: Option<u16>, owner: Owner) -> sattr3 {
    sattr3 {
        mode: match perm {
            Some(perm) => Nfs3Option::Some(u32::from(perm & 0o7777)),
            None => Nfs3Option::None,
        },
        uid: Nfs3Option::Some(owner.uid),
        gid: Nfs3Option::Some(owner.gid),
        ..sattr3::default()
    }
}

/// NFSv3 times are unsigned 32-bit seconds: anything else cannot be sent.
fn nfstime_of(time: Timestamp) -> Result<nfstime3> {
    let seconds = u32::try_from(time.secs).map_err(|_| {
        SourceError::status(
            "setattr",
            libc::EINVAL,
            format!(
                "time {}s is outside what NFSv3 can carry (0 to {})",
                time.secs,
                u32::MAX
            ),
        )
    })?;
    Ok(nfstime3 {
        seconds,
        nseconds: time.nanos.min(999_999_999),
    })
}

fn sattr_of(changes: &SetAttr) -> Result<sattr3> {
    let option = |value: Option<u32>| match value {
        Some(v) => Nfs3Option::Some(v),
        None => Nfs3Option::None,
    };
    Ok(sattr3 {
        mode: option(changes.perm.map(|p| u32::from(p & 0o7777))),
        uid: option(changes.uid),
        gid: option(changes.gid),
        size: match changes.size {
            Some(size) => Nfs3Option::Some(size),
            None => Nfs3Option::None,
        },
        atime: match changes.atime {
            None => set_atime::DONT_CHANGE,
            Some(SetTime::Now) => set_atime::SET_TO_SERVER_TIME,
            Some(SetTime::At(t)) => set_atime::SET_TO_CLIENT_TIME(nfstime_of(t)?),
        },
        mtime: match changes.mtime {
            None => set_mtime::DONT_CHANGE,
            Some(SetTime::Now) => set_mtime::SET_TO_SERVER_TIME,
            Some(SetTime::At(t)) => set_mtime::SET_TO_CLIENT_TIME(nfstime_of(t)?),
        },
    })
}

fn post_op(attr: post_op_attr) -> Option<Attr> {
    match attr {
        Nfs3Option::Some(attr) => Some(attr_from_fattr(&attr)),
        Nfs3Option::None => None,
    }
}

/// What a retried CREATE, MKDIR or SYMLINK expects to find under its name if its first attempt
/// (whose reply was lost) went through: an object of its type, owned by the caller, with the mode
/// asked for, and for a symlink the same target.
struct Ours<'a> {
    kind: Kind,
    perm: Option<u16>,
    owner: Owner,
    target: Option<&'a [u8]>,
}

impl Ours<'_> {
    fn looks_like(&self, attr: &Attr) -> bool {
        attr.kind == self.kind
            && attr.uid == self.owner.uid
            && attr.gid == self.owner.gid
            && self.perm.is_none_or(|perm| attr.perm == perm & 0o7777)
    }
}

/// The most recent of two snapshots of one file's attributes (pieces of a write finish in any
/// order): the later change, then the larger size.
fn newest(a: Option<Attr>, b: Option<Attr>) -> Option<Attr> {
    match (a, b) {
        (Some(a), Some(b)) => {
            if (b.ctime, b.mtime, b.size) >= (a.ctime, a.mtime, a.size) {
                Some(b)
            } else {
                Some(a)
            }
        }
        (a, b) => a.or(b),
    }
}

impl Inner {
    fn unstable(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.unstable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers the verifier of an UNSTABLE write to `fh`.
    fn note_unstable(&self, fh: &[u8], verf: writeverf3) {
        if self.unstable().note(fh, verf) {
            warn!(file = %Fh(fh), "the write verifier changed between two unstable writes: the server restarted and may have lost data");
        }
    }

    /// Writes `data` at `offset` in as many UNSTABLE WRITEs as the server needs (it may write
    /// fewer bytes than asked). Returns the attributes after the last one, when reported.
    async fn write_range(
        &self,
        fh: &nfs_fh3,
        offset: u64,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Option<Attr>> {
        let mut done = 0usize;
        let mut attr = None;
        while done < data.len() {
            let at = offset + done as u64;
            let rest = &data[done..];
            let args = WRITE3args {
                file: fh.clone(),
                offset: at,
                count: rest.len() as u32,
                stable: stable_how::UNSTABLE,
                data: Opaque::borrowed(rest),
            };
            // WRITE at an offset is idempotent: the transport retry of `call` is safe.
            let reply = self
                .call("write", deadline, procedure!(write, args))
                .await?;
            let ok = match reply {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((status, _)) => {
                    return Err(self.status_error(
                        "write",
                        status,
                        format_args!("{} at {at}+{}", Fh(&fh.data), rest.len()),
                    ));
                }
            };
            let count = (ok.count as usize).min(rest.len());
            if count == 0 {
                return Err(SourceError::status(
                    "write",
                    libc::EIO,
                    format!(
                        "{}: {} at {at}: the server wrote nothing",
                        self.id,
                        Fh(&fh.data)
                    ),
                ));
            }
            if ok.committed == stable_how::UNSTABLE {
                self.note_unstable(&fh.data, ok.verf);
            }
            if count < rest.len() {
                debug!(at, asked = rest.len(), written = count, "short write");
            }
            attr = newest(attr, post_op(ok.file_wcc.after));
            done += count;
        }
        Ok(attr)
    }

    /// COMMIT of the whole file, checked against the verifiers of its unstable writes.
    async fn commit_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<()> {
        let before = self.unstable().get(&fh.data);
        let args = COMMIT3args {
            file: fh.clone(),
            offset: 0,
            count: 0,
        };
        let reply = self
            .call("commit", deadline, procedure!(commit, args))
            .await?;
        let verf = match reply {
            Nfs3Result::Ok(ok) => ok.verf,
            Nfs3Result::Err((status, _)) => {
                return Err(self.status_error("commit", status, format_args!("{}", Fh(&fh.data))));
            }
        };
        let lost = self.unstable().committed(&fh.data, before, verf);
        if lost {
            warn!(file = %Fh(&fh.data), "COMMIT: the server's write verifier changed since the unstable writes");
            return Err(SourceError::status(
                "commit",
                libc::EIO,
                format!(
                    "{}: {}: the server restarted since the last writes (write verifier changed): \
                     data written since the previous commit may be lost",
                    self.id,
                    Fh(&fh.data)
                ),
            ));
        }
        Ok(())
    }

    /// The handle and attributes of an object just made, asking for what the reply left out.
    async fn made(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        obj: Nfs3Option<nfs_fh3>,
        attr: post_op_attr,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        match (obj, post_op(attr)) {
            (Nfs3Option::Some(fh), Some(attr)) if !fh.data.is_empty() => Ok((fh, attr)),
            (Nfs3Option::Some(fh), None) if !fh.data.is_empty() => {
                let attr = self.getattr_fh(&fh, deadline).await?;
                Ok((fh, attr))
            }
            _ => self.lookup_fh(dir, name, deadline).await,
        }
    }

    /// Gives a new object to its owner (and mode) when the server did not apply them at creation.
    async fn settle_owner(
        &self,
        op: &'static str,
        fh: &nfs_fh3,
        attr: Attr,
        perm: Option<u16>,
        owner: Owner,
        deadline: Instant,
    ) -> Result<Attr> {
        let perm = perm.map(|p| p & 0o7777);
        let wrong_owner = attr.uid != owner.uid || attr.gid != owner.gid;
        let wrong_perm = perm.is_some_and(|p| attr.perm != p);
        if !wrong_owner && !wrong_perm {
            return Ok(attr);
        }
        debug!(
            op,
            uid = attr.uid,
            gid = attr.gid,
            perm = attr.perm,
            "the server did not apply the attributes of a new object; setting them"
        );
        let changes = SetAttr {
            // Changing the owner may clear set-id bits: the mode goes with it.
            perm,
            uid: Some(owner.uid),
            gid: Some(owner.gid),
            ..SetAttr::default()
        };
        self.setattr_fh(fh, &changes, deadline).await
    }

    async fn setattr_fh(&self, fh: &nfs_fh3, changes: &SetAttr, deadline: Instant) -> Result<Attr> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: sattr_of(changes)?,
            guard: Nfs3Option::None,
        };
        // SETATTR without a guard is idempotent (times set to "now" move a little on a retry).
        let reply = self
            .call("setattr", deadline, procedure!(setattr, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => match post_op(ok.obj_wcc.after) {
                Some(attr) => Ok(attr),
                None => self.getattr_fh(fh, deadline).await,
            },
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("setattr", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    /// CREATE, always GUARDED so that the attributes we send (mode, owner) only ever apply to a
    /// file this call made: an UNCHECKED create of an existing file would, on some servers, chmod
    /// and chown someone else's file. Without `exclusive`, EXIST is answered by looking the name
    /// up and opening the existing file as it is.
    async fn create_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        perm: u16,
        owner: Owner,
        exclusive: bool,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let target = InDir { dir, name };
        let exists = || {
            SourceError::status(
                "create",
                libc::EEXIST,
                format!("{}: {target}: {}", self.id, nfsstat3::NFS3ERR_EXIST),
            )
        };
        for _ in 0..CREATE_ATTEMPTS {
            let args = CREATE3args {
                where_: dirop(dir, name),
                how: createhow3::GUARDED(new_sattr(Some(perm), owner)),
            };
            let (reply, retried) = self
                .call_tracked("create", deadline, procedure!(create, args))
                .await?;
            match reply {
                Nfs3Result::Ok(ok) => {
                    let (fh, attr) = self
                        .made(dir, name, ok.obj, ok.obj_attributes, deadline)
                        .await?;
                    let attr = self
                        .settle_owner("create", &fh, attr, Some(perm), owner, deadline)
                        .await?;
                    return Ok((fh, attr));
                }
                Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                    let (fh, attr) = match self.lookup_fh(dir, name, deadline).await {
                        Ok(found) => found,
                        // Removed since: create again (an exclusive create did meet a file).
                        Err(SourceError::Status { errno, .. })
                            if errno == libc::ENOENT && !exclusive =>
                        {
                            continue;
                        }
                        Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {
                            return Err(exists());
                        }
                        Err(e) => return Err(e),
                    };
                    let ours = Ours {
                        kind: Kind::File,
                        perm: Some(perm),
                        owner,
                        target: None,
                    };
                    if retried && ours.looks_like(&attr) {
                        debug!(%target, "a retried CREATE found the file of its first attempt");
                        return Ok((fh, attr));
                    }
                    return match attr.kind {
                        _ if exclusive => Err(exists()),
                        Kind::File => Ok((fh, attr)),
                        Kind::Directory => Err(SourceError::status(
                            "create",
                            libc::EISDIR,
                            format!("{}: {target} is a directory", self.id),
                        )),
                        _ => Err(exists()),
                    };
                }
                Nfs3Result::Err((status, _)) => {
                    return Err(self.status_error("create", status, format_args!("{target}")));
                }
            }
        }
        Err(exists())
    }

    /// On EXIST from a retried MKDIR/SYMLINK: the object of the first attempt, if it is there.
    async fn ours_after_retry(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        ours: Ours<'_>,
        deadline: Instant,
    ) -> Result<Option<(nfs_fh3, Attr)>> {
        let (fh, attr) = match self.lookup_fh(dir, name, deadline).await {
            Ok(found) => found,
            Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => return Ok(None),
            Err(e) => return Err(e),
        };
        if !ours.looks_like(&attr) {
            return Ok(None);
        }
        if let Some(target) = ours.target {
            if self.readlink_fh(&fh, deadline).await? != target {
                return Ok(None);
            }
        }
        debug!(target = %InDir { dir, name }, kind = ?ours.kind, "a retried call found the object of its first attempt");
        Ok(Some((fh, attr)))
    }

    async fn readlink_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<Vec<u8>> {
        let args = READLINK3args {
            symlink: fh.clone(),
        };
        let reply = self
            .call("readlink", deadline, procedure!(readlink, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(ok.data.0.into_owned()),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("readlink", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    async fn mkdir_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        perm: u16,
        owner: Owner,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes: new_sattr(Some(perm), owner),
        };
        let (reply, retried) = self
            .call_tracked("mkdir", deadline, procedure!(mkdir, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => {
                let (fh, attr) = self
                    .made(dir, name, ok.obj, ok.obj_attributes, deadline)
                    .await?;
                let attr = self
                    .settle_owner("mkdir", &fh, attr, Some(perm), owner, deadline)
                    .await?;
                Ok((fh, attr))
            }
            Nfs3Result::Err((status, _)) => {
                if status == nfsstat3::NFS3ERR_EXIST && retried {
                    let found = self
                        .ours_after_retry(
                            dir,
                            name,
                            Ours {
                                kind: Kind::Directory,
                                perm: Some(perm),
                                owner,
                                target: None,
                            },
                            deadline,
                        )
                        .await?;
                    if let Some(found) = found {
                        return Ok(found);
                    }
                }
                Err(self.status_error("mkdir", status, format_args!("{}", InDir { dir, name })))
            }
        }
    }

    async fn symlink_fh(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        target: &[u8],
        owner: Owner,
        deadline: Instant,
    ) -> Result<(nfs_fh3, Attr)> {
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: new_sattr(None, owner),
                symlink_data: nfspath3(Opaque::borrowed(target)),
            },
        };
        let (reply, retried) = self
            .call_tracked("symlink", deadline, procedure!(symlink, args))
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => {
                let (fh, attr) = self
                    .made(dir, name, ok.obj, ok.obj_attributes, deadline)
                    .await?;
                let attr = self
                    .settle_owner("symlink", &fh, attr, None, owner, deadline)
                    .await?;
                Ok((fh, attr))
            }
            Nfs3Result::Err((status, _)) => {
                if status == nfsstat3::NFS3ERR_EXIST && retried {
                    let found = self
                        .ours_after_retry(
                            dir,
                            name,
                            Ours {
                                kind: Kind::Symlink,
                                perm: None,
                                owner,
                                target: Some(target),
                            },
                            deadline,
                        )
                        .await?;
                    if let Some(found) = found {
                        return Ok(found);
                    }
                }
                Err(self.status_error("symlink", status, format_args!("{}", InDir { dir, name })))
            }
        }
    }

    /// REMOVE or RMDIR. NOENT in answer to a retry is the first attempt's success.
    async fn remove_name(
        &self,
        op: &'static str,
        dir: &nfs_fh3,
        name: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let object = dirop(dir, name);
        let (status, retried) = if op == "rmdir" {
            let args = RMDIR3args { object };
            let (reply, retried) = self
                .call_tracked(op, deadline, procedure!(rmdir, args))
                .await?;
            (reply.status(), retried)
        } else {
            let args = REMOVE3args { object };
            let (reply, retried) = self
                .call_tracked(op, deadline, procedure!(remove, args))
                .await?;
            (reply.status(), retried)
        };
        match status {
            nfsstat3::NFS3_OK => Ok(()),
            nfsstat3::NFS3ERR_NOENT if retried => {
                debug!(op, target = %InDir { dir, name }, "NOENT after a retry: the first attempt removed it");
                Ok(())
            }
            status => Err(self.status_error(op, status, format_args!("{}", InDir { dir, name }))),
        }
    }

    async fn rename_names(
        &self,
        from_dir: &nfs_fh3,
        from: &[u8],
        to_dir: &nfs_fh3,
        to: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let args = RENAME3args {
            from: dirop(from_dir, from),
            to: dirop(to_dir, to),
        };
        let (reply, retried) = self
            .call_tracked("rename", deadline, procedure!(rename, args))
            .await?;
        let status = reply.status();
        if status == nfsstat3::NFS3_OK {
            return Ok(());
        }
        if status == nfsstat3::NFS3ERR_NOENT && retried {
            // The first attempt may have moved it: the source name is gone and the target is there.
            match self.lookup_fh(to_dir, to, deadline).await {
                Ok(_) => {
                    debug!(from = %InDir { dir: from_dir, name: from }, "NOENT after a retried RENAME, and the target exists: the first attempt renamed it");
                    return Ok(());
                }
                Err(SourceError::Status { errno, .. }) if errno == libc::ENOENT => {}
                Err(e) => return Err(e),
            }
        }
        Err(self.status_error(
            "rename",
            status,
            format_args!(
                "{} to {}",
                InDir {
                    dir: from_dir,
                    name: from
                },
                InDir {
                    dir: to_dir,
                    name: to
                }
            ),
        ))
    }
}

fn rpc_failure(id: &str, op: &'static str, e: RpcError) -> SourceError {
    let errno = match e {
        RpcError::Auth(_) => libc::EACCES,
        _ => libc::EIO,
    };
    SourceError::status(op, errno, format!("{id}: RPC failed: {e}"))
}

/// A file handle as hex, for messages and logs.
struct Fh<'a>(&'a [u8]);

impl fmt::Display for Fh<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fh:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

fn fh_of(handle: &Handle) -> nfs_fh3 {
    nfs_fh3 {
        data: Opaque::owned(handle.as_bytes().to_vec()),
    }
}

fn errno_of(status: nfsstat3) -> i32 {
    match status {
        nfsstat3::NFS3_OK => 0,
        nfsstat3::NFS3ERR_PERM => libc::EPERM,
        nfsstat3::NFS3ERR_NOENT => libc::ENOENT,
        nfsstat3::NFS3ERR_NXIO => libc::ENXIO,
        nfsstat3::NFS3ERR_ACCES => libc::EACCES,
        nfsstat3::NFS3ERR_EXIST => libc::EEXIST,
        nfsstat3::NFS3ERR_XDEV => libc::EXDEV,
        nfsstat3::NFS3ERR_NODEV => libc::ENODEV,
        nfsstat3::NFS3ERR_NOTDIR => libc::ENOTDIR,
        nfsstat3::NFS3ERR_ISDIR => libc::EISDIR,
        nfsstat3::NFS3ERR_INVAL => libc::EINVAL,
        nfsstat3::NFS3ERR_FBIG => libc::EFBIG,
        nfsstat3::NFS3ERR_NOSPC => libc::ENOSPC,
        nfsstat3::NFS3ERR_ROFS => libc::EROFS,
        nfsstat3::NFS3ERR_MLINK => libc::EMLINK,
        nfsstat3::NFS3ERR_NAMETOOLONG => libc::ENAMETOOLONG,
        nfsstat3::NFS3ERR_NOTEMPTY => libc::ENOTEMPTY,
        nfsstat3::NFS3ERR_DQUOT => libc::EDQUOT,
        nfsstat3::NFS3ERR_STALE | nfsstat3::NFS3ERR_BADHANDLE => libc::ESTALE,
        nfsstat3::NFS3ERR_NOTSUPP => libc::EOPNOTSUPP,
        nfsstat3::NFS3ERR_IO
        | nfsstat3::NFS3ERR_REMOTE
        | nfsstat3::NFS3ERR_NOT_SYNC
        | nfsstat3::NFS3ERR_BAD_COOKIE
        | nfsstat3::NFS3ERR_TOOSMALL
        | nfsstat3::NFS3ERR_SERVERFAULT
        | nfsstat3::NFS3ERR_BADTYPE
        | nfsstat3::NFS3ERR_JUKEBOX => libc::EIO,
    }
}

fn kind_of(kind: ftype3) -> Kind {
    match kind {
        ftype3::NF3REG => Kind::File,
        ftype3::NF3DIR => Kind::Directory,
        ftype3::NF3BLK => Kind::BlockDevice,
        ftype3::NF3CHR => Kind::CharDevice,
        ftype3::NF3LNK => Kind::Symlink,
        ftype3::NF3SOCK => Kind::Socket,
        ftype3::NF3FIFO => Kind::Fifo,
    }
}

/// Major and minor as the kernel's 32-bit device number (`new_encode_dev`), which is what FUSE
/// passes on: `(minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)`.
fn rdev_of(spec: &specdata3) -> u32 {
    let (major, minor) = (spec.specdata1, spec.specdata2);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn timestamp_of(time: &nfstime3) -> Timestamp {
    Timestamp {
        secs: i64::from(time.seconds),
        nanos: time.nseconds.min(999_999_999),
    }
}

fn attr_from_fattr(attr: &fattr3) -> Attr {
    Attr {
        kind: kind_of(attr.type_),
        size: attr.size,
        perm: (attr.mode & 0o7777) as u16,
        uid: attr.uid,
        gid: attr.gid,
        nlink: attr.nlink,
        rdev: rdev_of(&attr.rdev),
        fileid: attr.fileid,
        atime: timestamp_of(&attr.atime),
        mtime: timestamp_of(&attr.mtime),
        ctime: timestamp_of(&attr.ctime),
    }
}

// ---------------------------------------------------------------------------------------------

#[async_trait]
impl Source for NfsSource {
    fn id(&self) -> &str {
        &self.inner.id
    }

    async fn root(&self) -> Result<(Handle, Attr)> {
        let fh = fh_of(&self.root);
        let attr = self
            .inner
            .getattr_fh(&fh, self.deadline())
            .instrument(debug_span!("nfs_root"))
            .await?;
        Ok((self.root.clone(), attr))
    }

    async fn lookup(&self, dir: &Handle, name: &[u8]) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let span = debug_span!("nfs_lookup", dir = %Fh(dir.as_bytes()), name = %String::from_utf8_lossy(name).escape_debug());
        let (fh, attr) = self
            .inner
            .lookup_fh(&fh_of(dir), name, self.deadline())
            .instrument(span)
            .await?;
        Ok((Handle(fh.data.into_owned().into_boxed_slice()), attr))
    }

    async fn getattr(&self, node: &Handle) -> Result<Attr> {
        let span = debug_span!("nfs_getattr", node = %Fh(node.as_bytes()));
        self.inner
            .getattr_fh(&fh_of(node), self.deadline())
            .instrument(span)
            .await
    }

    async fn read_dir(&self, dir: &Handle) -> Result<Vec<DirEntry>> {
        let span = debug_span!("nfs_read_dir", dir = %Fh(dir.as_bytes()));
        self.inner.read_dir(&fh_of(dir)).instrument(span).await
    }

    async fn read(&self, file: &Handle, offset: u64, len: u32) -> Result<Vec<u8>> {
        let span = debug_span!("nfs_read", file = %Fh(file.as_bytes()), offset, len);
        async move {
            if len == 0 {
                return Ok(Vec::new());
            }
            let deadline = self.deadline();
            let fh = fh_of(file);
            let piece = self.read_size.max(1);
            if len <= piece {
                return self.inner.read_range(&fh, offset, len, deadline).await;
            }
            // Pieces in parallel over the pool, all within the one deadline.
            let mut tasks = JoinSet::new();
            let mut count = 0usize;
            let mut start = 0u32;
            while start < len {
                let size = piece.min(len - start);
                let (inner, fh) = (self.inner.clone(), fh.clone());
                let at = offset.saturating_add(u64::from(start));
                let index = count;
                tasks.spawn(
                    async move { (index, inner.read_range(&fh, at, size, deadline).await) }
                        .in_current_span(),
                );
                count += 1;
                start += size;
            }
            let mut pieces: Vec<Option<Vec<u8>>> = vec![None; count];
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((index, Ok(data))) => pieces[index] = Some(data),
                    // Dropping the set aborts the other pieces.
                    Ok((_, Err(e))) => return Err(e),
                    Err(e) => {
                        return Err(SourceError::status(
                            "read",
                            libc::EIO,
                            format!("{}: read task failed: {e}", self.inner.id),
                        ));
                    }
                }
            }
            let mut out = Vec::with_capacity(len as usize);
            let mut start = 0u32;
            for data in pieces.into_iter().flatten() {
                let expected = piece.min(len - start);
                out.extend_from_slice(&data);
                if (data.len() as u32) < expected {
                    break; // end of file
                }
                start += expected;
            }
            Ok(out)
        }
        .instrument(span)
        .await
    }

    /// UNSTABLE WRITEs; the verifier of each reply is remembered for [`Source::commit`]. Returns
    /// the attributes after the write (the latest reported by the pieces).
    async fn write(&self, file: &Handle, offset: u64, data: &[u8]) -> Result<Option<Attr>> {
        let span = debug_span!("nfs_write", file = %Fh(file.as_bytes()), offset, len = data.len());
        self.write_impl(file, offset, data).instrument(span).await
    }

    /// The same UNSTABLE WRITEs, answered once they are sent: the outcome (an error status, a
    /// timeout, a transport failure after the one retry) comes with the [`Landing`].
    async fn write_sent(&self, file: &Handle, offset: u64, data: Vec<u8>) -> Result<Landing> {
        let span =
            debug_span!("nfs_write_sent", file = %Fh(file.as_bytes()), offset, len = data.len());
        self.write_sent_impl(file, offset, data)
            .instrument(span)
            .await
    }

    /// COMMIT of the whole file. Fails with EIO when the server's write verifier differs from the
    /// one the unstable writes since the last commit were answered with (or when those writes saw
    /// two verifiers): the server restarted and may have dropped data we no longer hold. The loss
    /// is reported once; the next commit starts afresh.
    async fn commit(&self, file: &Handle) -> Result<()> {
        let span = debug_span!("nfs_commit", file = %Fh(file.as_bytes()));
        self.inner
            .commit_fh(&fh_of(file), self.deadline())
            .instrument(span)
            .await
    }

    async fn create(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
        exclusive: bool,
    ) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let (fh, attr) = self
            .inner
            .create_fh(&fh_of(dir), name, mode, owner, exclusive, self.deadline())
            .instrument(Self::span("create", dir, name))
            .await?;
        Ok((handle_of(fh), attr))
    }

    async fn mkdir(
        &self,
        dir: &Handle,
        name: &[u8],
        mode: u16,
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let (fh, attr) = self
            .inner
            .mkdir_fh(&fh_of(dir), name, mode, owner, self.deadline())
            .instrument(Self::span("mkdir", dir, name))
            .await?;
        Ok((handle_of(fh), attr))
    }

    async fn symlink(
        &self,
        dir: &Handle,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let (fh, attr) = self
            .inner
            .symlink_fh(&fh_of(dir), name, target, owner, self.deadline())
            .instrument(Self::span("symlink", dir, name))
            .await?;
        Ok((handle_of(fh), attr))
    }

    async fn remove(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.inner
            .remove_name("remove", &fh_of(dir), name, self.deadline())
            .instrument(Self::span("remove", dir, name))
            .await
    }

    async fn rmdir(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.inner
            .remove_name("rmdir", &fh_of(dir), name, self.deadline())
            .instrument(Self::span("rmdir", dir, name))
            .await
    }

    async fn rename(
        &self,
        from_dir: &Handle,
        from: &[u8],
        to_dir: &Handle,
        to: &[u8],
    ) -> Result<()> {
        check_name(from)?;
        check_name(to)?;
        self.inner
            .rename_names(&fh_of(from_dir), from, &fh_of(to_dir), to, self.deadline())
            .instrument(Self::span("rename", from_dir, from))
            .await
    }

    async fn setattr(&self, node: &Handle, changes: &SetAttr) -> Result<Attr> {
        let span = debug_span!("nfs_setattr", node = %Fh(node.as_bytes()), ?changes);
        self.inner
            .setattr_fh(&fh_of(node), changes, self.deadline())
            .instrument(span)
            .await
    }

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>> {
        let span = debug_span!("nfs_read_link", link = %Fh(link.as_bytes()));
        self.inner
            .readlink_fh(&fh_of(link), self.deadline())
            .instrument(span)
            .await
    }
}

impl NfsSource {
    fn span(op: &'static str, dir: &Handle, name: &[u8]) -> tracing::Span {
        debug_span!("nfs_write_op", op, dir = %Fh(dir.as_bytes()), name = %String::from_utf8_lossy(name).escape_debug())
    }
}

fn handle_of(fh: nfs_fh3) -> Handle {
    Handle(fh.data.into_owned().into_boxed_slice())
}

/// The write half. Every call reaches the server before it returns; each is bounded by one
/// deadline (the source timeout) for all the RPCs it makes.
impl NfsSource {
    /// Refuses a write that would end beyond the largest offset.
    fn check_write(&self, file: &Handle, offset: u64, len: usize) -> Result<()> {
        if offset.checked_add(len as u64).is_none() {
            return Err(SourceError::status(
                "write",
                libc::EFBIG,
                format!(
                    "{}: {}: write beyond the largest offset",
                    self.inner.id,
                    Fh(file.as_bytes())
                ),
            ));
        }
        Ok(())
    }

    async fn write_impl(&self, file: &Handle, offset: u64, data: &[u8]) -> Result<Option<Attr>> {
        if data.is_empty() {
            return Ok(None);
        }
        self.check_write(file, offset, data.len())?;
        let deadline = self.deadline();
        let fh = fh_of(file);
        let piece = self.write_size.max(1) as usize;
        // Pieces concurrently over the pool (one connection each), all within the one deadline.
        // On the first error the others are dropped, which drops their connections.
        let mut pieces: FuturesUnordered<_> = data
            .chunks(piece)
            .enumerate()
            .map(|(index, chunk)| {
                let at = offset + (index * piece) as u64;
                self.inner.write_range(&fh, at, chunk, deadline)
            })
            .collect();
        let mut attr = None;
        while let Some(result) = pieces.next().await {
            attr = newest(attr, result?);
        }
        Ok(attr)
    }

    /// [`Source::write_sent`]: the pieces run in one future that owns the data; this returns
    /// it once every piece's WRITE has been written to its connection, or the outcome of a write
    /// that ended before that.
    async fn write_sent_impl(&self, file: &Handle, offset: u64, data: Vec<u8>) -> Result<Landing> {
        if data.is_empty() {
            return Ok(Landing::Landed(None));
        }
        self.check_write(file, offset, data.len())?;
        let deadline = self.deadline();
        let fh = fh_of(file);
        let piece = self.write_size.max(1) as usize;
        let (tell, sent) = oneshot::channel();
        let write = Arc::new(WriteSent {
            pieces_left: AtomicUsize::new(data.len().div_ceil(piece)),
            tell: Mutex::new(Some(tell)),
        });
        let inner = self.inner.clone();
        let mut writing: WriteOutcome = Box::pin(
            async move {
                let mut pieces: FuturesUnordered<_> = data
                    .chunks(piece)
                    .enumerate()
                    .map(|(index, chunk)| {
                        let at = offset + (index * piece) as u64;
                        let sent = Arc::new(PieceSent {
                            fired: AtomicBool::new(false),
                            write: write.clone(),
                        });
                        SENT.scope(sent, inner.write_range(&fh, at, chunk, deadline))
                    })
                    .collect();
                drop(write);
                let mut attr = None;
                while let Some(result) = pieces.next().await {
                    attr = newest(attr, result?);
                }
                Ok(attr)
            }
            .instrument(tracing::Span::current()),
        );
        // Driven here until it is sent (no hand-over to another task on the way), then handed
        // to the caller to await the answer.
        match select(&mut writing, sent).await {
            Either::Left((result, _)) => result.map(Landing::Landed),
            Either::Right((Ok(()), _)) => Ok(Landing::InFlight(writing)),
            // Every piece ended (or the first failure dropped the rest) before all were sent.
            Either::Right((Err(_), _)) => writing.await.map(Landing::Landed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_longest_export_prefix_wins_by_components() {
        let exports = strings(&["/", "/data", "/data/sets", "/data/sets2", "/other/"]);
        assert_eq!(best_export("/data/sets/a/b", &exports), Some("/data/sets"));
        assert_eq!(best_export("/data/sets", &exports), Some("/data/sets"));
        // A prefix of the string is not a prefix of the path.
        assert_eq!(best_export("/data/setsX", &exports), Some("/data"));
        assert_eq!(best_export("/other/x", &exports), Some("/other/"));
        assert_eq!(best_export("/elsewhere", &exports), Some("/"));
        let no_root = strings(&["/a", "/b"]);
        assert_eq!(best_export("/x", &no_root), None);
        assert_eq!(best_export("/", &no_root), None);
        assert_eq!(best_export("/ab", &no_root), None);

        assert_eq!(remainder("/data/sets/a/b", "/data/sets"), ["a", "b"]);
        assert_eq!(remainder("/data/sets", "/data/sets/"), Vec::<String>::new());
        assert_eq!(remainder("/x/y", "/"), ["x", "y"]);
    }

    #[test]
    fn mount_candidates_go_from_the_whole_path_to_the_root() {
        assert_eq!(mount_candidates("/a/b/c"), ["/a/b/c", "/a/b", "/a", "/"]);
        assert_eq!(mount_candidates("/"), ["/"]);
    }

    #[test]
    fn statuses_map_to_errnos() {
        for (status, errno) in [
            (nfsstat3::NFS3ERR_NOENT, libc::ENOENT),
            (nfsstat3::NFS3ERR_ACCES, libc::EACCES),
            (nfsstat3::NFS3ERR_PERM, libc::EPERM),
            (nfsstat3::NFS3ERR_NOTDIR, libc::ENOTDIR),
            (nfsstat3::NFS3ERR_ISDIR, libc::EISDIR),
            (nfsstat3::NFS3ERR_STALE, libc::ESTALE),
            (nfsstat3::NFS3ERR_BADHANDLE, libc::ESTALE),
            (nfsstat3::NFS3ERR_ROFS, libc::EROFS),
            (nfsstat3::NFS3ERR_NOSPC, libc::ENOSPC),
            (nfsstat3::NFS3ERR_NAMETOOLONG, libc::ENAMETOOLONG),
            (nfsstat3::NFS3ERR_NOTEMPTY, libc::ENOTEMPTY),
            (nfsstat3::NFS3ERR_EXIST, libc::EEXIST),
            (nfsstat3::NFS3ERR_DQUOT, libc::EDQUOT),
            (nfsstat3::NFS3ERR_IO, libc::EIO),
            (nfsstat3::NFS3ERR_SERVERFAULT, libc::EIO),
            (nfsstat3::NFS3ERR_BAD_COOKIE, libc::EIO),
        ] {
            assert_eq!(errno_of(status), errno, "{status}");
        }
    }

    #[test]
    fn attributes_map_from_fattr3() {
        let attr = fattr3 {
            type_: ftype3::NF3CHR,
            mode: 0o104755,
            nlink: 3,
            uid: 1000,
            gid: 100,
            size: 1 << 40,
            used: 0,
            rdev: specdata3 {
                specdata1: 259,
                specdata2: 0x1234,
            },
            fsid: 7,
            fileid: 42,
            atime: nfstime3 {
                seconds: 1,
                nseconds: 2,
            },
            mtime: nfstime3 {
                seconds: u32::MAX,
                nseconds: 2_000_000_000,
            },
            ctime: nfstime3 {
                seconds: 5,
                nseconds: 6,
            },
        };
        let mapped = attr_from_fattr(&attr);
        assert_eq!(mapped.kind, Kind::CharDevice);
        assert_eq!(mapped.perm, 0o4755);
        assert_eq!((mapped.uid, mapped.gid, mapped.nlink), (1000, 100, 3));
        assert_eq!(mapped.size, 1 << 40);
        assert_eq!(mapped.fileid, 42);
        assert_eq!(mapped.atime, Timestamp { secs: 1, nanos: 2 });
        assert_eq!(
            mapped.mtime,
            Timestamp {
                secs: i64::from(u32::MAX),
                nanos: 999_999_999
            }
        );
        // The kernel's encoding: minor low byte, 12 bits of major, then the rest of the minor.
        assert_eq!(mapped.rdev, 0x34 | (259 << 8) | (0x1200 << 12));
        assert_eq!(
            rdev_of(&specdata3 {
                specdata1: 8,
                specdata2: 1
            }),
            0x801
        );
        for (nfs, kind) in [
            (ftype3::NF3REG, Kind::File),
            (ftype3::NF3DIR, Kind::Directory),
            (ftype3::NF3LNK, Kind::Symlink),
            (ftype3::NF3BLK, Kind::BlockDevice),
            (ftype3::NF3SOCK, Kind::Socket),
            (ftype3::NF3FIFO, Kind::Fifo),
        ] {
            assert_eq!(kind_of(nfs), kind);
        }
    }

    #[test]
    fn commit_reports_a_verifier_change_since_the_unstable_writes() {
        let (a, b) = (writeverf3([1; 8]), writeverf3([2; 8]));
        let fh = &b"file"[..];
        let mut pending = Pending::default();
        // Nothing written: nothing to report, whatever the verifier.
        let before = pending.get(fh);
        assert!(!pending.committed(fh, before, b));

        // Same verifier at the writes and at the commit: durable, and forgotten.
        assert!(!pending.note(fh, a));
        assert!(!pending.note(fh, a));
        let before = pending.get(fh);
        assert!(!pending.committed(fh, before, a));
        assert!(pending.get(fh).is_none());

        // The server restarted between the writes and the commit.
        pending.note(fh, a);
        let before = pending.get(fh);
        assert!(pending.committed(fh, before, b));
        assert!(pending.get(fh).is_none(), "reported once");

        // ...or between two writes, even if the commit then agrees with the last one.
        pending.note(fh, a);
        assert!(pending.note(fh, b));
        let before = pending.get(fh);
        assert!(pending.committed(fh, before, b));

        // A write answered while the commit was in flight stays pending: the next commit checks
        // it, and the loss of the earlier data is reported only once.
        pending.note(fh, a);
        let before = pending.get(fh);
        pending.note(fh, b);
        assert!(pending.committed(fh, before, b));
        let before = pending.get(fh);
        assert!(before.is_some_and(|u| !u.lost));
        assert!(!pending.committed(fh, before, b));
        assert!(pending.get(fh).is_none());
    }

    #[test]
    fn attribute_changes_map_to_sattr3() {
        let changes = SetAttr {
            perm: Some(0o104755),
            uid: Some(1),
            gid: None,
            size: Some(7),
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::At(Timestamp { secs: 5, nanos: 6 })),
        };
        let sattr = sattr_of(&changes).unwrap();
        assert!(matches!(sattr.mode, Nfs3Option::Some(0o4755)));
        assert!(matches!(sattr.uid, Nfs3Option::Some(1)));
        assert!(matches!(sattr.gid, Nfs3Option::None));
        assert!(matches!(sattr.size, Nfs3Option::Some(7)));
        assert!(matches!(sattr.atime, set_atime::SET_TO_SERVER_TIME));
        assert!(matches!(
            sattr.mtime,
            set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                seconds: 5,
                nseconds: 6
            })
        ));
        let empty = sattr_of(&SetAttr::default()).unwrap();
        assert!(matches!(empty.atime, set_atime::DONT_CHANGE));
        assert!(matches!(empty.mode, Nfs3Option::None));
        // NFSv3 carries unsigned 32-bit seconds.
        for secs in [-1, i64::from(u32::MAX) + 1] {
            let changes = SetAttr {
                atime: Some(SetTime::At(Timestamp { secs, nanos: 0 })),
                ..SetAttr::default()
            };
            assert_eq!(sattr_of(&changes).unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn names_are_single_components() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(check_name(bad).unwrap_err().errno(), libc::EINVAL);
        }
        assert_eq!(
            check_name(&[b'x'; 256]).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        assert!(check_name(b"ok name").is_ok());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_not_invalid() {
        // Nothing listens on port 1 of the loopback address: connection refused, at once.
        let url = NfsUrl {
            host: "127.0.0.1".into(),
            nfs_port: Some(1),
            mount_port: Some(1),
            path: "/x".into(),
        };
        let options = SourceOptions {
            timeout: Duration::from_secs(5),
            connections: 2,
        };
        let started = std::time::Instant::now();
        let err = NfsSource::connect(&url, &options).await.err().unwrap();
        assert!(matches!(err, SourceError::Unavailable { .. }), "{err}");
        assert!(err.is_unavailable());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
