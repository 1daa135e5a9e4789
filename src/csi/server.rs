//! Serving CSI services on a unix socket, and the `reservoir controller` process.
//!
//! [`serve`] takes any set of tonic services (built with [`tonic::service::RoutesBuilder`]),
//! so the node command and the all-in-one `reservoir csi` add their services to the same
//! socket the same way [`run_controller`] does.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::service::{Routes, RoutesBuilder};
use tracing::{info, warn};

use super::controller::{ControllerOptions, ControllerService};
use super::health::{self, NodeReadiness};
use super::identity::IdentityService;
use super::node::{NodeOptions, NodePlugin, NodeService};
use super::proto::controller_server::ControllerServer;
use super::proto::identity_server::IdentityServer;
use super::proto::node_server::NodeServer;
use super::registration::{
    self, RegistrationService, proto::registration_server::RegistrationServer,
};
use super::state::StateStore;

/// The endpoint kubelet and the sidecars use by default.
pub const DEFAULT_ENDPOINT: &str = "unix:///csi/csi.sock";

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Turns `unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a plain path into a socket path.
pub fn parse_endpoint(endpoint: &str) -> Result<PathBuf, String> {
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(format!(
                "endpoint {endpoint:?}: write an absolute path after unix:// (unix:///csi/csi.sock)"
            ));
        }
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if let Some((scheme, _)) = endpoint.split_once("://") {
        return Err(format!(
            "endpoint {endpoint:?}: scheme {scheme:?} is not supported; CSI plugins listen on \
             unix sockets (unix:///csi/csi.sock)"
        ));
    } else {
        endpoint
    };
    if path.is_empty() {
        return Err(format!("endpoint {endpoint:?}: no socket path"));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "endpoint {endpoint:?}: a unix socket path is at most {MAX_SOCKET_PATH} bytes"
        ));
    }
    Ok(PathBuf::from(path))
}

/// A listening socket file; dropping it removes the file if it is still the one we created.
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time of the file we created (an inode number alone may be
    /// reused by a successor's socket).
    identity: Option<(u64, u64, i64, i64)>,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let same = file_identity(&self.path);
        if same.is_some() && same == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a unix socket at `path`. A socket file left by a process that is gone is removed
/// first; a socket somebody still answers on, or a file that is not a socket, is refused.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "{} is in use: another process is serving on it (stop it first)",
                    path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    info!(socket = %path.display(), "removing a stale socket");
                    std::fs::remove_file(path)
                        .with_context(|| format!("remove stale socket {}", path.display()))?;
                }
                Err(e) => bail!("{}: cannot tell whether it is in use: {e}", path.display()),
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create socket directory {}", parent.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))?;
    // The CO's processes (kubelet, sidecars) connect as root or as the socket's group.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    let identity = file_identity(path);
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            identity,
        },
    ))
}

fn file_identity(path: &Path) -> Option<(u64, u64, i64, i64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// How long calls in progress may take to finish once a stop is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `routes` on `listener` until `shutdown` completes; then stops accepting, lets calls
/// in progress finish for up to `grace` (clients that keep idle connections open do not hold
/// the process), and returns.
pub async fn serve(
    listener: UnixListener,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> anyhow::Result<()> {
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => return Some((Ok::<UnixStream, io::Error>(stream), listener)),
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stopping.send(());
        });
    let deadline = async move {
        if stopped.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result.context("gRPC server"),
        () = deadline => {
            warn!(?grace, "calls or connections still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
}

/// Settings of `reservoir controller`.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub endpoint: String,
    pub state_dir: PathBuf,
    pub driver_name: String,
    pub options: ControllerOptions,
}

/// Runs the Identity and Controller services on the endpoint until SIGTERM/SIGINT, then
/// removes the socket.
pub fn run_controller(config: ControllerConfig) -> anyhow::Result<()> {
    super::validate_driver_name(&config.driver_name).map_err(anyhow::Error::msg)?;
    let socket = parse_endpoint(&config.endpoint).map_err(anyhow::Error::msg)?;
    let store = StateStore::open(&config.state_dir)
        .with_context(|| format!("state directory {}", config.state_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let (listener, socket_file) = bind(&socket)?;
        let identity = IdentityService::new(config.driver_name.clone(), true);
        let controller = ControllerService::new(store.clone(), config.options.clone());
        let mut routes = RoutesBuilder::default();
        routes
            .add_service(IdentityServer::new(identity))
            .add_service(ControllerServer::new(controller));
        info!(
            endpoint = %socket_file.path().display(),
            driver = %config.driver_name,
            state_dir = %config.state_dir.display(),
            volumes = store.len(),
            version = env!("CARGO_PKG_VERSION"),
            "controller serving"
        );
        let result = serve(listener, routes.routes(), termination(), SHUTDOWN_GRACE).await;
        drop(socket_file);
        info!("controller stopped");
        result
    })
}

/// Settings of `reservoir node` and of the all-in-one `reservoir csi`.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub endpoint: String,
    pub driver_name: String,
    pub node: NodeOptions,
    /// `reservoir csi`: also serve the Controller service, with its state directory.
    pub controller: Option<(PathBuf, ControllerOptions)>,
    /// Register with kubelet ourselves (no registrar sidecar).
    pub registration: Option<KubeletRegistration>,
    /// Serve `/healthz` and `/ready` over HTTP here.
    pub health_address: Option<SocketAddr>,
}

/// Where to announce the driver to kubelet, and the CSI socket's path as kubelet sees it.
#[derive(Clone, Debug)]
pub struct KubeletRegistration {
    /// Kubelet's plugin registration directory (`/var/lib/kubelet/plugins_registry`).
    pub dir: PathBuf,
    /// The CSI endpoint's path on the node; `None`: the endpoint's own path (the node
    /// container sees kubelet's directory at the same path).
    pub kubelet_endpoint: Option<PathBuf>,
}

/// What an operator of a kubelet older than 1.26 needs to know (logged at every start).
pub const KUBELET_AUTHORITY_NOTE: &str = "kubelet 1.26 or newer is required (or one with the \
    fix of Kubernetes PR #112597): older kubelets send the socket path as the HTTP/2 \
    :authority, which this gRPC server refuses, resetting every call (registration and \
    NodeGetInfo then fail with PROTOCOL_ERROR in kubelet's log)";

/// Runs Identity and Node (and, for `reservoir csi`, Controller) on the endpoint until
/// SIGTERM/SIGINT, then removes the socket. Starts a detached cache daemon first when none
/// answers and starting one is allowed; stopping leaves the daemon and every mount alone.
/// With [`NodeConfig::registration`] it also serves kubelet's Registration service, on a
/// socket created once the CSI socket is served and removed before it when stopping.
pub fn run_node(config: NodeConfig) -> anyhow::Result<()> {
    super::validate_driver_name(&config.driver_name).map_err(anyhow::Error::msg)?;
    if config.node.node_id.is_empty() {
        bail!("--node-id is required (in Kubernetes: the node's name, spec.nodeName)");
    }
    let socket = parse_endpoint(&config.endpoint).map_err(anyhow::Error::msg)?;
    let registration_socket = config
        .registration
        .as_ref()
        .map(|r| registration::socket_path(&r.dir, &config.driver_name));
    if let Some(path) = &registration_socket {
        check_socket_path(path, "--kubelet-registration-dir")?;
    }
    let store = match &config.controller {
        Some((state_dir, _)) => Some(
            StateStore::open(state_dir)
                .with_context(|| format!("state directory {}", state_dir.display()))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let health_listener = match config.health_address {
            Some(address) => Some(health::bind(address).await?),
            None => None,
        };
        let node = NodePlugin::new(config.node.clone());
        if config.node.spawn.is_some() {
            // Start the daemon before serving, rather than at the first stage (so that a
            // socket that answers means a node that is ready); a failure is retried then.
            if let Err(e) = node.daemon().await {
                warn!(error = %e, "the cache daemon is not running yet");
            }
        }
        let (listener, socket_file) = bind(&socket)?;
        let kubelet_registration = config.registration.as_ref().map(|r| {
            RegistrationService::new(
                &config.driver_name,
                r.kubelet_endpoint.as_deref().unwrap_or(socket_file.path()),
            )
        });
        let readiness = NodeReadiness::new(
            config.node.daemon_socket.clone(),
            kubelet_registration
                .as_ref()
                .map(RegistrationService::state),
        );
        let identity = IdentityService::new(config.driver_name.clone(), store.is_some())
            .with_node_readiness(readiness.clone());
        let mut routes = RoutesBuilder::default();
        routes
            .add_service(IdentityServer::new(identity))
            .add_service(NodeServer::new(NodeService::new(node.clone())));
        let node_for_pods = node;
        if let (Some(store), Some((_, options))) = (store.clone(), &config.controller) {
            routes.add_service(ControllerServer::new(ControllerService::new(
                store,
                options.clone(),
            )));
        }
        info!(
            endpoint = %socket_file.path().display(),
            driver = %config.driver_name,
            node_id = %config.node.node_id,
            daemon_socket = %config.node.daemon_socket.display(),
            allowed_sources = %config.node.allowed_sources.describe(),
            controller = store.is_some(),
            version = env!("CARGO_PKG_VERSION"),
            "node serving"
        );
        info!("{KUBELET_AUTHORITY_NOTE}");

        let (stop, stopping) = watch::channel(false);
        let stopped = |mut stopping: watch::Receiver<bool>| async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        tokio::spawn(async move {
            termination().await;
            stop.send_replace(true);
        });
        let csi = serve(
            listener,
            routes.routes(),
            stopped(stopping.clone()),
            SHUTDOWN_GRACE,
        );
        let registration = async {
            let (Some(service), Some(path)) = (kubelet_registration, &registration_socket) else {
                return Ok(());
            };
            let (listener, file) = bind(path)?;
            info!(
                socket = %file.path().display(),
                "serving kubelet plugin registration"
            );
            let mut routes = RoutesBuilder::default();
            routes.add_service(RegistrationServer::new(service));
            let result = serve(
                listener,
                routes.routes(),
                stopped(stopping.clone()),
                SHUTDOWN_GRACE,
            )
            .await;
            // Kubelet unregisters the driver when this socket goes: before the CSI socket.
            drop(file);
            result
        };
        let health = async {
            if let Some(listener) = health_listener {
                let handler = health::handler(socket_file.path().to_path_buf(), readiness);
                crate::metrics::http::serve(listener, handler, stopped(stopping.clone())).await;
            }
        };
        let source_pods = node_for_pods.reconcile_source_pods(stopping.clone());
        let (csi, registration, (), ()) = tokio::join!(csi, registration, health, source_pods);
        drop(socket_file);
        info!("node stopped (the cache daemon and the mounts are left running)");
        csi.and(registration)
    })
}

/// Refuses a socket path the kernel cannot bind, naming the flag it comes from.
fn check_socket_path(path: &Path, flag: &str) -> anyhow::Result<()> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "{flag}: the socket {} is longer than the {MAX_SOCKET_PATH} bytes a unix socket \
             path may have",
            path.display()
        );
    }
    if !path.is_absolute() {
        bail!("{flag}: {} is not an absolute path", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            parse_endpoint("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            parse_endpoint("/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        for bad in [
            "tcp://127.0.0.1:10000",
            "unix://relative.sock",
            "unix://",
            "",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert!(parse_endpoint(&format!("/{}", "x".repeat(200))).is_err());
    }

    #[tokio::test]
    async fn stale_sockets_are_replaced_and_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/csi.sock");
        let (listener, file) = bind(&path).unwrap();
        assert!(bind(&path).is_err(), "a live socket is refused");
        drop(listener);
        // File times can be as coarse as a clock tick: let the successor's differ.
        std::thread::sleep(std::time::Duration::from_millis(20));
        // The file remains (as after a crash): the next bind replaces it.
        let (_listener2, file2) = bind(&path).unwrap();
        drop(file); // not ours any more: must not remove the new socket
        assert!(path.exists());
        drop(file2);
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(bind(&path).is_err());
        assert!(path.exists());
    }
}
