//! The gRPC control API (`berth.volume.v1.VolumeService`): converts between
//! protobuf and the node's operations, runs them on blocking threads, and maps
//! errors to status codes once (`ServerError` → `tonic::Status`).

use std::sync::Arc;

use berth_proto::volume::v1 as pb;
use berth_proto::volume::v1::volume_service_server::VolumeService;
use tonic::{Request, Response, Status};

use crate::audit::AuditFilter;
use crate::error::ServerError;
use crate::node::{Caller, Node};
use crate::qos::Overrides;
use crate::state::{Grant, TargetKind};

#[derive(Debug, Clone)]
pub struct Service {
    node: Arc<Node>,
}

impl Service {
    pub fn new(node: Arc<Node>) -> Self {
        Service { node }
    }

    pub fn into_server(self) -> pb::volume_service_server::VolumeServiceServer<Self> {
        pb::volume_service_server::VolumeServiceServer::new(self)
    }

    /// Runs a blocking node operation off the async threads.
    async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Node) -> Result<T, ServerError> + Send + 'static,
    {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("control task failed: {e}")))?
            .map_err(Status::from)
    }
}

/// Who is calling, for the audit log (berthctl and the metadata service name
/// the person behind the call).
fn caller<T>(r: &Request<T>) -> Caller {
    Caller(berth_proto::caller(r))
}

fn required<'a>(field: &str, v: &'a str) -> Result<&'a str, Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(v)
}

/// The name of something new: the rule every program shares
/// ([`berth_proto::validate::name`]).
fn new_name(kind: &str, v: &str) -> Result<(), Status> {
    berth_proto::validate::name(kind, v).map_err(Status::invalid_argument)
}

fn overrides(o: Option<pb::QosOverrides>) -> Overrides {
    let o = o.unwrap_or_default();
    Overrides {
        iops_limit: o.iops_limit,
        bytes_per_second_limit: o.bytes_per_second_limit,
        burst_seconds: o.burst_seconds,
    }
}

fn volume_pb(node: &Node, v: berth_store::VolumeInfo) -> pb::Volume {
    let (qos, ovr) = match node.limits(&v.name) {
        Ok((l, q)) => (
            Some(pb::Qos {
                tier: l.tier,
                iops_limit: l.iops_limit,
                bytes_per_second_limit: l.bytes_per_second_limit,
                burst_seconds: l.burst_seconds,
                priority: l.priority,
            }),
            Some(pb::QosOverrides {
                iops_limit: q.overrides.iops_limit,
                bytes_per_second_limit: q.overrides.bytes_per_second_limit,
                burst_seconds: q.overrides.burst_seconds,
            }),
        ),
        Err(_) => (None, None),
    };
    pb::Volume {
        connections: node.connections_to(TargetKind::Volume, &v.name).len() as u32,
        name: v.name,
        size_bytes: v.size_bytes,
        created_unix: v.created_unix,
        source_snapshot: v.source_snapshot.unwrap_or_default(),
        qos,
        overrides: ovr,
        allocated_bytes: v.allocated_bytes,
    }
}

fn snapshot_pb(s: berth_store::SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name,
        volume: s.volume.unwrap_or_default(),
        size_bytes: s.size_bytes,
        created_unix: s.created_unix,
    }
}

fn kind_from_pb(k: i32) -> Result<TargetKind, Status> {
    match pb::TargetKind::try_from(k) {
        Ok(pb::TargetKind::Volume) => Ok(TargetKind::Volume),
        Ok(pb::TargetKind::Snapshot) => Ok(TargetKind::Snapshot),
        _ => Err(Status::invalid_argument(
            "kind must be TARGET_KIND_VOLUME or TARGET_KIND_SNAPSHOT",
        )),
    }
}

fn kind_pb(k: TargetKind) -> i32 {
    match k {
        TargetKind::Volume => pb::TargetKind::Volume as i32,
        TargetKind::Snapshot => pb::TargetKind::Snapshot as i32,
    }
}

pub fn export_pb(node: &Node, g: &Grant, connections: u32) -> pb::Export {
    let ep = node.endpoints.lock().clone();
    let export_name = g.export_name();
    let unix_uri = berth_proto::nbd_unix_uri(&ep.nbd_socket, &export_name);
    let tcp_uri = ep.nbd_tcp.map_or_else(String::new, |a| {
        let host = if ep.advertise_host.is_empty() {
            a.ip().to_string()
        } else {
            ep.advertise_host.clone()
        };
        let address = if host.contains(':') {
            format!("[{host}]:{}", a.port())
        } else {
            format!("{host}:{}", a.port())
        };
        berth_proto::nbd_tcp_uri(&address, &export_name)
    });
    pb::Export {
        kind: kind_pb(g.kind),
        name: g.name.clone(),
        client: g.client.clone(),
        read_only: g.read_only,
        peer_address: g.peer_address.clone(),
        export_name,
        unix_uri,
        tcp_uri,
        connections,
        granted_unix: g.granted_unix,
    }
}

#[tonic::async_trait]
impl VolumeService for Service {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        new_name("volume", &r.name)?;
        let v = self
            .run(move |n| {
                let v =
                    n.create_volume(&c, &r.name, r.size_bytes, &r.tier, overrides(r.overrides))?;
                Ok(volume_pb(n, v))
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.delete_volume(&c, &r.name)).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn resize_volume(
        &self,
        r: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        required("name", &r.name)?;
        let v = self
            .run(move |n| {
                let v = n.resize_volume(&c, &r.name, r.size_bytes)?;
                Ok(volume_pb(n, v))
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        required("name", &r.name)?;
        let v = self
            .run(move |n| {
                let v = n.store.volume(&r.name)?;
                Ok(volume_pb(n, v))
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn list_volumes(
        &self,
        _r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self
            .run(|n| {
                Ok(n.store
                    .list_volumes()
                    .into_iter()
                    .map(|v| volume_pb(n, v))
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        required("volume", &r.volume)?;
        new_name("snapshot", &r.name)?;
        let s = self
            .run(move |n| n.create_snapshot(&c, &r.volume, &r.name))
            .await?;
        Ok(Response::new(snapshot_pb(s)))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.delete_snapshot(&c, &r.name)).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        let snapshots = self
            .run(move |n| {
                Ok(n.store
                    .list_snapshots()
                    .into_iter()
                    .filter(|s| r.volume.is_empty() || s.volume.as_deref() == Some(&r.volume))
                    .map(snapshot_pb)
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn clone_volume(
        &self,
        r: Request<pb::CloneVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        new_name("volume", &r.name)?;
        let source = match r.source {
            Some(pb::clone_volume_request::Source::Snapshot(s)) => (TargetKind::Snapshot, s),
            Some(pb::clone_volume_request::Source::Volume(v)) => (TargetKind::Volume, v),
            None => {
                return Err(Status::invalid_argument(
                    "a source snapshot or volume is required",
                ))
            }
        };
        required("source", &source.1)?;
        let v = self
            .run(move |n| {
                let size = (r.size_bytes > 0).then_some(r.size_bytes);
                let v = n.clone_volume(
                    &c,
                    &r.name,
                    (source.0, &source.1),
                    size,
                    &r.tier,
                    overrides(r.overrides),
                )?;
                Ok(volume_pb(n, v))
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn grant_export(
        &self,
        r: Request<pb::GrantExportRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        let kind = kind_from_pb(r.kind)?;
        required("name", &r.name)?;
        required("client", &r.client)?;
        let e = self
            .run(move |n| {
                let g = n.grant(
                    &c,
                    &crate::node::GrantRequest {
                        kind,
                        name: &r.name,
                        client: &r.client,
                        read_only: r.read_only,
                        peer_address: &r.peer_address,
                        generation: r.generation,
                    },
                )?;
                let conns = n.connections_by_token().get(&g.token).copied().unwrap_or(0);
                Ok(export_pb(n, &g, conns))
            })
            .await?;
        Ok(Response::new(e))
    }

    async fn revoke_export(
        &self,
        r: Request<pb::RevokeExportRequest>,
    ) -> Result<Response<pb::RevokeExportResponse>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        required("export_name", &r.export_name)?;
        let closed = self.run(move |n| n.revoke(&c, &r.export_name)).await?;
        Ok(Response::new(pb::RevokeExportResponse {
            closed_connections: closed,
        }))
    }

    async fn list_exports(
        &self,
        _r: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        let exports = self
            .run(|n| {
                let conns = n.connections_by_token();
                Ok(n.grants()
                    .iter()
                    .map(|g| export_pb(n, g, conns.get(&g.token).copied().unwrap_or(0)))
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::ListExportsResponse { exports }))
    }

    async fn set_qos(&self, r: Request<pb::SetQosRequest>) -> Result<Response<pb::Volume>, Status> {
        let c = caller(&r);
        let r = r.into_inner();
        required("volume", &r.volume)?;
        let v = self
            .run(move |n| {
                n.set_qos(
                    &c,
                    &r.volume,
                    &r.tier,
                    overrides(r.overrides),
                    r.clear_overrides,
                )?;
                let v = n.store.volume(&r.volume)?;
                Ok(volume_pb(n, v))
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn track_changes(
        &self,
        r: Request<pb::TrackChangesRequest>,
    ) -> Result<Response<pb::TrackChangesResponse>, Status> {
        let r = r.into_inner();
        required("volume", &r.volume)?;
        let (point, round) = self
            .run(move |n| Ok(n.store.track_changes(&r.volume, r.point)?))
            .await?;
        Ok(Response::new(pb::TrackChangesResponse { point, round }))
    }

    async fn list_changes(
        &self,
        r: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        let r = r.into_inner();
        required("volume", &r.volume)?;
        let max = match r.max_ranges {
            0 => MAX_CHANGED_RANGES,
            m => (m as usize).min(MAX_CHANGED_RANGES),
        };
        let out = self
            .run(move |n| {
                let tracking = n.store.tracking(&r.volume)?;
                let listed = n.store.changed_ranges(&r.volume, r.since_round, max)?;
                Ok(match (tracking, listed) {
                    (None, _) => pb::ListChangesResponse::default(),
                    (Some(point), None) => pb::ListChangesResponse {
                        tracking: true,
                        point,
                        too_many: true,
                        ranges: Vec::new(),
                        round: 0,
                    },
                    (Some(_), Some(c)) => pb::ListChangesResponse {
                        tracking: true,
                        point: c.point,
                        round: c.round,
                        too_many: false,
                        ranges: c
                            .ranges
                            .into_iter()
                            .map(|(offset, length)| pb::ChangedRange { offset, length })
                            .collect(),
                    },
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn stop_tracking(
        &self,
        r: Request<pb::StopTrackingRequest>,
    ) -> Result<Response<pb::StopTrackingResponse>, Status> {
        let r = r.into_inner();
        required("volume", &r.volume)?;
        self.run(move |n| Ok(n.store.stop_tracking(&r.volume)?))
            .await?;
        Ok(Response::new(pb::StopTrackingResponse {}))
    }

    async fn scrub(
        &self,
        r: Request<pb::ScrubRequest>,
    ) -> Result<Response<pb::ScrubResponse>, Status> {
        let c = caller(&r);
        let rep = self
            .run(move |n| {
                let rep = n.store.scrub().map_err(ServerError::from);
                n.audit.record(crate::audit::AuditEvent {
                    action: "Scrub".into(),
                    client: c.0,
                    result: match &rep {
                        Ok(r) => {
                            format!("ok: {} blocks, {} errors", r.blocks_checked, r.errors.len())
                        }
                        Err(e) => e.to_string(),
                    },
                    ..Default::default()
                });
                rep
            })
            .await?;
        Ok(Response::new(pb::ScrubResponse {
            blocks_checked: rep.blocks_checked,
            errors: rep
                .errors
                .into_iter()
                .map(|e| pb::ScrubError {
                    owner: e.owner,
                    offset: e.offset,
                    pool_block: e.pool_block,
                })
                .collect(),
        }))
    }

    async fn stats(
        &self,
        _r: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let resp = self
            .run(|n| {
                let s = n.store.stats();
                let volume_stats = n
                    .runtimes()
                    .iter()
                    .map(|rt| {
                        let m = &rt.metrics.op;
                        let errors = m.iter().map(|o| o.errors.get()).sum();
                        pb::VolumeStats {
                            name: rt.name.clone(),
                            read_ops: m[0].ops.get(),
                            write_ops: m[1].ops.get(),
                            read_bytes: m[0].bytes.get(),
                            write_bytes: m[1].bytes.get(),
                            errors,
                            throttled_micros: rt.metrics.throttled_micros.get(),
                        }
                    })
                    .collect();
                Ok(pb::StatsResponse {
                    block_size: s.block_size,
                    total_bytes: s.total_blocks * s.block_size,
                    used_bytes: s.used_blocks * s.block_size,
                    pending_free_bytes: s.pending_free_blocks * s.block_size,
                    volumes: s.volumes,
                    snapshots: s.snapshots,
                    checksum_errors: n
                        .store
                        .counters()
                        .checksum_errors
                        .load(std::sync::atomic::Ordering::Relaxed),
                    engine: n.store.engine_name().into(),
                    volume_stats,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn health(
        &self,
        _r: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let n = &self.node;
        Ok(Response::new(pb::HealthResponse {
            serving: !n.shutdown.is_cancelled(),
            version: env!("CARGO_PKG_VERSION").into(),
            engine: n.store.engine_name().into(),
            pool_uuid: n.store.pool_uuid().to_string(),
            uptime_seconds: n.started.elapsed().as_secs(),
            connections: n.connection_count() as u32,
        }))
    }

    async fn list_audit_events(
        &self,
        r: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let r = r.into_inner();
        let f = AuditFilter {
            target: (!r.target.is_empty()).then_some(r.target),
            client: (!r.client.is_empty()).then_some(r.client),
            after_seq: r.after_seq,
            limit: r.limit as usize,
        };
        let events = self
            .run(move |n| n.audit.query(&f).map_err(ServerError::io("read audit log")))
            .await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    seq: e.seq,
                    time_unix_ms: e.time_unix_ms,
                    action: e.action,
                    client: e.client,
                    target: e.target,
                    result: e.result,
                    peer: e.peer,
                    read_ops: e.read_ops,
                    read_bytes: e.read_bytes,
                    write_ops: e.write_ops,
                    write_bytes: e.write_bytes,
                    detail: e.detail,
                })
                .collect(),
        }))
    }
}

/// The most changed ranges one `ListChanges` answers (about 2 MB of reply):
/// a volume changed in more places is copied whole.
const MAX_CHANGED_RANGES: usize = 100_000;
