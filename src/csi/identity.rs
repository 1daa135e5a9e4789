//! The Identity service, served by every reservoir CSI process (controller, node, or both).

use tonic::{Request, Response, Status};
use tracing::Level;

use super::health::NodeReadiness;
use super::proto::identity_server::Identity;
use super::proto::plugin_capability::{Service, service};
use super::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use super::traced;

#[derive(Clone)]
pub struct IdentityService {
    name: String,
    controller: bool,
    /// What Probe checks on a node: the cache daemon answers. `None` (a controller alone):
    /// always ready, since its state directory is opened before it serves.
    readiness: Option<NodeReadiness>,
}

impl IdentityService {
    /// `name` must satisfy [`super::validate_driver_name`]. `controller`: whether this process
    /// serves the Controller service (advertised as CONTROLLER_SERVICE).
    pub fn new(name: impl Into<String>, controller: bool) -> Self {
        IdentityService {
            name: name.into(),
            controller,
            readiness: None,
        }
    }

    /// Probe reports the node's cache daemon: not ready while it does not answer.
    pub fn with_node_readiness(mut self, readiness: NodeReadiness) -> Self {
        self.readiness = Some(readiness);
        self
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        traced("GetPluginInfo", "", Level::DEBUG, async {
            Ok(GetPluginInfoResponse {
                name: self.name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        traced("GetPluginCapabilities", "", Level::DEBUG, async {
            // No topology: every node can reach every source the controller accepts (or
            // reports why not when it mounts).
            let capabilities = self
                .controller
                .then(|| PluginCapability {
                    r#type: Some(super::proto::plugin_capability::Type::Service(Service {
                        r#type: service::Type::ControllerService as i32,
                    })),
                })
                .into_iter()
                .collect();
            Ok(GetPluginCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        traced("Probe", "", Level::DEBUG, async {
            let ready = match &self.readiness {
                None => true,
                Some(readiness) => match readiness.daemon_ready().await {
                    Ok(()) => true,
                    Err(why) => {
                        tracing::info!(%why, "Probe: not ready");
                        false
                    }
                },
            };
            Ok(ProbeResponse { ready: Some(ready) })
        })
        .await
    }
}
