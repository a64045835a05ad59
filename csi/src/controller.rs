//! The CSI Controller service: each call checks its arguments the way the
//! spec (and csi-sanity) expects, then becomes one call to the metadata
//! service, whose codes already follow CSI (NOT_FOUND, ALREADY_EXISTS,
//! RESOURCE_EXHAUSTED with the reasons per node, OUT_OF_RANGE...). Where CSI
//! asks for success on a missing object (deletes, unpublish), NOT_FOUND
//! becomes OK.

use std::collections::{BTreeMap, HashMap};

use berth_proto::csi::v1 as csi;
use berth_proto::meta::v1 as mpb;
use csi::controller_service_capability::rpc::Type as Rpc;
use tonic::{Code, Request, Response, Status};

use crate::caps::{self, Access};
use crate::locks::InFlight;
use crate::TOPOLOGY_NODE_KEY;

type R<T> = Result<Response<T>, Status>;

/// What the audit log calls the controller.
const CALLER: &str = "csi-controller";

/// Keys the node plugin reads from a volume's context.
pub const CTX_FS_TYPE: &str = "fsType";
pub const CTX_TIER: &str = "tier";

/// Keys of the publish context (ControllerPublish → NodeStage).
pub const PUB_TCP_URI: &str = "tcpUri";
pub const PUB_UNIX_URI: &str = "unixUri";
pub const PUB_EXPORT: &str = "exportName";
pub const PUB_SERVER_NODE: &str = "serverNode";
pub const PUB_READ_ONLY: &str = "readOnly";
/// A replicated volume: its legs, in JSON ([`PublishedLeg`]s, the local
/// replica first).
pub const PUB_REPLICAS: &str = "replicas";
/// A replicated volume: the generation its nexus's grants carry.
pub const PUB_GENERATION: &str = "generation";

/// One replica's export in a replicated volume's publish context.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedLeg {
    pub node: String,
    #[serde(rename = "tcpUri")]
    pub tcp_uri: String,
    #[serde(rename = "unixUri", default)]
    pub unix_uri: String,
}

#[derive(Debug, Clone)]
pub struct Controller {
    meta: berth_proto::MetaClient,
    inflight: InFlight,
}

/// A request to the metadata service, naming the controller as the caller.
pub(crate) fn meta_req<T>(who: &str, t: T) -> Request<T> {
    let mut r = Request::new(t);
    berth_proto::name_caller(&mut r, who);
    r
}

fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

/// CSI's signed sizes as bytes.
fn range(r: Option<&csi::CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = r else {
        return Ok((0, 0));
    };
    let required = u64::try_from(r.required_bytes)
        .map_err(|_| Status::invalid_argument("capacity_range.required_bytes is negative"))?;
    let limit = u64::try_from(r.limit_bytes)
        .map_err(|_| Status::invalid_argument("capacity_range.limit_bytes is negative"))?;
    Ok((required, limit))
}

fn bytes_i64(b: u64) -> i64 {
    i64::try_from(b).unwrap_or(i64::MAX)
}

fn ok_if_missing<T: Default>(r: Result<T, Status>) -> Result<T, Status> {
    match r {
        Err(s) if s.code() == Code::NotFound => Ok(T::default()),
        r => r,
    }
}

fn topology(t: &csi::Topology) -> mpb::Topology {
    mpb::Topology {
        segments: t.segments.clone(),
    }
}

/// Where a volume may be used from. Volumes are served to any node over NBD,
/// so the node itself is not a constraint; the other labels of the node that
/// holds it (zone, rack...) are: of any of its copies for a replicated one
/// (a pod may run near any copy). Empty: anywhere.
fn accessible(v: &mpb::Volume) -> Vec<csi::Topology> {
    let without_node = |t: Option<&mpb::Topology>| -> HashMap<String, String> {
        t.map(|t| {
            t.segments
                .iter()
                .filter(|(k, _)| k.as_str() != TOPOLOGY_NODE_KEY)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
    };
    let mut out: Vec<csi::Topology> = Vec::new();
    let each: Vec<HashMap<String, String>> = if v.replicas.iter().any(|r| r.topology.is_some()) {
        v.replicas
            .iter()
            .map(|r| without_node(r.topology.as_ref()))
            .collect()
    } else {
        vec![without_node(v.accessible_topology.as_ref())]
    };
    for segments in each {
        // A copy whose node has no other label: reachable from anywhere.
        if segments.is_empty() {
            return Vec::new();
        }
        if !out.iter().any(|t| t.segments == segments) {
            out.push(csi::Topology { segments });
        }
    }
    out
}

fn context(v: &mpb::Volume) -> HashMap<String, String> {
    HashMap::from([
        (CTX_TIER.to_string(), v.tier.clone()),
        (CTX_FS_TYPE.to_string(), v.fs_type.clone()),
    ])
}

fn volume_pb(v: &mpb::Volume, source: Option<csi::VolumeContentSource>) -> csi::Volume {
    csi::Volume {
        capacity_bytes: bytes_i64(v.size_bytes),
        volume_id: v.id.clone(),
        volume_context: context(v),
        content_source: source,
        accessible_topology: accessible(v),
    }
}

fn source_of(v: &mpb::Volume) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = if !v.source_snapshot_id.is_empty() {
        Type::Snapshot(SnapshotSource {
            snapshot_id: v.source_snapshot_id.clone(),
        })
    } else if !v.source_volume_id.is_empty() {
        Type::Volume(VolumeSource {
            volume_id: v.source_volume_id.clone(),
        })
    } else {
        return None;
    };
    Some(csi::VolumeContentSource { r#type: Some(t) })
}

fn condition(v: &mpb::Volume) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: v.abnormal,
        message: if v.condition.is_empty() {
            "ok".into()
        } else {
            v.condition.clone()
        },
    }
}

fn snapshot_pb(s: &mpb::Snapshot) -> csi::Snapshot {
    let ms = s.created_unix_ms;
    csi::Snapshot {
        size_bytes: bytes_i64(s.size_bytes),
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
        }),
        ready_to_use: s.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

/// The filesystem the capabilities ask for ("" when they leave it open).
fn fs_type_of(caps: &[caps::Capability]) -> Result<String, Status> {
    let mut fs = String::new();
    for c in caps {
        if let Access::Mount { fs_type, .. } = &c.access {
            if !fs_type.is_empty() {
                if !fs.is_empty() && fs != *fs_type {
                    return Err(Status::invalid_argument(format!(
                        "volume_capabilities ask for two filesystems: {fs} and {fs_type}"
                    )));
                }
                fs = fs_type.clone();
            }
        }
    }
    Ok(fs)
}

impl Controller {
    pub fn new(meta: berth_proto::MetaClient) -> Self {
        Controller {
            meta,
            inflight: InFlight::default(),
        }
    }

    fn m<T>(&self, t: T) -> Request<T> {
        meta_req(CALLER, t)
    }

    async fn get_volume(&self, id: &str) -> Result<mpb::Volume, Status> {
        Ok(self
            .meta
            .clone()
            .get_volume(self.m(mpb::GetVolumeRequest {
                volume_id: id.to_string(),
            }))
            .await?
            .into_inner())
    }

    /// Nodes each volume is published to (one call for the whole page).
    async fn published(&self, volume: &str) -> Result<BTreeMap<String, Vec<String>>, Status> {
        let list = self
            .meta
            .clone()
            .list_attachments(self.m(mpb::ListAttachmentsRequest {
                volume_id: volume.to_string(),
            }))
            .await?
            .into_inner()
            .attachments;
        let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for a in list {
            if a.state == mpb::ObjectState::Ready as i32 {
                by.entry(a.volume_id).or_default().push(a.node);
            }
        }
        Ok(by)
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> R<csi::CreateVolumeResponse> {
        let r = r.into_inner();
        required("name", &r.name)?;
        let caps = caps::all(&r.volume_capabilities)?;
        let fs = fs_type_of(&caps)?;
        let (required_bytes, limit_bytes) = range(r.capacity_range.as_ref())?;
        let mut parameters = r.parameters.clone();
        // VolumeAttributesClass parameters given at creation apply from the start.
        parameters.extend(r.mutable_parameters.clone());
        if !fs.is_empty() {
            match parameters.get(CTX_FS_TYPE) {
                Some(p) if *p != fs => {
                    return Err(Status::invalid_argument(format!(
                        "parameter fsType={p} contradicts the capability's fs_type {fs}"
                    )))
                }
                _ => {
                    parameters.insert(CTX_FS_TYPE.into(), fs);
                }
            }
        }
        let source = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => None,
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                required("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                Some(mpb::create_volume_request::Source::SourceSnapshotId(
                    s.snapshot_id.clone(),
                ))
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                required("volume_content_source.volume.volume_id", &v.volume_id)?;
                Some(mpb::create_volume_request::Source::SourceVolumeId(
                    v.volume_id.clone(),
                ))
            }
        };
        let accessibility =
            r.accessibility_requirements
                .as_ref()
                .map(|t| mpb::TopologyRequirement {
                    requisite: t.requisite.iter().map(topology).collect(),
                    preferred: t.preferred.iter().map(topology).collect(),
                });
        let _held = self.inflight.volume(&r.name)?;
        let v = self
            .meta
            .clone()
            .create_volume(self.m(mpb::CreateVolumeRequest {
                name: r.name.clone(),
                required_bytes,
                limit_bytes,
                parameters,
                accessibility,
                source,
            }))
            .await?
            .into_inner();
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume_pb(&v, r.volume_content_source)),
        }))
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> R<csi::DeleteVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        let _held = self.inflight.volume(&r.volume_id)?;
        ok_if_missing(
            self.meta
                .clone()
                .delete_volume(self.m(mpb::DeleteVolumeRequest {
                    volume_id: r.volume_id,
                }))
                .await
                .map(|_| ()),
        )?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> R<csi::ControllerPublishVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        required("node_id", &r.node_id)?;
        let cap = caps::required(r.volume_capability.as_ref())?;
        let read_only = r.readonly || cap.read_only();
        let _held = self.inflight.volume(&r.volume_id)?;
        let a = self
            .meta
            .clone()
            .publish_volume(self.m(mpb::PublishVolumeRequest {
                volume_id: r.volume_id,
                node: r.node_id,
                read_only,
            }))
            .await?
            .into_inner();
        let mut ctx = HashMap::from([
            (PUB_TCP_URI.to_string(), a.tcp_uri),
            (PUB_EXPORT.to_string(), a.export_name),
            (PUB_SERVER_NODE.to_string(), a.server_node),
            (PUB_READ_ONLY.to_string(), a.read_only.to_string()),
        ]);
        if !a.unix_uri.is_empty() {
            ctx.insert(PUB_UNIX_URI.to_string(), a.unix_uri);
        }
        if !a.legs.is_empty() {
            let legs: Vec<PublishedLeg> = a
                .legs
                .into_iter()
                .map(|l| PublishedLeg {
                    node: l.node,
                    tcp_uri: l.tcp_uri,
                    unix_uri: l.unix_uri,
                })
                .collect();
            ctx.insert(
                PUB_REPLICAS.to_string(),
                serde_json::to_string(&legs).map_err(|e| Status::internal(e.to_string()))?,
            );
            ctx.insert(PUB_GENERATION.to_string(), a.generation.to_string());
        }
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context: ctx,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> R<csi::ControllerUnpublishVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        let _held = self.inflight.volume(&r.volume_id)?;
        ok_if_missing(
            self.meta
                .clone()
                .unpublish_volume(self.m(mpb::UnpublishVolumeRequest {
                    volume_id: r.volume_id,
                    node: r.node_id,
                }))
                .await
                .map(|_| ()),
        )?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> R<csi::ValidateVolumeCapabilitiesResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let v = self.get_volume(&r.volume_id).await?;
        let unconfirmed = |message: String| {
            Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            }))
        };
        for c in &r.volume_capabilities {
            match caps::parse(c) {
                Err(why) => return unconfirmed(why),
                Ok(c) => {
                    if let Access::Mount { fs_type, .. } = &c.access {
                        if !fs_type.is_empty() && !v.fs_type.is_empty() && *fs_type != v.fs_type {
                            return unconfirmed(format!(
                                "volume {} is for {}, not {fs_type}",
                                v.id, v.fs_type
                            ));
                        }
                    }
                }
            }
        }
        let ours = |k: &str| k.starts_with("csi.storage.k8s.io/");
        for (k, want) in r.parameters.iter().filter(|(k, _)| !ours(k)) {
            if v.parameters.get(k) != Some(want) {
                return unconfirmed(format!(
                    "volume {} was not created with parameter {k}={want}",
                    v.id
                ));
            }
        }
        Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: r.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> R<csi::ListVolumesResponse> {
        let r = r.into_inner();
        let max_entries = u32::try_from(r.max_entries)
            .map_err(|_| Status::invalid_argument("max_entries is negative"))?;
        let page = self
            .meta
            .clone()
            .list_volumes(self.m(mpb::ListVolumesRequest {
                max_entries,
                page_token: r.starting_token,
                node: String::new(),
            }))
            .await?
            .into_inner();
        let published = self.published("").await?;
        let entries = page
            .volumes
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(volume_pb(v, source_of(v))),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: published.get(&v.id).cloned().unwrap_or_default(),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token: page.next_page_token,
        }))
    }

    async fn get_capacity(
        &self,
        r: Request<csi::GetCapacityRequest>,
    ) -> R<csi::GetCapacityResponse> {
        let r = r.into_inner();
        // Capabilities Berth cannot honour leave no capacity for them.
        if r.volume_capabilities
            .iter()
            .any(|c| caps::parse(c).is_err())
        {
            return Ok(Response::new(csi::GetCapacityResponse::default()));
        }
        let c = self
            .meta
            .clone()
            .get_capacity(self.m(mpb::GetCapacityRequest {
                topology: r.accessible_topology.as_ref().map(topology),
                parameters: r.parameters,
            }))
            .await?
            .into_inner();
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: bytes_i64(c.available_bytes),
            maximum_volume_size: Some(bytes_i64(c.maximum_volume_bytes)),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> R<csi::ControllerGetCapabilitiesResponse> {
        let rpc = |t: Rpc| csi::ControllerServiceCapability {
            r#type: Some(csi::controller_service_capability::Type::Rpc(
                csi::controller_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: [
                Rpc::CreateDeleteVolume,
                Rpc::PublishUnpublishVolume,
                Rpc::ListVolumes,
                Rpc::GetCapacity,
                Rpc::CreateDeleteSnapshot,
                Rpc::ListSnapshots,
                Rpc::GetSnapshot,
                Rpc::CloneVolume,
                Rpc::PublishReadonly,
                Rpc::ExpandVolume,
                Rpc::ListVolumesPublishedNodes,
                Rpc::VolumeCondition,
                Rpc::GetVolume,
                Rpc::SingleNodeMultiWriter,
                Rpc::ModifyVolume,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> R<csi::CreateSnapshotResponse> {
        let r = r.into_inner();
        required("name", &r.name)?;
        required("source_volume_id", &r.source_volume_id)?;
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Status::invalid_argument(format!(
                "snapshot parameter {k:?} is not supported (Berth snapshots take none)"
            )));
        }
        let _held = self.inflight.snapshot(&r.name)?;
        let s = self
            .meta
            .clone()
            .create_snapshot(self.m(mpb::CreateSnapshotRequest {
                name: r.name,
                source_volume_id: r.source_volume_id,
            }))
            .await?
            .into_inner();
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot_pb(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> R<csi::DeleteSnapshotResponse> {
        let r = r.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        let _held = self.inflight.snapshot(&r.snapshot_id)?;
        ok_if_missing(
            self.meta
                .clone()
                .delete_snapshot(self.m(mpb::DeleteSnapshotRequest {
                    snapshot_id: r.snapshot_id,
                }))
                .await
                .map(|_| ()),
        )?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> R<csi::ListSnapshotsResponse> {
        let r = r.into_inner();
        let max_entries = u32::try_from(r.max_entries)
            .map_err(|_| Status::invalid_argument("max_entries is negative"))?;
        let page = self
            .meta
            .clone()
            .list_snapshots(self.m(mpb::ListSnapshotsRequest {
                snapshot_id: r.snapshot_id,
                source_volume_id: r.source_volume_id,
                max_entries,
                page_token: r.starting_token,
            }))
            .await?
            .into_inner();
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: page
                .snapshots
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_pb(s)),
                })
                .collect(),
            next_token: page.next_page_token,
        }))
    }

    async fn get_snapshot(
        &self,
        r: Request<csi::GetSnapshotRequest>,
    ) -> R<csi::GetSnapshotResponse> {
        let r = r.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        let page = self
            .meta
            .clone()
            .list_snapshots(self.m(mpb::ListSnapshotsRequest {
                snapshot_id: r.snapshot_id.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        let s = page.snapshots.first().ok_or_else(|| {
            Status::not_found(format!("snapshot {} does not exist", r.snapshot_id))
        })?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(snapshot_pb(s)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> R<csi::ControllerExpandVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        let Some(cr) = r.capacity_range.as_ref() else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        let (required_bytes, limit_bytes) = range(Some(cr))?;
        if let Some(c) = r.volume_capability.as_ref() {
            caps::parse(c).map_err(Status::invalid_argument)?;
        }
        let _held = self.inflight.volume(&r.volume_id)?;
        let v = self
            .meta
            .clone()
            .expand_volume(self.m(mpb::ExpandVolumeRequest {
                volume_id: r.volume_id,
                required_bytes,
                limit_bytes,
            }))
            .await?
            .into_inner();
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: bytes_i64(v.size_bytes),
            // The node's NBD attachment learns the new size when it
            // re-reads it (NodeExpandVolume), for a raw device too; a
            // filesystem is grown there as well.
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> R<csi::ControllerGetVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        let v = self.get_volume(&r.volume_id).await?;
        let published = self.published(&v.id).await?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(volume_pb(&v, source_of(&v))),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published.get(&v.id).cloned().unwrap_or_default(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        r: Request<csi::ControllerModifyVolumeRequest>,
    ) -> R<csi::ControllerModifyVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument("mutable_parameters is required"));
        }
        let _held = self.inflight.volume(&r.volume_id)?;
        self.meta
            .clone()
            .modify_volume(self.m(mpb::ModifyVolumeRequest {
                volume_id: r.volume_id,
                parameters: r.mutable_parameters,
            }))
            .await?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(pairs: &[(&str, &str)]) -> mpb::Topology {
        mpb::Topology {
            segments: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn zones(t: &[csi::Topology]) -> Vec<String> {
        let mut z: Vec<String> = t
            .iter()
            .map(|t| t.segments["topology.kubernetes.io/zone"].clone())
            .collect();
        z.sort();
        z
    }

    #[test]
    fn a_replicated_volume_is_accessible_near_any_of_its_copies() {
        let replica = |node: &str, zone: &str| mpb::Replica {
            node: node.into(),
            topology: Some(topo(&[
                (TOPOLOGY_NODE_KEY, node),
                ("topology.kubernetes.io/zone", zone),
            ])),
            ..Default::default()
        };
        let v = mpb::Volume {
            accessible_topology: Some(topo(&[
                (TOPOLOGY_NODE_KEY, "a"),
                ("topology.kubernetes.io/zone", "z1"),
            ])),
            replicas: vec![replica("a", "z1"), replica("b", "z2"), replica("c", "z1")],
            ..Default::default()
        };
        let t = accessible(&v);
        assert_eq!(zones(&t), ["z1", "z2"], "one term per zone, no node key");
        assert!(t
            .iter()
            .all(|t| !t.segments.contains_key(TOPOLOGY_NODE_KEY)));
        // A single copy: its own labels.
        let single = mpb::Volume {
            replicas: Vec::new(),
            ..v.clone()
        };
        assert_eq!(zones(&accessible(&single)), ["z1"]);
        // A copy on a node with no other label: anywhere.
        let mut anywhere = v.clone();
        anywhere.replicas[1].topology = Some(topo(&[(TOPOLOGY_NODE_KEY, "b")]));
        assert!(accessible(&anywhere).is_empty());
    }
}
