//! The NFSv3 source: a userspace client (on `nfs3_client`), because nodes and serverless
//! sandboxes often have no kernel NFS client.
//!
//! The parts: [`discovery`] (opening: ports, the export, the walk to the volume root),
//! [`pool`] (the connections, the transport under `nfs3_client`, calls and their retries),
//! [`namespace`] (attributes, lookups, listings and changes to names), [`writes`] (WRITE and
//! COMMIT), [`convert`] (between NFSv3 and the source's types); data reads are here.
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
//! - **Writes**: see [`SourceWrite::write`] and [`SourceWrite::commit`] on [`NfsSource`]. WRITE is UNSTABLE,
//!   split into pieces of at most `min(wtmax, MAX_WRITE_PIECE)` issued concurrently over the pool.
//!   [`SourceWrite::write_sent`] returns as soon as every piece's request has been written to its
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

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nfs3_client::Nfs3Client;
use nfs3_client::nfs3_types::nfs3::{Nfs3Result, READ3args, nfs_fh3};
use nfs3_client::nfs3_types::rpc::opaque_auth;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug_span};

use super::{
    Attr, DirEntry, Handle, Landing, NfsUrl, Owner, Result, SetAttr, Source, SourceError,
    SourceOptions, SourceWrite, check_name,
};
use convert::{Fh, fh_of, handle_of};
use pool::Transport;
use replies::{NoProgress, ReadStep};
use writes::UnstableWrites;

/// The call [`Server::call`] makes on each attempt: one NFSv3 procedure of the client on the
/// borrowed arguments, handing the connection back with the result.
macro_rules! procedure {
    ($method:ident, $args:expr) => {{
        let args = &$args;
        move |mut c: $crate::source::nfs::Connection| async move {
            let r = c.$method(args).await;
            (c, r)
        }
    }};
}

mod convert;
mod discovery;
mod namespace;
mod pool;
pub mod replies;
mod writes;

/// The largest single READ we issue, even when the server accepts more (ganesha announces
/// `rtmax` = 64 MiB): larger reads are split into pieces of this size and fetched in parallel over
/// the pool, which is faster than one large READ and bounds each reply's buffer.
pub const MAX_READ_PIECE: u32 = 1 << 20;
/// The largest single WRITE we issue, even when the server accepts more: larger writes are split
/// into pieces of this size (or `wtmax` if smaller) sent concurrently over the pool.
pub const MAX_WRITE_PIECE: u32 = 1 << 20;

/// A source on an NFSv3 server.
pub struct NfsSource {
    server: Arc<Server>,
    root: Handle,
    export: String,
    read_size: u32,
    rtmax: u32,
    write_size: u32,
    wtmax: u32,
}

/// An NFS client on one pooled connection.
type Connection = Nfs3Client<Transport>;

/// What every call needs: where the server is, how to talk to it, and the connection pool.
struct Server {
    id: String,
    /// The NFS service: pool connections go straight there.
    addr: SocketAddr,
    privileged: bool,
    credential: opaque_auth<'static>,
    timeout: Duration,
    /// Connections that are connected, idle and in a clean state.
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection that may exist (idle or busy).
    slots: Arc<Semaphore>,
    /// Files with UNSTABLE writes not yet committed, by file handle.
    unstable: Mutex<UnstableWrites>,
}

impl NfsSource {
    /// Connects to the server, mounts the export that contains `url.path` and walks to the volume
    /// root. Fails with [`SourceError::Invalid`] when the export or path does not exist, and with
    /// [`SourceError::Unavailable`] or [`SourceError::Timeout`] when the server cannot be reached.
    pub async fn connect(url: &NfsUrl, options: &SourceOptions) -> Result<Self> {
        let id = url.to_string();
        let span = debug_span!("nfs_connect", source = %id);
        discovery::connect(url, id, options).instrument(span).await
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

    /// The size of the WRITE calls a large [`SourceWrite::write`] is split into:
    /// `min(wtmax, MAX_WRITE_PIECE)`.
    pub fn write_size(&self) -> u32 {
        self.write_size
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.server.timeout
    }
}

impl Server {
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
            match replies::take_read(&mut out, want, ok) {
                Ok(ReadStep::Done) => break,
                Ok(ReadStep::More) => {}
                Err(NoProgress) => {
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
        }
        Ok(out)
    }
}

#[async_trait]
impl Source for NfsSource {
    fn id(&self) -> &str {
        &self.server.id
    }

    async fn root(&self) -> Result<(Handle, Attr)> {
        let fh = fh_of(&self.root);
        let attr = self
            .server
            .getattr_fh(&fh, self.deadline())
            .instrument(debug_span!("nfs_root"))
            .await?;
        Ok((self.root.clone(), attr))
    }

    async fn lookup(&self, dir: &Handle, name: &[u8]) -> Result<(Handle, Attr)> {
        check_name(name)?;
        let span = debug_span!("nfs_lookup", dir = %Fh(dir.as_bytes()), name = %String::from_utf8_lossy(name).escape_debug());
        let (fh, attr) = self
            .server
            .lookup_fh(&fh_of(dir), name, self.deadline())
            .instrument(span)
            .await?;
        Ok((Handle(fh.data.into_owned().into_boxed_slice()), attr))
    }

    async fn getattr(&self, node: &Handle) -> Result<Attr> {
        let span = debug_span!("nfs_getattr", node = %Fh(node.as_bytes()));
        self.server
            .getattr_fh(&fh_of(node), self.deadline())
            .instrument(span)
            .await
    }

    async fn read_dir(&self, dir: &Handle) -> Result<Vec<DirEntry>> {
        let span = debug_span!("nfs_read_dir", dir = %Fh(dir.as_bytes()));
        self.server.read_dir(&fh_of(dir)).instrument(span).await
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
                return self.server.read_range(&fh, offset, len, deadline).await;
            }
            // Pieces in parallel over the pool, all within the one deadline.
            let mut tasks = JoinSet::new();
            let mut count = 0usize;
            let mut start = 0u32;
            while start < len {
                let size = piece.min(len - start);
                let (server, fh) = (self.server.clone(), fh.clone());
                let at = offset.saturating_add(u64::from(start));
                let index = count;
                tasks.spawn(
                    async move { (index, server.read_range(&fh, at, size, deadline).await) }
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
                        return Err(SourceError::failed(
                            "read",
                            libc::EIO,
                            format!("{}: a read task failed", self.server.id),
                            e,
                        ));
                    }
                }
            }
            Ok(replies::join_pieces(
                pieces.into_iter().flatten().collect(),
                piece,
                len,
            ))
        }
        .instrument(span)
        .await
    }

    async fn read_link(&self, link: &Handle) -> Result<Vec<u8>> {
        let span = debug_span!("nfs_read_link", link = %Fh(link.as_bytes()));
        self.server
            .readlink_fh(&fh_of(link), self.deadline())
            .instrument(span)
            .await
    }
}

#[async_trait]
impl SourceWrite for NfsSource {
    /// UNSTABLE WRITEs; the verifier of each reply is remembered for [`SourceWrite::commit`]. Returns
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
        self.server
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
            .server
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
            .server
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
            .server
            .symlink_fh(&fh_of(dir), name, target, owner, self.deadline())
            .instrument(Self::span("symlink", dir, name))
            .await?;
        Ok((handle_of(fh), attr))
    }

    async fn remove(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.server
            .remove_name("remove", &fh_of(dir), name, self.deadline())
            .instrument(Self::span("remove", dir, name))
            .await
    }

    async fn rmdir(&self, dir: &Handle, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.server
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
        self.server
            .rename_names(&fh_of(from_dir), from, &fh_of(to_dir), to, self.deadline())
            .instrument(Self::span("rename", from_dir, from))
            .await
    }

    async fn setattr(&self, node: &Handle, changes: &SetAttr) -> Result<Attr> {
        let span = debug_span!("nfs_setattr", node = %Fh(node.as_bytes()), ?changes);
        self.server
            .setattr_fh(&fh_of(node), changes, self.deadline())
            .instrument(span)
            .await
    }
}

impl NfsSource {
    fn span(op: &'static str, dir: &Handle, name: &[u8]) -> tracing::Span {
        debug_span!("nfs_write_op", op, dir = %Fh(dir.as_bytes()), name = %String::from_utf8_lossy(name).escape_debug())
    }
}
