//! Berth's CSI driver, `csi.berth.dev`: the Container Storage Interface that
//! kubelet and the standard sidecars (external-provisioner, -attacher,
//! -snapshotter, -resizer) call.
//!
//! - [`identity`]: who the plugin is and what it can do;
//! - [`controller`]: volumes, snapshots, clones, publish, capacity, expand and
//!   modify, each a call to the metadata service (which places, audits and
//!   drives the volume servers);
//! - [`node`]: attaching a published volume as a block device over NBD,
//!   formatting it when blank, mounting, bind-mounting into pods, stats and
//!   filesystem growth.
//!
//! One socket serves the services of the chosen [`Mode`]. Calls on the same
//! volume (or snapshot) do not queue: a second one gets ABORTED while the
//! first runs, as the spec asks, and the sidecars retry it.

pub mod caps;
pub mod controller;
pub mod identity;
mod locks;
pub mod node;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use berth_proto::csi::v1 as csi;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// The driver's name: CSIDriver objects, StorageClass provisioners and the
/// node registration all use it.
pub const DRIVER_NAME: &str = "csi.berth.dev";

/// The topology key every Berth node carries (set by the volume servers).
pub const TOPOLOGY_NODE_KEY: &str = "topology.berth.dev/node";

/// Which CSI services the socket serves (Identity is always there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "controller" => Ok(Mode::Controller),
            "node" => Ok(Mode::Node),
            "all" => Ok(Mode::All),
            _ => Err(format!("{s:?} is not a mode: controller, node or all")),
        }
    }
}

/// What the node plugin needs to know about its node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The CSI node id: this node's name in Berth's catalog (its volume
    /// server registers under the same name).
    pub node_id: String,
    /// Topology labels beside [`TOPOLOGY_NODE_KEY`] (zone, rack...).
    pub labels: BTreeMap<String, String>,
    /// Where staged volumes are recorded (survives plugin restarts) and the
    /// NBD attachments' FUSE mount points live.
    pub state_dir: PathBuf,
    /// The `berth` binary, run as `berth attach` for each staged volume.
    pub attach_program: PathBuf,
    /// Certificates `berth attach` uses for NBD over TCP (STARTTLS).
    pub attach_tls_dir: Option<PathBuf>,
    /// The metadata service as `berth attach` reaches it: a replicated
    /// volume's nexus reports failed replicas there.
    pub attach_metadata: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CsiConfig {
    /// The unix socket to serve on (`unix://` prefix accepted, as in
    /// `CSI_ENDPOINT`).
    pub socket: PathBuf,
    pub mode: Mode,
    /// The metadata service: `http://host:port`, `https://host:port` (with
    /// `tls`) or `unix:///path`.
    pub metadata: String,
    /// Certificates for an `https://` metadata service.
    pub tls: Option<berth_proto::ClientTls>,
    /// Required in node and all modes.
    pub node: Option<NodeConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The running plugin.
#[derive(Debug)]
pub struct Running {
    pub socket: PathBuf,
    pub node: Option<Arc<node::NodeService>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("CSI plugin stopped");
    }
}

/// A lazily connected client of the metadata service (`A` or `A,B,C`: the
/// one that leads): the plugin starts (and answers Probe with "not ready")
/// while the service is still coming up.
pub fn metadata_client(
    endpoint: &str,
    tls: Option<&berth_proto::ClientTls>,
) -> Result<berth_proto::MetaClient, CsiError> {
    berth_proto::meta_client(endpoint, tls)
        .map_err(|e| CsiError::Config(format!("metadata endpoint {endpoint:?}: {e}")))
}

/// Binds the socket and serves Identity plus the services of `cfg.mode`. In
/// node mode, volumes staged before a restart are checked (and re-attached
/// where their attachment died) in the background.
pub async fn start(cfg: CsiConfig) -> Result<Running, CsiError> {
    let socket = match cfg.socket.to_str().and_then(|s| s.strip_prefix("unix://")) {
        Some(p) => PathBuf::from(p),
        None => cfg.socket.clone(),
    };
    let meta = metadata_client(&cfg.metadata, cfg.tls.as_ref())?;
    let node = match (cfg.mode.node(), cfg.node) {
        (true, Some(n)) => Some(Arc::new(node::NodeService::new(n, meta.clone())?)),
        (true, None) => {
            return Err(CsiError::Config(
                "node mode needs a node id and a state directory".into(),
            ))
        }
        (false, _) => None,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CsiError::Io {
            what: format!("create {}", dir.display()),
            source: e,
        })?;
    }
    // A socket left by a plugin that died is in the way.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| CsiError::Io {
        what: format!("bind {}", socket.display()),
        source: e,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            CsiError::Io {
                what: format!("chmod {}", socket.display()),
                source: e,
            }
        })?;
    }
    let identity = identity::Identity::new(cfg.mode, meta.clone(), node.clone());
    let mut routes =
        tonic::service::Routes::new(csi::identity_server::IdentityServer::new(identity));
    if cfg.mode.controller() {
        routes = routes.add_service(csi::controller_server::ControllerServer::new(
            controller::Controller::new(meta.clone()),
        ));
    }
    if let Some(n) = &node {
        routes = routes.add_service(csi::node_server::NodeServer::from_arc(n.clone()));
    }
    let stop = CancellationToken::new();
    let mut tasks = vec![berth_proto::spawn_server(
        routes,
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        None,
        stop.clone().cancelled_owned(),
        "csi",
    )
    .map_err(|e| CsiError::Config(e.to_string()))?];
    if let Some(n) = &node {
        tasks.push(tokio::spawn(n.clone().repair_loop(stop.clone())));
    }
    tracing::info!(socket = %socket.display(), mode = ?cfg.mode, "CSI plugin ready");
    Ok(Running {
        socket,
        node,
        stop,
        tasks,
    })
}
