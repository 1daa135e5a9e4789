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
//!   dropped, never reused (a late reply would desynchronise it). All our calls are idempotent, so
//!   one that failed in transport on a pooled connection (which may have gone stale, e.g. the
//!   server restarted) is retried once on a fresh connection. A server that is down makes calls
//!   fail fast (connection refused) or at the timeout (no answer); when it is back, calls work again.
//! - **Credentials**: AUTH_SYS as uid 0 / gid 0 with this machine's name, from a privileged source
//!   port when running as root, so the daemon reads like a root kernel client does on a
//!   `no_root_squash` export.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::nfs3_types::mount::{self, dirpath};
use nfs3_client::nfs3_types::nfs3::{
    self, FSINFO3args, GETATTR3args, LOOKUP3args, Nfs3Option, Nfs3Result, READ3args,
    READDIRPLUS3args, READDIRPLUS3res, READLINK3args, cookieverf3, diropargs3, fattr3, filename3,
    ftype3, nfs_fh3, nfsstat3, nfstime3, specdata3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{MountClient, MountError, Nfs3Client, PortmapError, PortmapperClient, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, warn};

use super::{
    Attr, DirEntry, Handle, Kind, NfsUrl, Result, Source, SourceError, SourceOptions, Timestamp,
    check_name,
};

/// The largest single READ we issue, even when the server accepts more (ganesha announces
/// `rtmax` = 64 MiB): larger reads are split into pieces of this size and fetched in parallel over
/// the pool, which is faster than one large READ and bounds each reply's buffer.
pub const MAX_READ_PIECE: u32 = 1 << 20;
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
    });

    let rtmax = inner.fsinfo(&export_fh).await?;
    let read_size = if rtmax == 0 {
        64 * 1024
    } else {
        rtmax.min(MAX_READ_PIECE)
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
    debug!(rtmax, read_size, "volume root found");
    Ok(NfsSource {
        inner,
        root: Handle(fh.data.into_owned().into_boxed_slice()),
        export,
        read_size,
        rtmax,
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
        let mut may_retry_stale = true;
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
                    return Ok(reply);
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

    async fn fsinfo(&self, fh: &nfs_fh3) -> Result<u32> {
        let args = FSINFO3args { fsroot: fh.clone() };
        let reply = self
            .call("fsinfo", Instant::now() + self.timeout, |mut c| {
                let args = &args;
                async move {
                    let r = c.fsinfo(args).await;
                    (c, r)
                }
            })
            .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(ok.rtmax),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error("fsinfo", status, format_args!("{}", Fh(&fh.data))))
            }
        }
    }

    async fn getattr_fh(&self, fh: &nfs_fh3, deadline: Instant) -> Result<Attr> {
        let args = GETATTR3args { object: fh.clone() };
        let reply = self
            .call("getattr", deadline, |mut c| {
                let args = &args;
                async move {
                    let r = c.getattr(args).await;
                    (c, r)
                }
            })
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
            .call("lookup", deadline, |mut c| {
                let args = &args;
                async move {
                    let r = c.lookup(args).await;
                    (c, r)
                }
            })
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
            let reply = self
                .call("read", deadline, |mut c| {
                    let args = &args;
                    async move {
                        let r = c.read(args).await;
                        (c, r)
                    }
                })
                .await?;
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
        self.call("readdir", Instant::now() + self.timeout, |mut c| {
            let args = &args;
            async move {
                let r = c.readdirplus(args).await;
                (c, r)
            }
        })
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

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>> {
        let span = debug_span!("nfs_read_link", link = %Fh(link.as_bytes()));
        async move {
            let args = READLINK3args {
                symlink: fh_of(link),
            };
            let reply = self
                .inner
                .call("readlink", self.deadline(), |mut c| {
                    let args = &args;
                    async move {
                        let r = c.readlink(args).await;
                        (c, r)
                    }
                })
                .await?;
            match reply {
                Nfs3Result::Ok(ok) => Ok(ok.data.0.into_owned()),
                Nfs3Result::Err((status, _)) => Err(self.inner.status_error(
                    "readlink",
                    status,
                    format_args!("{}", Fh(link.as_bytes())),
                )),
            }
        }
        .instrument(span)
        .await
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
