//! `berthctl server ...`: one volume server's own control API, for
//! node-local administration and debugging (the catalog does not see what is
//! done here; its reconcile leaves unmanaged volumes alone).

use berth_proto::volume::v1 as pb;
use berth_proto::volume::v1::volume_service_client::VolumeServiceClient;
use clap::Subcommand;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::{nonzero, req, table, Out, Output};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Volumes: create, delete, resize, get, list.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots: create, delete, list.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// A new volume from a snapshot or from a volume as it is now (O(1)).
    Clone {
        name: String,
        #[arg(
            long,
            conflicts_with = "from_volume",
            required_unless_present = "from_volume"
        )]
        from_snapshot: Option<String>,
        #[arg(long)]
        from_volume: Option<String>,
        #[arg(long, value_parser = berth_cli::parse_size)]
        size: Option<u64>,
        #[arg(long, default_value = "")]
        tier: String,
    },
    /// NBD exports: grant, revoke, list.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Change a volume's tier or limits while it is served.
    Qos {
        volume: String,
        #[arg(long, default_value = "")]
        tier: String,
        #[command(flatten)]
        limits: Limits,
        /// Drop explicit limits first (back to the tier's).
        #[arg(long)]
        clear: bool,
    },
    /// Read every allocated block and check its checksum.
    Scrub,
    /// Pool use and per-volume counters.
    Stats,
    /// Is the server up, and what is it running.
    Health,
    /// Audit events: who connected to what, and every control call.
    Audit {
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        client: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events (0: all), fetched in pages.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
}

#[derive(Debug, clap::Args)]
pub struct Limits {
    /// IOPS limit (0 = unlimited).
    #[arg(long)]
    iops: Option<u64>,
    /// Throughput limit in bytes per second, e.g. 200M (0 = unlimited).
    #[arg(long, value_parser = berth_cli::parse_size)]
    bandwidth: Option<u64>,
    /// Seconds of the limit a volume may use at once after idling.
    #[arg(long)]
    burst: Option<f64>,
}

impl Limits {
    fn pb(&self) -> Option<pb::QosOverrides> {
        Some(pb::QosOverrides {
            iops_limit: self.iops,
            bytes_per_second_limit: self.bandwidth,
            burst_seconds: self.burst,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    Create {
        name: String,
        #[arg(long, value_parser = berth_cli::parse_size)]
        size: u64,
        /// standard, premium or extreme.
        #[arg(long, default_value = "standard")]
        tier: String,
        #[command(flatten)]
        limits: Limits,
    },
    Delete {
        name: String,
    },
    Resize {
        name: String,
        #[arg(long, value_parser = berth_cli::parse_size)]
        size: u64,
    },
    Get {
        name: String,
    },
    List,
    /// The blocks of a volume changed since its copy elsewhere left its
    /// replica set (recorded for that copy's delta rebuild).
    Changes {
        name: String,
    },
    /// Stop recording changed blocks and forget them: the next rebuild of
    /// the volume's other copies from this one copies everything.
    StopTracking {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    Create {
        volume: String,
        name: String,
    },
    Delete {
        name: String,
    },
    List {
        #[arg(long)]
        volume: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Let a client reach a volume or snapshot; prints the NBD URIs.
    Grant {
        #[arg(
            long,
            conflicts_with = "snapshot",
            required_unless_present = "snapshot"
        )]
        volume: Option<String>,
        #[arg(long)]
        snapshot: Option<String>,
        /// Who the grant is for (node, pod, person): recorded in the audit log.
        #[arg(long)]
        client: String,
        #[arg(long)]
        read_only: bool,
        /// Only TCP connections from this IP may use it.
        #[arg(long, default_value = "")]
        peer_address: String,
        /// A replicated volume's copy: the generation to grant at (at least
        /// the volume's fence; a higher one fences its current nexus). For
        /// inspecting a copy after the volume is detached.
        #[arg(long, default_value_t = 0)]
        generation: u64,
    },
    /// Remove a grant (by its export name) and close its connections.
    Revoke {
        export_name: String,
    },
    List,
}

fn volume_json(v: &pb::Volume) -> Value {
    let q = v.qos.clone().unwrap_or_default();
    json!({
        "name": v.name, "size_bytes": v.size_bytes, "allocated_bytes": v.allocated_bytes,
        "created_unix": v.created_unix, "source_snapshot": v.source_snapshot,
        "tier": q.tier, "iops_limit": q.iops_limit,
        "bytes_per_second_limit": q.bytes_per_second_limit, "burst_seconds": q.burst_seconds,
        "priority": q.priority, "connections": v.connections,
    })
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({"name": s.name, "volume": s.volume, "size_bytes": s.size_bytes, "created_unix": s.created_unix})
}

fn export_json(e: &pb::Export) -> Value {
    let kind = if e.kind == pb::TargetKind::Snapshot as i32 {
        "snapshot"
    } else {
        "volume"
    };
    json!({
        "kind": kind, "name": e.name, "client": e.client, "read_only": e.read_only,
        "peer_address": e.peer_address, "export_name": e.export_name,
        "unix_uri": e.unix_uri, "tcp_uri": e.tcp_uri, "connections": e.connections,
        "granted_unix": e.granted_unix,
    })
}

const VOL_COLS: &[&str] = &[
    "name",
    "size_bytes",
    "allocated_bytes",
    "tier",
    "iops_limit",
    "bytes_per_second_limit",
    "connections",
    "source_snapshot",
];
const SNAP_COLS: &[&str] = &["name", "volume", "size_bytes", "created_unix"];
const EXPORT_COLS: &[&str] = &[
    "kind",
    "name",
    "client",
    "read_only",
    "connections",
    "export_name",
];

pub async fn run(
    out: &Out,
    command: Cmd,
    mut c: VolumeServiceClient<Channel>,
) -> Result<(), tonic::Status> {
    match command {
        Cmd::Volume(v) => match v {
            VolumeCmd::Create {
                name,
                size,
                tier,
                limits,
            } => {
                let v = c
                    .create_volume(req(pb::CreateVolumeRequest {
                        name,
                        size_bytes: nonzero(size)?,
                        tier,
                        overrides: limits.pb(),
                    }))
                    .await?
                    .into_inner();
                out.one(volume_json(&v), VOL_COLS);
            }
            VolumeCmd::Delete { name } => {
                // DeleteVolume succeeds on a missing volume and says
                // nothing either way: look it up first to tell which.
                let found = match c
                    .get_volume(req(pb::GetVolumeRequest { name: name.clone() }))
                    .await
                {
                    Ok(_) => true,
                    Err(s) if s.code() == tonic::Code::NotFound => false,
                    Err(s) => return Err(s),
                };
                if found {
                    c.delete_volume(req(pb::DeleteVolumeRequest { name: name.clone() }))
                        .await?;
                    out.done(&format!("deleted volume {name}"));
                } else {
                    out.done(&format!("volume {name} already absent"));
                }
            }
            VolumeCmd::Resize { name, size } => {
                let v = c
                    .resize_volume(req(pb::ResizeVolumeRequest {
                        name,
                        size_bytes: nonzero(size)?,
                    }))
                    .await?
                    .into_inner();
                out.one(volume_json(&v), VOL_COLS);
            }
            VolumeCmd::Get { name } => {
                let v = c
                    .get_volume(req(pb::GetVolumeRequest { name }))
                    .await?
                    .into_inner();
                out.one(volume_json(&v), VOL_COLS);
            }
            VolumeCmd::List => {
                let l = c
                    .list_volumes(req(pb::ListVolumesRequest {}))
                    .await?
                    .into_inner();
                out.rows(l.volumes.iter().map(volume_json).collect(), VOL_COLS);
            }
            VolumeCmd::Changes { name } => {
                let l = c
                    .list_changes(req(pb::ListChangesRequest {
                        volume: name.clone(),
                        max_ranges: 0,
                        since_round: 0,
                    }))
                    .await?
                    .into_inner();
                let bytes: u64 = l.ranges.iter().map(|r| r.length).sum();
                out.one(
                    json!({
                        "volume": name,
                        "tracking": l.tracking,
                        "since_generation": l.point,
                        "round": l.round,
                        "too_many": l.too_many,
                        "ranges": l.ranges.len(),
                        "changed_bytes": bytes,
                    }),
                    &[
                        "volume",
                        "tracking",
                        "since_generation",
                        "ranges",
                        "changed_bytes",
                    ],
                );
            }
            VolumeCmd::StopTracking { name } => {
                c.stop_tracking(req(pb::StopTrackingRequest {
                    volume: name.clone(),
                }))
                .await?;
                out.one(
                    json!({"volume": name, "tracking": false}),
                    &["volume", "tracking"],
                );
            }
        },
        Cmd::Snapshot(s) => match s {
            SnapshotCmd::Create { volume, name } => {
                let s = c
                    .create_snapshot(req(pb::CreateSnapshotRequest { volume, name }))
                    .await?
                    .into_inner();
                out.one(snapshot_json(&s), SNAP_COLS);
            }
            SnapshotCmd::Delete { name } => {
                // As for volumes: deleting a missing snapshot succeeds
                // silently, so look it up first to tell which it was.
                let found = c
                    .list_snapshots(req(pb::ListSnapshotsRequest {
                        volume: String::new(),
                    }))
                    .await?
                    .into_inner()
                    .snapshots
                    .iter()
                    .any(|s| s.name == name);
                if found {
                    c.delete_snapshot(req(pb::DeleteSnapshotRequest { name: name.clone() }))
                        .await?;
                    out.done(&format!("deleted snapshot {name}"));
                } else {
                    out.done(&format!("snapshot {name} already absent"));
                }
            }
            SnapshotCmd::List { volume } => {
                let l = c
                    .list_snapshots(req(pb::ListSnapshotsRequest {
                        volume: volume.unwrap_or_default(),
                    }))
                    .await?
                    .into_inner();
                out.rows(l.snapshots.iter().map(snapshot_json).collect(), SNAP_COLS);
            }
        },
        Cmd::Clone {
            name,
            from_snapshot,
            from_volume,
            size,
            tier,
        } => {
            use pb::clone_volume_request::Source;
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Source::Snapshot(s),
                (None, Some(v)) => Source::Volume(v),
                (None, None) => {
                    return Err(tonic::Status::invalid_argument(
                        "--from-snapshot or --from-volume is required",
                    ))
                }
            };
            let v = c
                .clone_volume(req(pb::CloneVolumeRequest {
                    name,
                    source: Some(source),
                    // 0 asks for the source's size; a person typing 0 gets
                    // told instead (omitting --size is how to ask that).
                    size_bytes: size.map(nonzero).transpose()?.unwrap_or(0),
                    tier,
                    overrides: None,
                }))
                .await?
                .into_inner();
            out.one(volume_json(&v), VOL_COLS);
        }
        Cmd::Export(e) => match e {
            ExportCmd::Grant {
                volume,
                snapshot,
                client,
                read_only,
                peer_address,
                generation,
            } => {
                let (kind, name) = match (volume, snapshot) {
                    (Some(v), _) => (pb::TargetKind::Volume, v),
                    (None, Some(s)) => (pb::TargetKind::Snapshot, s),
                    (None, None) => {
                        return Err(tonic::Status::invalid_argument(
                            "--volume or --snapshot is required",
                        ))
                    }
                };
                let e = c
                    .grant_export(req(pb::GrantExportRequest {
                        kind: kind as i32,
                        name,
                        client,
                        read_only,
                        peer_address,
                        generation,
                    }))
                    .await?
                    .into_inner();
                match out.mode {
                    Output::Json => outln!("{}", export_json(&e)),
                    Output::Table => {
                        outln!("export name: {}", e.export_name);
                        outln!("unix:        {}", e.unix_uri);
                        if !e.tcp_uri.is_empty() {
                            outln!("tcp:         {}", e.tcp_uri);
                        }
                    }
                }
            }
            ExportCmd::Revoke { export_name } => {
                let r = c
                    .revoke_export(req(pb::RevokeExportRequest { export_name }))
                    .await?
                    .into_inner();
                out.done(&format!(
                    "revoked; {} connection(s) closed",
                    r.closed_connections
                ));
            }
            ExportCmd::List => {
                let l = c
                    .list_exports(req(pb::ListExportsRequest {}))
                    .await?
                    .into_inner();
                out.rows(l.exports.iter().map(export_json).collect(), EXPORT_COLS);
            }
        },
        Cmd::Qos {
            volume,
            tier,
            limits,
            clear,
        } => {
            let v = c
                .set_qos(req(pb::SetQosRequest {
                    volume,
                    tier,
                    overrides: limits.pb(),
                    clear_overrides: clear,
                }))
                .await?
                .into_inner();
            out.one(volume_json(&v), VOL_COLS);
        }
        Cmd::Scrub => {
            let r = c.scrub(req(pb::ScrubRequest {})).await?.into_inner();
            let errors: Vec<Value> = r
                .errors
                .iter()
                .map(|e| json!({"owner": e.owner, "offset": e.offset, "pool_block": e.pool_block}))
                .collect();
            match out.mode {
                Output::Json => outln!(
                    "{}",
                    json!({"blocks_checked": r.blocks_checked, "errors": errors})
                ),
                Output::Table => {
                    outln!(
                        "{} blocks checked, {} checksum errors",
                        r.blocks_checked,
                        errors.len()
                    );
                    if !errors.is_empty() {
                        table(&errors, &["owner", "offset", "pool_block"]);
                    }
                }
            }
            if !r.errors.is_empty() {
                return Err(tonic::Status::data_loss(format!(
                    "{} blocks failed their checksum",
                    r.errors.len()
                )));
            }
        }
        Cmd::Stats => {
            let s = c.stats(req(pb::StatsRequest {})).await?.into_inner();
            let vols: Vec<Value> = s
                .volume_stats
                .iter()
                .map(|v| json!({"name": v.name, "read_ops": v.read_ops, "write_ops": v.write_ops, "read_bytes": v.read_bytes, "write_bytes": v.write_bytes, "errors": v.errors, "throttled_micros": v.throttled_micros}))
                .collect();
            let pool = json!({"total_bytes": s.total_bytes, "used_bytes": s.used_bytes, "pending_free_bytes": s.pending_free_bytes, "volumes": s.volumes, "snapshots": s.snapshots, "checksum_errors": s.checksum_errors, "engine": s.engine});
            match out.mode {
                Output::Json => outln!("{}", json!({"pool": pool, "volumes": vols})),
                Output::Table => {
                    table(
                        &[pool],
                        &[
                            "total_bytes",
                            "used_bytes",
                            "pending_free_bytes",
                            "volumes",
                            "snapshots",
                            "checksum_errors",
                            "engine",
                        ],
                    );
                    outln!();
                    table(
                        &vols,
                        &[
                            "name",
                            "read_ops",
                            "write_ops",
                            "read_bytes",
                            "write_bytes",
                            "errors",
                            "throttled_micros",
                        ],
                    );
                }
            }
        }
        Cmd::Health => {
            let h = c.health(req(pb::HealthRequest {})).await?.into_inner();
            out.one(
                json!({"serving": h.serving, "version": h.version, "engine": h.engine, "pool_uuid": h.pool_uuid, "uptime_seconds": h.uptime_seconds, "connections": h.connections}),
                &["serving", "version", "engine", "pool_uuid", "uptime_seconds", "connections"],
            );
        }
        Cmd::Audit {
            target,
            client,
            after,
            limit,
        } => {
            // In pages, each after the last event seen, so any --limit fits
            // the 4 MiB a gRPC client decodes (an event's free text is a
            // few KiB at most). The reply has no cursor: a short page is
            // the end.
            const PAGE: u64 = 256;
            let (target, client) = (target.unwrap_or_default(), client.unwrap_or_default());
            let rows = crate::in_pages(limit, after, PAGE, async |after_seq, want| {
                let events = c
                    .list_audit_events(req(pb::ListAuditEventsRequest {
                        target: target.clone(),
                        client: client.clone(),
                        after_seq,
                        // At most PAGE, which fits.
                        limit: want as u32,
                    }))
                    .await?
                    .into_inner()
                    .events;
                let next = (events.len() as u64 >= want).then(|| events.last().map_or(after_seq, |e| e.seq));
                let rows = events.iter().map(|e| json!({"seq": e.seq, "time_unix_ms": e.time_unix_ms, "action": e.action, "client": e.client, "target": e.target, "result": e.result, "peer": e.peer, "read_bytes": e.read_bytes, "write_bytes": e.write_bytes, "detail": e.detail})).collect();
                Ok((rows, next))
            })
            .await?;
            out.rows(
                rows,
                &[
                    "seq",
                    "time_unix_ms",
                    "action",
                    "client",
                    "target",
                    "result",
                    "peer",
                    "read_bytes",
                    "write_bytes",
                ],
            );
        }
    }
    Ok(())
}
