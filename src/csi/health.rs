//! Whether the node plugin can serve volumes (readiness: CSI Probe and `/ready`), and whether
//! the node plugin itself is alive (`/healthz`, for a liveness probe).
//!
//! Liveness never depends on the daemon: restarting the node container cannot help a daemon
//! that hangs, and would only add a second outage. Readiness does: a node whose daemon does not
//! answer cannot stage volumes, and a node kubelet has not registered gets no calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::registration::RegistrationState;
use crate::daemon::{Client, Timeouts};
use crate::metrics::http::{self, Handler, Reply};

/// How long a readiness check waits for the daemon.
const DAEMON_WAIT: Duration = Duration::from_secs(3);

/// Whether the node can serve volumes now; `Err` says why not.
#[derive(Clone)]
pub struct NodeReadiness {
    daemon: Client,
    /// Kubelet's verdict, when this process registers itself (`None`: a registrar does).
    registration: Option<watch::Receiver<RegistrationState>>,
}

impl NodeReadiness {
    pub fn new(
        daemon_socket: PathBuf,
        registration: Option<watch::Receiver<RegistrationState>>,
    ) -> Self {
        NodeReadiness {
            daemon: Client::new(daemon_socket).with_timeouts(Timeouts {
                connect: DAEMON_WAIT,
                status: DAEMON_WAIT,
                ..Timeouts::default()
            }),
            registration,
        }
    }

    /// The daemon answers on its control socket (what CSI Probe reports).
    pub async fn daemon_ready(&self) -> Result<(), String> {
        self.daemon
            .status()
            .await
            .map(|_| ())
            .map_err(|e| format!("the node's cache daemon does not answer: {e}"))
    }

    /// The daemon answers, and kubelet has registered the driver (when we register it).
    pub async fn ready(&self) -> Result<(), String> {
        self.daemon_ready().await?;
        match self.registration.as_ref().map(|r| r.borrow().clone()) {
            None | Some(RegistrationState::Registered) => Ok(()),
            Some(RegistrationState::Waiting) => {
                Err("kubelet has not registered the driver yet".to_string())
            }
            Some(RegistrationState::Refused(why)) => {
                Err(format!("kubelet refused the driver's registration: {why}"))
            }
        }
    }
}

/// Answers `/healthz` (this process serves its CSI socket) and `/ready` ([`NodeReadiness`]).
pub fn handler(csi_socket: PathBuf, readiness: NodeReadiness) -> Handler {
    Arc::new(move |path| {
        let csi_socket = csi_socket.clone();
        let readiness = readiness.clone();
        Box::pin(async move {
            match path.as_str() {
                "/healthz" => match tokio::net::UnixStream::connect(&csi_socket).await {
                    Ok(_) => Reply::text(200, "ok: the CSI socket accepts connections\n"),
                    Err(e) => Reply::text(
                        503,
                        format!(
                            "the CSI socket {} does not answer: {e}\n",
                            csi_socket.display()
                        ),
                    ),
                },
                "/ready" => match readiness.ready().await {
                    Ok(()) => Reply::text(200, "ready\n"),
                    Err(why) => Reply::text(503, format!("not ready: {why}\n")),
                },
                _ => Reply::not_found(&["/healthz", "/ready"]),
            }
        })
    })
}

/// Binds the health endpoint (before serving, so a bad address fails the start).
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    http::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("--health-address: {e}"))
}
