//! The CSI Node service: a published volume becomes a block device on this
//! node ([`attach`]), a filesystem made only when the device is blank and
//! mounted at the staging path ([`mount`]), then bind-mounted (or, in raw
//! block mode, the device file itself) into each pod's target path.
//!
//! What is staged is written down (`STATE/staged/VOLUME.json`, replaced
//! atomically) before anything mounts on it, with the targets it was
//! published to. After a plugin restart the records are read back; a staged
//! volume whose attachment died (its `berth attach` process was killed; a
//! restarted volume server alone does not break it) is attached again and its
//! mounts rebuilt: at start, every
//! [`REPAIR_INTERVAL`], and when NodeStage is called again.
//!
//! Each volume's attach process logs to `STATE/attach/VOLUME.log`; the log
//! is kept through failures and repairs and removed by NodeUnstage.

pub mod attach;
pub mod fuse;
pub mod local;
pub mod mount;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::csi::v1 as csi;
use berth_proto::meta::v1 as mpb;
use csi::node_service_capability::rpc::Type as Rpc;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::caps::{self, Access};
use crate::controller::{
    meta_req, CTX_FS_TYPE, PUB_GENERATION, PUB_READ_ONLY, PUB_REPLICAS, PUB_TCP_URI, PUB_UNIX_URI,
};
use crate::locks::InFlight;
use crate::{CsiError, NodeConfig, TOPOLOGY_NODE_KEY};

/// How often staged volumes are checked (and re-attached when broken).
pub const REPAIR_INTERVAL: Duration = Duration::from_secs(10);

/// The filesystem a volume gets when neither the capability nor the volume
/// says.
const DEFAULT_FS: &str = "ext4";

/// Programs the node plugin runs.
const TOOLS: &[&str] = &[
    "fusermount3",
    "losetup",
    "mount",
    "umount",
    "blkid",
    "mkfs.ext4",
    "mkfs.xfs",
    "resize2fs",
    "xfs_growfs",
    "dd",
];

type R<T> = Result<Response<T>, Status>;

/// A volume staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub block: bool,
    /// Empty in raw block mode.
    pub fs_type: String,
    pub read_only: bool,
    pub mount_flags: Vec<String>,
    pub attachment: attach::Attachment,
    /// Published target paths.
    pub targets: BTreeMap<PathBuf, Target>,
}

/// One published target path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub read_only: bool,
    /// A read-only publish of a block volume staged read-write gets a
    /// read-only loop device of its own: a read-only bind mount does not
    /// stop writes to a device file.
    pub ro_device: Option<PathBuf>,
}

#[derive(Debug)]
pub struct NodeService {
    cfg: NodeConfig,
    meta: berth_proto::MetaClient,
    inflight: InFlight,
    staged: Mutex<BTreeMap<String, Staged>>,
}

fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

/// Volume ids name files here: letters, digits, '-', '_', '.', at most 128,
/// no dot files (no separator, nothing that walks out of the state folder).
/// Volumes staged before the shared name rule may start with '-' or '_', so
/// this is what every call on an existing staging accepts.
fn check_id(id: &str) -> Result<(), Status> {
    required("volume_id", id)?;
    if id.len() > berth_proto::validate::MAX_NAME_BYTES
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(Status::invalid_argument(format!(
            "volume_id {} is not a Berth volume id (letters, digits, '-', '_', '.'; at most 128)",
            berth_proto::validate::quote(id)
        )));
    }
    Ok(())
}

/// A volume id to stage now: the names the metadata service gives out
/// ([`berth_proto::validate::name`]).
fn check_new_id(id: &str) -> Result<(), Status> {
    check_id(id)?;
    berth_proto::validate::name("volume_id", id)
        .map_err(|e| Status::invalid_argument(format!("{e}: not a Berth volume id")))
}

/// Paths from kubelet: absolute, bounded, no control characters, no '.' or
/// '..' components, nothing mount would take for an option.
fn check_path(field: &str, p: &str) -> Result<(), Status> {
    berth_proto::validate::path(field, p).map_err(Status::invalid_argument)
}

/// What a node call finds missing: NOT_FOUND, the spec's code for a volume
/// (or a volume path) the call names and this node does not have.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("volume {volume} is not staged on this node")]
    NotStaged { volume: String },
    /// `path` is quoted (bounded): it came from the caller.
    #[error("{path} is not where volume {volume} is staged or published")]
    NotAtPath { volume: String, path: String },
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        match e {
            NodeError::NotStaged { .. } | NodeError::NotAtPath { .. } => {
                Status::not_found(e.to_string())
            }
        }
    }
}

fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// The NBD URI to attach with: the unix socket when the volume lives on this
/// node (no TCP in the data path), else TCP.
fn choose_uri(volume: &str, node: &str, ctx: &HashMap<String, String>) -> Result<String, Status> {
    if let Some(legs) = ctx.get(PUB_REPLICAS) {
        return replicated_uri(volume, node, ctx, legs);
    }
    let get = |k: &str| ctx.get(k).map_or("", String::as_str);
    fuse::pick_uri(get(PUB_UNIX_URI), get(PUB_TCP_URI)).ok_or_else(|| {
        Status::failed_precondition(
            "publish_context has no NBD URI: the volume was not published to this node \
             (ControllerPublishVolume first)",
        )
    })
}

/// A replicated volume's attachment: each leg over its replica's unix
/// socket where that is on this node, else TCP.
fn replicated_uri(
    volume: &str,
    node: &str,
    ctx: &HashMap<String, String>,
    legs: &str,
) -> Result<String, Status> {
    let bad =
        |why: String| Status::invalid_argument(format!("publish_context {PUB_REPLICAS}: {why}"));
    let legs: Vec<crate::controller::PublishedLeg> =
        serde_json::from_str(legs).map_err(|e| bad(e.to_string()))?;
    let generation = ctx
        .get(PUB_GENERATION)
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| bad(format!("no {PUB_GENERATION}")))?;
    let legs = legs
        .into_iter()
        .map(|l| {
            let uri = fuse::pick_uri(&l.unix_uri, &l.tcp_uri).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "publish_context: the replica on {} has no NBD URI reachable from here",
                    l.node
                ))
            })?;
            Ok(fuse::LegSpec { uri, node: l.node })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    if legs.is_empty() {
        return Err(bad("no legs".into()));
    }
    Ok(fuse::ReplicatedSpec {
        volume: volume.to_string(),
        generation,
        legs,
        node: node.to_string(),
    }
    .to_uri())
}

impl NodeService {
    pub fn new(cfg: NodeConfig, meta: berth_proto::MetaClient) -> Result<Self, CsiError> {
        let staged_dir = cfg.state_dir.join("staged");
        // Records name every staged volume and its NBD URI (a grant's secret),
        // and the attachments are its data: root's alone (0700).
        for d in [&cfg.state_dir, &staged_dir, &cfg.state_dir.join("attach")] {
            berth_proto::private::dir(d).map_err(|e| CsiError::Io {
                what: format!("create {}", d.display()),
                source: e,
            })?;
        }
        let mut staged = BTreeMap::new();
        let entries = std::fs::read_dir(&staged_dir).map_err(|e| CsiError::Io {
            what: format!("read {}", staged_dir.display()),
            source: e,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&p).map_err(|e| CsiError::Io {
                what: format!("read {}", p.display()),
                source: e,
            })?;
            // A record that cannot be read would leave a mount nobody owns:
            // refuse to start rather than forget it.
            let s: Staged = serde_json::from_str(&text).map_err(|e| {
                CsiError::Config(format!("staged volume record {}: {e}", p.display()))
            })?;
            staged.insert(s.volume_id.clone(), s);
        }
        if !staged.is_empty() {
            tracing::info!(
                volumes = staged.len(),
                "staged volumes from before the restart"
            );
        }
        Ok(NodeService {
            cfg,
            meta,
            inflight: InFlight::default(),
            staged: Mutex::new(staged),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// Staged volumes, by id.
    pub fn staged(&self) -> BTreeMap<String, Staged> {
        self.staged.lock().clone()
    }

    fn attach_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("attach").join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("staged").join(format!("{id}.json"))
    }

    /// Writes the record durably (temp file, fsync, rename, fsync dir).
    fn save(&self, s: &Staged) -> Result<(), Status> {
        let path = self.record_path(&s.volume_id);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(s).map_err(|e| internal("encode record", e))?;
        let mut f = berth_proto::private::create_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| internal(tmp.display(), e))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(|e| internal(tmp.display(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| internal(path.display(), e))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| internal(dir.display(), e))?;
        }
        self.staged.lock().insert(s.volume_id.clone(), s.clone());
        Ok(())
    }

    fn forget(&self, id: &str) -> Result<(), Status> {
        let path = self.record_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(path.display(), e)),
        }
        self.staged.lock().remove(id);
        Ok(())
    }

    fn get(&self, id: &str) -> Option<Staged> {
        self.staged.lock().get(id).cloned()
    }

    /// The staged volume `id`, or NOT_FOUND.
    fn staged_volume(&self, id: &str) -> Result<Staged, NodeError> {
        self.get(id).ok_or_else(|| NodeError::NotStaged {
            volume: id.to_string(),
        })
    }

    /// The staged volume `id` if `path` is its staging path or one of its
    /// targets and is there, else NOT_FOUND. The path is only compared with
    /// paths recorded by NodeStage and NodePublish (which checked them), and
    /// touched only once it matches one: a relative or hostile path is simply
    /// not where the volume is, as the spec (and csi-sanity) expect.
    fn staged_at(&self, id: &str, path: &str) -> Result<Staged, NodeError> {
        let s = self.staged_volume(id)?;
        let p = Path::new(path);
        if (p != s.staging_path && !s.targets.contains_key(p)) || !p.exists() {
            return Err(NodeError::NotAtPath {
                volume: id.to_string(),
                path: berth_proto::validate::quote(path),
            });
        }
        Ok(s)
    }

    /// FAILED_PRECONDITION naming the programs the node plugin needs and
    /// cannot find.
    pub fn check_tools(&self) -> Result<(), Status> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let missing: Vec<&str> = TOOLS
            .iter()
            .copied()
            .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
            .collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "missing programs: {} (packages fuse3, util-linux, e2fsprogs, xfsprogs)",
                missing.join(", ")
            )));
        }
        if !Path::new("/dev/fuse").exists() {
            return Err(Status::failed_precondition(
                "/dev/fuse is missing: the node plugin needs FUSE to attach NBD volumes",
            ));
        }
        Ok(())
    }

    /// Who this plugin is in the metadata service's audit log.
    fn actor(&self) -> String {
        format!("csi-node:{}", self.cfg.node_id)
    }

    /// What the catalog says is wrong with a volume (a replicated volume
    /// with a copy out of the set), if anything; nothing when the metadata
    /// service does not answer within 2 s (the device's own health stands).
    async fn catalog_condition(&self, volume: &str) -> Option<String> {
        let mut meta = self.meta.clone();
        let call = meta.get_volume(meta_req(
            &self.actor(),
            mpb::GetVolumeRequest {
                volume_id: volume.to_string(),
            },
        ));
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(v)) => {
                let v = v.into_inner();
                v.abnormal.then_some(v.condition)
            }
            Ok(Err(e)) => {
                tracing::debug!(%volume, error = %e, "cannot ask the catalog for the volume's condition");
                None
            }
            Err(_) => None,
        }
    }

    /// Records a node event in the audit log ("who accessed this volume").
    /// The volume server records the NBD connection itself, so a metadata
    /// service that cannot be reached is logged, not fatal.
    async fn audit(&self, action: &str, volume: &str, target: &Path, detail: String) {
        let mut meta = self.meta.clone();
        let call = meta.append_audit(meta_req(
            &self.actor(),
            mpb::AppendAuditRequest {
                action: action.to_string(),
                volume: volume.to_string(),
                target: target.display().to_string(),
                detail,
            },
        ));
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(%volume, action, error = %e, "audit append failed"),
            Err(_) => tracing::warn!(%volume, action, "audit append timed out"),
        }
    }

    /// Mounts the staged filesystem at its staging path if it is not there.
    async fn ensure_staging_mount(&self, s: &Staged) -> Result<(), Status> {
        if s.block {
            return Ok(());
        }
        let dev = mount::device_number(&s.attachment.device)?;
        if let Some(m) = mount::mounted_at(&s.staging_path)? {
            if m.dev == dev {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} is already a mount of {} ({}), not of volume {}",
                s.staging_path.display(),
                m.source,
                m.fs_type,
                s.volume_id
            )));
        }
        std::fs::create_dir_all(&s.staging_path)
            .map_err(|e| internal(s.staging_path.display(), e))?;
        let found = mount::probe_fs(&s.attachment.device).await?;
        if found.is_empty() {
            if s.read_only {
                return Err(Status::failed_precondition(format!(
                    "volume {} has no filesystem and is staged read-only: nothing to mount",
                    s.volume_id
                )));
            }
            tracing::info!(volume = %s.volume_id, fs = %s.fs_type, "blank volume: making a filesystem");
            mount::mkfs(&s.attachment.device, &s.fs_type).await?;
        } else if found != s.fs_type {
            return Err(Status::failed_precondition(format!(
                "volume {} holds {found}, not the {} asked for; it is not reformatted",
                s.volume_id, s.fs_type
            )));
        }
        let opts = mount::fs_options(&s.fs_type, s.read_only, &s.mount_flags);
        mount::mount_fs(&s.attachment.device, &s.staging_path, &s.fs_type, &opts).await
    }

    /// Where a target's bind mount comes from.
    fn bind_source<'a>(s: &'a Staged, t: &'a Target) -> &'a Path {
        match (&t.ro_device, s.block) {
            (Some(d), _) => d,
            (None, true) => &s.attachment.device,
            (None, false) => &s.staging_path,
        }
    }

    /// Makes what a new target needs beside the staged volume (a read-only
    /// device for a read-only publish of a read-write block volume).
    async fn new_target(s: &Staged, read_only: bool) -> Result<Target, Status> {
        let ro_device = if s.block && read_only && !s.read_only {
            Some(attach::read_only_loop(&s.attachment).await?)
        } else {
            None
        };
        Ok(Target {
            read_only,
            ro_device,
        })
    }

    /// Whether `m` (a mount at a target) shows this staged volume.
    fn is_ours(s: &Staged, t: Option<&Target>, m: &mount::MountEntry) -> Result<bool, Status> {
        if s.block {
            let dev = t
                .and_then(|t| t.ro_device.as_ref())
                .unwrap_or(&s.attachment.device);
            let name = dev.file_name().map(|n| n.to_string_lossy());
            Ok(name.is_some_and(|n| m.root.trim_start_matches('/') == n))
        } else {
            Ok(m.dev == mount::device_number(&s.attachment.device)?)
        }
    }

    /// Attaches a broken staged volume anew and rebuilds its mounts: the
    /// old filesystem is detached lazily (open files in it stay broken, as
    /// after a crash); the new mount replays the journal, so the volume comes
    /// back as it was at its last flush.
    async fn repair(&self, s: &Staged, why: &str) -> Result<Staged, Status> {
        tracing::warn!(volume = %s.volume_id, reason = why, "staged volume is broken: attaching it again");
        for (path, t) in &s.targets {
            mount::unmount(path, true).await?;
            if let Some(d) = &t.ro_device {
                attach::release_loop(d, &s.attachment).await?;
            }
        }
        if !s.block {
            mount::unmount(&s.staging_path, true).await?;
        }
        attach::detach(&s.attachment).await?;
        let a = attach::attach(
            &self.cfg.attach_program,
            &self.attach_dir(&s.volume_id),
            &s.attachment.uri,
            s.read_only,
            self.cfg.attach_tls_dir.as_deref(),
            self.cfg.attach_metadata.as_deref(),
        )
        .await?;
        let mut fresh = Staged {
            attachment: a,
            targets: BTreeMap::new(),
            ..s.clone()
        };
        self.save(&fresh)?;
        self.ensure_staging_mount(&fresh).await?;
        for (path, t) in &s.targets {
            let t = Self::new_target(&fresh, t.read_only).await?;
            mount::bind(Self::bind_source(&fresh, &t), path, t.read_only).await?;
            fresh.targets.insert(path.clone(), t);
            self.save(&fresh)?;
        }
        self.audit(
            "NodeRepair",
            &s.volume_id,
            &s.staging_path,
            format!("re-attached on node {}: {why}", self.cfg.node_id),
        )
        .await;
        tracing::info!(volume = %s.volume_id, device = %fresh.attachment.device.display(), "staged volume repaired");
        Ok(fresh)
    }

    /// One pass over the staged volumes: re-attaches those whose attachment
    /// broke (skipping any a call is working on).
    pub async fn check_staged(&self) {
        for (id, s) in self.staged() {
            let Ok(_held) = self.inflight.volume(&id) else {
                continue;
            };
            // Unstaged while we waited.
            let Some(s) = self.get(&id).filter(|now| *now == s) else {
                continue;
            };
            match attach::health(&s.attachment).await {
                Ok(()) => {}
                Err(attach::Fault::Broken(why)) => {
                    if let Err(e) = self.repair(&s, &why).await {
                        tracing::error!(volume = %id, error = %e.message(), "repair failed; will retry");
                    }
                }
                Err(attach::Fault::Unreachable(why)) => {
                    tracing::warn!(volume = %id, reason = %why, "staged volume waits for its volume server");
                }
            }
        }
    }

    /// [`check_staged`](Self::check_staged) at start and every
    /// [`REPAIR_INTERVAL`] until `stop`.
    pub async fn repair_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.check_staged().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REPAIR_INTERVAL) => {}
            }
        }
    }
}

fn pod_detail(ctx: &HashMap<String, String>) -> String {
    let get = |k: &str| ctx.get(k).map(String::as_str).unwrap_or("");
    let pod = get("csi.storage.k8s.io/pod.name");
    if pod.is_empty() {
        return String::new();
    }
    format!(
        " for pod {}/{pod} (service account {})",
        get("csi.storage.k8s.io/pod.namespace"),
        get("csi.storage.k8s.io/serviceAccount.name")
    )
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> R<csi::NodeStageVolumeResponse> {
        let r = r.into_inner();
        check_new_id(&r.volume_id)?;
        check_path("staging_target_path", &r.staging_target_path)?;
        let cap = caps::required(r.volume_capability.as_ref())?;
        let uri = choose_uri(&r.volume_id, &self.cfg.node_id, &r.publish_context)?;
        let read_only = cap.read_only()
            || r.publish_context.get(PUB_READ_ONLY).map(String::as_str) == Some("true");
        // The capability's filesystem is a demand; the volume's (its tier's
        // default) only says what to make on a blank device: a clone keeps
        // whatever its source holds.
        let (block, asked_fs, default_fs, flags) = match &cap.access {
            Access::Block => (true, None, String::new(), Vec::new()),
            Access::Mount { fs_type, flags } => {
                let default = r
                    .volume_context
                    .get(CTX_FS_TYPE)
                    .filter(|f| !f.is_empty())
                    .map_or(DEFAULT_FS, String::as_str)
                    .to_string();
                if !caps::FS_TYPES.contains(&default.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "volume {} has fsType {default}, which Berth does not make",
                        r.volume_id
                    )));
                }
                let asked = (!fs_type.is_empty()).then(|| fs_type.clone());
                (false, asked, default, flags.clone())
            }
        };
        let staging = PathBuf::from(&r.staging_target_path);
        let _held = self.inflight.volume(&r.volume_id)?;
        if let Some(s) = self.get(&r.volume_id) {
            if s.staging_path != staging {
                return Err(Status::already_exists(format!(
                    "volume {} is already staged at {}",
                    r.volume_id,
                    s.staging_path.display()
                )));
            }
            if s.block != block
                || asked_fs.as_ref().is_some_and(|f| *f != s.fs_type)
                || s.read_only != read_only
            {
                return Err(Status::already_exists(format!(
                    "volume {} is already staged as {}{}",
                    r.volume_id,
                    if s.block {
                        "a raw block device".to_string()
                    } else {
                        format!("{} ", s.fs_type)
                    },
                    if s.read_only {
                        " read-only"
                    } else {
                        " read-write"
                    }
                )));
            }
            match attach::health(&s.attachment).await {
                Ok(()) => self.ensure_staging_mount(&s).await?,
                Err(attach::Fault::Broken(why)) => {
                    self.repair(&s, &why).await?;
                }
                Err(attach::Fault::Unreachable(why)) => {
                    return Err(Status::unavailable(format!(
                        "volume {} is staged but its volume server does not answer \
                         (the attachment reconnects when it is back): {why}",
                        r.volume_id
                    )));
                }
            }
            return Ok(Response::new(csi::NodeStageVolumeResponse {}));
        }
        let a = attach::attach(
            &self.cfg.attach_program,
            &self.attach_dir(&r.volume_id),
            &uri,
            read_only,
            self.cfg.attach_tls_dir.as_deref(),
            self.cfg.attach_metadata.as_deref(),
        )
        .await?;
        let fs_type = if block {
            Ok(String::new())
        } else {
            match mount::probe_fs(&a.device).await {
                Ok(found) if found.is_empty() => Ok(asked_fs.unwrap_or(default_fs)),
                Ok(found) => match asked_fs {
                    Some(asked) if asked != found => Err(Status::failed_precondition(format!(
                        "volume {} holds {found}, not the {asked} asked for; it is not reformatted",
                        r.volume_id
                    ))),
                    _ => Ok(found),
                },
                Err(e) => Err(e),
            }
        };
        let fs_type = match fs_type {
            Ok(f) => f,
            Err(e) => {
                let _ = attach::detach(&a).await;
                return Err(e);
            }
        };
        let s = Staged {
            volume_id: r.volume_id.clone(),
            staging_path: staging.clone(),
            block,
            fs_type,
            read_only,
            mount_flags: flags,
            attachment: a,
            targets: BTreeMap::new(),
        };
        let done = async {
            self.save(&s)?;
            self.ensure_staging_mount(&s).await
        }
        .await;
        if let Err(e) = done {
            // Leave nothing behind: the CO retries from scratch.
            let _ = mount::unmount(&staging, false).await;
            let _ = attach::detach(&s.attachment).await;
            let _ = self.forget(&s.volume_id);
            return Err(e);
        }
        self.audit(
            "NodeStage",
            &r.volume_id,
            &staging,
            format!(
                "{} {} on node {} via {}",
                if block {
                    "block device".to_string()
                } else {
                    s.fs_type.clone()
                },
                if read_only { "read-only" } else { "read-write" },
                self.cfg.node_id,
                attach::redact(&uri)
            ),
        )
        .await;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> R<csi::NodeUnstageVolumeResponse> {
        let r = r.into_inner();
        check_id(&r.volume_id)?;
        check_path("staging_target_path", &r.staging_target_path)?;
        let staging = PathBuf::from(&r.staging_target_path);
        let _held = self.inflight.volume(&r.volume_id)?;
        let Some(s) = self.get(&r.volume_id) else {
            // Nothing staged, but failed NodeStage calls may have left their
            // attach log: the CO is done with the volume here.
            attach::remove_log(&self.attach_dir(&r.volume_id));
            return Ok(Response::new(csi::NodeUnstageVolumeResponse {}));
        };
        if s.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {} is staged at {}, not {}",
                r.volume_id,
                s.staging_path.display(),
                staging.display()
            )));
        }
        for t in s.targets.keys() {
            if mount::mounted_at(t)?.is_some() {
                return Err(Status::failed_precondition(format!(
                    "volume {} is still published at {}: NodeUnpublishVolume first",
                    r.volume_id,
                    t.display()
                )));
            }
        }
        if !s.block {
            mount::unmount(&staging, false).await?;
        }
        attach::detach(&s.attachment).await?;
        self.forget(&r.volume_id)?;
        attach::remove_log(&self.attach_dir(&r.volume_id));
        self.audit(
            "NodeUnstage",
            &r.volume_id,
            &staging,
            format!("on node {}", self.cfg.node_id),
        )
        .await;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> R<csi::NodePublishVolumeResponse> {
        let r = r.into_inner();
        check_id(&r.volume_id)?;
        check_path("staging_target_path", &r.staging_target_path)?;
        check_path("target_path", &r.target_path)?;
        let cap = caps::required(r.volume_capability.as_ref())?;
        let target = PathBuf::from(&r.target_path);
        let _held = self.inflight.volume(&r.volume_id)?;
        let Some(mut s) = self.get(&r.volume_id) else {
            return Err(Status::failed_precondition(format!(
                "volume {} is not staged on this node (NodeStageVolume first)",
                r.volume_id
            )));
        };
        if s.staging_path != Path::new(&r.staging_target_path) {
            return Err(Status::failed_precondition(format!(
                "volume {} is staged at {}, not {}",
                r.volume_id,
                s.staging_path.display(),
                r.staging_target_path
            )));
        }
        if s.block != cap.is_block() {
            return Err(Status::failed_precondition(format!(
                "volume {} is staged as {}",
                r.volume_id,
                if s.block {
                    "a raw block device"
                } else {
                    "a filesystem"
                }
            )));
        }
        let read_only = r.readonly || cap.read_only() || s.read_only;
        if let Some(m) = mount::mounted_at(&target)? {
            if !Self::is_ours(&s, s.targets.get(&target), &m)? {
                return Err(Status::already_exists(format!(
                    "{} is already a mount of {}",
                    target.display(),
                    m.source
                )));
            }
            if m.read_only() != read_only {
                return Err(Status::already_exists(format!(
                    "volume {} is already published at {} {}",
                    r.volume_id,
                    target.display(),
                    if m.read_only() {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
        } else {
            if s.block {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| internal(parent.display(), e))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&target)
                    .map_err(|e| internal(target.display(), e))?;
            } else {
                std::fs::create_dir_all(&target).map_err(|e| internal(target.display(), e))?;
            }
            let t = Self::new_target(&s, read_only).await?;
            if let Err(e) = mount::bind(Self::bind_source(&s, &t), &target, read_only).await {
                if let Some(d) = &t.ro_device {
                    let _ = attach::release_loop(d, &s.attachment).await;
                }
                return Err(e);
            }
            s.targets.insert(target.clone(), t);
            self.save(&s)?;
        }
        self.audit(
            "NodePublish",
            &r.volume_id,
            &target,
            format!(
                "{} on node {}{}",
                if read_only { "read-only" } else { "read-write" },
                self.cfg.node_id,
                pod_detail(&r.volume_context)
            ),
        )
        .await;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> R<csi::NodeUnpublishVolumeResponse> {
        let r = r.into_inner();
        check_id(&r.volume_id)?;
        check_path("target_path", &r.target_path)?;
        let target = PathBuf::from(&r.target_path);
        let _held = self.inflight.volume(&r.volume_id)?;
        mount::unmount(&target, false).await?;
        match std::fs::symlink_metadata(&target) {
            Ok(md) if md.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| internal(format!("remove {}", target.display()), e))?;
        if let Some(mut s) = self.get(&r.volume_id) {
            if let Some(t) = s.targets.remove(&target) {
                if let Some(d) = &t.ro_device {
                    attach::release_loop(d, &s.attachment).await?;
                }
                self.save(&s)?;
            }
            self.audit(
                "NodeUnpublish",
                &r.volume_id,
                &target,
                format!("on node {}", self.cfg.node_id),
            )
            .await;
        }
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> R<csi::NodeGetVolumeStatsResponse> {
        use csi::volume_usage::Unit;
        let r = r.into_inner();
        check_id(&r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        // Existence before syntax (see `staged_at`): NOT_FOUND for a volume
        // that is not here, or a path it is not at, whatever the path's form.
        let s = self.staged_at(&r.volume_id, &r.volume_path)?;
        let path = PathBuf::from(&r.volume_path);
        let mut condition = match attach::health(&s.attachment).await {
            Ok(()) => csi::VolumeCondition {
                abnormal: false,
                message: "ok".into(),
            },
            Err(fault) => csi::VolumeCondition {
                abnormal: true,
                message: fault.message().to_string(),
            },
        };
        // A replicated volume whose device works may still be degraded (a
        // copy out of the set): the catalog says so.
        let device_ok = !condition.abnormal;
        if device_ok && fuse::ReplicatedSpec::parse(&s.attachment.uri).is_some() {
            if let Some(why) = self.catalog_condition(&r.volume_id).await {
                condition = csi::VolumeCondition {
                    abnormal: true,
                    message: why,
                };
            }
        }
        let usage = if s.block {
            vec![csi::VolumeUsage {
                total: i64::try_from(mount::size_of(&s.attachment.device)?).unwrap_or(i64::MAX),
                unit: Unit::Bytes as i32,
                ..Default::default()
            }]
        } else if !device_ok {
            // statvfs of a filesystem whose device is gone can hang or lie.
            Vec::new()
        } else {
            let u = mount::usage(&path)?;
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            vec![
                csi::VolumeUsage {
                    available: n(u.available_bytes),
                    total: n(u.total_bytes),
                    used: n(u.used_bytes),
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: n(u.free_inodes),
                    total: n(u.total_inodes),
                    used: n(u.total_inodes.saturating_sub(u.free_inodes)),
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> R<csi::NodeExpandVolumeResponse> {
        let r = r.into_inner();
        check_id(&r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let want = r
            .capacity_range
            .as_ref()
            .map_or(0, |c| u64::try_from(c.required_bytes).unwrap_or(0));
        let _held = self.inflight.volume(&r.volume_id)?;
        // A volume that is not here is NOT_FOUND whatever path comes with it
        // (csi-sanity sends a relative one); the path's form is checked
        // after. The path itself is never used: the staged record says what
        // to grow.
        let s = self.staged_volume(&r.volume_id)?;
        check_path("volume_path", &r.volume_path)?;
        let mut size = mount::size_of(&s.attachment.device)?;
        if want == 0 || want > size {
            // Online: the attachment re-reads the volume's size and its loop
            // devices take it; the filesystem stays mounted.
            let others: Vec<PathBuf> = s
                .targets
                .values()
                .filter_map(|t| t.ro_device.clone())
                .collect();
            size = attach::grow(&s.attachment, want, &others).await?;
        }
        if !s.block {
            mount::grow_fs(&s.attachment.device, &s.staging_path, &s.fs_type).await?;
        }
        self.audit(
            "NodeExpand",
            &r.volume_id,
            &s.staging_path,
            format!("{size} bytes on node {}", self.cfg.node_id),
        )
        .await;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> R<csi::NodeGetCapabilitiesResponse> {
        let rpc = |t: Rpc| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: [
                Rpc::StageUnstageVolume,
                Rpc::GetVolumeStats,
                Rpc::ExpandVolume,
                Rpc::VolumeCondition,
                Rpc::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> R<csi::NodeGetInfoResponse> {
        let mut segments: HashMap<String, String> = self
            .cfg
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        segments.insert(TOPOLOGY_NODE_KEY.to_string(), self.cfg.node_id.clone());
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_escape_the_state_folder_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", "x\0"] {
            assert_eq!(
                check_id(bad).expect_err(bad).code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        check_id("pvc-0d1e2f.db_1").expect("a normal id");
    }

    /// A node service on `state` whose metadata client is never dialled.
    fn service(state: &Path) -> NodeService {
        let meta = crate::metadata_client("unix:///nonexistent/berth-meta.sock", None)
            .expect("metadata client");
        NodeService::new(
            NodeConfig {
                node_id: "node-1".into(),
                labels: BTreeMap::new(),
                state_dir: state.to_path_buf(),
                attach_program: PathBuf::from("/nonexistent/berth"),
                attach_tls_dir: None,
                attach_metadata: None,
            },
            meta,
        )
        .expect("node service")
    }

    fn stats(id: &str, path: &str) -> Request<csi::NodeGetVolumeStatsRequest> {
        Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        })
    }

    fn expand(id: &str, path: &str) -> Request<csi::NodeExpandVolumeRequest> {
        Request::new(csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        })
    }

    /// What csi-sanity v5.4.0 sends (a random volume id, the relative path
    /// "some/path") gets NOT_FOUND, not INVALID_ARGUMENT: existence is
    /// checked before the path's form. Missing fields stay INVALID_ARGUMENT.
    #[tokio::test]
    async fn missing_volumes_and_paths_are_not_found_whatever_the_path() {
        use csi::node_server::Node;
        let dir = tempfile::tempdir().expect("tmp");
        let node = service(&dir.path().join("state"));
        fn code<T>(r: Result<T, Status>) -> tonic::Code {
            r.err().map_or(tonic::Code::Ok, |e| e.code())
        }
        let not_found = tonic::Code::NotFound;
        let invalid = tonic::Code::InvalidArgument;
        for path in ["some/path", "/nonexistent/berth", "/a/../b", "-o"] {
            let id = "sanity-missing-volume";
            assert_eq!(
                code(node.node_get_volume_stats(stats(id, path)).await),
                not_found,
                "stats {path}"
            );
            assert_eq!(
                code(node.node_expand_volume(expand(id, path)).await),
                not_found,
                "expand {path}"
            );
        }
        assert_eq!(
            code(node.node_get_volume_stats(stats("", "some/path")).await),
            invalid
        );
        assert_eq!(
            code(node.node_get_volume_stats(stats("v", "")).await),
            invalid
        );
        assert_eq!(
            code(node.node_expand_volume(expand("", "some/path")).await),
            invalid
        );
        assert_eq!(
            code(node.node_expand_volume(expand("v", "")).await),
            invalid
        );

        // A volume staged here and published at `target`, asked about at a
        // path it is not at.
        let staging = dir.path().join("staging");
        let target = dir.path().join("target");
        std::fs::create_dir_all(&staging).expect("staging");
        let s = Staged {
            volume_id: "v".into(),
            staging_path: staging.clone(),
            block: false,
            fs_type: "ext4".into(),
            read_only: false,
            mount_flags: Vec::new(),
            attachment: attach::Attachment {
                uri: "nbd+unix:///v@t?socket=/nonexistent".into(),
                read_only: false,
                fuse_dir: dir.path().join("state/attach/v"),
                daemon_pid: 0,
                device: PathBuf::from("/dev/nonexistent-loop"),
            },
            targets: BTreeMap::from([(
                target.clone(),
                Target {
                    read_only: false,
                    ro_device: None,
                },
            )]),
        };
        node.staged.lock().insert("v".into(), s);
        let missing_target = target.display().to_string();
        for path in ["some/path", "/nonexistent/berth", missing_target.as_str()] {
            assert_eq!(
                code(node.node_get_volume_stats(stats("v", path)).await),
                not_found,
                "stats {path}: not where the volume is (or no longer there)"
            );
        }
        // On a volume that is here, a path of the wrong form is refused
        // before anything is grown.
        assert_eq!(
            code(node.node_expand_volume(expand("v", "some/path")).await),
            invalid
        );
    }

    #[test]
    fn the_unix_uri_is_used_only_when_its_socket_is_here() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("nbd.sock");
        let ctx = |unix: &str| {
            HashMap::from([
                (
                    PUB_TCP_URI.to_string(),
                    "nbd://10.0.0.1:10809/v@t".to_string(),
                ),
                (PUB_UNIX_URI.to_string(), unix.to_string()),
            ])
        };
        let unix = format!("nbd+unix:///v@t?socket={}", sock.display());
        assert_eq!(
            choose_uri("v", "n", &ctx(&unix)).expect("tcp"),
            "nbd://10.0.0.1:10809/v@t"
        );
        std::fs::write(&sock, b"").expect("touch");
        assert_eq!(choose_uri("v", "n", &ctx(&unix)).expect("unix"), unix);
        assert_eq!(
            choose_uri("v", "n", &HashMap::new())
                .expect_err("none")
                .code(),
            tonic::Code::FailedPrecondition
        );
    }
}
