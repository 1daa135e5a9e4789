//! Opening a source: the server's address and ports (from the URL or its portmapper), the
//! export that contains the URL's path (MOUNT `EXPORT`, else `MNT` on successively shorter
//! prefixes), the walk from the export to the volume root, and the server's transfer sizes.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nfs3_client::nfs3_types::mount::{self, dirpath};
use nfs3_client::nfs3_types::nfs3::{self, FSINFO3args, Nfs3Result, nfs_fh3};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{MountClient, MountError, PortmapError, PortmapperClient, RpcError};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::convert::Fh;
use super::pool::{Transport, connect_tcp};
use super::writes::UnstableWrites;
use super::{MAX_READ_PIECE, MAX_WRITE_PIECE, NfsSource, Server};
use crate::source::{Handle, Kind, NfsUrl, Result, SourceError, SourceOptions};

/// The portmapper's well-known port.
const PORTMAPPER_PORT: u16 = 111;
/// NFS's well-known port (NFSv4 servers listen there without a portmapper).
const NFS_PORT: u16 = 2049;

pub(super) async fn connect(
    url: &NfsUrl,
    id: String,
    options: &SourceOptions,
) -> Result<NfsSource> {
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

    let server = Arc::new(Server {
        id: id.clone(),
        addr: SocketAddr::new(ip, nfs_port),
        privileged,
        credential,
        timeout,
        idle: Mutex::new(Vec::new()),
        slots: Arc::new(Semaphore::new(options.connections.max(1))),
        unstable: Mutex::new(UnstableWrites::default()),
    });

    let (rtmax, wtmax) = server.fsinfo(&export_fh).await?;
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
        match server.lookup_fh(&fh, name.as_bytes(), deadline).await {
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
    let attr = server.getattr_fh(&fh, Instant::now() + timeout).await?;
    if attr.kind != Kind::Directory {
        return Err(SourceError::Invalid(format!(
            "{id}: {} is not a directory",
            display_dir(&walked)
        )));
    }
    debug!(rtmax, read_size, wtmax, write_size, "volume root found");
    Ok(NfsSource {
        server,
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
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await {
        Err(_) => Err(SourceError::Timeout {
            op: "resolve host",
            source_name: id.to_string(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(SourceError::unavailable(
            id,
            format!("cannot resolve host {host}"),
            e,
        )),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| SourceError::Unavailable {
                source_name: id.to_string(),
                message: format!("host {host} has no address"),
                cause: None,
            }),
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

    /// The server cannot be reached: `message` says where, `cause` why.
    fn unavailable(
        &self,
        message: String,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> SourceError {
        SourceError::unavailable(self.id, message, cause)
    }

    /// A broken protocol exchange with the server while opening.
    fn protocol(
        &self,
        message: String,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> SourceError {
        SourceError::Protocol {
            source_name: self.id.to_string(),
            message,
            cause: Arc::new(cause),
        }
    }

    /// A transport error means the server went away; anything else is a broken protocol exchange.
    fn rpc_error(&self, op: &'static str, service: &str, e: RpcError) -> SourceError {
        match e {
            RpcError::Io(e) => self.unavailable(service.to_string(), e),
            other => self.protocol(format!("{op} ({service})"), other),
        }
    }

    async fn open(&self, addr: SocketAddr, privileged: bool, service: &str) -> Result<Transport> {
        self.bounded("connect", connect_tcp(addr, privileged))
            .await?
            .map(Transport)
            .map_err(|e| self.unavailable(format!("{service} at {addr}"), e))
    }

    /// Asks the portmapper for the ports that are missing.
    async fn portmap(
        &self,
        ip: IpAddr,
        want_mount: bool,
        want_nfs: bool,
    ) -> Result<(Option<u16>, Option<u16>)> {
        let addr = SocketAddr::new(ip, PORTMAPPER_PORT);
        let conn = match self.open(addr, false, "portmapper").await {
            Ok(conn) => conn,
            Err(refused @ SourceError::Unavailable { .. }) => {
                // No portmapper, yet the NFS port answers: a server that speaks NFSv4 only
                // (which needs no portmapper).
                let nfs = SocketAddr::new(ip, NFS_PORT);
                let answers = self.bounded("connect", connect_tcp(nfs, false)).await;
                return Err(match answers {
                    Ok(Ok(_)) => SourceError::NotOffered {
                        source_name: self.id.to_string(),
                        message: format!(
                            "no portmapper answers at {addr} ({refused}), but {nfs} does: the \
                             server speaks NFSv4 only"
                        ),
                    },
                    _ => refused,
                });
            }
            Err(other) => return Err(other),
        };
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
        portmapper: &mut PortmapperClient<Transport>,
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
            Err(PortmapError::ProgramUnavailable) => Err(SourceError::NotOffered {
                source_name: self.id.to_string(),
                message: format!(
                    "{name} v3 over TCP is not registered with the portmapper at {addr} (an \
                     NFSv4-only server?)"
                ),
            }),
            Err(PortmapError::Rpc(e)) => Err(self.rpc_error("GETPORT", "portmapper", e)),
            Err(other) => Err(self.protocol(format!("portmapper at {addr}"), other)),
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
            Err(RpcError::Io(e)) => return Err(self.unavailable("MOUNT service".into(), e)),
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
        client: &mut MountClient<Transport>,
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

impl Server {
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
        // The message says which source and where; the I/O error is its source, not flattened.
        let message = err.to_string();
        assert!(message.contains("nfs://127.0.0.1"), "{message}");
        assert!(
            message.contains("MOUNT service at 127.0.0.1:1"),
            "{message}"
        );
        let cause = std::error::Error::source(&err).expect("the I/O error underneath");
        let io = cause.downcast_ref::<io::Error>().expect("an I/O error");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            !message.contains(&io.to_string()),
            "the cause is not repeated: {message}"
        );
    }
}
