//! `berth.meta.v1.MetadataService`: converts between protobuf and the
//! service's types; the work is in [`crate::meta`].

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_catalog::audit::{self, AuditEntry};
use berth_catalog::records::{
    self, AttachmentRecord, NodeState, PoolRecord, SnapshotRecord, Source, State, VolumeRecord,
};
use berth_proto::meta::v1 as pb;
use berth_proto::meta::v1::metadata_service_server::{MetadataService, MetadataServiceServer};
use tonic::{Request, Response, Status};

use crate::error::MetaError;
use crate::meta::{now_ms, Call, CreateVolume, Meta, Registration};

#[derive(Debug, Clone)]
pub struct Service {
    meta: Arc<Meta>,
}

impl Service {
    pub fn new(meta: Arc<Meta>) -> Self {
        Service { meta }
    }
    pub fn into_server(self) -> MetadataServiceServer<Self> {
        MetadataServiceServer::new(self)
    }
}

/// Who is calling: the `x-berth-client` header (berthctl sends the user, the
/// CSI driver its node), else the transport peer.
fn actor<T>(r: &Request<T>) -> String {
    berth_proto::caller(r)
}

fn state_pb(s: State) -> i32 {
    (match s {
        State::Creating => pb::ObjectState::Creating,
        State::Ready => pb::ObjectState::Ready,
        State::Deleting => pb::ObjectState::Deleting,
    }) as i32
}

fn map(m: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn btree(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

pub fn volume_pb(v: &VolumeRecord) -> pb::Volume {
    let (snap, vol) = match &v.source {
        Some(Source::Snapshot(s)) => (s.clone(), String::new()),
        Some(Source::Volume(x)) => (String::new(), x.clone()),
        None => (String::new(), String::new()),
    };
    pb::Volume {
        id: v.id.clone(),
        size_bytes: v.size_bytes,
        tier: v.tier.clone(),
        parameters: map(&v.parameters),
        qos: Some(pb::Qos {
            tier: v.qos.tier.clone(),
            iops_limit: v.qos.iops_limit,
            bytes_per_second_limit: v.qos.bytes_per_second_limit,
            burst_seconds: v.qos.burst_seconds,
            priority: v.qos.priority,
        }),
        node: v.node.clone(),
        pool_id: v.pool_id.clone(),
        source_snapshot_id: snap,
        source_volume_id: vol,
        state: state_pb(v.state),
        accessible_topology: Some(pb::Topology {
            segments: map(&v.topology),
        }),
        fs_type: v.fs_type.clone(),
        created_unix_ms: v.created_ms,
        abnormal: !v.condition.is_empty(),
        condition: v.condition.clone(),
        replicas: v
            .replicas
            .iter()
            .flat_map(|set| set.replicas().iter().enumerate())
            .map(|(i, r)| pb::Replica {
                topology: v
                    .copy_topology
                    .get(i)
                    .map(|t| pb::Topology { segments: map(t) }),
                node: r.node.clone(),
                pool_id: r.pool_id.clone(),
                state: replica_state(r.state).to_string(),
                synced_generation: r.synced_generation,
                rebuild_done_bytes: r.rebuild_done_bytes,
                rebuild_total_bytes: r.rebuild_total_bytes,
            })
            .collect(),
        generation: v.replicas.as_ref().map_or(0, |s| s.generation()),
    }
}

/// A replica's state as the API and berthctl spell it.
pub fn replica_state(s: berth_catalog::replication::ReplicaState) -> &'static str {
    use berth_catalog::replication::ReplicaState as S;
    match s {
        S::InSync => "in-sync",
        S::Rebuilding => "rebuilding",
        S::Faulted => "faulted",
        S::Stale => "stale",
    }
}

fn snapshot_pb(s: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.clone(),
        source_volume_id: s.source_volume.clone(),
        size_bytes: s.size_bytes,
        node: s.node.clone(),
        pool_id: s.pool_id.clone(),
        state: state_pb(s.state),
        created_unix_ms: s.created_ms,
        ready_to_use: s.state == State::Ready,
    }
}

fn attachment_pb(meta: &Meta, a: &AttachmentRecord) -> pb::Attachment {
    let legs = a
        .legs
        .iter()
        .map(|l| {
            let (tcp_uri, unix_uri) = meta.leg_uris(a, l);
            pb::AttachmentLeg {
                node: l.node.clone(),
                export_name: l.export_name.clone(),
                tcp_uri,
                unix_uri,
            }
        })
        .collect();
    pb::Attachment {
        legs,
        generation: a.generation,
        volume_id: a.volume.clone(),
        node: a.node.clone(),
        read_only: a.read_only,
        server_node: a.server_node.clone(),
        export_name: a.export_name.clone(),
        tcp_uri: a.tcp_uri.clone(),
        unix_uri: a.unix_uri.clone(),
        created_unix_ms: a.created_ms,
        state: state_pb(a.state),
    }
}

fn audit_pb(e: AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: e.seq,
        time_unix_ms: e.time_ms,
        actor: e.actor,
        action: e.action,
        volume: e.volume,
        target: e.target,
        node: e.node,
        result: e.result,
        peer: e.peer,
        read_bytes: e.read_bytes,
        write_bytes: e.write_bytes,
        detail: e.detail,
        prev_hash: e.prev_hash,
        hash: e.hash,
    }
}

/// A node's pool report as the catalog keeps it.
fn pool_record(node: &str, p: Option<pb::PoolStatus>) -> PoolRecord {
    let p = p.unwrap_or_default();
    PoolRecord {
        id: p.id,
        node: node.to_string(),
        total_bytes: p.total_bytes,
        used_bytes: p.used_bytes,
        media: p.media,
        volumes: p.volumes,
        snapshots: p.snapshots,
        updated_ms: now_ms(),
    }
}

fn segments(t: Vec<pb::Topology>) -> Vec<BTreeMap<String, String>> {
    t.into_iter().map(|t| btree(t.segments)).collect()
}

/// Page tokens are the last key returned, hex-encoded (opaque to callers).
fn page_start(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(Some)
        .ok_or_else(|| {
            Status::aborted(format!(
                "page token {token:?} was not issued by this service"
            ))
        })
}

/// One page of records that pass `keep`, and the token of the next page
/// (empty when nothing after the page passes). Keys are names in order, so a
/// record added before the cursor is not seen and one added after it is:
/// nothing that existed is skipped or repeated.
fn page<R: records::Record>(
    meta: &Meta,
    token: &str,
    max: u32,
    keep: impl Fn(&R) -> bool,
) -> Result<(Vec<R>, String), Status> {
    const BATCH: usize = 512;
    let mut cursor = page_start(token)?;
    let max = if max == 0 { usize::MAX } else { max as usize };
    let mut out: Vec<R> = Vec::new();
    loop {
        let batch =
            records::list::<R>(&*meta.store, cursor.as_deref(), BATCH).map_err(MetaError::from)?;
        let n = batch.len();
        for r in batch {
            let key = r.key();
            if keep(&r) {
                if out.len() == max {
                    // Something passes after a full page: the next page
                    // starts after this page's last record.
                    let last = out.last().map(R::key).unwrap_or_default();
                    return Ok((out, hex::encode(last)));
                }
                out.push(r);
            }
            cursor = Some(key);
        }
        if n < BATCH {
            return Ok((out, String::new()));
        }
    }
}

type R<T> = Result<Response<T>, Status>;

/// Runs a catalog-changing call to completion on its own task: a client that
/// gives up (cancels, hits its deadline) must not cut the intent → volume
/// server → outcome sequence, or the service's accounting, half-way.
async fn detached<T: Send + 'static>(
    meta: &Meta,
    f: impl std::future::Future<Output = Result<T, MetaError>> + Send + 'static,
) -> Result<T, Status> {
    meta.calls
        .spawn(f)
        .await
        .map_err(|e| Status::internal(format!("call task: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl MetadataService for Service {
    async fn register_node(
        &self,
        r: Request<pb::RegisterNodeRequest>,
    ) -> R<pb::RegisterNodeResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let reg = Registration {
            pool: pool_record(&m.name, m.pool),
            name: m.name,
            control_endpoint: m.control_endpoint,
            nbd_address: m.nbd_address,
            nbd_socket: m.nbd_socket,
            labels: btree(m.labels),
            version: m.version,
        };
        let name = reg.name.clone();
        let ms = self.meta.register_node(&who, reg).await?;
        // A node that (re)registers gets a reconcile pass right away.
        let meta = self.meta.clone();
        tokio::spawn(async move {
            if let Err(e) = meta.reconcile_node(&name).await {
                tracing::warn!(node = %name, error = %e, "reconcile after registration failed");
            }
        });
        Ok(Response::new(pb::RegisterNodeResponse {
            heartbeat_interval_ms: ms,
        }))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        let m = r.into_inner();
        if !self
            .meta
            .heartbeat(&m.name, pool_record(&m.name, m.pool))
            .await?
        {
            return Err(Status::not_found(format!(
                "node {} is not registered (or its pool changed): register",
                m.name
            )));
        }
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_interval_ms: self.meta.cfg.heartbeat_interval.as_millis() as u32,
        }))
    }

    async fn list_nodes(&self, _r: Request<pb::ListNodesRequest>) -> R<pb::ListNodesResponse> {
        let nodes = self
            .meta
            .nodes()?
            .into_iter()
            .map(|(n, up)| pb::Node {
                state: if up && n.state == NodeState::Up {
                    "up"
                } else {
                    "down"
                }
                .into(),
                name: n.name,
                control_endpoint: n.control_endpoint,
                nbd_address: n.nbd_address,
                nbd_socket: n.nbd_socket,
                labels: n.labels.into_iter().collect(),
                last_heartbeat_unix_ms: n.last_heartbeat_ms,
                registered_unix_ms: n.registered_ms,
                version: n.version,
                cordoned: n.cordoned,
                pool_id: n.pool_id,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_pools(&self, _r: Request<pb::ListPoolsRequest>) -> R<pb::ListPoolsResponse> {
        let pools = self
            .meta
            .pool_views()?
            .into_iter()
            .map(|v| pb::Pool {
                id: v.pool.id.clone(),
                node: v.pool.node.clone(),
                status: Some(pb::PoolStatus {
                    id: v.pool.id,
                    total_bytes: v.pool.total_bytes,
                    used_bytes: v.pool.used_bytes,
                    media: v.pool.media,
                    volumes: v.pool.volumes,
                    snapshots: v.pool.snapshots,
                }),
                provisioned_bytes: v.provisioned_bytes,
                available_bytes: v.available_bytes,
                node_state: if v.node_up { "up" } else { "down" }.into(),
            })
            .collect();
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn list_tiers(&self, _r: Request<pb::ListTiersRequest>) -> R<pb::ListTiersResponse> {
        let tiers = self
            .meta
            .cfg
            .tiers
            .iter()
            .map(|t| pb::Tier {
                name: t.name.clone(),
                iops_base: t.iops_base,
                iops_per_gib: t.iops_per_gib,
                iops_cap: t.iops_cap,
                bytes_per_second_base: t.bytes_per_second_base,
                bytes_per_second_per_gib: t.bytes_per_second_per_gib,
                bytes_per_second_cap: t.bytes_per_second_cap,
                burst_seconds: t.burst_seconds,
                priority: t.priority,
                fs_type: t.fs_type.clone(),
                media: t.media.clone(),
                description: t.description.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListTiersResponse { tiers }))
    }

    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> R<pb::Volume> {
        use pb::create_volume_request::Source as S;
        let who = actor(&r);
        let m = r.into_inner();
        let acc = m.accessibility.unwrap_or_default();
        let source = m.source.map(|s| match s {
            S::SourceSnapshotId(s) => Source::Snapshot(s),
            S::SourceVolumeId(v) => Source::Volume(v),
        });
        let target = match &source {
            Some(Source::Snapshot(s)) | Some(Source::Volume(s)) => s.clone(),
            None => String::new(),
        };
        let call = Call::new(&who, "CreateVolume", &m.name, &target);
        let req = CreateVolume {
            name: m.name,
            required_bytes: m.required_bytes,
            limit_bytes: m.limit_bytes,
            parameters: btree(m.parameters),
            requisite: segments(acc.requisite),
            preferred: segments(acc.preferred),
            source,
        };
        let v = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| meta.create_volume(c, req).await)
                    .await
            })
            .await?
        };
        Ok(Response::new(volume_pb(&v)))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> R<pb::DeleteVolumeResponse> {
        let who = actor(&r);
        let id = r.into_inner().volume_id;
        let call = Call::new(&who, "DeleteVolume", &id, "");
        {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| meta.delete_volume(c, &id).await)
                    .await
            })
            .await?
        };
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn expand_volume(&self, r: Request<pb::ExpandVolumeRequest>) -> R<pb::Volume> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "ExpandVolume", &m.volume_id, "");
        let v = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| {
                    meta.expand_volume(c, &m.volume_id, m.required_bytes, m.limit_bytes)
                        .await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(volume_pb(&v)))
    }

    async fn modify_volume(&self, r: Request<pb::ModifyVolumeRequest>) -> R<pb::Volume> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "ModifyVolume", &m.volume_id, "");
        let changes = btree(m.parameters);
        let v = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| {
                    meta.modify_volume(c, &m.volume_id, changes).await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(volume_pb(&v)))
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> R<pb::Volume> {
        let id = r.into_inner().volume_id;
        let v: VolumeRecord = self
            .meta
            .get(&id)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        Ok(Response::new(volume_pb(&self.meta.volume_view(v))))
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> R<pb::ListVolumesResponse> {
        let m = r.into_inner();
        let (vols, next) = page::<VolumeRecord>(&self.meta, &m.page_token, m.max_entries, |v| {
            m.node.is_empty() || v.node == m.node
        })?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: vols
                .into_iter()
                .map(|v| volume_pb(&self.meta.volume_view(v)))
                .collect(),
            next_page_token: next,
        }))
    }

    async fn create_snapshot(&self, r: Request<pb::CreateSnapshotRequest>) -> R<pb::Snapshot> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "CreateSnapshot", &m.source_volume_id, &m.name);
        let s = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| {
                    meta.create_snapshot(c, &m.name, &m.source_volume_id).await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(snapshot_pb(&s)))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> R<pb::DeleteSnapshotResponse> {
        let who = actor(&r);
        let id = r.into_inner().snapshot_id;
        let call = Call::new(&who, "DeleteSnapshot", "", &id);
        {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| meta.delete_snapshot(c, &id).await)
                    .await
            })
            .await?
        };
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> R<pb::ListSnapshotsResponse> {
        let m = r.into_inner();
        if !m.snapshot_id.is_empty() {
            let s: Option<SnapshotRecord> = self.meta.get(&m.snapshot_id)?;
            let snapshots = s
                .filter(|s| m.source_volume_id.is_empty() || s.source_volume == m.source_volume_id)
                .iter()
                .map(snapshot_pb)
                .collect();
            return Ok(Response::new(pb::ListSnapshotsResponse {
                snapshots,
                next_page_token: String::new(),
            }));
        }
        let (snaps, next) =
            page::<SnapshotRecord>(&self.meta, &m.page_token, m.max_entries, |s| {
                m.source_volume_id.is_empty() || s.source_volume == m.source_volume_id
            })?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.iter().map(snapshot_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn publish_volume(&self, r: Request<pb::PublishVolumeRequest>) -> R<pb::Attachment> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "PublishVolume", &m.volume_id, &m.node);
        let a = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| {
                    meta.publish(c, &m.volume_id, &m.node, m.read_only).await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(attachment_pb(&self.meta, &a)))
    }

    async fn report_replica_fault(
        &self,
        r: Request<pb::ReportReplicaFaultRequest>,
    ) -> R<pb::ReportReplicaFaultResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "ReportReplicaFault", &m.volume_id, &m.node);
        let generation = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                let pending: Vec<(u64, u64)> =
                    m.pending.iter().map(|r| (r.offset, r.length)).collect();
                meta.audited(call, async |c| {
                    meta.report_replica_fault(
                        c,
                        &m.volume_id,
                        &m.node,
                        m.generation,
                        &pending,
                        &m.reason,
                    )
                    .await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(pb::ReportReplicaFaultResponse { generation }))
    }

    async fn start_rebuild(
        &self,
        r: Request<pb::StartRebuildRequest>,
    ) -> R<pb::StartRebuildResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "StartRebuild", &m.volume_id, &m.node);
        // Not `audited`: a nexus asks again every few seconds while the
        // replica's node is down; only a rebuild that starts is recorded.
        let meta = self.meta.clone();
        let (generation, a, leg) = detached(&self.meta, async move {
            meta.start_rebuild(&call, &m.volume_id, &m.node, m.generation)
                .await
        })
        .await?;
        let (tcp_uri, unix_uri) = self.meta.leg_uris(&a, &leg);
        Ok(Response::new(pb::StartRebuildResponse {
            generation,
            leg: Some(pb::AttachmentLeg {
                node: leg.node,
                export_name: leg.export_name,
                tcp_uri,
                unix_uri,
            }),
        }))
    }

    async fn list_rebuild_ranges(
        &self,
        r: Request<pb::ListRebuildRangesRequest>,
    ) -> R<pb::ListRebuildRangesResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "ListRebuildRanges", &m.volume_id, &m.node);
        let meta = self.meta.clone();
        let (ranges, full, source, resumed_from) = detached(&self.meta, async move {
            meta.rebuild_ranges(&call, &m.volume_id, &m.node, m.generation)
                .await
        })
        .await?;
        Ok(Response::new(pb::ListRebuildRangesResponse {
            ranges: ranges
                .into_iter()
                .map(|(offset, length)| pb::ByteRange { offset, length })
                .collect(),
            full,
            source,
            resumed_from,
        }))
    }

    async fn report_rebuild_progress(
        &self,
        r: Request<pb::ReportRebuildProgressRequest>,
    ) -> R<pb::ReportRebuildProgressResponse> {
        let m = r.into_inner();
        let meta = self.meta.clone();
        detached(&self.meta, async move {
            meta.rebuild_progress(&m.volume_id, &m.node, m.generation, m.done_bytes, m.cursor)
                .await
        })
        .await?;
        Ok(Response::new(pb::ReportRebuildProgressResponse {}))
    }

    async fn finish_rebuild(
        &self,
        r: Request<pb::FinishRebuildRequest>,
    ) -> R<pb::FinishRebuildResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "FinishRebuild", &m.volume_id, &m.node);
        let generation = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| {
                    meta.finish_rebuild(c, &m.volume_id, &m.node, m.generation)
                        .await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(pb::FinishRebuildResponse { generation }))
    }

    type WatchNexusStream = tokio_stream::wrappers::ReceiverStream<Result<pb::NexusEvent, Status>>;

    async fn watch_nexus(&self, r: Request<pb::WatchNexusRequest>) -> R<Self::WatchNexusStream> {
        let m = r.into_inner();
        crate::meta::check_name("volume", &m.volume_id)?;
        crate::meta::check_name("node", &m.node)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.meta.nexuses.watch(&m.volume_id, &m.node, tx);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn quiesced(&self, r: Request<pb::QuiescedRequest>) -> R<pb::QuiescedResponse> {
        let m = r.into_inner();
        self.meta
            .nexuses
            .paused(
                &m.volume_id,
                &m.token,
                &berth_proto::validate::bounded(&m.error, 512),
            )
            .await?;
        Ok(Response::new(pb::QuiescedResponse {}))
    }

    async fn drain_node(&self, r: Request<pb::DrainNodeRequest>) -> R<pb::DrainNodeResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "DrainNode", "", &m.node);
        let meta = self.meta.clone();
        let moved = detached(&self.meta, async move {
            meta.audited(call, async |c| meta.drain_node(c, &m.node).await)
                .await
        })
        .await?;
        Ok(Response::new(pb::DrainNodeResponse {
            volumes: moved
                .into_iter()
                .map(|(volume_id, to_node, outcome)| pb::DrainedVolume {
                    volume_id,
                    to_node,
                    outcome,
                })
                .collect(),
        }))
    }

    async fn unpublish_volume(
        &self,
        r: Request<pb::UnpublishVolumeRequest>,
    ) -> R<pb::UnpublishVolumeResponse> {
        let who = actor(&r);
        let m = r.into_inner();
        let call = Call::new(&who, "UnpublishVolume", &m.volume_id, &m.node);
        let closed = {
            let meta = self.meta.clone();
            detached(&self.meta, async move {
                meta.audited(call, async |c| {
                    meta.unpublish(c, &m.volume_id, &m.node).await
                })
                .await
            })
            .await?
        };
        Ok(Response::new(pb::UnpublishVolumeResponse {
            closed_connections: closed,
        }))
    }

    async fn list_attachments(
        &self,
        r: Request<pb::ListAttachmentsRequest>,
    ) -> R<pb::ListAttachmentsResponse> {
        let m = r.into_inner();
        let list = if m.volume_id.is_empty() {
            self.meta.all_attachments()?
        } else {
            self.meta.attachments(&m.volume_id)?
        };
        Ok(Response::new(pb::ListAttachmentsResponse {
            attachments: list
                .into_iter()
                .map(|a| attachment_pb(&self.meta, &self.meta.with_current_uris(a)))
                .collect(),
        }))
    }

    async fn get_capacity(&self, r: Request<pb::GetCapacityRequest>) -> R<pb::GetCapacityResponse> {
        let m = r.into_inner();
        let seg = m.topology.map(|t| btree(t.segments)).unwrap_or_default();
        let (available, max) = self.meta.capacity(&seg, &btree(m.parameters))?;
        Ok(Response::new(pb::GetCapacityResponse {
            available_bytes: available,
            maximum_volume_bytes: max,
        }))
    }

    async fn append_audit(&self, r: Request<pb::AppendAuditRequest>) -> R<pb::AuditEntry> {
        let who = actor(&r);
        let m = r.into_inner();
        if m.action.is_empty() {
            return Err(Status::invalid_argument("action is required"));
        }
        // Bounded, not refused: a kubelet path (up to 4 KiB) as a target
        // must still leave its entry.
        use berth_proto::validate::{bounded, AUDIT_FIELD_BYTES as F, AUDIT_TEXT_BYTES as T};
        let e = self
            .meta
            .record(AuditEntry {
                time_ms: now_ms(),
                actor: bounded(&who, F),
                action: bounded(&m.action, F),
                volume: bounded(&m.volume, F),
                target: bounded(&m.target, T),
                result: "ok".into(),
                detail: bounded(&m.detail, T),
                ..AuditEntry::default()
            })
            .await?;
        Ok(Response::new(audit_pb(e)))
    }

    async fn query_audit(&self, r: Request<pb::QueryAuditRequest>) -> R<pb::QueryAuditResponse> {
        let m = r.into_inner();
        let q = audit::Query {
            volume: m.volume,
            actor: m.actor,
            since_ms: m.since_unix_ms,
            until_ms: m.until_unix_ms,
            after_seq: m.after_seq,
            limit: m.limit as usize,
        };
        let meta = self.meta.clone();
        let (entries, next) = tokio::task::spawn_blocking(move || meta.audit_query(&q))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::QueryAuditResponse {
            entries: entries.into_iter().map(audit_pb).collect(),
            next_after_seq: next,
        }))
    }

    async fn verify_audit(
        &self,
        _r: Request<pb::VerifyAuditRequest>,
    ) -> R<pb::VerifyAuditResponse> {
        let meta = self.meta.clone();
        let v = tokio::task::spawn_blocking(move || meta.audit_verify())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let (bad, problem) = v.first_bad.unwrap_or((0, String::new()));
        Ok(Response::new(pb::VerifyAuditResponse {
            intact: problem.is_empty(),
            entries_checked: v.entries_checked,
            first_bad_seq: bad,
            problem,
            head_seq: v.head.seq,
            head_hash: v.head.hash,
        }))
    }
}
