//! The CSI Identity service: name, version, capabilities, readiness.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::csi::v1 as csi;
use berth_proto::meta::v1 as mpb;
use csi::plugin_capability::{self, service, volume_expansion};
use tonic::{Request, Response, Status};

use crate::node::NodeService;
use crate::{Mode, DRIVER_NAME};

#[derive(Debug, Clone)]
pub struct Identity {
    mode: Mode,
    meta: berth_proto::MetaClient,
    node: Option<Arc<NodeService>>,
}

impl Identity {
    pub fn new(mode: Mode, meta: berth_proto::MetaClient, node: Option<Arc<NodeService>>) -> Self {
        Identity { mode, meta, node }
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _r: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::from([(
                "mode".to_string(),
                format!("{:?}", self.mode).to_lowercase(),
            )]),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| csi::PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut capabilities = vec![
            svc(service::Type::VolumeAccessibilityConstraints),
            csi::PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            },
        ];
        if self.mode.controller() {
            capabilities.insert(0, svc(service::Type::ControllerService));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// Ready when what the plugin depends on answers: the metadata service
    /// (controller) and the attach and format tools (node). A missing tool
    /// is FAILED_PRECONDITION naming it; an unreachable service is "not
    /// ready", which probes retry.
    async fn probe(
        &self,
        _r: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        if let Some(n) = &self.node {
            n.check_tools()?;
        }
        let mut ready = true;
        if self.mode.controller() {
            let mut meta = self.meta.clone();
            let call = meta.list_tiers(Request::new(mpb::ListTiersRequest {}));
            ready = matches!(
                tokio::time::timeout(Duration::from_secs(3), call).await,
                Ok(Ok(_))
            );
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
