//! Kubelet plugin registration, served by `reservoir node` itself (`--kubelet-registration-dir`)
//! so that a cluster needs no node-driver-registrar sidecar.
//!
//! Kubelet watches its registration directory (`/var/lib/kubelet/plugins_registry/`). When a
//! socket appears there it calls GetInfo on it, checks the answer (plugin type, driver name,
//! CSI versions), connects to the CSI endpoint the answer names for NodeGetInfo, and reports
//! the outcome with NotifyRegistrationStatus. While the registration is refused kubelet keeps
//! retrying; removing the socket (when the node plugin stops) unregisters the driver.
//! `proto/pluginregistration.proto` is the wire contract.

use std::path::{Path, PathBuf};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{error, info};

/// Code generated from `proto/pluginregistration.proto` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("pluginregistration");
}

use proto::registration_server::Registration;
use proto::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};

/// The plugin type kubelet hands CSI drivers to.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";

/// The CSI specification versions this driver speaks (the version of `proto/csi.proto`).
/// Kubelet picks the highest 1.x version it finds here.
pub const CSI_VERSIONS: &[&str] = &["1.12.0"];

/// The registration socket of `driver` in kubelet's registration directory (the name the
/// node-driver-registrar uses too, so switching between them leaves no stale socket).
pub fn socket_path(registration_dir: &Path, driver: &str) -> PathBuf {
    registration_dir.join(format!("{driver}-reg.sock"))
}

/// Where a registration stands, as kubelet last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    /// Kubelet has not reported yet (it may not have found the socket).
    Waiting,
    Registered,
    /// Kubelet refused the plugin, saying why; it retries by itself.
    Refused(String),
}

/// The Registration service: who we are, and kubelet's verdict.
pub struct RegistrationService {
    info: PluginInfo,
    state: watch::Sender<RegistrationState>,
}

impl RegistrationService {
    /// `endpoint`: the CSI socket as kubelet sees it on the node (an absolute path).
    pub fn new(driver_name: &str, endpoint: &Path) -> Self {
        RegistrationService {
            info: PluginInfo {
                r#type: CSI_PLUGIN_TYPE.to_string(),
                name: driver_name.to_string(),
                endpoint: endpoint.display().to_string(),
                supported_versions: CSI_VERSIONS.iter().map(|v| v.to_string()).collect(),
            },
            state: watch::Sender::new(RegistrationState::Waiting),
        }
    }

    /// Follows the registration's state (for readiness).
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        info!(
            driver = %self.info.name,
            endpoint = %self.info.endpoint,
            "kubelet asked for the plugin's identity"
        );
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let state = if status.plugin_registered {
            info!(driver = %self.info.name, "registered with kubelet");
            RegistrationState::Registered
        } else {
            error!(
                driver = %self.info.name,
                endpoint = %self.info.endpoint,
                reason = %status.error,
                "kubelet refused the registration (it retries); check that the endpoint is the \
                 CSI socket's path on the node (--kubelet-registration-path)"
            );
            RegistrationState::Refused(status.error)
        };
        self.state.send_replace(state);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identity_and_verdicts() {
        let service = RegistrationService::new(
            "reservoir.csi.dev",
            Path::new("/var/lib/kubelet/plugins/reservoir.csi.dev/csi.sock"),
        );
        let info = service
            .get_info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "reservoir.csi.dev");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/reservoir.csi.dev/csi.sock"
        );
        assert_eq!(info.supported_versions, ["1.12.0"]);

        let state = service.state();
        assert_eq!(*state.borrow(), RegistrationState::Waiting);
        service
            .notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: false,
                error: "driver name mismatch".into(),
            }))
            .await
            .unwrap();
        assert_eq!(
            *state.borrow(),
            RegistrationState::Refused("driver name mismatch".into())
        );
        service
            .notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            }))
            .await
            .unwrap();
        assert_eq!(*state.borrow(), RegistrationState::Registered);
    }

    #[test]
    fn socket_names() {
        assert_eq!(
            socket_path(
                Path::new("/var/lib/kubelet/plugins_registry"),
                "reservoir.csi.dev"
            ),
            PathBuf::from("/var/lib/kubelet/plugins_registry/reservoir.csi.dev-reg.sock")
        );
    }
}
