//! `berth attach`: an NBD export as one file (`DIR/disk`) in a FUSE mount,
//! for a loop device to make a block device of where the kernel has no NBD
//! client.
//!
//! For a volume on this node, the volume server serves the file itself
//! (`super::local`: this process mounts and hands the mount over); what
//! follows is the path of every other attachment: remote volumes, replicated
//! ones (the nexus), TLS, and mounts by an unprivileged user.
//!
//! It does what nbdfuse does, over [`berth_nbd::session`], so that the file
//! keeps working under a mounted filesystem when the volume server restarts
//! (the session reconnects and replays what was not flushed), and so that it
//! can grow: on SIGHUP the export's size is asked for again and the file
//! takes it (then `losetup -c` shows it to the loop device). Attributes are
//! never cached (TTL 0), so a `stat` sees a new size at once.
//!
//! Every request goes to the session without blocking the FUSE loop; replies
//! are sent from the session's task when the server answers, so many requests
//! are in flight at once.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use berth_nbd::proto::{TF_SEND_TRIM, TF_SEND_WRITE_ZEROES};
use std::sync::Arc;

use berth_nbd::nexus::{FaultError, Leg, LegState, Membership, Nexus, NexusOptions, Range};
use berth_nbd::session::{Cmd, Options, Session, Uri};
use berth_nbd::target::{call, BlockTarget, BoxFuture};
use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// The file's name in its mount.
pub const FILE: &str = "disk";
const DISK: INodeNo = INodeNo(2);
/// Attributes are never cached: a grown export shows at the next stat.
const TTL: Duration = Duration::ZERO;
/// TRIM and WRITE_ZEROES lengths are 32-bit; longer ranges go in pieces.
const MAX_RANGE_BYTES: u64 = 1 << 30;

// fallocate(2) modes the loop device sends.
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub uri: String,
    /// The FUSE mount point (created if missing).
    pub dir: PathBuf,
    pub read_only: bool,
    /// Written once the file is served (as `nbdfuse -P` does).
    pub pid_file: Option<PathBuf>,
    /// How long I/O waits for a volume server that went away before failing.
    pub reconnect_timeout: Duration,
    /// Certificates: TCP connections then use STARTTLS, verifying the
    /// volume server as `berth-volume-server`.
    pub tls_dir: Option<PathBuf>,
    /// The metadata service (a replicated volume's nexus reports failed
    /// replicas to it), with `tls_dir`'s certificates for https.
    pub metadata: Option<String>,
}

/// What `uri` holds for a replicated volume: this prefix and a
/// [`ReplicatedSpec`] in JSON.
pub const REPLICAS_PREFIX: &str = "berth-replicas:";

/// A replicated volume's attachment: one NBD URI per in-sync replica (the
/// local one first) and the generation its grants carry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicatedSpec {
    pub volume: String,
    pub generation: u64,
    pub legs: Vec<LegSpec>,
    /// The node the nexus runs on (it listens to the metadata service as
    /// that node's).
    #[serde(default)]
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LegSpec {
    pub node: String,
    pub uri: String,
}

impl ReplicatedSpec {
    /// As `berth attach` takes it in place of an NBD URI.
    pub fn to_uri(&self) -> String {
        format!(
            "{REPLICAS_PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// `None` when `uri` is a plain NBD URI.
    pub fn parse(uri: &str) -> Option<Result<ReplicatedSpec, String>> {
        let json = uri.strip_prefix(REPLICAS_PREFIX)?;
        Some(
            serde_json::from_str::<ReplicatedSpec>(json)
                .map_err(|e| format!("a replicated attachment that does not parse: {e}"))
                .and_then(|s| {
                    if s.legs.is_empty() || s.legs.len() > 3 {
                        Err(format!("{} replica legs (1 to 3)", s.legs.len()))
                    } else {
                        Ok(s)
                    }
                }),
        )
    }
}

/// The URI to reach an export by: its unix socket when that is on this
/// host (no TCP in the data path), else TCP; `None` when neither works.
pub fn pick_uri(unix: &str, tcp: &str) -> Option<String> {
    let local = unix
        .split_once("?socket=")
        .is_some_and(|(_, p)| std::path::Path::new(p).exists());
    if local {
        Some(unix.to_string())
    } else {
        (!tcp.is_empty()).then(|| tcp.to_string())
    }
}

/// What `berth attach` takes to serve a published volume: the legs of a
/// replicated one, else its NBD URI; a unix socket wherever the server is on
/// this host, else TCP.
pub fn attachment_uri(a: &berth_proto::meta::v1::Attachment) -> Result<String, String> {
    let pick = |unix: &str, tcp: &str| {
        pick_uri(unix, tcp).ok_or_else(|| {
            format!(
                "volume {} has no NBD address reachable from here",
                a.volume_id
            )
        })
    };
    if a.legs.is_empty() {
        return pick(&a.unix_uri, &a.tcp_uri);
    }
    let legs = a
        .legs
        .iter()
        .map(|l| {
            Ok(LegSpec {
                node: l.node.clone(),
                uri: pick(&l.unix_uri, &l.tcp_uri)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ReplicatedSpec {
        volume: a.volume_id.clone(),
        generation: a.generation,
        legs,
        node: a.node.clone(),
    }
    .to_uri())
}

/// The metadata service as the nexus's membership: a failed replica is
/// reported there and marked out before the writes it missed are
/// acknowledged.
struct MetaMembership {
    client: berth_proto::MetaClient,
    volume: String,
}

impl Membership for MetaMembership {
    fn fault(
        &self,
        leg: &str,
        generation: u64,
        pending: Vec<Range>,
    ) -> BoxFuture<'static, Result<u64, FaultError>> {
        use berth_proto::meta::v1 as pb;
        let mut c = self.client.clone();
        let req = pb::ReportReplicaFaultRequest {
            volume_id: self.volume.clone(),
            node: leg.to_string(),
            generation,
            pending: pending
                .iter()
                .map(|r| pb::ByteRange {
                    offset: r.offset,
                    length: r.len,
                })
                .collect(),
            reason: "the nexus saw it fail (an error, a lost connection or no answer)".into(),
        };
        Box::pin(async move {
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_secs(10));
            match c.report_replica_fault(r).await {
                Ok(r) => Ok(r.into_inner().generation),
                Err(s) => match s.code() {
                    tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::PermissionDenied => Err(FaultError::Deposed(s.message().into())),
                    _ => Err(FaultError::Unavailable(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    ))),
                },
            }
        })
    }

    fn repaired(&self, leg: &str, range: Range, from: &str) {
        use berth_proto::meta::v1 as pb;
        let mut c = self.client.clone();
        let req = pb::AppendAuditRequest {
            action: "ReplicaRepaired".into(),
            volume: self.volume.clone(),
            target: leg.to_string(),
            detail: format!(
                "{} bytes at offset {} failed to read on {leg}'s copy and were rewritten from {from}'s",
                range.len, range.offset
            ),
        };
        tokio::spawn(async move {
            if let Err(e) = c.append_audit(req).await {
                tracing::warn!(error = %e.message(), "cannot record a repair in the audit log");
            }
        });
    }
}

/// How long a replica with requests outstanding may answer none before the
/// nexus reports it out (a paused or hung server).
const LEG_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a leg's session waits for a server that closed its connections
/// (killed, restarting) before failing its requests: then the nexus reports
/// the replica out.
const LEG_RECONNECT: Duration = Duration::from_secs(1);

/// Connects to every replica of `spec` and starts its nexus. A replica that
/// cannot be reached now is reported out first (the set goes on without it).
async fn replicated(
    spec: ReplicatedSpec,
    o: &AttachOptions,
    tls: Option<berth_nbd::client::TlsClient>,
) -> Result<Arc<dyn BlockTarget>, String> {
    let endpoint = o.metadata.clone().ok_or(
        "a replicated volume needs the metadata service (--metadata) to report failed replicas to",
    )?;
    let ctls = match &o.tls_dir {
        Some(d) => Some(berth_proto::ClientTls::new(
            berth_proto::TlsDir::load(d).map_err(|e| format!("--tls-dir: {e}"))?,
        )),
        None => None,
    };
    let client = crate::metadata_client(&endpoint, ctls.as_ref()).map_err(|e| e.to_string())?;
    let membership = MetaMembership {
        client: client.clone(),
        volume: spec.volume.clone(),
    };
    // A leg's session waits briefly for a server that went away: past that
    // its requests fail and the replica is reported out.
    let opts = Options {
        reconnect_timeout: LEG_RECONNECT,
        connect_timeout: LEG_TIMEOUT,
        tls,
        ..Options::default()
    };
    let mut legs = Vec::new();
    let mut generation = spec.generation;
    for l in &spec.legs {
        let uri = Uri::parse(&l.uri)?;
        match Session::connect(uri, opts.clone()).await {
            Ok(s) => legs.push(Leg {
                name: l.node.clone(),
                target: Arc::new(s),
            }),
            Err(e) => {
                tracing::warn!(leg = %l.node, error = %e, "a replica cannot be reached: reporting it out");
                generation = report_at_start(&membership, &l.node, generation).await?;
            }
        }
    }
    if legs.is_empty() {
        return Err("no replica of the volume can be reached".into());
    }
    let nexus = Nexus::new(
        legs,
        generation,
        Arc::new(membership),
        NexusOptions {
            leg_timeout: LEG_TIMEOUT,
            ..NexusOptions::default()
        },
    )?;
    tracing::info!(volume = %spec.volume, generation, legs = ?nexus.legs(), "nexus started");
    tokio::spawn(listener(
        nexus.clone(),
        client.clone(),
        spec.volume.clone(),
        spec.node.clone(),
    ));
    tokio::spawn(rebuilder(nexus.clone(), client, spec.volume.clone(), opts));
    Ok(Arc::new(nexus))
}

type MetaClient = berth_proto::MetaClient;

/// How often the nexus asks the catalog for faulted replicas to rebuild.
const REBUILD_POLL: Duration = Duration::from_secs(2);
/// The largest piece a rebuild copies at once.
const REBUILD_CHUNK: u64 = 1 << 20;
/// Pieces a rebuild keeps in flight, and the bytes they may add up to: the
/// copy is background work, and client I/O keeps most of the volume's
/// tier.
const REBUILD_PIECES: usize = 128;
const REBUILD_BYTES: u64 = 4 << 20;
/// How often a rebuild's progress is recorded in the catalog.
const REBUILD_REPORT: Duration = Duration::from_secs(1);

/// Rebuilds the faulted replicas of the nexus's volume as their servers
/// come back, one at a time, for as long as the nexus serves.
async fn rebuilder(nexus: Nexus, mut client: MetaClient, volume: String, opts: Options) {
    use berth_proto::meta::v1 as pb;
    loop {
        tokio::time::sleep(REBUILD_POLL).await;
        if nexus.deposed().is_some() {
            return;
        }
        let v = match client
            .get_volume(pb::GetVolumeRequest {
                volume_id: volume.clone(),
            })
            .await
        {
            Ok(v) => v.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return,
            Err(s) => {
                tracing::debug!(error = %s.message(), "cannot read the replica set");
                continue;
            }
        };
        // Retired ones (their node was drained) are no longer written.
        for (leg, st) in nexus.legs() {
            let kept = v
                .replicas
                .iter()
                .any(|r| r.node == leg && r.state != "stale");
            if st != LegState::Out && !kept {
                nexus.drop_leg(&leg);
            }
        }
        // Faulted ones; and rebuilding ones this nexus does not write to
        // (a start whose answer it never got: asked again, it gets the
        // same answer).
        let mine = nexus.legs();
        let faulted: Vec<String> = v
            .replicas
            .iter()
            .filter(|r| {
                r.state == "faulted"
                    || (r.state == "rebuilding"
                        && !mine
                            .iter()
                            .any(|(n, s)| *n == r.node && *s != LegState::Out))
            })
            .map(|r| r.node.clone())
            .collect();
        for node in faulted {
            if let Err(e) = rebuild_one(&nexus, &mut client, &volume, &node, &opts).await {
                tracing::warn!(%volume, leg = %node, error = %e, "rebuild stopped; it starts again when the replica can be reached");
            }
        }
    }
}

/// Listens to the metadata service for what it needs of the nexus (a pause
/// for a snapshot), reconnecting while the nexus serves.
async fn listener(nexus: Nexus, mut client: MetaClient, volume: String, node: String) {
    use berth_proto::meta::v1 as pb;
    if node.is_empty() {
        tracing::warn!(%volume, "the nexus does not know its node: snapshots of the volume cannot pause it");
        return;
    }
    loop {
        if nexus.deposed().is_some() {
            return;
        }
        let stream = client
            .watch_nexus(pb::WatchNexusRequest {
                volume_id: volume.clone(),
                node: node.clone(),
            })
            .await;
        match stream {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(ev)) => pause_for(&nexus, &mut client, &volume, ev).await,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e.message(), "the metadata service's stream ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e.message(), "cannot listen to the metadata service")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The longest the nexus stays paused for the metadata service.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Pauses the nexus and tells the service, which answers once the
/// snapshot is taken; then the nexus goes on.
async fn pause_for(
    nexus: &Nexus,
    client: &mut MetaClient,
    volume: &str,
    ev: berth_proto::meta::v1::NexusEvent,
) {
    use berth_proto::meta::v1 as pb;
    tracing::info!(volume, reason = %ev.reason, "pausing writes");
    let t = std::time::Instant::now();
    let paused = tokio::time::timeout(Duration::from_secs(10), nexus.quiesce()).await;
    let (guard, error) = match paused {
        Ok(Ok(g)) => (Some(g), String::new()),
        Ok(Err(e)) => (None, e),
        Err(_) => (
            None,
            "the writes in flight did not finish within 10 s".to_string(),
        ),
    };
    let mut r = tonic::Request::new(pb::QuiescedRequest {
        volume_id: volume.to_string(),
        token: ev.quiesce_token,
        error,
    });
    r.set_timeout(MAX_PAUSE);
    if let Err(e) = client.quiesced(r).await {
        tracing::warn!(volume, error = %e.message(), "the pause was not acknowledged");
    }
    drop(guard);
    tracing::info!(volume, paused = ?t.elapsed(), "writes go on");
}

/// How long a rebuild step whose answer was lost is asked again.
const STEP_PATIENCE: Duration = Duration::from_secs(30);

/// Asks again while the answer is unknown (the metadata service is down or
/// restarting: the step may or may not have been taken; the same step
/// again gets the same answer), for up to [`STEP_PATIENCE`].
async fn until_answered<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let end = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), call()).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(s))
                if !matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) || tokio::time::Instant::now() > end =>
            {
                return Err(s)
            }
            Err(_) if tokio::time::Instant::now() > end => {
                return Err(tonic::Status::deadline_exceeded("no answer"))
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// A gRPC status as the rebuild's errors say it.
fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// One membership change of the nexus's own (`call` at its generation,
/// answering the new generation and a result), asked again while its
/// answer is unknown: the same step again gets the same answer.
async fn step<R, F, Fut>(nexus: &Nexus, call: F) -> Result<R, String>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(u64, R), tonic::Status>>,
{
    nexus
        .change_membership(|generation| {
            let call = &call;
            async move { until_answered(|| call(generation)).await.map_err(status) }
        })
        .await
}

/// Starts, runs and finishes the rebuild of the replica on `node`.
async fn rebuild_one(
    nexus: &Nexus,
    client: &mut MetaClient,
    volume: &str,
    node: &str,
    opts: &Options,
) -> Result<(), String> {
    use berth_proto::meta::v1 as pb;
    let start = step(nexus, |generation| {
        let mut c = client.clone();
        async move {
            let r = c
                .start_rebuild(pb::StartRebuildRequest {
                    volume_id: volume.to_string(),
                    node: node.to_string(),
                    generation,
                })
                .await?
                .into_inner();
            Ok((r.generation, r.leg))
        }
    })
    .await;
    let leg = match start {
        Ok(Some(leg)) => leg,
        Ok(None) => return Err("the metadata service named no export".into()),
        // Its server is down, or another change came first: asked again later.
        Err(e) => {
            tracing::debug!(leg = node, error = %e, "no rebuild yet");
            return Ok(());
        }
    };
    // From here the catalog has it rebuilding: any failure faults it again.
    let joined = async {
        let uri = pick_uri(&leg.unix_uri, &leg.tcp_uri)
            .ok_or_else(|| format!("no NBD address of {node} reachable from here"))?;
        let s = Session::connect(Uri::parse(&uri)?, opts.clone())
            .await
            .map_err(|e| e.to_string())?;
        nexus.join(node, Arc::new(s))
    }
    .await;
    if let Err(e) = joined {
        let reason = format!("its rebuild could not start: {e}");
        step(nexus, |generation| {
            let mut c = client.clone();
            let reason = reason.clone();
            async move {
                let r = c
                    .report_replica_fault(pb::ReportReplicaFaultRequest {
                        volume_id: volume.to_string(),
                        node: node.to_string(),
                        generation,
                        pending: Vec::new(),
                        reason,
                    })
                    .await?;
                Ok((r.into_inner().generation, ()))
            }
        })
        .await?;
        return Err(e);
    }
    let copied = copy_all(nexus, client, volume, node).await;
    let finished = match copied {
        Ok(done) => {
            step(nexus, |generation| {
                let mut c = client.clone();
                async move {
                    let r = c
                        .finish_rebuild(pb::FinishRebuildRequest {
                            volume_id: volume.to_string(),
                            node: node.to_string(),
                            generation,
                        })
                        .await?;
                    Ok((r.into_inner().generation, done))
                }
            })
            .await
        }
        Err(e) => Err(e),
    };
    match finished {
        Ok((bytes, full)) => {
            nexus.promote(node)?;
            tracing::info!(
                volume,
                leg = node,
                bytes,
                full,
                "replica rebuilt: in sync again"
            );
            Ok(())
        }
        Err(e) => {
            nexus.fail_leg(node).await;
            Err(e)
        }
    }
}

/// Copies what the catalog lists for the joined leg `node`, then flushes
/// it; returns the bytes copied and whether it was a full copy.
async fn copy_all(
    nexus: &Nexus,
    client: &mut MetaClient,
    volume: &str,
    node: &str,
) -> Result<(u64, bool), String> {
    use berth_proto::meta::v1 as pb;
    let plan = client
        .list_rebuild_ranges(pb::ListRebuildRangesRequest {
            volume_id: volume.to_string(),
            node: node.to_string(),
            generation: nexus.generation(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let total: u64 = plan.ranges.iter().map(|r| r.length).sum();
    tracing::info!(volume, leg = node, full = plan.full, source = %plan.source, ranges = plan.ranges.len(), total, resumed_from = plan.resumed_from, "rebuilding");
    // Pieces in flight by offset: everything below the lowest one (or below
    // the next to start) is copied; a rebuild after this one resumes there.
    let mut pending_at: std::collections::BTreeMap<u64, u32> = Default::default();
    let mut done = 0u64;
    let mut reported = std::time::Instant::now();
    // A few pieces in flight (small ranges of a delta are each a round trip
    // to both copies), within a byte budget, so client I/O keeps its share.
    let mut copies = tokio::task::JoinSet::new();
    let mut in_flight = 0u64;
    // The next piece: range `ri` of the plan, from `at`.
    let (mut ri, mut at) = (0usize, plan.ranges.first().map_or(0, |r| r.offset));
    loop {
        while copies.len() < REBUILD_PIECES && in_flight < REBUILD_BYTES {
            let Some(r) = plan.ranges.get(ri) else { break };
            let end = r.offset.saturating_add(r.length);
            if at >= end {
                ri += 1;
                at = plan.ranges.get(ri).map_or(0, |r| r.offset);
                continue;
            }
            let p = Range {
                offset: at,
                len: (end - at).min(REBUILD_CHUNK),
            };
            at += p.len;
            let (n, leg) = (nexus.clone(), node.to_string());
            in_flight += p.len;
            *pending_at.entry(p.offset).or_default() += 1;
            copies.spawn(async move { n.copy(&leg, p).await.map(|()| (p.offset, p.len)) });
        }
        let Some(finished) = copies.join_next().await else {
            break;
        };
        let (offset, len) = match finished
            .map_err(|e| format!("a copy task failed: {e}"))
            .and_then(|r| r)
        {
            Ok(x) => x,
            Err(e) => {
                // The others finish (each holds a range of the volume).
                while copies.join_next().await.is_some() {}
                return Err(e);
            }
        };
        in_flight -= len;
        done += len;
        if let Some(n) = pending_at.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                pending_at.remove(&offset);
            }
        }
        if reported.elapsed() >= REBUILD_REPORT {
            reported = std::time::Instant::now();
            let next = if plan.ranges.get(ri).is_some() {
                at
            } else {
                u64::MAX
            };
            let cursor = pending_at.keys().next().copied().unwrap_or(next).min(next);
            // Durable before it is recorded: a replica killed later keeps
            // what is below the cursor (and its unflushed rest is pending).
            if let Err(e) = nexus.flush_leg(node).await {
                while copies.join_next().await.is_some() {}
                return Err(e);
            }
            let progress = client
                .report_rebuild_progress(pb::ReportRebuildProgressRequest {
                    volume_id: volume.to_string(),
                    node: node.to_string(),
                    generation: nexus.generation(),
                    done_bytes: done,
                    cursor: if cursor == u64::MAX { 0 } else { cursor },
                })
                .await;
            if let Err(s) = progress {
                tracing::debug!(error = %s.message(), "cannot record rebuild progress");
            }
        }
    }
    nexus.flush_leg(node).await?;
    client
        .report_rebuild_progress(pb::ReportRebuildProgressRequest {
            volume_id: volume.to_string(),
            node: node.to_string(),
            generation: nexus.generation(),
            done_bytes: done,
            cursor: 0,
        })
        .await
        .map_err(status)?;
    Ok((done, plan.full))
}

/// Reports a replica out before the nexus starts, retrying while the
/// metadata service is unavailable (for up to a minute).
async fn report_at_start(m: &MetaMembership, node: &str, generation: u64) -> Result<u64, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match m.fault(node, generation, Vec::new()).await {
            Ok(g) => return Ok(g),
            Err(FaultError::Deposed(why)) => {
                return Err(format!(
                    "the replica on {node} cannot be reported out: {why}"
                ))
            }
            Err(FaultError::Unavailable(why)) if std::time::Instant::now() > deadline => {
                return Err(format!("the metadata service is unavailable: {why}"))
            }
            Err(FaultError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// STARTTLS from a certificate folder (see `berth_proto::tls`).
pub fn nbd_tls(dir: &std::path::Path) -> Result<berth_nbd::client::TlsClient, String> {
    let t = berth_proto::TlsDir::load(dir).map_err(|e| format!("--tls-dir: {e}"))?;
    let cfg = t.rustls_client().map_err(|e| e.to_string())?;
    Ok(berth_nbd::client::TlsClient {
        connector: tokio_rustls::TlsConnector::from(cfg),
        server_name: rustls_pki_types::ServerName::try_from(berth_proto::tls::VOLUME_SERVER_NAME)
            .map_err(|e| e.to_string())?,
    })
}

struct DiskFs {
    /// One session, or a nexus over the replicas' sessions.
    session: Arc<dyn BlockTarget>,
    rt: tokio::runtime::Handle,
    read_only: bool,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

fn errno(nbd: u32) -> Errno {
    Errno::from_i32(i32::try_from(nbd).unwrap_or(libc::EIO))
}

impl DiskFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, size, perm, nlink) = if ino == DISK {
            let perm = if self.read_only { 0o400 } else { 0o600 };
            (FileType::RegularFile, self.session.size_bytes(), perm, 1)
        } else {
            (FileType::Directory, 0, 0o700, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// A long TRIM or WRITE_ZEROES, in pieces, answered once all are done.
    fn ranges(&self, offset: u64, length: u64, trim: bool, reply: ReplyEmpty) {
        let s = self.session.clone();
        self.rt.spawn(async move {
            let end = offset.saturating_add(length);
            let mut at = offset;
            while at < end {
                let len = (end - at).min(MAX_RANGE_BYTES) as u32;
                let cmd = if trim {
                    Cmd::Trim { offset: at, len }
                } else {
                    Cmd::WriteZeroes { offset: at, len }
                };
                if let Err(e) = call(&*s, cmd).await {
                    reply.error(errno(e));
                    return;
                }
                at += u64::from(len);
            }
            reply.ok();
        });
    }

    fn flush_to(&self, reply: ReplyEmpty) {
        if self.read_only {
            reply.ok();
            return;
        }
        self.session.submit(
            Cmd::Flush,
            Box::new(move |r| match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Direct I/O from the loop device may be asynchronous (many requests
        // in flight); writes of up to 1 MiB in one request.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(1 << 20);
        // The kernel's default of 12 background requests (a loop device's
        // direct I/O is background) held QD32 to 26K 4 KiB reads per second
        // on the 2-vCPU test VM; 128 gave 36K (as the volume server's own
        // FUSE frontend asks for).
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == FILE {
            reply.entry(&TTL, &self.attr(DISK), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == DISK || ino == INodeNo::ROOT {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The volume's size is the control plane's to change, not a truncate's.
        if ino == DISK && size.is_some_and(|s| s != self.session.size_bytes()) {
            reply.error(Errno::EPERM);
            return;
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        // No page cache for the file: the loop device above has its own.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = self.session.size_bytes();
        if offset >= end || size == 0 {
            reply.data(&[]);
            return;
        }
        let len = u64::from(size).min(end - offset) as u32;
        self.session.submit(
            Cmd::Read { offset, len },
            Box::new(move |r| match r {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        if offset.saturating_add(data.len() as u64) > self.session.size_bytes() {
            reply.error(Errno::EFBIG);
            return;
        }
        let n = data.len() as u32;
        self.session.submit(
            Cmd::Write {
                offset,
                data: Bytes::copy_from_slice(data),
            },
            Box::new(move |r| match r {
                Ok(_) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flush_to(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_to(reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        let size = self.session.size_bytes();
        let inside = offset.checked_add(length).is_some_and(|e| e <= size);
        let flags = self.session.flags();
        match mode & !FALLOC_FL_KEEP_SIZE {
            // Thin volumes have nothing to reserve.
            0 if inside => reply.ok(),
            FALLOC_FL_PUNCH_HOLE if inside && flags & TF_SEND_TRIM != 0 => {
                self.ranges(offset, length, true, reply)
            }
            FALLOC_FL_ZERO_RANGE if inside && flags & TF_SEND_WRITE_ZEROES != 0 => {
                self.ranges(offset, length, false, reply)
            }
            _ => reply.error(Errno::EOPNOTSUPP),
        }
    }

    // No ioctls (qemu-io asks for the device's geometry and block size):
    // ENOTTY, as a regular file answers, without fuser's warning for each.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    // No extended attributes. ENOSYS (not ENODATA) tells the kernel never to
    // ask again, instead of on every write (security.capability).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Connects to what `o.uri` names: one NBD session, or the nexus of a
/// replicated volume (which reports failed replicas, rebuilds the ones that
/// come back and pauses for snapshots for as long as it is open). Must run
/// within a tokio runtime, which then runs the nexus's work.
pub async fn open(o: &AttachOptions) -> Result<Arc<dyn BlockTarget>, String> {
    let tls = o.tls_dir.as_deref().map(nbd_tls).transpose()?;
    match ReplicatedSpec::parse(&o.uri) {
        Some(spec) => replicated(spec?, o, tls)
            .await
            .map_err(|e| format!("cannot attach the replicated volume: {e}")),
        None => {
            let uri = Uri::parse(&o.uri)?;
            let opts = Options {
                reconnect_timeout: o.reconnect_timeout,
                tls,
                ..Options::default()
            };
            let s = Session::connect(uri, opts)
                .await
                .map_err(|e| format!("cannot attach the export: {e}"))?;
            Ok(Arc::new(s))
        }
    }
}

/// Serves the export until the mount is unmounted (SIGTERM/SIGINT unmount
/// it, lazily if it is busy; or `fusermount3 -u`), then flushes and
/// disconnects.
pub fn run(o: AttachOptions) -> Result<(), String> {
    if let Some(l) = super::local::eligible(&o) {
        return super::local::run(&o, &l);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("berth-attach")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let session = rt.block_on(open(&o))?;
    if session.read_only() && !o.read_only {
        return Err("the export is read-only: attach it with --read-only".into());
    }
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let fs = DiskFs {
        session: session.clone(),
        rt: rt.handle().clone(),
        read_only: o.read_only,
        // SAFETY: getuid/getgid take no arguments and cannot fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        started: SystemTime::now(),
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("berth".into()),
        MountOption::Subtype("berth".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        if o.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    cfg.n_threads = Some(1);
    let mut fuse = fuser::Session::new(fs, &o.dir, &cfg)
        .map_err(|e| format!("cannot mount FUSE at {}: {e}", o.dir.display()))?;
    // The mount is ended through the session, once: fuser then knows it is
    // gone. Unmounted behind its back (fusermount3 from outside, as detach
    // used to), the session found it still mounted on its way out, unmounted
    // a second time and logged the failure.
    let mut unmounter = fuse.unmount_callable();
    if let Some(p) = &o.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    tracing::info!(
        dir = %o.dir.display(),
        size_bytes = session.size_bytes(),
        read_only = o.read_only,
        "serving the export"
    );
    let (s, dir) = (session.clone(), o.dir.clone());
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match s.refresh_size().await {
                    Ok(size) => tracing::info!(size_bytes = size, "export size refreshed"),
                    Err(e) => tracing::warn!(error = %e, "cannot refresh the export's size"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let failed = match tokio::task::spawn_blocking(move || unmounter.unmount()).await {
            Ok(r) => r.err(),
            Err(e) => Some(std::io::Error::other(e)),
        };
        if let Some(e) = failed {
            // Busy: a loop device (or a lazily unmounted filesystem above
            // one) still holds the file. Detached lazily, it stays served
            // until the last user lets go, and the session ends then.
            tracing::info!(error = %e, "the mount is busy: unmounting it lazily");
            let _ = tokio::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&dir)
                .status()
                .await;
        }
    });
    let served = fuse.run();
    let closed =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), session.close()).await });
    if let Some(p) = &o.pid_file {
        let _ = std::fs::remove_file(p);
    }
    served.map_err(|e| format!("FUSE session: {e}"))?;
    match closed {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("the final flush failed (NBD error {e})")),
        Err(_) => Err("the final flush timed out".into()),
    }
}
