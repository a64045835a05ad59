//! berthctl's commands over the metadata service.

use std::collections::HashMap;

use berth_proto::meta::v1 as pb;
use clap::Subcommand;
use serde_json::{json, Value};

use super::{nonzero, req, Out, Output};
use crate::out::human_bytes;

type KV = (String, String);

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Volumes: create, delete, expand, modify, get, list, export, unexport.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots: create, delete, list.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// A new volume from a snapshot or from a volume as it is now (O(1), same pool).
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
        /// Default: the source's size.
        #[arg(long, value_parser = berth_cli::parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        params: Params,
    },
    /// The performance tiers and their limits.
    Tiers,
    /// Volume servers: state, addresses, labels.
    Nodes,
    /// Move every replica off a node (for maintenance, or a node lost for
    /// good): each replicated volume with a copy there gets a new copy on
    /// another node, which its nexus rebuilds in full; the old copy is
    /// retired and deleted once the new one is in sync. The node takes no
    /// new volumes from then on. Unreplicated volumes cannot move.
    Drain { node: String },
    /// Pools: size, use, what is promised and what is left.
    Pools,
    /// Which node each volume is published to.
    Attachments {
        #[arg(long)]
        volume: Option<String>,
    },
    /// Room left to place volumes, in a topology segment and tier.
    Capacity {
        /// Segment label key=value (repeat).
        #[arg(long = "topology", value_parser = berth_cli::parse_topology_label)]
        topology: Vec<KV>,
        #[command(flatten)]
        params: Params,
    },
    /// The hash-chained audit log: list, verify.
    #[command(subcommand)]
    Audit(AuditCmd),
}

/// StorageClass-style parameters.
#[derive(Debug, clap::Args)]
pub struct Params {
    /// Tier (see `berthctl tiers`).
    #[arg(long)]
    tier: Option<String>,
    /// Any parameter key=value (repeat): fsType, maxIops, maxMBps, iopsPerGiB, burstSeconds, media.
    #[arg(long = "param", value_parser = berth_cli::parse_label)]
    param: Vec<KV>,
}

impl Params {
    fn map(self) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = self.param.into_iter().collect();
        if let Some(t) = self.tier {
            m.insert("tier".into(), t);
        }
        m
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    Create {
        name: String,
        #[arg(long, value_parser = berth_cli::parse_size)]
        size: u64,
        #[command(flatten)]
        params: Params,
        /// Must be reachable from a node with these labels, key=value (repeat).
        #[arg(long = "topology", value_parser = berth_cli::parse_topology_label)]
        topology: Vec<KV>,
    },
    Delete {
        name: String,
    },
    /// Grow a volume (volumes never shrink).
    Expand {
        name: String,
        #[arg(long, value_parser = berth_cli::parse_size)]
        size: u64,
    },
    /// Change tier or limits while the volume is in use.
    Modify {
        name: String,
        #[command(flatten)]
        params: Params,
    },
    Get {
        name: String,
    },
    List {
        #[arg(long)]
        node: Option<String>,
        /// Entries fetched per call (every page is printed).
        #[arg(long, default_value_t = 500)]
        page_size: u32,
    },
    /// Publish the volume to a node and print its NBD URI (qemu-io, nbdinfo
    /// and nbdfuse accept it).
    Export {
        name: String,
        /// The node that connects (default: the node serving the volume).
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        read_only: bool,
    },
    /// Revoke the volume's export to a node (default: every node).
    Unexport {
        name: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Show the rebuild of a replicated volume's faulted replicas. Their
    /// rebuild runs in the nexus of the volume's attachment (the CSI node
    /// plugin's, or `volume attach`'s) as soon as their servers answer; with
    /// --wait, a volume nobody attaches is attached here (no file) until its
    /// copies are in sync.
    Rebuild {
        name: String,
        /// Wait, with a progress bar, until every replica is in sync.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// With --wait, for a volume nobody attaches: the node to attach it
        /// on meanwhile, as its volume server registered (default: the host
        /// name).
        #[arg(long)]
        node: Option<String>,
    },
    /// Attach the volume on this host as the file DIR/disk, as the CSI node
    /// plugin does (replicated or not: the fan-out to the replicas runs
    /// here), until interrupted; then flush, detach and unpublish. DIR must
    /// be an empty folder (a FUSE mount point).
    Attach {
        name: String,
        dir: std::path::PathBuf,
        /// This host's node name, as its volume server registered it
        /// (default: the host name).
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        read_only: bool,
    },
}

/// How berthctl reached the metadata service: `volume attach` hands it on
/// to the nexus, which reports failed replicas there.
#[derive(Debug, Clone)]
pub struct Conn {
    pub endpoint: String,
    pub tls_dir: Option<std::path::PathBuf>,
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
        #[arg(long, default_value_t = 500)]
        page_size: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Entries, oldest first, filtered.
    List {
        #[arg(long)]
        volume: Option<String>,
        /// Entries whose actor contains this (berthctl:alice, node:n1...).
        #[arg(long)]
        actor: Option<String>,
        /// From this time: Unix milliseconds, or an age like 90s, 15m, 2h, 7d.
        #[arg(long, value_parser = parse_time)]
        since: Option<u64>,
        #[arg(long, value_parser = parse_time)]
        until: Option<u64>,
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many entries (0: all), fetched in pages.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
    },
    /// Walk the hash chain; exit 9 naming the first entry altered or removed.
    Verify,
}

/// Unix milliseconds, or an age ("15m") before now.
fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not Unix milliseconds or an age like 15m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(now.saturating_sub(secs * 1000))
}

fn state(s: i32) -> &'static str {
    match pb::ObjectState::try_from(s) {
        Ok(pb::ObjectState::Creating) => "creating",
        Ok(pb::ObjectState::Ready) => "ready",
        Ok(pb::ObjectState::Deleting) => "deleting",
        _ => "unknown",
    }
}

fn volume_json(v: &pb::Volume) -> Value {
    let q = v.qos.clone().unwrap_or_default();
    let source = if !v.source_snapshot_id.is_empty() {
        format!("snapshot:{}", v.source_snapshot_id)
    } else if !v.source_volume_id.is_empty() {
        format!("volume:{}", v.source_volume_id)
    } else {
        String::new()
    };
    json!({
        "id": v.id, "size_bytes": v.size_bytes, "tier": v.tier, "node": v.node, "pool_id": v.pool_id,
        "state": state(v.state), "iops_limit": q.iops_limit,
        "bytes_per_second_limit": q.bytes_per_second_limit, "burst_seconds": q.burst_seconds,
        "priority": q.priority, "fs_type": v.fs_type, "source": source,
        "parameters": v.parameters, "topology": v.accessible_topology.clone().unwrap_or_default().segments,
        "created_unix_ms": v.created_unix_ms, "abnormal": v.abnormal, "condition": v.condition,
        "replicas": v.replicas.iter().map(|r| json!({
            "node": r.node, "pool_id": r.pool_id, "state": r.state,
            "synced_generation": r.synced_generation,
            "rebuild_done_bytes": r.rebuild_done_bytes, "rebuild_total_bytes": r.rebuild_total_bytes,
        })).collect::<Vec<_>>(),
        "generation": v.generation,
    })
}

/// A volume's replicas in one cell: `node state` per replica, with a
/// rebuild's progress.
fn replica_summary(v: &pb::Volume) -> String {
    v.replicas
        .iter()
        .map(|r| {
            if r.state == "rebuilding" && r.rebuild_total_bytes > 0 {
                format!(
                    "{} rebuilding {}%",
                    r.node,
                    r.rebuild_done_bytes * 100 / r.rebuild_total_bytes
                )
            } else {
                format!("{} {}", r.node, r.state)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
const VOL_COLS: &[&str] = &[
    "id",
    "size_bytes",
    "tier",
    "node",
    "state",
    "iops_limit",
    "bytes_per_second_limit",
    "source",
    "condition",
];

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({"id": s.id, "source_volume_id": s.source_volume_id, "size_bytes": s.size_bytes, "node": s.node,
        "state": state(s.state), "ready_to_use": s.ready_to_use, "created_unix_ms": s.created_unix_ms})
}
const SNAP_COLS: &[&str] = &["id", "source_volume_id", "size_bytes", "node", "state"];

fn attachment_json(a: &pb::Attachment) -> Value {
    json!({"volume_id": a.volume_id, "node": a.node, "read_only": a.read_only, "server_node": a.server_node,
        "export_name": a.export_name, "tcp_uri": a.tcp_uri, "unix_uri": a.unix_uri, "state": state(a.state),
        "created_unix_ms": a.created_unix_ms})
}
const ATTACH_COLS: &[&str] = &[
    "volume_id",
    "node",
    "read_only",
    "server_node",
    "state",
    "tcp_uri",
];

fn audit_json(e: &pb::AuditEntry) -> Value {
    json!({"seq": e.seq, "time_unix_ms": e.time_unix_ms, "actor": e.actor, "action": e.action,
        "volume": e.volume, "target": e.target, "node": e.node, "result": e.result, "peer": e.peer,
        "read_bytes": e.read_bytes, "write_bytes": e.write_bytes, "detail": e.detail,
        "prev_hash": e.prev_hash, "hash": e.hash})
}

/// Every page of a listing, in order: `page(token)` returns rows and the
/// next token (empty at the end).
async fn all_pages(
    mut page: impl AsyncFnMut(String) -> Result<(Vec<Value>, String), tonic::Status>,
) -> Result<Vec<Value>, tonic::Status> {
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let (more, next) = page(token).await?;
        rows.extend(more);
        if next.is_empty() {
            return Ok(rows);
        }
        token = next;
    }
}

fn topology(kv: Vec<KV>) -> Option<pb::Topology> {
    Some(pb::Topology {
        segments: kv.into_iter().collect(),
    })
}

/// The block size the service rounds volume sizes up to.
const BLOCK_BYTES: u64 = 4096;

/// Audit entries asked for per call. An entry is at most ~10 KiB (two
/// 4 KiB text fields, a few 256-byte ones, two hashes), so a page stays
/// well under the 4 MiB a gRPC client decodes by default, whatever
/// `--limit` says.
const AUDIT_PAGE: u64 = 256;

/// The `limit_bytes` that makes the service refuse, in the same call, a
/// size it would otherwise quietly raise (to a volume's current size, or a
/// clone's source's): the asked size rounded up as the service rounds it.
/// The look-ups before such calls give the clear message; this closes the
/// race with a concurrent change. 0 (no limit) if rounding overflows; the
/// service refuses such a size anyway.
fn limit_for(size: u64) -> u64 {
    size.checked_next_multiple_of(BLOCK_BYTES).unwrap_or(0)
}

/// A size for messages: as people write it, then exact.
fn size_text(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", human_bytes(bytes))
}

/// Refuses a size below what a volume (or a clone's source) already has:
/// the service would keep the larger size and report success.
fn check_not_below(size: u64, have: u64, what: &str, why: &str) -> Result<(), tonic::Status> {
    if limit_for(size) != 0 && have > limit_for(size) {
        return Err(tonic::Status::invalid_argument(format!(
            "--size {} is below {what}, {}; {why}",
            size_text(size),
            size_text(have)
        )));
    }
    Ok(())
}

/// Whether a snapshot exists, by listing it by id.
async fn snapshot_exists(
    c: &mut berth_proto::MetaClient,
    id: &str,
) -> Result<Option<pb::Snapshot>, tonic::Status> {
    Ok(c.list_snapshots(req(pb::ListSnapshotsRequest {
        snapshot_id: id.to_string(),
        source_volume_id: String::new(),
        max_entries: 1,
        page_token: String::new(),
    }))
    .await?
    .into_inner()
    .snapshots
    .into_iter()
    .next())
}

/// A volume's attachments.
async fn attachments_of(
    c: &mut berth_proto::MetaClient,
    volume: &str,
) -> Result<Vec<pb::Attachment>, tonic::Status> {
    Ok(c.list_attachments(req(pb::ListAttachmentsRequest {
        volume_id: volume.to_string(),
    }))
    .await?
    .into_inner()
    .attachments)
}

/// Whether a volume exists, by asking for it.
async fn volume_exists(
    c: &mut berth_proto::MetaClient,
    name: &str,
) -> Result<Option<pb::Volume>, tonic::Status> {
    match c
        .get_volume(req(pb::GetVolumeRequest {
            volume_id: name.to_string(),
        }))
        .await
    {
        Ok(v) => Ok(Some(v.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

pub async fn run(
    out: &Out,
    cmd: Cmd,
    mut c: berth_proto::MetaClient,
    conn: &Conn,
) -> Result<(), tonic::Status> {
    match cmd {
        Cmd::Volume(v) => volume(out, v, &mut c, conn).await?,
        Cmd::Snapshot(s) => match s {
            SnapshotCmd::Create { volume, name } => {
                let s = c
                    .create_snapshot(req(pb::CreateSnapshotRequest {
                        name,
                        source_volume_id: volume,
                    }))
                    .await?
                    .into_inner();
                out.one(snapshot_json(&s), SNAP_COLS);
            }
            SnapshotCmd::Delete { name } => {
                // DeleteSnapshot succeeds whether or not the snapshot
                // existed (CSI asks that) and its reply says nothing, so
                // look it up first to tell the person which it was. Absent,
                // nothing is called: a snapshot made meanwhile stays.
                if snapshot_exists(&mut c, &name).await?.is_none() {
                    out.done(&format!("snapshot {name} already absent"));
                } else {
                    c.delete_snapshot(req(pb::DeleteSnapshotRequest {
                        snapshot_id: name.clone(),
                    }))
                    .await?;
                    out.done(&format!("deleted snapshot {name}"));
                }
            }
            SnapshotCmd::List { volume, page_size } => {
                let source_volume_id = volume.unwrap_or_default();
                let rows = all_pages(async |page_token| {
                    let l = c
                        .list_snapshots(req(pb::ListSnapshotsRequest {
                            snapshot_id: String::new(),
                            source_volume_id: source_volume_id.clone(),
                            max_entries: page_size,
                            page_token,
                        }))
                        .await?
                        .into_inner();
                    Ok((
                        l.snapshots.iter().map(snapshot_json).collect(),
                        l.next_page_token,
                    ))
                })
                .await?;
                out.rows(rows, SNAP_COLS);
            }
        },
        Cmd::Clone {
            name,
            from_snapshot,
            from_volume,
            size,
            params,
        } => {
            use pb::create_volume_request::Source;
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Source::SourceSnapshotId(s),
                (None, Some(v)) => Source::SourceVolumeId(v),
                (None, None) => {
                    return Err(tonic::Status::invalid_argument(
                        "--from-snapshot or --from-volume is required",
                    ))
                }
            };
            // A clone is never smaller than its source: the service would
            // make it the source's size and succeed, so a smaller --size is
            // refused here, naming both sizes. A missing source is left
            // for CreateVolume to report.
            if let Some(size) = size {
                nonzero(size)?;
                let source_size = match &source {
                    Source::SourceSnapshotId(s) => snapshot_exists(&mut c, s)
                        .await?
                        .map(|s| (format!("snapshot {}", s.id), s.size_bytes)),
                    Source::SourceVolumeId(v) => volume_exists(&mut c, v)
                        .await?
                        .map(|v| (format!("volume {}", v.id), v.size_bytes)),
                };
                if let Some((what, have)) = source_size {
                    check_not_below(
                        size,
                        have,
                        &format!("the size of its source {what}"),
                        "a clone is at least as large as its source (omit --size for the same size)",
                    )?;
                }
            }
            let v = c
                .create_volume(req(pb::CreateVolumeRequest {
                    name,
                    required_bytes: size.unwrap_or(0),
                    limit_bytes: size.map_or(0, limit_for),
                    parameters: params.map(),
                    accessibility: None,
                    source: Some(source),
                }))
                .await?
                .into_inner();
            out.one(volume_json(&v), VOL_COLS);
        }
        Cmd::Tiers => {
            let l = c
                .list_tiers(req(pb::ListTiersRequest {}))
                .await?
                .into_inner();
            let rows = l
                .tiers
                .iter()
                .map(|t| json!({"name": t.name, "priority": t.priority, "iops_base": t.iops_base,
                    "iops_per_gib": t.iops_per_gib, "iops_cap": t.iops_cap,
                    "bytes_per_second_base": t.bytes_per_second_base,
                    "bytes_per_second_per_gib": t.bytes_per_second_per_gib,
                    "bytes_per_second_cap": t.bytes_per_second_cap, "burst_seconds": t.burst_seconds,
                    "fs_type": t.fs_type, "media": t.media.join(","), "description": t.description}))
                .collect();
            out.rows(
                rows,
                &[
                    "name",
                    "priority",
                    "iops_base",
                    "iops_per_gib",
                    "iops_cap",
                    "bytes_per_second_base",
                    "bytes_per_second_cap",
                    "fs_type",
                    "description",
                ],
            );
        }
        Cmd::Drain { node } => {
            let l = c
                .drain_node(req(pb::DrainNodeRequest { node }))
                .await?
                .into_inner();
            let rows = l
                .volumes
                .iter()
                .map(|v| json!({"volume": v.volume_id, "to_node": v.to_node, "outcome": v.outcome}))
                .collect();
            out.rows(rows, &["volume", "to_node", "outcome"]);
        }
        Cmd::Nodes => {
            let l = c
                .list_nodes(req(pb::ListNodesRequest {}))
                .await?
                .into_inner();
            let rows = l
                .nodes
                .iter()
                .map(|n| json!({"name": n.name, "state": n.state, "cordoned": n.cordoned, "control_endpoint": n.control_endpoint,
                    "nbd_address": n.nbd_address, "nbd_socket": n.nbd_socket, "labels": n.labels,
                    "pool_id": n.pool_id, "version": n.version,
                    "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms, "registered_unix_ms": n.registered_unix_ms}))
                .collect();
            out.rows(
                rows,
                &[
                    "name",
                    "state",
                    "control_endpoint",
                    "nbd_address",
                    "pool_id",
                ],
            );
        }
        Cmd::Pools => {
            let l = c
                .list_pools(req(pb::ListPoolsRequest {}))
                .await?
                .into_inner();
            let rows = l
                .pools
                .iter()
                .map(|p| {
                    let s = p.status.clone().unwrap_or_default();
                    json!({"id": p.id, "node": p.node, "node_state": p.node_state, "media": s.media,
                        "total_bytes": s.total_bytes, "used_bytes": s.used_bytes,
                        "provisioned_bytes": p.provisioned_bytes, "available_bytes": p.available_bytes,
                        "volumes": s.volumes, "snapshots": s.snapshots})
                })
                .collect();
            out.rows(
                rows,
                &[
                    "node",
                    "node_state",
                    "media",
                    "total_bytes",
                    "used_bytes",
                    "provisioned_bytes",
                    "available_bytes",
                    "volumes",
                    "snapshots",
                ],
            );
        }
        Cmd::Attachments { volume } => {
            let l = c
                .list_attachments(req(pb::ListAttachmentsRequest {
                    volume_id: volume.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            out.rows(
                l.attachments.iter().map(attachment_json).collect(),
                ATTACH_COLS,
            );
        }
        Cmd::Capacity {
            topology: t,
            params,
        } => {
            let r = c
                .get_capacity(req(pb::GetCapacityRequest {
                    topology: topology(t),
                    parameters: params.map(),
                }))
                .await?
                .into_inner();
            out.one(
                json!({"available_bytes": r.available_bytes, "maximum_volume_bytes": r.maximum_volume_bytes}),
                &["available_bytes", "maximum_volume_bytes"],
            );
        }
        Cmd::Audit(AuditCmd::List {
            volume,
            actor,
            since,
            until,
            after,
            limit,
        }) => {
            // In pages of AUDIT_PAGE, each going on from the last entry
            // the previous one examined, so any --limit fits the client's
            // message size.
            let (volume, actor) = (volume.unwrap_or_default(), actor.unwrap_or_default());
            let rows = crate::in_pages(limit, after, AUDIT_PAGE, async |after_seq, want| {
                let r = c
                    .query_audit(req(pb::QueryAuditRequest {
                        volume: volume.clone(),
                        actor: actor.clone(),
                        since_unix_ms: since.unwrap_or(0),
                        until_unix_ms: until.unwrap_or(0),
                        after_seq,
                        // At most AUDIT_PAGE, which fits.
                        limit: want as u32,
                    }))
                    .await?
                    .into_inner();
                // 0: nothing more matches.
                let rows = r.entries.iter().map(audit_json).collect();
                Ok((rows, Some(r.next_after_seq)))
            })
            .await?;
            out.rows(
                rows,
                &[
                    "seq",
                    "time_unix_ms",
                    "actor",
                    "action",
                    "volume",
                    "target",
                    "node",
                    "result",
                    "read_bytes",
                    "write_bytes",
                ],
            );
        }
        Cmd::Audit(AuditCmd::Verify) => {
            let v = c
                .verify_audit(req(pb::VerifyAuditRequest {}))
                .await?
                .into_inner();
            let j = json!({"intact": v.intact, "entries_checked": v.entries_checked,
                "first_bad_seq": v.first_bad_seq, "problem": v.problem,
                "head_seq": v.head_seq, "head_hash": v.head_hash});
            match out.mode {
                Output::Json => outln!("{j}"),
                Output::Table if v.intact => outln!(
                    "intact: {} entries checked; head is entry {} ({})",
                    v.entries_checked,
                    v.head_seq,
                    v.head_hash
                ),
                Output::Table => outln!("TAMPERED: {}", v.problem),
            }
            if !v.intact {
                return Err(tonic::Status::data_loss(format!(
                    "the audit log was tampered with: {} (first bad entry: {})",
                    v.problem, v.first_bad_seq
                )));
            }
        }
    }
    Ok(())
}

async fn volume(
    out: &Out,
    v: VolumeCmd,
    c: &mut berth_proto::MetaClient,
    conn: &Conn,
) -> Result<(), tonic::Status> {
    match v {
        VolumeCmd::Rebuild {
            name,
            wait,
            timeout,
            node,
        } => {
            let get = |c: &mut berth_proto::MetaClient| {
                let mut c = c.clone();
                let name = name.clone();
                async move {
                    c.get_volume(req(pb::GetVolumeRequest { volume_id: name }))
                        .await
                        .map(tonic::Response::into_inner)
                }
            };
            let v = get(c).await?;
            if v.replicas.is_empty() {
                return Err(tonic::Status::failed_precondition(format!(
                    "volume {name} is not replicated: nothing to rebuild"
                )));
            }
            // Retired copies (stale) are not waited for: nothing rebuilds them.
            let behind = |v: &pb::Volume| {
                v.replicas
                    .iter()
                    .any(|r| r.state == "faulted" || r.state == "rebuilding")
            };
            let attached = attachments_of(c, &name)
                .await?
                .iter()
                .any(|a| !a.legs.is_empty());
            if behind(&v) && !attached && !wait {
                return Err(tonic::Status::failed_precondition(format!(
                    "volume {name} is not attached: its rebuild runs in the nexus of an \
                     attachment (a pod using it, berthctl volume attach {name} DIR, or \
                     berthctl volume rebuild {name} --wait, which attaches it here meanwhile)"
                )));
            }
            if !wait {
                out.one(
                    json!({"id": v.id, "generation": v.generation, "replicas": replica_summary(&v)}),
                    &["id", "generation", "replicas"],
                );
                return Ok(());
            }
            // Not attached: a nexus here (no file) rebuilds it meanwhile.
            let mut held = None;
            if behind(&v) && !attached {
                let node = node.unwrap_or_else(berth_cli::host_name);
                let a = c
                    .publish_volume(req(pb::PublishVolumeRequest {
                        volume_id: name.clone(),
                        node: node.clone(),
                        read_only: false,
                    }))
                    .await?
                    .into_inner();
                let opened = async {
                    let opts = berth_csi::node::fuse::AttachOptions {
                        uri: berth_csi::node::fuse::attachment_uri(&a)?,
                        dir: std::path::PathBuf::new(),
                        read_only: false,
                        pid_file: None,
                        reconnect_timeout: std::time::Duration::from_secs(300),
                        tls_dir: conn.tls_dir.clone(),
                        metadata: Some(conn.endpoint.clone()),
                    };
                    berth_csi::node::fuse::open(&opts).await
                }
                .await;
                match opened {
                    Ok(t) => {
                        errln!("berthctl: volume {name} is attached on node {node} while its copies are rebuilt");
                        held = Some((t, node));
                    }
                    Err(e) => {
                        c.unpublish_volume(req(pb::UnpublishVolumeRequest {
                            volume_id: name.clone(),
                            node,
                        }))
                        .await?;
                        return Err(tonic::Status::unavailable(format!("volume {name}: {e}")));
                    }
                }
            }
            let bar = indicatif::ProgressBar::new(100);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}% {msg}",
                )
                .map_err(|e| tonic::Status::internal(e.to_string()))?,
            );
            let started = std::time::Instant::now();
            let waited = async {
                let mut v = v;
                while behind(&v) {
                    let (done, total) = v
                        .replicas
                        .iter()
                        .filter(|r| r.state == "rebuilding")
                        .fold((0, 0), |(d, t), r| {
                            (d + r.rebuild_done_bytes, t + r.rebuild_total_bytes)
                        });
                    bar.set_position((done * 100).checked_div(total).unwrap_or(0));
                    bar.set_message(replica_summary(&v));
                    if timeout > 0 && started.elapsed().as_secs() >= timeout {
                        bar.abandon();
                        return Err(tonic::Status::deadline_exceeded(format!(
                            "volume {name} is not in sync after {timeout} s: {}",
                            replica_summary(&v)
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    v = get(c).await?;
                }
                Ok(v)
            }
            .await;
            if let Some((t, node)) = held {
                let _ = t.close().await;
                c.unpublish_volume(req(pb::UnpublishVolumeRequest {
                    volume_id: name.clone(),
                    node,
                }))
                .await?;
            }
            let v = waited?;
            bar.set_position(100);
            bar.finish_with_message(replica_summary(&v));
            out.one(
                json!({"id": v.id, "generation": v.generation, "replicas": replica_summary(&v)}),
                &["id", "generation", "replicas"],
            );
        }
        VolumeCmd::Attach {
            name,
            dir,
            node,
            read_only,
        } => {
            // The attachment runs here: its warnings (a replica reported
            // out, a lost connection) go to stderr as the daemon's do, and a
            // panic in any of its tasks ends it, as it ends the daemon.
            berth_cli::init_logging(false);
            berth_cli::abort_on_panic("berthctl");
            let node = node.unwrap_or_else(berth_cli::host_name);
            let a = c
                .publish_volume(req(pb::PublishVolumeRequest {
                    volume_id: name.clone(),
                    node: node.clone(),
                    read_only,
                }))
                .await?
                .into_inner();
            let served = match berth_csi::node::fuse::attachment_uri(&a) {
                Ok(uri) => {
                    let opts = berth_csi::node::fuse::AttachOptions {
                        uri,
                        dir: dir.clone(),
                        read_only,
                        pid_file: None,
                        reconnect_timeout: std::time::Duration::from_secs(300),
                        tls_dir: conn.tls_dir.clone(),
                        metadata: Some(conn.endpoint.clone()),
                    };
                    let legs: Vec<&str> = a.legs.iter().map(|l| l.node.as_str()).collect();
                    errln!(
                        "berthctl: volume {name} attached at {} ({}); interrupt to detach",
                        dir.join(berth_csi::node::fuse::FILE).display(),
                        if legs.is_empty() {
                            format!("on node {}", a.server_node)
                        } else {
                            format!(
                                "replicas on {}, generation {}",
                                legs.join(", "),
                                a.generation
                            )
                        }
                    );
                    // The FUSE loop and its runtime on a thread of their own.
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    std::thread::spawn(move || {
                        let _ = tx.send(berth_csi::node::fuse::run(opts));
                    });
                    rx.await
                        .unwrap_or_else(|_| Err("the attach thread died".into()))
                }
                Err(e) => Err(e),
            };
            // Unpublished whatever happened: the grants go with the attachment.
            c.unpublish_volume(req(pb::UnpublishVolumeRequest {
                volume_id: name.clone(),
                node,
            }))
            .await?;
            served.map_err(|e| tonic::Status::internal(format!("volume {name}: {e}")))?;
            out.done(&format!("detached volume {name}"));
        }
        VolumeCmd::Create {
            name,
            size,
            params,
            topology: t,
        } => {
            let accessibility = (!t.is_empty()).then(|| pb::TopologyRequirement {
                requisite: topology(t).into_iter().collect(),
                preferred: Vec::new(),
            });
            let v = c
                .create_volume(req(pb::CreateVolumeRequest {
                    name,
                    required_bytes: nonzero(size)?,
                    limit_bytes: 0,
                    parameters: params.map(),
                    accessibility,
                    source: None,
                }))
                .await?
                .into_inner();
            out.one(volume_json(&v), VOL_COLS);
        }
        VolumeCmd::Delete { name } => {
            // DeleteVolume succeeds whether or not the volume existed (CSI
            // asks that) and its reply says nothing, so look it up first to
            // tell the person which it was. Absent, nothing is called: a
            // volume made meanwhile stays.
            if volume_exists(c, &name).await?.is_none() {
                out.done(&format!("volume {name} already absent"));
            } else {
                c.delete_volume(req(pb::DeleteVolumeRequest {
                    volume_id: name.clone(),
                }))
                .await?;
                out.done(&format!("deleted volume {name}"));
            }
        }
        VolumeCmd::Expand { name, size } => {
            // ExpandVolume to a smaller size succeeds doing nothing (CSI's
            // resizer may repeat itself); a person asking to shrink gets
            // told. A missing volume is left for ExpandVolume to report.
            nonzero(size)?;
            if let Some(v) = volume_exists(c, &name).await? {
                check_not_below(
                    size,
                    v.size_bytes,
                    &format!("volume {name}'s size"),
                    "volumes never shrink",
                )?;
            }
            let v = c
                .expand_volume(req(pb::ExpandVolumeRequest {
                    volume_id: name,
                    required_bytes: size,
                    limit_bytes: limit_for(size),
                }))
                .await?
                .into_inner();
            out.one(volume_json(&v), VOL_COLS);
        }
        VolumeCmd::Modify { name, params } => {
            let v = c
                .modify_volume(req(pb::ModifyVolumeRequest {
                    volume_id: name,
                    parameters: params.map(),
                }))
                .await?
                .into_inner();
            out.one(volume_json(&v), VOL_COLS);
        }
        VolumeCmd::Get { name } => {
            let v = c
                .get_volume(req(pb::GetVolumeRequest { volume_id: name }))
                .await?
                .into_inner();
            if v.replicas.is_empty() || out.mode == Output::Json {
                out.one(volume_json(&v), VOL_COLS);
            } else {
                // A replicated volume's table shows each copy.
                let mut j = volume_json(&v);
                j["replicas"] = json!(replica_summary(&v));
                let mut cols = VOL_COLS.to_vec();
                cols.extend(["generation", "replicas"]);
                out.one(j, &cols);
            }
        }
        VolumeCmd::List { node, page_size } => {
            let node = node.unwrap_or_default();
            let rows = all_pages(async |page_token| {
                let l = c
                    .list_volumes(req(pb::ListVolumesRequest {
                        max_entries: page_size,
                        page_token,
                        node: node.clone(),
                    }))
                    .await?
                    .into_inner();
                Ok((
                    l.volumes.iter().map(volume_json).collect(),
                    l.next_page_token,
                ))
            })
            .await?;
            out.rows(rows, VOL_COLS);
        }
        VolumeCmd::Export {
            name,
            node,
            read_only,
        } => {
            let node = match node {
                Some(n) => n,
                None => {
                    c.get_volume(req(pb::GetVolumeRequest {
                        volume_id: name.clone(),
                    }))
                    .await?
                    .into_inner()
                    .node
                }
            };
            let a = c
                .publish_volume(req(pb::PublishVolumeRequest {
                    volume_id: name,
                    node,
                    read_only,
                }))
                .await?
                .into_inner();
            match out.mode {
                Output::Json => outln!("{}", attachment_json(&a)),
                // One URI, the one that works from anywhere when there is one.
                Output::Table => outln!(
                    "{}",
                    if a.tcp_uri.is_empty() {
                        &a.unix_uri
                    } else {
                        &a.tcp_uri
                    }
                ),
            }
        }
        VolumeCmd::Unexport { name, node } => {
            // UnpublishVolume succeeds whether or not there was an
            // attachment (CSI asks that) and its reply only counts closed
            // connections, so look the attachments up first. None: nothing
            // is called, so an export made meanwhile stays.
            let node = node.unwrap_or_default();
            let exported = attachments_of(c, &name)
                .await?
                .iter()
                .any(|a| a.volume_id == name && (node.is_empty() || a.node == node));
            let to = if node.is_empty() {
                String::new()
            } else {
                format!(" to node {node}")
            };
            if !exported {
                out.done(&format!("export of {name}{to} already absent"));
            } else {
                let r = c
                    .unpublish_volume(req(pb::UnpublishVolumeRequest {
                        volume_id: name.clone(),
                        node,
                    }))
                    .await?
                    .into_inner();
                out.done(&format!(
                    "unexported {name}{to}; {} connection(s) closed",
                    r.closed_connections
                ));
            }
        }
    }
    Ok(())
}
