//! The connection pool and retries: connections made on demand (from a privileged port when
//! running as root), one call at a time on each, every call bounded by its deadline, a
//! transport failure on a pooled connection retried once on a fresh one, and NFS3ERR_JUKEBOX
//! retried after a pause.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::nfs3_types::nfs3::{Nfs3Result, nfsstat3};
use nfs3_client::nfs3_types::rpc::opaque_auth;
use nfs3_client::{Nfs3Client, RpcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::debug;

use super::convert::errno_of;
use super::{Connection, Server, writes};
use crate::source::{Result, SourceError};

/// Source ports tried for a privileged connection (the range `nfs3_client` uses too).
const PRIVILEGED_PORTS: std::ops::RangeInclusive<u16> = 300..=1023;
/// First and longest pause before retrying a call the server answered with NFS3ERR_JUKEBOX.
const JUKEBOX_FIRST_DELAY: Duration = Duration::from_millis(50);
const JUKEBOX_MAX_DELAY: Duration = Duration::from_secs(1);

/// A TCP connection as `nfs3_client` wants it. Unlike its own tokio wrapper, a closed connection
/// is an error: `nfs3_client` reads with a loop that would spin forever on end of file.
pub(super) struct Transport(pub(super) TcpStream);

impl AsyncRead for Transport {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // `nfs3_client` reads only once the whole call has been written (pinned by
        // `writes::tests::the_client_reads_only_after_writing_a_whole_call`): for a WRITE whose
        // sending is awaited, that is the moment it is on the wire.
        writes::note_sent();
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

impl AsyncWrite for Transport {
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

pub(super) async fn connect_tcp(addr: SocketAddr, privileged: bool) -> io::Result<TcpStream> {
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
pub(super) trait Reply {
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

impl Server {
    pub(super) fn timeout_error(&self, op: &'static str) -> SourceError {
        SourceError::Timeout {
            op,
            source_name: self.id.clone(),
            after: self.timeout,
        }
    }

    /// The server cannot be reached for `op`; `cause` says why.
    pub(super) fn unavailable(
        &self,
        op: &'static str,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> SourceError {
        SourceError::unavailable(&*self.id, format!("{op} ({})", self.addr), cause)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
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
    ) -> Result<(OwnedSemaphorePermit, Connection, bool)> {
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
                    Transport(stream),
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
    pub(super) async fn call<R, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        call: F,
    ) -> Result<R>
    where
        R: Reply,
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = (Connection, std::result::Result<R, RpcError>)>,
    {
        Ok(self.call_tracked(op, deadline, call).await?.0)
    }

    /// [`Server::call`], also telling whether the reply answers a retry after a transport failure,
    /// i.e. whether an earlier attempt may have been carried out by the server without us
    /// getting its reply (what non-idempotent calls need to know).
    pub(super) async fn call_tracked<R, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        call: F,
    ) -> Result<(R, bool)>
    where
        R: Reply,
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = (Connection, std::result::Result<R, RpcError>)>,
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
                    let RpcError::Io(e) = e else {
                        return Err(rpc_failure(&self.id, op, e));
                    };
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

    pub(super) fn status_error(
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
}

fn rpc_failure(id: &str, op: &'static str, e: RpcError) -> SourceError {
    let errno = match e {
        RpcError::Auth(_) => libc::EACCES,
        _ => libc::EIO,
    };
    SourceError::failed(op, errno, format!("{id}: RPC failed"), e)
}
