//! The metadata service's state and operations, independent of gRPC types
//! where it can be.
//!
//! Every change follows one protocol so that a crash at any point leaves
//! nothing behind that reconcile cannot finish or undo:
//! 1. under the object's name lock, the catalog records the intent
//!    (`Creating` / `Deleting`) in a synced transaction;
//! 2. the volume server is asked (its calls are idempotent by name);
//! 3. the catalog records the outcome, in the same transaction as the audit
//!    entry that describes it.
//!
//! Creates whose step 3 never happened are undone by reconcile (nobody was
//! told the object exists); deletes are finished.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_catalog::audit::{self, AuditEntry, AuditLog};
use berth_catalog::records::{
    self, AttachmentRecord, NodeRecord, NodeState, PoolRecord, Record, SnapshotRecord, Source,
    State, VolumeRecord,
};
use berth_catalog::replication::{MembershipError, ReplicaSet, ReplicaState};
use berth_catalog::{CatalogStore, Txn};
use berth_proto::volume::v1 as vpb;
use berth_proto::volume::v1::volume_service_client::VolumeServiceClient;
use parking_lot::Mutex;
use tonic::transport::Channel;

use crate::error::{MetaError, Result};
use crate::fault;
use crate::placement::{self, Candidate};
use crate::tiers::{self, Spec, Tier};

/// The service's settings.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// How often volume servers are asked to report.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is marked down.
    pub node_timeout: Duration,
    /// How often every up node is compared with the catalog.
    pub reconcile_interval: Duration,
    /// How long a node may be down before its replicas are replaced
    /// elsewhere (None: only by `DrainNode`).
    pub replica_grace: Option<Duration>,
    /// Pool size multiplier for thin provisioning (1.0: never promise more
    /// than the disk holds).
    pub overcommit: f64,
    pub tiers: Vec<Tier>,
    /// Certificates for volume servers' `https://` control endpoints (their
    /// certificates must name [`berth_proto::tls::VOLUME_SERVER_NAME`]).
    pub volume_tls: Option<berth_proto::ClientTls>,
}

const BLOCK: u64 = 4096;
/// CSI leaves the size to the driver when it asks for 0 bytes.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Who the volume servers see as the caller (the person is appended).
pub const SERVER_CALLER_PREFIX: &str = "berth-metadata";
/// How long a snapshot waits for the nexus of a replicated volume to be
/// listening (it reconnects within a second or two of a restart).
const NEXUS_FIND_WITHIN: Duration = Duration::from_secs(5);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serializes operations on one name without a global lock.
#[derive(Debug, Default)]
pub struct NameLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug)]
pub struct NameGuard<'a> {
    locks: &'a NameLocks,
    key: String,
    entry: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut m = self.locks.map.lock();
        // Clones happen only under the map lock, so the count is exact: the
        // map's and ours mean nobody waits.
        if Arc::strong_count(&self.entry) == 2 {
            m.remove(&self.key);
        }
    }
}

impl NameLocks {
    pub async fn lock(&self, key: String) -> NameGuard<'_> {
        let entry = self.map.lock().entry(key.clone()).or_default().clone();
        let guard = entry.clone().lock_owned().await;
        NameGuard {
            locks: self,
            key,
            entry,
            guard: Some(guard),
        }
    }

    pub fn try_lock(&self, key: String) -> Option<NameGuard<'_>> {
        let entry = self.map.lock().entry(key.clone()).or_default().clone();
        let guard = entry.clone().try_lock_owned().ok();
        let g = NameGuard {
            locks: self,
            key,
            entry,
            guard,
        };
        // Dropping `g` without its guard still removes an unused entry.
        g.guard.is_some().then_some(g)
    }
}

/// Who asked for what, for the audit log. An operation that stores its
/// outcome with [`Meta::commit`] records its entry there; otherwise the
/// wrapper records one when it returns.
#[derive(Debug)]
pub struct Call {
    pub actor: String,
    pub action: &'static str,
    pub volume: String,
    pub target: String,
    recorded: AtomicBool,
}

impl Call {
    /// The caller's strings are kept bounded: a refused 4 MiB name must not
    /// become a 4 MiB audit entry.
    pub fn new(actor: &str, action: &'static str, volume: &str, target: &str) -> Self {
        use berth_proto::validate::{bounded, AUDIT_FIELD_BYTES};
        Call {
            actor: bounded(actor, AUDIT_FIELD_BYTES),
            action,
            volume: bounded(volume, AUDIT_FIELD_BYTES),
            target: bounded(target, AUDIT_FIELD_BYTES),
            recorded: AtomicBool::new(false),
        }
    }

    fn entry(&self, node: &str, result: &str, detail: String) -> AuditEntry {
        AuditEntry {
            time_ms: now_ms(),
            actor: self.actor.clone(),
            action: self.action.into(),
            volume: self.volume.clone(),
            target: self.target.clone(),
            node: node.into(),
            result: berth_proto::validate::bounded(result, berth_proto::validate::AUDIT_TEXT_BYTES),
            detail,
            ..AuditEntry::default()
        }
    }
}

/// What CreateVolume asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateVolume {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub parameters: BTreeMap<String, String>,
    pub requisite: Vec<BTreeMap<String, String>>,
    pub preferred: Vec<BTreeMap<String, String>>,
    pub source: Option<Source>,
}

/// A registering node.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub control_endpoint: String,
    pub nbd_address: String,
    pub nbd_socket: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    /// As the node reports it (`node` is the registering node).
    pub pool: PoolRecord,
}

/// A pool with what the catalog has promised from it.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub pool: PoolRecord,
    pub provisioned_bytes: u64,
    pub available_bytes: u64,
    pub node_up: bool,
}

pub struct Meta {
    pub store: Arc<dyn CatalogStore>,
    /// Catalog-changing calls in progress; shutdown waits for them.
    pub calls: tokio_util::task::TaskTracker,
    audit: Arc<AuditLog>,
    pub cfg: MetaConfig,
    /// Last heartbeat per node (monotonic clock).
    live: Mutex<HashMap<String, Instant>>,
    /// Latest pool reports, by pool id (persisted when they change shape).
    pools: Mutex<HashMap<String, PoolRecord>>,
    /// Sum of the catalog's volume sizes per pool.
    provisioned: Mutex<HashMap<String, u64>>,
    clients: Mutex<HashMap<String, (String, VolumeServiceClient<Channel>)>>,
    pub locks: NameLocks,
    /// Held from choosing a pool to recording the volume on it.
    placement: tokio::sync::Mutex<()>,
    /// Nodes a reconcile pass is running for.
    reconciling: Mutex<std::collections::HashSet<String>>,
    /// Calls between a catalog change of a volume's size and the matching
    /// change of `provisioned` (a recount then would count them wrong).
    changing: std::sync::atomic::AtomicUsize,
    /// The nexuses of replicated volumes, listening (see `nexus`).
    pub nexuses: crate::nexus::Nexuses,
}

/// Marks a call that changes `provisioned` as in progress.
struct Changing<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> MetaError {
    MetaError::InvalidArgument(msg.into())
}

/// The name of something new: the shared rule of
/// [`berth_proto::validate::name`] (letters, digits, '-', '_', '.'; at most
/// 128 bytes), so that what is created here can be staged by the node plugin
/// and stored by the server.
pub fn check_new_name(kind: &str, name: &str) -> Result<()> {
    berth_proto::validate::name(kind, name).map_err(invalid)
}

/// The name of something that may already exist: the rule names were
/// created under before [`check_new_name`] (non-empty, at most 128 bytes,
/// no whitespace, control characters, '/', '\\' or '@'), so that older
/// volumes and snapshots can still be found, expanded, unpublished and
/// deleted.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    use berth_proto::validate::{quote, MAX_NAME_BYTES};
    if name.is_empty() {
        return Err(invalid(format!("{kind} name is required")));
    }
    if name.len() > MAX_NAME_BYTES
        || name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '\\' | '@'))
    {
        return Err(invalid(format!(
            "{kind} name {} is longer than {MAX_NAME_BYTES} bytes or contains whitespace, \
             a control character, '/', '\\' or '@'",
            quote(name)
        )));
    }
    Ok(())
}

/// The size to give a volume asked for with CSI's capacity range.
fn size_for(required: u64, limit: u64, floor: u64) -> Result<u64> {
    if limit != 0 && limit < required {
        return Err(MetaError::OutOfRange(format!(
            "limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let want = if required == 0 && floor == 0 {
        if limit != 0 {
            DEFAULT_VOLUME_BYTES.min(limit)
        } else {
            DEFAULT_VOLUME_BYTES
        }
    } else {
        required.max(floor)
    };
    let size = berth_proto::validate::volume_bytes("the size", want, BLOCK)
        .map_err(MetaError::OutOfRange)?;
    if limit != 0 && size > limit {
        return Err(MetaError::OutOfRange(format!(
            "the volume needs {size} bytes (4 KiB multiples, never below its source), \
             above limit_bytes {limit}"
        )));
    }
    Ok(size)
}

/// The catalog's volume sizes summed per pool.
fn provisioned_by_pool(volumes: Vec<VolumeRecord>) -> HashMap<String, u64> {
    let mut m: HashMap<String, u64> = HashMap::new();
    for v in volumes {
        for (_, pool) in v.nodes() {
            *m.entry(pool).or_default() += v.size_bytes;
        }
    }
    m
}

/// The pools that are promised something.
fn nonzero(m: &HashMap<String, u64>) -> HashMap<&str, u64> {
    m.iter()
        .filter(|(_, b)| **b > 0)
        .map(|(p, b)| (p.as_str(), *b))
        .collect()
}

fn server_overrides(q: &records::QosRecord) -> vpb::QosOverrides {
    vpb::QosOverrides {
        iops_limit: Some(q.iops_limit),
        bytes_per_second_limit: Some(q.bytes_per_second_limit),
        burst_seconds: Some(q.burst_seconds),
    }
}

impl Meta {
    pub fn new(store: Arc<dyn CatalogStore>, cfg: MetaConfig) -> Result<Arc<Self>> {
        let now = Instant::now();
        let mut live = HashMap::new();
        for n in records::list::<NodeRecord>(&*store, None, 0)? {
            // A node that was up gets one timeout to report before it is
            // marked down: the service, not the node, was away.
            if n.state == NodeState::Up {
                live.insert(n.name, now);
            }
        }
        let pools = records::list::<PoolRecord>(&*store, None, 0)?
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        let provisioned = provisioned_by_pool(records::list::<VolumeRecord>(&*store, None, 0)?);
        Ok(Arc::new(Meta {
            store,
            calls: tokio_util::task::TaskTracker::new(),
            audit: Arc::new(AuditLog::new()),
            cfg,
            live: Mutex::new(live),
            pools: Mutex::new(pools),
            provisioned: Mutex::new(provisioned),
            clients: Mutex::new(HashMap::new()),
            locks: NameLocks::default(),
            placement: tokio::sync::Mutex::new(()),
            reconciling: Mutex::new(Default::default()),
            changing: std::sync::atomic::AtomicUsize::new(0),
            nexuses: crate::nexus::Nexuses::default(),
        }))
    }

    // ---- catalog access ---------------------------------------------------

    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>> {
        Ok(records::get::<R>(&*self.store, key)?)
    }

    /// Commits `txn` with `entries` on a blocking thread (a synced write);
    /// returns the entries as chained.
    async fn commit_entries(&self, txn: Txn, entries: Vec<AuditEntry>) -> Result<Vec<AuditEntry>> {
        let store = self.store.clone();
        let log = self.audit.clone();
        Ok(
            tokio::task::spawn_blocking(move || log.append(&*store, entries, txn))
                .await
                .map_err(|e| MetaError::Unavailable(format!("catalog task: {e}")))??,
        )
    }

    /// Stores a step that is not the outcome (an intent), without audit.
    async fn commit_intent(&self, txn: Txn) -> Result<()> {
        self.commit_entries(txn, Vec::new()).await.map(drop)
    }

    /// Stores an operation's outcome together with its audit entry.
    async fn commit(&self, call: &Call, txn: Txn, node: &str, detail: String) -> Result<()> {
        self.commit_entries(txn, vec![call.entry(node, "ok", detail)])
            .await?;
        call.recorded.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Records an entry on its own.
    pub async fn record(&self, entry: AuditEntry) -> Result<AuditEntry> {
        self.commit_entries(Txn::new(), vec![entry])
            .await?
            .pop()
            .ok_or_else(|| MetaError::Unavailable("audit append stored nothing".into()))
    }

    /// Runs a control call, making sure it leaves exactly one audit entry.
    pub async fn audited<T>(
        &self,
        call: Call,
        f: impl AsyncFnOnce(&Call) -> Result<T>,
    ) -> Result<T> {
        let r = f(&call).await;
        if !call.recorded.load(Ordering::Relaxed) {
            let entry = match &r {
                Ok(_) => call.entry("", "ok", String::new()),
                Err(e) => call.entry("", &e.to_string(), String::new()),
            };
            if let Err(e) = self.record(entry).await {
                tracing::error!(error = %e, action = call.action, "cannot append to the audit log");
            }
        }
        r
    }

    // ---- nodes --------------------------------------------------------------

    pub fn is_up(&self, node: &str) -> bool {
        self.live
            .lock()
            .get(node)
            .is_some_and(|t| t.elapsed() < self.cfg.node_timeout)
    }

    fn down_since(&self, node: &str) -> String {
        match self.live.lock().get(node) {
            Some(t) => format!("no heartbeat for {}s", t.elapsed().as_secs()),
            None => "no heartbeat since the metadata service started".into(),
        }
    }

    /// Fails with UNAVAILABLE, naming the node, unless it is up.
    fn require_up(&self, node: &str) -> Result<()> {
        if self.is_up(node) {
            Ok(())
        } else {
            Err(MetaError::Unavailable(format!(
                "volume server {node} is down ({})",
                self.down_since(node)
            )))
        }
    }

    /// A client for `node`'s volume server; UNAVAILABLE naming it if down.
    async fn server(&self, node: &str) -> Result<VolumeServiceClient<Channel>> {
        self.require_up(node)?;
        let rec: NodeRecord = self.get(node)?.ok_or_else(|| {
            MetaError::Unavailable(format!("volume server {node} is not registered"))
        })?;
        if let Some((ep, c)) = self.clients.lock().get(node) {
            if *ep == rec.control_endpoint {
                return Ok(c.clone());
            }
        }
        let ch = tokio::time::timeout(
            Duration::from_secs(5),
            berth_proto::channel(&rec.control_endpoint, self.cfg.volume_tls.as_ref()),
        )
        .await
        .map_err(|_| {
            MetaError::Unavailable(format!(
                "volume server {node} at {} did not answer within 5s",
                rec.control_endpoint
            ))
        })?
        .map_err(|e| {
            MetaError::Unavailable(format!(
                "volume server {node} at {} is unreachable: {e}",
                rec.control_endpoint
            ))
        })?;
        let c = VolumeServiceClient::new(ch);
        self.clients
            .lock()
            .insert(node.to_string(), (rec.control_endpoint, c.clone()));
        Ok(c)
    }

    pub async fn register_node(&self, actor: &str, r: Registration) -> Result<u32> {
        check_name("node", &r.name)?;
        if r.control_endpoint.is_empty() {
            return Err(invalid(format!(
                "node {}: control_endpoint is required (the metadata service calls it)",
                r.name
            )));
        }
        if r.pool.id.is_empty() {
            return Err(invalid(format!("node {}: pool.id is required", r.name)));
        }
        // Labels become CSI topology segments, which Kubernetes checks too.
        for (k, v) in &r.labels {
            berth_proto::validate::label(k, v)
                .map_err(|e| invalid(format!("node {}: {e}", r.name)))?;
        }
        if r.labels.len() > 64 {
            return Err(invalid(format!("node {}: more than 64 labels", r.name)));
        }
        if !r.pool.media.is_empty() {
            berth_proto::validate::name("pool media", &r.pool.media)
                .map_err(|e| invalid(format!("node {}: {e}", r.name)))?;
        }
        berth_proto::validate::name("pool id", &r.pool.id)
            .map_err(|e| invalid(format!("node {}: {e}", r.name)))?;
        for (field, v) in [
            ("control_endpoint", &r.control_endpoint),
            ("nbd_address", &r.nbd_address),
            ("nbd_socket", &r.nbd_socket),
        ] {
            if v.len() > 1024 || v.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "node {}: {field} {} is longer than 1024 bytes or has control characters",
                    r.name,
                    berth_proto::validate::quote(v)
                )));
            }
        }
        // Grants are bound to a node's NBD address; a wildcard would bind to nothing.
        if let Ok(a) = r.nbd_address.parse::<std::net::SocketAddr>() {
            if a.ip().is_unspecified() {
                return Err(invalid(format!(
                    "node {}: nbd_address {a} is a wildcard; advertise an address other hosts can dial",
                    r.name
                )));
            }
        }
        // The audit puller moves the node's cursor concurrently: write by
        // compare-and-swap and start over if it moved.
        for _ in 0..5 {
            match self.try_register(actor, &r).await {
                Err(MetaError::Catalog(berth_catalog::CatalogError::Conflict { .. })) => continue,
                other => return other.map(|()| self.cfg.heartbeat_interval.as_millis() as u32),
            }
        }
        Err(MetaError::Aborted(format!(
            "node {}: its record kept changing; retry",
            r.name
        )))
    }

    async fn try_register(&self, actor: &str, r: &Registration) -> Result<()> {
        let old: Option<NodeRecord> = self.get(&r.name)?;
        let rec = NodeRecord {
            name: r.name.clone(),
            control_endpoint: r.control_endpoint.clone(),
            nbd_address: r.nbd_address.clone(),
            nbd_socket: r.nbd_socket.clone(),
            labels: r.labels.clone(),
            version: r.version.clone(),
            pool_id: r.pool.id.clone(),
            state: NodeState::Up,
            registered_ms: old.as_ref().map_or_else(now_ms, |o| o.registered_ms),
            last_heartbeat_ms: now_ms(),
            audit_cursor: old.as_ref().map_or(0, |o| o.audit_cursor),
            audit_pool_id: old
                .as_ref()
                .map_or_else(String::new, |o| o.audit_pool_id.clone()),
            cordoned: old.as_ref().is_some_and(|o| o.cordoned),
        };
        let pool = r.pool.clone();
        if let Some(o) = old.as_ref().filter(|o| o.pool_id != rec.pool_id) {
            tracing::warn!(node = %rec.name, old_pool = %o.pool_id, new_pool = %rec.pool_id,
                "node came back with a different pool; volumes of the old pool are gone");
        }
        let changed = old.as_ref().is_none_or(|o| {
            NodeRecord {
                last_heartbeat_ms: rec.last_heartbeat_ms,
                ..o.clone()
            } != rec
        });
        let txn = match &old {
            Some(o) => rec.replace(o),
            None => rec.create(),
        }
        .merge(pool.put());
        if changed {
            let call = Call::new(actor, "RegisterNode", "", &r.name);
            let detail = format!(
                "control {} nbd {} pool {} ({} bytes)",
                rec.control_endpoint, rec.nbd_address, pool.id, pool.total_bytes
            );
            self.commit(&call, txn, &r.name, detail).await?;
            tracing::info!(node = %r.name, "node registered");
        } else {
            self.commit_intent(txn).await?;
        }
        self.live.lock().insert(r.name.clone(), Instant::now());
        self.pools.lock().insert(pool.id.clone(), pool);
        self.clients.lock().remove(&r.name);
        Ok(())
    }

    /// Returns false when the node is unknown (it must register).
    pub async fn heartbeat(&self, name: &str, p: PoolRecord) -> Result<bool> {
        let Some(rec) = self.get::<NodeRecord>(name)? else {
            return Ok(false);
        };
        if rec.pool_id != p.id {
            // A new pool behind the same name: register again, say so.
            return Ok(false);
        }
        self.live.lock().insert(name.to_string(), Instant::now());
        let reshaped = self
            .pools
            .lock()
            .insert(p.id.clone(), p.clone())
            .is_none_or(|o| o.total_bytes != p.total_bytes || o.media != p.media);
        if reshaped {
            self.commit_intent(p.put()).await?;
        }
        if rec.state == NodeState::Down {
            self.set_node_state(rec, NodeState::Up).await?;
        }
        Ok(true)
    }

    async fn set_node_state(&self, rec: NodeRecord, state: NodeState) -> Result<()> {
        let name = rec.name.clone();
        let new = NodeRecord {
            state,
            last_heartbeat_ms: now_ms(),
            ..rec.clone()
        };
        let (action, detail) = match state {
            NodeState::Up => ("NodeUp", "heartbeats resumed".to_string()),
            NodeState::Down => ("NodeDown", self.down_since(&name)),
        };
        let call = Call::new("berth-metadata", action, "", &name);
        let r = self
            .commit(&call, new.replace(&rec), &name, detail.clone())
            .await;
        if r.is_ok() {
            match state {
                NodeState::Up => tracing::info!(node = %name, "node is up again"),
                NodeState::Down => tracing::warn!(node = %name, %detail, "node marked down"),
            }
        }
        // Someone else moved it first (register, another tick): fine.
        lost_race_is_fine(r)
    }

    /// Marks silent nodes down; returns the nodes that are up.
    pub async fn check_nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut up = Vec::new();
        for n in records::list::<NodeRecord>(&*self.store, None, 0)? {
            let alive = self.is_up(&n.name);
            match (n.state, alive) {
                (NodeState::Up, false) => self.set_node_state(n, NodeState::Down).await?,
                (NodeState::Down, true) => {
                    self.set_node_state(n.clone(), NodeState::Up).await?;
                    up.push(n);
                }
                (NodeState::Up, true) => up.push(n),
                (NodeState::Down, false) => {}
            }
        }
        Ok(up)
    }

    pub fn nodes(&self) -> Result<Vec<(NodeRecord, bool)>> {
        Ok(records::list::<NodeRecord>(&*self.store, None, 0)?
            .into_iter()
            .map(|n| {
                let up = self.is_up(&n.name);
                (n, up)
            })
            .collect())
    }

    pub fn pool_views(&self) -> Result<Vec<PoolView>> {
        let nodes: HashMap<String, NodeRecord> =
            records::list::<NodeRecord>(&*self.store, None, 0)?
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect();
        let prov = self.provisioned.lock().clone();
        let mut out: Vec<PoolView> = self
            .pools
            .lock()
            .values()
            // A node's current pool only; replaced pools are history.
            .filter(|p| nodes.get(&p.node).is_some_and(|n| n.pool_id == p.id))
            .map(|p| {
                let provisioned = prov.get(&p.id).copied().unwrap_or(0);
                let c = self.candidate(&nodes[&p.node], p, provisioned);
                PoolView {
                    pool: p.clone(),
                    provisioned_bytes: provisioned,
                    available_bytes: c.available(self.cfg.overcommit),
                    node_up: c.up,
                }
            })
            .collect();
        out.sort_by(|a, b| a.pool.node.cmp(&b.pool.node));
        Ok(out)
    }

    fn candidate(&self, n: &NodeRecord, p: &PoolRecord, provisioned: u64) -> Candidate {
        Candidate {
            node: n.name.clone(),
            pool_id: p.id.clone(),
            up: self.is_up(&n.name),
            labels: n.labels.clone(),
            media: p.media.clone(),
            total_bytes: p.total_bytes,
            provisioned_bytes: provisioned,
            used_bytes: p.used_bytes,
        }
    }

    fn candidates(&self) -> Result<Vec<Candidate>> {
        Ok(self
            .pool_views()?
            .into_iter()
            .filter_map(|v| {
                let n: NodeRecord = self.get(&v.pool.node).ok().flatten()?;
                // A drained node takes nothing new.
                (!n.cordoned).then(|| self.candidate(&n, &v.pool, v.provisioned_bytes))
            })
            .collect())
    }

    fn changing(&self) -> Changing<'_> {
        self.changing.fetch_add(1, Ordering::SeqCst);
        Changing(&self.changing)
    }

    fn reserve(&self, pool: &str, delta: i128) {
        let mut m = self.provisioned.lock();
        let e = m.entry(pool.to_string()).or_default();
        *e = (*e as i128 + delta).max(0) as u64;
        // A pool whose volumes are all gone has no entry, as in a recount.
        if *e == 0 {
            m.remove(pool);
        }
    }

    pub fn capacity(
        &self,
        segment: &BTreeMap<String, String>,
        params: &BTreeMap<String, String>,
    ) -> Result<(u64, u64)> {
        let spec = tiers::resolve(&self.cfg.tiers, params)?;
        let (mut total, mut max) = (0u64, 0u64);
        for c in self.candidates()? {
            if c.up
                && placement::in_segment(&c.labels, segment)
                && placement::media_allowed(&c.media, &spec.media)
            {
                let a = c.available(self.cfg.overcommit);
                total += a;
                max = max.max(a);
            }
        }
        Ok((total, max))
    }

    // ---- volumes ------------------------------------------------------------

    fn spec_of(&self, v: &VolumeRecord) -> Result<Spec> {
        tiers::resolve(&self.cfg.tiers, &v.parameters)
    }

    /// Why an existing volume does not match a create request, if it does not.
    fn incompatibility(v: &VolumeRecord, req: &CreateVolume) -> Option<String> {
        if v.size_bytes < req.required_bytes {
            return Some(format!(
                "it has {} bytes, {} were asked",
                v.size_bytes, req.required_bytes
            ));
        }
        if req.limit_bytes != 0 && v.size_bytes > req.limit_bytes {
            return Some(format!(
                "it has {} bytes, above limit_bytes {}",
                v.size_bytes, req.limit_bytes
            ));
        }
        if v.parameters != req.parameters {
            // Each differing parameter with both values, so the caller sees
            // what to change rather than a map to diff by eye.
            let keys: std::collections::BTreeSet<&String> =
                v.parameters.keys().chain(req.parameters.keys()).collect();
            let value = |m: &BTreeMap<String, String>, k: &String| {
                m.get(k).map_or("unset".to_string(), |x| format!("{x:?}"))
            };
            let diffs: Vec<String> = keys
                .into_iter()
                .filter(|k| v.parameters.get(*k) != req.parameters.get(*k))
                .map(|k| {
                    format!(
                        "parameter {k} is {} on it, {} in this request",
                        value(&v.parameters, k),
                        value(&req.parameters, k)
                    )
                })
                .collect();
            return Some(diffs.join("; "));
        }
        if v.source != req.source {
            return Some(format!("it was created from {:?}", v.source));
        }
        if !placement::in_topology(&v.topology, &req.requisite) {
            return Some(format!(
                "it lives on node {}, outside the requested topology",
                v.node
            ));
        }
        None
    }

    pub async fn create_volume(&self, call: &Call, req: CreateVolume) -> Result<VolumeRecord> {
        let _changing = self.changing();
        check_new_name("volume", &req.name)?;
        let spec = tiers::resolve(&self.cfg.tiers, &req.parameters)?;
        let _name = self.locks.lock(format!("v:{}", req.name)).await;
        if let Some(v) = self.get::<VolumeRecord>(&req.name)? {
            if let Some(why) = Self::incompatibility(&v, &req) {
                return Err(MetaError::AlreadyExists(format!(
                    "volume {} already exists and differs: {why}",
                    req.name
                )));
            }
            return match v.state {
                State::Ready => Ok(v),
                // Left by a crash before reconcile saw it: finish it now.
                State::Creating => self.finish_create(call, &spec, v).await,
                State::Deleting => Err(MetaError::FailedPrecondition(format!(
                    "volume {} is being deleted; retry once it is gone",
                    req.name
                ))),
            };
        }
        if let Some(Source::Volume(v)) = &req.source {
            if self
                .get::<VolumeRecord>(v)?
                .is_some_and(|v| v.replicas.is_some())
            {
                return Err(MetaError::FailedPrecondition(format!(
                    "volume {v} is replicated: snapshot it and clone the snapshot (a \
                     snapshot is taken on every copy in sync at one point)"
                )));
            }
        }
        // Clones live on their source's pool: that is what makes them O(1).
        // A replicated snapshot's clone is replicated on the same copies.
        let mut source_copies: Vec<(String, String)> = Vec::new();
        let (floor, placed) = match &req.source {
            Some(Source::Snapshot(s)) => {
                let snap: SnapshotRecord = self.get(s)?.ok_or_else(|| {
                    MetaError::NotFound(format!("source snapshot {s} does not exist"))
                })?;
                if snap.state != State::Ready {
                    return Err(MetaError::FailedPrecondition(format!(
                        "source snapshot {s} is not ready ({:?})",
                        snap.state
                    )));
                }
                let copies = snap.copies.len().max(1);
                let asked = req.parameters.contains_key("replicas");
                if (asked && spec.replicas != copies) || (!asked && spec.replicas > copies) {
                    return Err(MetaError::FailedPrecondition(format!(
                        "volume {}: a clone has its snapshot's copies ({copies}, snapshot {s} is \
                         on {}); {} replicas cannot be made from it",
                        req.name,
                        snap.nodes()
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        spec.replicas
                    )));
                }
                source_copies = snap.copies.clone();
                (snap.size_bytes, Some((snap.node, snap.pool_id)))
            }
            Some(Source::Volume(src)) => {
                let v: VolumeRecord = self.get(src)?.ok_or_else(|| {
                    MetaError::NotFound(format!("source volume {src} does not exist"))
                })?;
                if v.state != State::Ready {
                    return Err(MetaError::FailedPrecondition(format!(
                        "source volume {src} is not ready ({:?})",
                        v.state
                    )));
                }
                (v.size_bytes, Some((v.node, v.pool_id)))
            }
            None => (0, None),
        };
        let size = size_for(req.required_bytes, req.limit_bytes, floor)?;
        let record = {
            let _placing = self.placement.lock().await;
            let cands = self.candidates()?;
            let mut copies: Vec<(String, String)> = Vec::new();
            let (node, pool_id) = match placed {
                Some((node, pool_id)) => {
                    let on = if source_copies.is_empty() {
                        vec![(node.clone(), pool_id.clone())]
                    } else {
                        source_copies.clone()
                    };
                    for (node, pool_id) in &on {
                        self.require_up(node)?;
                        let c = cands
                            .iter()
                            .find(|c| c.pool_id == *pool_id)
                            .ok_or_else(|| {
                                MetaError::Unavailable(format!(
                                "the source's pool {pool_id} on node {node} is no longer reported"
                            ))
                            })?;
                        if !placement::in_topology(&c.labels, &req.requisite) {
                            return Err(MetaError::Unplaceable(format!(
                                "the source lives on node {node}, outside the requested topology \
                                 (a clone must stay on its source's pool)"
                            )));
                        }
                        if c.available(self.cfg.overcommit) < size {
                            return Err(MetaError::Unplaceable(format!(
                                "pool {pool_id} on node {node}, where the source lives, has {} \
                                 bytes left to promise; the clone needs {size}",
                                c.available(self.cfg.overcommit)
                            )));
                        }
                    }
                    if on.len() > 1 {
                        copies = on;
                    }
                    (node, pool_id)
                }
                None => {
                    let r = placement::Request {
                        size_bytes: size,
                        requisite: req.requisite.clone(),
                        preferred: req.preferred.clone(),
                        media: spec.media.clone(),
                    };
                    let picked = placement::choose_n(
                        &cands,
                        &r,
                        self.cfg.overcommit,
                        spec.replicas,
                        spec.spread.as_deref(),
                    )
                    .map_err(|why| {
                        MetaError::Unplaceable(format!("cannot place volume {}: {why}", req.name))
                    })?;
                    copies = picked
                        .iter()
                        .map(|&i| (cands[i].node.clone(), cands[i].pool_id.clone()))
                        .collect();
                    copies[0].clone()
                }
            };
            let replicas = if copies.len() > 1 {
                Some(ReplicaSet::new(&copies)?)
            } else {
                None
            };
            let labels = |n: &str| -> Result<BTreeMap<String, String>> {
                Ok(self
                    .get::<NodeRecord>(n)?
                    .map(|n| n.labels)
                    .unwrap_or_default())
            };
            let topology = labels(&node)?;
            let copy_topology = match &replicas {
                Some(_) => copies
                    .iter()
                    .map(|(n, _)| labels(n))
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            let record = VolumeRecord {
                id: req.name.clone(),
                size_bytes: size,
                tier: spec.tier.name.clone(),
                parameters: req.parameters.clone(),
                qos: spec.qos(size),
                fs_type: spec.fs_type.clone(),
                node,
                pool_id,
                source: req.source.clone(),
                state: State::Creating,
                topology,
                copy_topology,
                created_ms: now_ms(),
                condition: String::new(),
                replicas,
            };
            // Reserved under the placement lock, so the next placement sees
            // it; made durable after, so creates do not queue behind each
            // other's fsync (recount waits while `_changing` is held).
            self.reserve_copies(&record, i128::from(size));
            record
        };
        if let Err(e) = self.commit_intent(record.create()).await {
            self.reserve_copies(&record, -i128::from(size));
            return Err(e);
        }
        fault::point("create-volume:after-catalog");
        self.finish_create(call, &spec, record).await
    }

    /// Steps 2 and 3 of a create: the volume server, then the outcome.
    async fn finish_create(
        &self,
        call: &Call,
        spec: &Spec,
        rec: VolumeRecord,
    ) -> Result<VolumeRecord> {
        let made = self.create_on_server(call, spec, &rec).await;
        if let Err(e) = made {
            // Nobody was told the volume exists: undo, unless the node is out
            // of reach (reconcile will undo it when it is back).
            if !matches!(e, MetaError::Unavailable(_)) {
                let owns_it = !matches!(
                    &e,
                    MetaError::Server {
                        code: tonic::Code::AlreadyExists,
                        ..
                    }
                );
                if let Err(undo) = self.undo_create(&rec, owns_it).await {
                    tracing::warn!(volume = %rec.id, error = %undo, "could not undo a failed create; reconcile will");
                }
            }
            return Err(e);
        }
        fault::point("create-volume:after-server");
        let ready = VolumeRecord {
            state: State::Ready,
            ..rec.clone()
        };
        let detail = format!(
            "{} bytes, tier {}, pool {}{}",
            ready.size_bytes,
            ready.tier,
            ready.pool_id,
            match &ready.source {
                Some(Source::Snapshot(s)) => format!(", from snapshot {s}"),
                Some(Source::Volume(v)) => format!(", from volume {v}"),
                None => String::new(),
            }
        );
        self.commit(call, ready.replace(&rec), &ready.node, detail)
            .await?;
        tracing::info!(volume = %ready.id, node = %ready.node, size = ready.size_bytes, "volume created");
        Ok(ready)
    }

    /// Creates the volume on each of its nodes (every copy of a replicated
    /// one), in order; the first failure stops it.
    async fn create_on_server(&self, call: &Call, spec: &Spec, rec: &VolumeRecord) -> Result<()> {
        for (node, _) in rec.nodes() {
            self.create_on(call, spec, rec, &node).await?;
        }
        Ok(())
    }

    async fn create_on(
        &self,
        call: &Call,
        spec: &Spec,
        rec: &VolumeRecord,
        node: &str,
    ) -> Result<()> {
        let mut c = self.server(node).await?;
        let class = tiers::server_class(spec.tier.priority).to_string();
        let overrides = Some(server_overrides(&rec.qos));
        let r = match &rec.source {
            None => {
                c.create_volume(server_req(
                    call,
                    vpb::CreateVolumeRequest {
                        name: rec.id.clone(),
                        size_bytes: rec.size_bytes,
                        tier: class,
                        overrides,
                    },
                ))
                .await
            }
            Some(src) => {
                use vpb::clone_volume_request::Source as S;
                let source = match src {
                    Source::Snapshot(s) => S::Snapshot(s.clone()),
                    Source::Volume(v) => S::Volume(v.clone()),
                };
                c.clone_volume(server_req(
                    call,
                    vpb::CloneVolumeRequest {
                        name: rec.id.clone(),
                        source: Some(source),
                        size_bytes: rec.size_bytes,
                        tier: class,
                        overrides,
                    },
                ))
                .await
            }
        };
        r.map(|_| ()).map_err(|s| MetaError::server(node, &s))
    }

    /// Reserves (or returns) `delta` bytes on every pool holding a copy.
    fn reserve_copies(&self, v: &VolumeRecord, delta: i128) {
        for (_, pool) in v.nodes() {
            self.reserve(&pool, delta);
        }
    }

    /// Removes a half-created volume: from its server (when it is ours), then
    /// from the catalog.
    async fn undo_create(&self, rec: &VolumeRecord, on_server: bool) -> Result<()> {
        let _changing = self.changing();
        if on_server {
            self.delete_on_server(&rec.node, &rec.id, "reconcile")
                .await?;
        }
        // The other copies, wherever the create got to (gone is fine).
        for (node, _) in rec.nodes().iter().skip(1) {
            self.delete_on_server(node, &rec.id, "reconcile").await?;
        }
        self.commit_intent(rec.remove()).await?;
        self.reserve_copies(rec, -i128::from(rec.size_bytes));
        Ok(())
    }

    async fn delete_on_server(&self, node: &str, volume: &str, actor: &str) -> Result<()> {
        let mut c = self.server(node).await?;
        let call = Call::new(actor, "DeleteVolume", volume, "");
        match c
            .delete_volume(server_req(
                &call,
                vpb::DeleteVolumeRequest {
                    name: volume.into(),
                },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(MetaError::server(node, &s)),
        }
    }

    pub async fn delete_volume(&self, call: &Call, id: &str) -> Result<()> {
        let _changing = self.changing();
        check_name("volume", id)?;
        let _name = self.locks.lock(format!("v:{id}")).await;
        let Some(v) = self.get::<VolumeRecord>(id)? else {
            return Ok(()); // Already gone: deleting is idempotent.
        };
        let attached = self.attachments(id)?;
        if !attached.is_empty() {
            let nodes: Vec<&str> = attached.iter().map(|a| a.node.as_str()).collect();
            return Err(MetaError::FailedPrecondition(format!(
                "volume {id} is published to node(s) {}; unpublish it first",
                nodes.join(", ")
            )));
        }
        for (node, _) in v.nodes() {
            self.require_up(&node)?;
        }
        let deleting = VolumeRecord {
            state: State::Deleting,
            ..v.clone()
        };
        if v.state != State::Deleting {
            self.commit_intent(deleting.replace(&v)).await?;
        }
        fault::point("delete-volume:after-catalog");
        for (node, _) in v.nodes() {
            if let Err(e) = self.delete_on_server(&node, id, &call.actor).await {
                if !matches!(e, MetaError::Unavailable(_)) && v.state == State::Ready {
                    // The server refused (in use...): the volume stays as it
                    // was (copies deleted before it are recreated by nobody:
                    // the volume is marked deleting and a retry finishes it).
                    if node == v.node {
                        self.commit_intent(v.replace(&deleting)).await?;
                    }
                }
                return Err(e);
            }
        }
        self.commit(
            call,
            deleting.remove(),
            &v.node,
            format!("{} bytes freed", v.size_bytes),
        )
        .await?;
        self.reserve_copies(&v, -i128::from(v.size_bytes));
        tracing::info!(volume = %id, node = %v.node, "volume deleted");
        Ok(())
    }

    fn ready_volume(&self, id: &str) -> Result<VolumeRecord> {
        let v: VolumeRecord = self
            .get(id)?
            .ok_or_else(|| MetaError::NotFound(format!("volume {id} does not exist")))?;
        if v.state != State::Ready {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {id} is {:?}, not ready",
                v.state
            )));
        }
        Ok(v)
    }

    /// Applies a volume's limits on its server, live.
    async fn push_qos(&self, call: &Call, v: &VolumeRecord, spec: &Spec) -> Result<()> {
        let mut c = self.server(&v.node).await?;
        c.set_qos(server_req(
            call,
            vpb::SetQosRequest {
                volume: v.id.clone(),
                tier: tiers::server_class(spec.tier.priority).to_string(),
                overrides: Some(server_overrides(&v.qos)),
                clear_overrides: true,
            },
        ))
        .await
        .map_err(|s| MetaError::server(&v.node, &s))?;
        Ok(())
    }

    pub async fn expand_volume(
        &self,
        call: &Call,
        id: &str,
        required: u64,
        limit: u64,
    ) -> Result<VolumeRecord> {
        let _changing = self.changing();
        check_name("volume", id)?;
        let _name = self.locks.lock(format!("v:{id}")).await;
        let v = self.ready_volume(id)?;
        if required <= v.size_bytes {
            if limit != 0 && v.size_bytes > limit {
                return Err(MetaError::OutOfRange(format!(
                    "volume {id} already has {} bytes, above limit_bytes {limit}; volumes do not shrink",
                    v.size_bytes
                )));
            }
            return Ok(v);
        }
        let size = size_for(required, limit, 0)?;
        self.require_up(&v.node)?;
        {
            let _placing = self.placement.lock().await;
            let room = self
                .candidates()?
                .into_iter()
                .find(|c| c.pool_id == v.pool_id)
                .map_or(0, |c| c.available(self.cfg.overcommit));
            let delta = size - v.size_bytes;
            if room < delta {
                return Err(MetaError::Unplaceable(format!(
                    "pool {} on node {} can promise {room} more bytes; growing volume {id} needs {delta}",
                    v.pool_id, v.node
                )));
            }
            self.reserve(&v.pool_id, i128::from(delta));
        }
        let spec = self.spec_of(&v)?;
        let grown = VolumeRecord {
            size_bytes: size,
            qos: spec.qos(size),
            ..v.clone()
        };
        let r = async {
            let mut c = self.server(&v.node).await?;
            c.resize_volume(server_req(
                call,
                vpb::ResizeVolumeRequest {
                    name: id.to_string(),
                    size_bytes: size,
                },
            ))
            .await
            .map_err(|s| MetaError::server(&v.node, &s))?;
            // Limits scale with size.
            self.push_qos(call, &grown, &spec).await
        }
        .await;
        if let Err(e) = r {
            self.reserve(&v.pool_id, -i128::from(size - v.size_bytes));
            return Err(e);
        }
        let detail = format!("{} -> {size} bytes", v.size_bytes);
        if let Err(e) = self.commit(call, grown.replace(&v), &v.node, detail).await {
            // The server grew; reconcile adopts its size and counts it then.
            self.reserve(&v.pool_id, -i128::from(size - v.size_bytes));
            return Err(e);
        }
        Ok(grown)
    }

    pub async fn modify_volume(
        &self,
        call: &Call,
        id: &str,
        changes: BTreeMap<String, String>,
    ) -> Result<VolumeRecord> {
        check_name("volume", id)?;
        tiers::check_mutable(&changes)?;
        let _name = self.locks.lock(format!("v:{id}")).await;
        let v = self.ready_volume(id)?;
        let mut params = v.parameters.clone();
        for (k, val) in &changes {
            if val.is_empty() {
                params.remove(k);
            } else {
                params.insert(k.clone(), val.clone());
            }
        }
        let spec = tiers::resolve(&self.cfg.tiers, &params)?;
        let new = VolumeRecord {
            tier: spec.tier.name.clone(),
            qos: spec.qos(v.size_bytes),
            parameters: params,
            ..v.clone()
        };
        if new == v {
            return Ok(v);
        }
        self.push_qos(call, &new, &spec).await?;
        let detail = format!(
            "tier {} -> {}, iops {} -> {}, bytes/s {} -> {}",
            v.tier,
            new.tier,
            v.qos.iops_limit,
            new.qos.iops_limit,
            v.qos.bytes_per_second_limit,
            new.qos.bytes_per_second_limit
        );
        self.commit(call, new.replace(&v), &v.node, detail).await?;
        Ok(new)
    }

    /// A volume with its condition as of now (a down node makes it abnormal).
    pub fn volume_view(&self, mut v: VolumeRecord) -> VolumeRecord {
        if let Some(set) = v.replicas.as_ref().filter(|s| s.degraded()) {
            if v.condition.is_empty() {
                let out: Vec<String> = set
                    .replicas()
                    .iter()
                    .filter(|r| r.state != berth_catalog::replication::ReplicaState::InSync)
                    .map(|r| format!("{} {:?}", r.node, r.state).to_lowercase())
                    .collect();
                v.condition = format!(
                    "degraded: {} of {} replicas in sync at generation {} ({})",
                    set.counted().count(),
                    set.replicas().len(),
                    set.generation(),
                    out.join(", ")
                );
            }
            return v;
        }
        if v.condition.is_empty() && !self.is_up(&v.node) {
            v.condition = format!(
                "volume server {} is down ({})",
                v.node,
                self.down_since(&v.node)
            );
        }
        v
    }

    // ---- snapshots ----------------------------------------------------------

    pub async fn create_snapshot(
        &self,
        call: &Call,
        name: &str,
        source: &str,
    ) -> Result<SnapshotRecord> {
        check_new_name("snapshot", name)?;
        check_name("source volume", source)?;
        let _name = self.locks.lock(format!("s:{name}")).await;
        let rec = match self.get::<SnapshotRecord>(name)? {
            Some(s) if s.source_volume != source => {
                return Err(MetaError::AlreadyExists(format!(
                    "snapshot {name} already exists, of volume {}",
                    s.source_volume
                )))
            }
            Some(s) if s.state == State::Ready => return Ok(s),
            Some(s) if s.state == State::Deleting => {
                return Err(MetaError::FailedPrecondition(format!(
                    "snapshot {name} is being deleted; retry once it is gone"
                )))
            }
            Some(s) => s,
            None => {
                let v = self.ready_volume(source)?;
                // A replicated volume's snapshot is taken on every copy in
                // sync (each holds every acknowledged write) at one point:
                // its nexus pauses meanwhile.
                let copies: Vec<(String, String)> = match &v.replicas {
                    Some(set) => {
                        let c: Vec<(String, String)> = set
                            .readable()
                            .map(|r| (r.node.clone(), r.pool_id.clone()))
                            .collect();
                        for (n, _) in &c {
                            self.require_up(n)?;
                        }
                        c
                    }
                    None => Vec::new(),
                };
                let (node, pool_id) = copies
                    .first()
                    .cloned()
                    .unwrap_or_else(|| (v.node.clone(), v.pool_id.clone()));
                self.require_up(&node)?;
                let rec = SnapshotRecord {
                    id: name.to_string(),
                    source_volume: source.to_string(),
                    size_bytes: v.size_bytes,
                    node,
                    pool_id,
                    state: State::Creating,
                    created_ms: now_ms(),
                    copies,
                };
                self.commit_intent(rec.create()).await?;
                rec
            }
        };
        fault::point("create-snapshot:after-catalog");
        let made = async {
            // A replicated volume in use: its nexus pauses while every copy
            // takes the snapshot.
            let _pause = match self.writer_of(&rec)? {
                Some(nexus_node) => Some(
                    self.nexuses
                        .pause(
                            source,
                            &nexus_node,
                            &format!("snapshot {name}"),
                            NEXUS_FIND_WITHIN,
                        )
                        .await?,
                ),
                None => None,
            };
            for (node, _) in rec.nodes() {
                let mut c = self.server(&node).await?;
                c.create_snapshot(server_req(
                    call,
                    vpb::CreateSnapshotRequest {
                        volume: source.to_string(),
                        name: name.to_string(),
                    },
                ))
                .await
                .map_err(|s| MetaError::server(&node, &s))?;
            }
            Ok::<(), MetaError>(())
        }
        .await;
        if let Err(e) = made {
            // Undone on every copy that may have it; one out of reach is
            // reconcile's (the intent stays).
            let mut undone = true;
            for (node, _) in rec.nodes() {
                if self
                    .delete_snapshot_on_server(call, &node, name)
                    .await
                    .is_err()
                {
                    undone = false;
                }
            }
            if undone {
                self.commit_intent(rec.remove()).await?;
            }
            return Err(e);
        }
        fault::point("create-snapshot:after-server");
        let ready = SnapshotRecord {
            state: State::Ready,
            ..rec.clone()
        };
        let detail = if rec.copies.is_empty() {
            format!("of {} bytes", rec.size_bytes)
        } else {
            format!(
                "of {} bytes, on every copy in sync at one point: {}",
                rec.size_bytes,
                rec.copies
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        self.commit(call, ready.replace(&rec), &rec.node, detail)
            .await?;
        Ok(ready)
    }

    /// The node whose nexus writes the replicated volume a snapshot is of,
    /// if it is attached read-write.
    fn writer_of(&self, s: &SnapshotRecord) -> Result<Option<String>> {
        if s.copies.is_empty() {
            return Ok(None);
        }
        Ok(self
            .attachments(&s.source_volume)?
            .into_iter()
            .find(|a| !a.read_only && a.state == State::Ready && !a.legs.is_empty())
            .map(|a| a.node))
    }

    pub async fn delete_snapshot(&self, call: &Call, id: &str) -> Result<()> {
        check_name("snapshot", id)?;
        let _name = self.locks.lock(format!("s:{id}")).await;
        let Some(s) = self.get::<SnapshotRecord>(id)? else {
            return Ok(());
        };
        for (node, _) in s.nodes() {
            self.require_up(&node)?;
        }
        let deleting = SnapshotRecord {
            state: State::Deleting,
            ..s.clone()
        };
        if s.state != State::Deleting {
            self.commit_intent(deleting.replace(&s)).await?;
        }
        for (node, _) in s.nodes() {
            self.delete_snapshot_on_server(call, &node, id).await?;
        }
        self.commit(call, deleting.remove(), &s.node, String::new())
            .await
    }

    /// Deletes a snapshot on its server; one already gone is fine.
    async fn delete_snapshot_on_server(&self, call: &Call, node: &str, id: &str) -> Result<()> {
        let mut c = self.server(node).await?;
        match c
            .delete_snapshot(server_req(
                call,
                vpb::DeleteSnapshotRequest { name: id.into() },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(st) if st.code() == tonic::Code::NotFound => Ok(()),
            Err(st) => Err(MetaError::server(node, &st)),
        }
    }

    // ---- attachments --------------------------------------------------------

    pub fn attachments(&self, volume: &str) -> Result<Vec<AttachmentRecord>> {
        let prefix = format!("{volume}/");
        // Keys sort by volume: start just before this volume's range.
        let mut out = Vec::new();
        let mut after = Some(volume.to_string());
        loop {
            let page = records::list::<AttachmentRecord>(&*self.store, after.as_deref(), 256)?;
            let Some(last) = page.last() else { break };
            after = Some(last.key());
            let n = page.len();
            let mut done = false;
            for a in page {
                if a.key().starts_with(&prefix) {
                    out.push(a);
                } else if a.key() > prefix {
                    done = true;
                    break;
                }
            }
            if done || n < 256 {
                break;
            }
        }
        Ok(out)
    }

    /// The attachment with URIs built from its server node's addresses as
    /// the node reports them now (a restarted node may listen elsewhere; the
    /// export name, the secret, stays).
    pub fn with_current_uris(&self, mut a: AttachmentRecord) -> AttachmentRecord {
        if a.export_name.is_empty() {
            return a;
        }
        if !a.legs.is_empty() {
            return a; // A replicated volume's: see `leg_uris`.
        }
        let (tcp, unix) = self.current_uris(&a.server_node, &a.node, &a.export_name);
        if let Some(t) = tcp {
            a.tcp_uri = t;
        }
        if let Some(u) = unix {
            a.unix_uri = u;
        }
        a
    }

    /// (tcp, unix) URIs of a replicated attachment's leg, from its node's
    /// addresses as reported now; the unix one only where the leg's replica
    /// is on the connecting node.
    pub fn leg_uris(&self, a: &AttachmentRecord, leg: &records::LegRecord) -> (String, String) {
        let (tcp, unix) = self.current_uris(&leg.node, &a.node, &leg.export_name);
        (tcp.unwrap_or_default(), unix.unwrap_or_default())
    }

    /// The URIs of `export` on `server` as that node reports its addresses
    /// now: TCP where it listens, the unix socket only for a `client` on the
    /// same node. `None` for what cannot be built.
    fn current_uris(
        &self,
        server: &str,
        client: &str,
        export: &str,
    ) -> (Option<String>, Option<String>) {
        let Ok(Some(n)) = self.get::<NodeRecord>(server) else {
            return (None, None);
        };
        let tcp =
            (!n.nbd_address.is_empty()).then(|| berth_proto::nbd_tcp_uri(&n.nbd_address, export));
        let unix = (client == server && !n.nbd_socket.is_empty())
            .then(|| berth_proto::nbd_unix_uri(std::path::Path::new(&n.nbd_socket), export));
        (tcp, unix)
    }

    pub fn all_attachments(&self) -> Result<Vec<AttachmentRecord>> {
        Ok(records::list::<AttachmentRecord>(&*self.store, None, 0)?)
    }

    pub async fn publish(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        read_only: bool,
    ) -> Result<AttachmentRecord> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let client: NodeRecord = self
            .get(node)?
            .ok_or_else(|| MetaError::NotFound(format!("node {node} is not registered")))?;
        let existing = self.attachments(volume)?;
        if let Some(a) = existing.iter().find(|a| a.node == node) {
            if a.read_only != read_only {
                return Err(MetaError::AlreadyExists(format!(
                    "volume {volume} is already published to node {node} {}",
                    if a.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            if a.state == State::Ready {
                return Ok(self.with_current_uris(a.clone()));
            }
        } else if let Some(w) = existing.iter().find(|a| !a.read_only || !read_only) {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {volume} is published to node {} ({}); a volume is written from one \
                 node at a time",
                w.node,
                if w.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        if let Some(set) = v.replicas.clone() {
            let pending = existing.into_iter().find(|a| a.node == node);
            return self
                .publish_replicated(call, v, set, &client, read_only, pending)
                .await;
        }
        self.require_up(&v.node)?;
        let pending = existing.into_iter().find(|a| a.node == node);
        let rec = self.attachment_intent(&v, node, read_only, pending).await?;
        fault::point("publish-volume:after-catalog");
        // Connections from another node must come from its address.
        let peer = if node == v.node {
            String::new()
        } else {
            peer_ip(&client.nbd_address)
        };
        let granted = async {
            let mut c = self.server(&v.node).await?;
            c.grant_export(server_req(
                call,
                vpb::GrantExportRequest {
                    kind: vpb::TargetKind::Volume as i32,
                    name: volume.to_string(),
                    client: node_client(node),
                    read_only,
                    peer_address: peer,
                    generation: 0,
                },
            ))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| MetaError::server(&v.node, &s))
        }
        .await;
        let e = match granted {
            Ok(e) => e,
            Err(err) => {
                if !matches!(err, MetaError::Unavailable(_)) {
                    self.commit_intent(rec.remove()).await?;
                }
                return Err(err);
            }
        };
        fault::point("publish-volume:after-server");
        let ready = AttachmentRecord {
            export_name: e.export_name,
            tcp_uri: e.tcp_uri,
            unix_uri: if node == v.node {
                e.unix_uri
            } else {
                String::new()
            },
            state: State::Ready,
            ..rec.clone()
        };
        let detail = format!(
            "{} to node {node}",
            if read_only { "read-only" } else { "read-write" }
        );
        self.commit(call, ready.replace(&rec), &v.node, detail)
            .await?;
        Ok(self.with_current_uris(ready))
    }

    /// The attachment a publish works on: the one a failed attempt left, or
    /// a new intent (Creating), durable before any server is asked.
    async fn attachment_intent(
        &self,
        v: &VolumeRecord,
        node: &str,
        read_only: bool,
        pending: Option<AttachmentRecord>,
    ) -> Result<AttachmentRecord> {
        if let Some(a) = pending {
            return Ok(a);
        }
        let a = AttachmentRecord {
            volume: v.id.clone(),
            node: node.to_string(),
            read_only,
            server_node: v.node.clone(),
            export_name: String::new(),
            tcp_uri: String::new(),
            unix_uri: String::new(),
            state: State::Creating,
            created_ms: now_ms(),
            legs: Vec::new(),
            generation: 0,
        };
        self.commit_intent(a.create()).await?;
        Ok(a)
    }

    /// Publishes a replicated volume to `client` for a new nexus there: the
    /// set's generation moves on (fencing any earlier nexus), each in-sync
    /// replica grants the node an export at that generation, and a replica
    /// whose server cannot be reached is marked out (the set goes on with
    /// the others; at least one must answer). Called with the volume's name
    /// lock held.
    async fn publish_replicated(
        &self,
        call: &Call,
        v: VolumeRecord,
        mut set: ReplicaSet,
        client: &NodeRecord,
        read_only: bool,
        pending: Option<AttachmentRecord>,
    ) -> Result<AttachmentRecord> {
        if read_only {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {}: read-only publishing of replicated volumes is not built yet; \
                 snapshot it and publish the snapshot's clone",
                v.id
            )));
        }
        let node = client.name.as_str();
        let rec = self.attachment_intent(&v, node, read_only, pending).await?;
        fault::point("publish-volume:after-catalog");
        // The new nexus's generation, durable before any grant carries it.
        let fence = set.new_nexus(set.generation())?;
        let mut cur = VolumeRecord {
            replicas: Some(set.clone()),
            ..v.clone()
        };
        self.commit_intent(cur.replace(&v)).await?;
        fault::point("publish-volume:after-generation");
        let mut legs = Vec::new();
        let mut missing = Vec::new();
        let readable: Vec<String> = set.readable().map(|r| r.node.clone()).collect();
        for rnode in readable {
            let peer = if rnode == node {
                String::new()
            } else {
                peer_ip(&client.nbd_address)
            };
            let granted = async {
                self.require_up(&rnode)?;
                let mut c = self.server(&rnode).await?;
                c.grant_export(server_req(
                    call,
                    vpb::GrantExportRequest {
                        kind: vpb::TargetKind::Volume as i32,
                        name: v.id.clone(),
                        client: node_client(node),
                        read_only,
                        peer_address: peer,
                        generation: fence,
                    },
                ))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| MetaError::server(&rnode, &s))
            }
            .await;
            match granted {
                Ok(e) => legs.push(records::LegRecord {
                    node: rnode,
                    export_name: e.export_name,
                }),
                Err(MetaError::Unavailable(why)) => missing.push((rnode, why)),
                Err(e) => return Err(e),
            }
        }
        if legs.is_empty() {
            return Err(MetaError::Unavailable(format!(
                "no replica of volume {} can be reached: {}",
                v.id,
                missing
                    .iter()
                    .map(|(n, why)| format!("{n}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        for (rnode, why) in &missing {
            let before = cur.clone();
            let g = set.fault(rnode, set.generation(), &[])?;
            let survivors: Vec<String> = set.counted().map(|r| r.node.clone()).collect();
            let rounds = self.track_changes_on(call, &v.id, &survivors, g).await;
            set.note_left_rounds(rnode, rounds)?;
            cur = VolumeRecord {
                replicas: Some(set.clone()),
                ..before.clone()
            };
            let c = Call::new(&call.actor, "FaultReplica", &v.id, rnode);
            self.commit(
                &c,
                cur.replace(&before),
                rnode,
                format!("unreachable at publish: {why}"),
            )
            .await?;
            tracing::warn!(volume = %v.id, node = %rnode, error = %why, "replica unreachable at publish: marked out");
        }
        fault::point("publish-volume:after-server");
        // The local replica first: the nexus reads from it.
        legs.sort_by_key(|l| l.node != node);
        let ready = AttachmentRecord {
            legs,
            generation: set.generation(),
            state: State::Ready,
            ..rec.clone()
        };
        let detail = format!(
            "read-write to node {node}, generation {} ({} replica(s): {})",
            set.generation(),
            ready.legs.len(),
            ready
                .legs
                .iter()
                .map(|l| l.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.commit(call, ready.replace(&rec), &v.node, detail)
            .await?;
        Ok(ready)
    }

    /// A nexus saw the replica on `node` fail: it leaves the set and the
    /// generation moves on, durably, before the nexus acknowledges the
    /// writes it holds. Refused at an old generation (a newer nexus owns the
    /// volume) and for the last in-sync replica.
    pub async fn report_replica_fault(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
        pending: &[(u64, u64)],
        reason: &str,
    ) -> Result<u64> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        const MAX_PENDING: usize = 1 << 16;
        if pending.len() > MAX_PENDING {
            return Err(MetaError::InvalidArgument(format!(
                "{} pending ranges, more than {MAX_PENDING}",
                pending.len()
            )));
        }
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let mut set = replica_set(&v)?;
        if pending
            .iter()
            .any(|&(o, l)| o.checked_add(l).is_none_or(|e| e > v.size_bytes))
        {
            return Err(MetaError::InvalidArgument(format!(
                "a pending range lies past the end of volume {volume} ({} bytes)",
                v.size_bytes
            )));
        }
        let was_in = v.replicas.as_ref().is_some_and(|s| {
            s.replicas().iter().any(|r| {
                r.node == node && matches!(r.state, ReplicaState::InSync | ReplicaState::Rebuilding)
            })
        });
        let g = set.fault(node, generation, pending)?;
        // The copies that go on record what changes from here, before the
        // nexus may write without this one.
        let survivors: Vec<String> = set.counted().map(|r| r.node.clone()).collect();
        let rounds = self.track_changes_on(call, volume, &survivors, g).await;
        if was_in {
            // Only when it leaves now: a repeated report must not move the
            // rounds past writes it missed.
            set.note_left_rounds(node, rounds)?;
        }
        let faulted = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        fault::point("replica-fault:before-catalog");
        let detail = format!(
            "generation {generation} -> {g}; {} pending range(s); {}",
            pending.len(),
            berth_proto::validate::bounded(reason, 512)
        );
        if faulted != v {
            self.commit(call, faulted.replace(&v), node, detail).await?;
        }
        fault::point("replica-fault:after-catalog");
        tracing::warn!(volume, node, generation = g, reason, "replica marked out");
        Ok(g)
    }

    /// Starts recording changed blocks on the copies of `volume` on `nodes`
    /// (the ones still in sync when another left at `generation`), so the
    /// one that left can be rebuilt from what changed. Best effort: a copy
    /// that cannot start is only not a delta source (the rebuild copies
    /// everything from another, or from it, instead).
    async fn track_changes_on(
        &self,
        call: &Call,
        volume: &str,
        nodes: &[String],
        generation: u64,
    ) -> Vec<(String, u64, u64)> {
        // All at once: the nexus holds writes until this is done.
        let each = nodes.iter().map(|n| async move {
            let started = async {
                self.require_up(n)?;
                let mut c = self.server(n).await?;
                c.track_changes(server_req(
                    call,
                    vpb::TrackChangesRequest {
                        volume: volume.to_string(),
                        point: generation,
                    },
                ))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| MetaError::server(n, &s))
            }
            .await;
            match started {
                Ok(t) => Some((n.clone(), t.point, t.round)),
                Err(e) => {
                    tracing::warn!(volume, node = %n, error = %e, "cannot track changed blocks on a replica: rebuilds of the others copy everything from it");
                    None
                }
            }
        });
        futures_util::future::join_all(each)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// What a membership step on the replica of `volume` on `node` works
    /// on, names checked, under the volume's name lock: the lock, the
    /// volume and its replica set.
    async fn replica_step(
        &self,
        volume: &str,
        node: &str,
    ) -> Result<(NameGuard<'_>, VolumeRecord, ReplicaSet)> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        let name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let set = replica_set(&v)?;
        Ok((name, v, set))
    }

    /// The replicated volume `volume`, its set, and its read-write
    /// attachment (a rebuild runs in that attachment's nexus).
    fn replicated_attached(
        &self,
        volume: &str,
    ) -> Result<(VolumeRecord, ReplicaSet, AttachmentRecord)> {
        let v = self.ready_volume(volume)?;
        let set = replica_set(&v)?;
        let a = self
            .attachments(volume)?
            .into_iter()
            .find(|a| a.state == State::Ready && !a.read_only && !a.legs.is_empty())
            .ok_or_else(|| {
                MetaError::FailedPrecondition(format!(
                    "volume {volume} is not attached: a rebuild runs in the nexus of its attachment"
                ))
            })?;
        Ok((v, set, a))
    }

    /// The nexus at `generation` rebuilds the faulted replica on `node`: its
    /// server grants the nexus's node an export at the fence, the
    /// attachment lists the leg (so unpublishing revokes it), and the
    /// replica becomes a write member (`Rebuilding`). Returns the new
    /// generation and the leg. The nexus then adds the leg and asks for
    /// the ranges to copy ([`Meta::rebuild_ranges`]).
    pub async fn start_rebuild(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
    ) -> Result<(u64, AttachmentRecord, records::LegRecord)> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let (v, mut set, a) = self.replicated_attached(volume)?;
        // Not UNAVAILABLE: that says "this service, ask again" to the nexus.
        if !self.is_up(node) {
            return Err(MetaError::FailedPrecondition(format!(
                "volume server {node} is down ({}): its replica is rebuilt once it is back",
                self.down_since(node)
            )));
        }
        let peer = if a.node == node {
            String::new()
        } else {
            match self.get::<NodeRecord>(&a.node)? {
                Some(n) => peer_ip(&n.nbd_address),
                None => String::new(),
            }
        };
        let g = set.start_rebuild(node, generation, v.size_bytes)?;
        let mut c = self.server(node).await?;
        let e = c
            .grant_export(server_req(
                call,
                vpb::GrantExportRequest {
                    kind: vpb::TargetKind::Volume as i32,
                    name: v.id.clone(),
                    client: node_client(&a.node),
                    read_only: false,
                    peer_address: peer,
                    generation: set.fence(),
                },
            ))
            .await
            .map_err(|s| MetaError::server(node, &s))?
            .into_inner();
        let leg = records::LegRecord {
            node: node.to_string(),
            export_name: e.export_name,
        };
        let mut legs: Vec<records::LegRecord> =
            a.legs.iter().filter(|l| l.node != node).cloned().collect();
        legs.push(leg.clone());
        let attached = AttachmentRecord { legs, ..a.clone() };
        let rebuilding = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        if rebuilding != v || attached != a {
            self.commit(
                call,
                rebuilding.replace(&v).merge(attached.replace(&a)),
                node,
                format!(
                    "generation {generation} -> {g}: rebuilding into the nexus on {}",
                    a.node
                ),
            )
            .await?;
        }
        Ok((g, attached, leg))
    }

    /// What the rebuild of the replica on `node` must copy, once the nexus
    /// writes to it: the blocks an in-sync replica recorded as changed
    /// since it left, plus the ranges the nexus reported pending for it;
    /// everything when no replica tracked from early enough (or it is new).
    /// Returns (ranges, whether it is a full copy, the source consulted).
    pub async fn rebuild_ranges(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
    ) -> Result<(Vec<(u64, u64)>, bool, String, u64)> {
        let (_name, v, mut set) = self.replica_step(volume, node).await?;
        let r = set
            .replicas()
            .iter()
            .find(|r| r.node == node)
            .cloned()
            .ok_or_else(|| MembershipError::NoSuchReplica(node.to_string()))?;
        // Tracking that started when it left (or before) covers it.
        let left_at = r.synced_generation + 1;
        let sources: Vec<String> = set.readable().map(|r| r.node.clone()).collect();
        let list = |s: String, since: u64| async move {
            self.require_up(&s)?;
            let mut c = self.server(&s).await?;
            c.list_changes(server_req(
                call,
                vpb::ListChangesRequest {
                    volume: volume.to_string(),
                    max_ranges: 0,
                    since_round: since,
                },
            ))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| MetaError::server(&s, &e))
        };
        let pairs = |l: &vpb::ListChangesResponse| -> Vec<(u64, u64)> {
            l.ranges.iter().map(|r| (r.offset, r.length)).collect()
        };
        let mut delta = None;
        if r.synced_generation > 0 {
            for s in &sources {
                match list(s.clone(), 0).await {
                    Ok(l) if l.tracking && !l.too_many && l.point <= left_at => {
                        delta = Some((pairs(&l), s.clone()));
                        break;
                    }
                    Ok(l) => {
                        tracing::info!(volume, source = %s, tracking = l.tracking, point = l.point, left_at, too_many = l.too_many, "replica cannot serve a delta rebuild")
                    }
                    Err(e) => {
                        tracing::warn!(volume, source = %s, error = %e, "cannot list changed blocks")
                    }
                }
            }
        }
        let full = delta.is_none();
        let (base, source) = delta.unwrap_or_else(|| (vec![(0, v.size_bytes)], String::new()));
        // The rebuild before stopped at its cursor: below it only what
        // changed since it stopped is copied again, as a source that was in
        // sync then (in the same recording of changes) lists it.
        let mut resumed = None;
        if r.rebuild_cursor > 0 {
            let mut by: Vec<&(String, u64, u64)> = r
                .left_rounds
                .iter()
                .filter(|(n, _, _)| sources.contains(n))
                .collect();
            by.sort_by_key(|(n, _, _)| *n != source);
            for (s, point, round) in by {
                match list(s.clone(), *round).await {
                    Ok(l) if l.tracking && !l.too_many && l.point == *point => {
                        resumed = Some((r.rebuild_cursor, pairs(&l)));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(volume, source = %s, error = %e, "cannot list changed blocks")
                    }
                }
            }
        }
        let mut ranges: Vec<(u64, u64)> = match &resumed {
            Some((cursor, since)) => {
                let mut v: Vec<(u64, u64)> = base
                    .iter()
                    .filter_map(|&(o, l)| {
                        let end = o.saturating_add(l);
                        (end > *cursor).then(|| (o.max(*cursor), end - o.max(*cursor)))
                    })
                    .collect();
                v.extend(since.iter().copied());
                v
            }
            None => base,
        };
        ranges.extend(r.pending.iter().copied());
        let ranges = coalesce_ranges(ranges, v.size_bytes);
        let resumed_from = resumed.map_or(0, |(c, _)| c);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        set.plan_rebuild(node, generation, total)?;
        let planned = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        self.commit_intent(planned.replace(&v)).await?;
        tracing::info!(volume, node, full, total, source = %source, ranges = ranges.len(), resumed_from, "rebuild planned");
        Ok((ranges, full, source, resumed_from))
    }

    /// Records a rebuild's progress (shown by `volume get`).
    pub async fn rebuild_progress(
        &self,
        volume: &str,
        node: &str,
        generation: u64,
        done: u64,
        cursor: u64,
    ) -> Result<()> {
        let (_name, v, mut set) = self.replica_step(volume, node).await?;
        set.rebuild_progress(node, generation, done, cursor)?;
        let cur = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        if cur != v {
            self.commit_intent(cur.replace(&v)).await?;
        }
        Ok(())
    }

    /// The nexus copied everything to the replica on `node` (and flushed
    /// it): it counts again. When none is left out, the replicas stop
    /// recording changed blocks.
    pub async fn finish_rebuild(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
    ) -> Result<u64> {
        let (_name, v, mut set) = self.replica_step(volume, node).await?;
        let (done, total) = set
            .replicas()
            .iter()
            .find(|r| r.node == node)
            .map_or((0, 0), |r| (r.rebuild_done_bytes, r.rebuild_total_bytes));
        let g = set.finish_rebuild(node, generation)?;
        let whole = !set.degraded();
        let nodes: Vec<String> = set.replicas().iter().map(|r| r.node.clone()).collect();
        let cur = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        if cur == v {
            return Ok(g); // The same call again: done already.
        }
        fault::point("rebuild:before-catalog");
        self.commit(
            call,
            cur.replace(&v),
            node,
            format!("generation {generation} -> {g}: in sync again after copying {done} of {total} bytes"),
        )
        .await?;
        fault::point("rebuild:after-catalog");
        if let Err(e) = self.drop_retired(call, volume).await {
            tracing::warn!(volume, error = %e, "cannot drop retired copies yet");
        }
        if whole {
            for n in &nodes {
                let stopped = async {
                    let mut c = self.server(n).await?;
                    c.stop_tracking(server_req(
                        call,
                        vpb::StopTrackingRequest {
                            volume: volume.to_string(),
                        },
                    ))
                    .await
                    .map_err(|s| MetaError::server(n, &s))
                }
                .await;
                if let Err(e) = stopped {
                    tracing::warn!(volume, node = %n, error = %e, "cannot stop tracking changed blocks (it costs a key per write until it does)");
                }
            }
        }
        Ok(g)
    }

    /// Moves every replica off `node` (see the `DrainNode` call): returns,
    /// per volume with a copy there, where its new copy is or why it cannot
    /// move.
    pub async fn drain_node(
        &self,
        call: &Call,
        node: &str,
    ) -> Result<Vec<(String, String, String)>> {
        check_name("node", node)?;
        let rec: NodeRecord = self
            .get(node)?
            .ok_or_else(|| MetaError::NotFound(format!("node {node} is not registered")))?;
        if !rec.cordoned {
            let cordoned = NodeRecord {
                cordoned: true,
                ..rec.clone()
            };
            self.commit(
                call,
                cordoned.replace(&rec),
                node,
                "cordoned: no new volumes".into(),
            )
            .await?;
        }
        let mut out = Vec::new();
        for v in records::list::<VolumeRecord>(&*self.store, None, 0)? {
            let on_it = v.nodes().iter().any(|(n, _)| n == node);
            if !on_it {
                continue;
            }
            let outcome = match &v.replicas {
                None => Err(MetaError::FailedPrecondition(
                    "not replicated: its only copy cannot move".into(),
                )),
                Some(set)
                    if set
                        .replicas()
                        .iter()
                        .any(|r| r.node == node && r.state == ReplicaState::Stale) =>
                {
                    Ok(("".to_string(), "retired already".to_string()))
                }
                Some(_) => self.replace_copy(call, &v.id, node).await,
            };
            let (to, what) = match outcome {
                Ok(x) => x,
                Err(e) => (String::new(), e.to_string()),
            };
            out.push((v.id.clone(), to, what));
        }
        Ok(out)
    }

    /// Places a new copy of replicated volume `volume` away from `node`,
    /// creates it there (empty), and in one catalog change retires the copy
    /// on `node` and adds the new one (out of sync: its nexus rebuilds it in
    /// full). Returns the new copy's node and what happens next.
    async fn replace_copy(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
    ) -> Result<(String, String)> {
        let _changing = self.changing();
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let mut set = replica_set(&v)?;
        let spec = self.spec_of(&v)?;
        let kept: Vec<String> = set
            .replicas()
            .iter()
            .filter(|r| r.node != node && r.state != ReplicaState::Stale)
            .map(|r| r.node.clone())
            .collect();
        let holding: Vec<String> = set.replicas().iter().map(|r| r.node.clone()).collect();
        let (to, pool) = {
            let _placing = self.placement.lock().await;
            let mut excluded = Vec::new();
            let spread_values: Vec<Option<String>> = match spec.spread.as_deref() {
                Some(label) => kept
                    .iter()
                    .map(|n| {
                        self.get::<NodeRecord>(n)
                            .ok()
                            .flatten()
                            .and_then(|r| r.labels.get(label).cloned())
                    })
                    .collect(),
                None => Vec::new(),
            };
            let cands: Vec<Candidate> = self
                .candidates()?
                .into_iter()
                .filter(|c| {
                    if holding.contains(&c.node) {
                        excluded.push(format!("{}: holds a copy", c.node));
                        return false;
                    }
                    if let Some(label) = spec.spread.as_deref() {
                        let val = c.labels.get(label).cloned();
                        if spread_values.contains(&val) {
                            excluded.push(format!("{}: same {label} as a copy it keeps", c.node));
                            return false;
                        }
                    }
                    true
                })
                .collect();
            let r = placement::Request {
                size_bytes: v.size_bytes,
                requisite: Vec::new(),
                preferred: Vec::new(),
                media: spec.media.clone(),
            };
            let mut why_not = |why: String| {
                excluded.push(why);
                MetaError::Unplaceable(format!(
                    "no node for a new copy of {volume}: {}",
                    excluded.join("; ")
                ))
            };
            if cands.is_empty() {
                return Err(why_not(
                    "no other node takes new volumes (drained nodes do not)".into(),
                ));
            }
            let picked =
                placement::choose_n(&cands, &r, self.cfg.overcommit, 1, None).map_err(why_not)?;
            let c = &cands[picked[0]];
            self.reserve(&c.pool_id, i128::from(v.size_bytes));
            (c.node.clone(), c.pool_id.clone())
        };
        let made = async {
            let mut c = self.server(&to).await?;
            c.create_volume(server_req(
                call,
                vpb::CreateVolumeRequest {
                    name: v.id.clone(),
                    size_bytes: v.size_bytes,
                    tier: tiers::server_class(spec.tier.priority).to_string(),
                    overrides: Some(server_overrides(&v.qos)),
                },
            ))
            .await
            .map_err(|s| MetaError::server(&to, &s))
        }
        .await;
        let changed = made.and_then(|_| {
            let g = set.retire(node, set.generation())?;
            Ok(set.add(&to, &pool, g)?)
        });
        let g = match changed {
            Ok(g) => g,
            Err(e) => {
                self.reserve(&pool, -i128::from(v.size_bytes));
                let _ = self.delete_on_server(&to, volume, &call.actor).await;
                return Err(e);
            }
        };
        let mut copy_topology = v.copy_topology.clone();
        copy_topology.push(
            self.get::<NodeRecord>(&to)?
                .map(|n| n.labels)
                .unwrap_or_default(),
        );
        let cur = VolumeRecord {
            replicas: Some(set),
            copy_topology,
            ..v.clone()
        };
        self.commit(
            call,
            cur.replace(&v),
            node,
            format!(
                "generation {g}: the copy on {node} is retired, a new one on {to} is to be rebuilt"
            ),
        )
        .await?;
        let attached = self
            .attachments(volume)?
            .iter()
            .any(|a| !a.read_only && !a.legs.is_empty());
        Ok((
            to,
            if attached {
                "moving: its nexus copies it to the new copy".into()
            } else {
                "moving once attached: a nexus copies it".into()
            },
        ))
    }

    /// Replaces the copies on nodes down for longer than the grace period
    /// (each once: the replaced copy is retired). A copy that cannot be
    /// placed is tried again at the next pass.
    async fn replace_lost(&self) -> Result<()> {
        let Some(grace) = self.cfg.replica_grace else {
            return Ok(());
        };
        let lost: Vec<String> = {
            let live = self.live.lock();
            records::list::<NodeRecord>(&*self.store, None, 0)?
                .into_iter()
                .filter(|n| {
                    live.get(&n.name)
                        .is_some_and(|t| t.elapsed() >= grace + self.cfg.node_timeout)
                })
                .map(|n| n.name)
                .collect()
        };
        for v in records::list::<VolumeRecord>(&*self.store, None, 0)? {
            let Some(set) = &v.replicas else { continue };
            // Retired copies whose node answers again are deleted now.
            if set
                .replicas()
                .iter()
                .any(|r| r.state == ReplicaState::Stale && self.is_up(&r.node))
            {
                let call = Call::new(SERVER_CALLER_PREFIX, "DropRetired", &v.id, "");
                let _name = self.locks.lock(format!("v:{}", v.id)).await;
                if let Err(e) = self.drop_retired(&call, &v.id).await {
                    tracing::warn!(volume = %v.id, error = %e, "cannot drop retired copies yet");
                }
            }
            for r in set.replicas() {
                if r.state == ReplicaState::Stale || !lost.contains(&r.node) {
                    continue;
                }
                let call = Call::new(SERVER_CALLER_PREFIX, "ReplaceReplica", &v.id, &r.node);
                match self.replace_copy(&call, &v.id, &r.node).await {
                    Ok((to, _)) => {
                        tracing::warn!(volume = %v.id, from = %r.node, %to, ?grace, "a node stayed down past the grace period: its copy is replaced")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.id, node = %r.node, error = %e, "cannot replace the copy of a lost node yet")
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets the retired copies of a volume whose copies are all in sync
    /// again, deleting them where their server answers (one that does not
    /// stays retired: never read or counted, its space on that pool still
    /// promised, until it answers).
    async fn drop_retired(&self, call: &Call, volume: &str) -> Result<()> {
        let v = self.ready_volume(volume)?;
        let Some(set) = v.replicas.clone() else {
            return Ok(());
        };
        let retired: Vec<(usize, String, String)> = set
            .replicas()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == ReplicaState::Stale)
            .map(|(i, r)| (i, r.node.clone(), r.pool_id.clone()))
            .collect();
        if retired.is_empty()
            || set
                .replicas()
                .iter()
                .any(|r| !matches!(r.state, ReplicaState::Stale | ReplicaState::InSync))
        {
            return Ok(());
        }
        let mut cur = v.clone();
        // From the last, so the indexes of the others hold.
        for (i, node, pool) in retired.into_iter().rev() {
            if let Err(e) = self.delete_on_server(&node, volume, &call.actor).await {
                tracing::warn!(volume, node = %node, error = %e, "the retired copy stays until its server answers");
                continue;
            }
            let before = cur.clone();
            let Some(mut set) = cur.replicas.clone() else {
                break;
            };
            set.remove_stale(&node, set.generation())?;
            if i < cur.copy_topology.len() {
                cur.copy_topology.remove(i);
            }
            cur.replicas = Some(set);
            self.commit(
                call,
                cur.replace(&before),
                &node,
                "the retired copy is deleted".into(),
            )
            .await?;
            self.reserve(&pool, -i128::from(v.size_bytes));
        }
        Ok(())
    }

    pub async fn unpublish(&self, call: &Call, volume: &str, node: &str) -> Result<u32> {
        check_name("volume", volume)?;
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let mut closed = 0;
        for a in self.attachments(volume)? {
            if !node.is_empty() && a.node != node {
                continue;
            }
            closed += self.revoke(call, a).await?;
        }
        Ok(closed)
    }

    /// Removes one attachment: catalog intent, server revoke, catalog outcome.
    async fn revoke(&self, call: &Call, a: AttachmentRecord) -> Result<u32> {
        // A replicated volume's grants are on every copy's node; one that is
        // down keeps its grant, fenced by the next publish's generation.
        let copies: Vec<String> = match self.get::<VolumeRecord>(&a.volume)? {
            Some(v) if v.replicas.is_some() => v.nodes().into_iter().map(|(n, _)| n).collect(),
            _ => Vec::new(),
        };
        if copies.is_empty() {
            self.require_up(&a.server_node)?;
        }
        let deleting = AttachmentRecord {
            state: State::Deleting,
            ..a.clone()
        };
        if a.state != State::Deleting {
            self.commit_intent(deleting.replace(&a)).await?;
        }
        let closed = if copies.is_empty() {
            self.revoke_on_server(call, &a.server_node, &a.volume, &a.node)
                .await?
        } else {
            let mut closed = 0;
            for n in &copies {
                if !self.is_up(n) {
                    tracing::warn!(volume = %a.volume, node = %n, "replica node down: its grant stays, fenced");
                    continue;
                }
                match self.revoke_on_server(call, n, &a.volume, &a.node).await {
                    Ok(c) => closed += c,
                    Err(MetaError::Unavailable(why)) => {
                        tracing::warn!(volume = %a.volume, node = %n, error = %why, "replica node unreachable: its grant stays, fenced");
                    }
                    Err(e) => return Err(e),
                }
            }
            closed
        };
        self.commit(
            call,
            deleting.remove(),
            &a.server_node,
            format!("from node {}; {closed} connection(s) closed", a.node),
        )
        .await?;
        Ok(closed)
    }

    /// Revokes every grant of `volume` to `node` on its server.
    async fn revoke_on_server(
        &self,
        call: &Call,
        server: &str,
        volume: &str,
        node: &str,
    ) -> Result<u32> {
        let mut c = self.server(server).await?;
        let grants = c
            .list_exports(server_req(call, vpb::ListExportsRequest {}))
            .await
            .map_err(|s| MetaError::server(server, &s))?
            .into_inner()
            .exports;
        let mut closed = 0;
        for g in grants
            .into_iter()
            .filter(|g| g.name == volume && g.client == node_client(node))
        {
            match c
                .revoke_export(server_req(
                    call,
                    vpb::RevokeExportRequest {
                        export_name: g.export_name,
                    },
                ))
                .await
            {
                Ok(r) => closed += r.into_inner().closed_connections,
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(MetaError::server(server, &s)),
            }
        }
        Ok(closed)
    }

    // ---- audit --------------------------------------------------------------

    pub fn audit_query(&self, q: &audit::Query) -> Result<(Vec<AuditEntry>, u64)> {
        Ok(audit::query(&*self.store, q)?)
    }

    pub fn audit_head(&self) -> Result<audit::Head> {
        Ok(audit::head(&*self.store)?)
    }

    pub fn audit_verify(&self) -> Result<audit::Verification> {
        Ok(audit::verify(&*self.store)?)
    }

    // ---- reconcile ----------------------------------------------------------

    /// Compares one node's volume server with the catalog and repairs the
    /// difference: half-created objects are undone, half-deleted ones
    /// finished, lost ones flagged, and the node's audit events chained. One
    /// object that cannot be repaired now is logged and left for the next
    /// pass; it does not hold up the others.
    pub async fn reconcile_node(&self, node: &str) -> Result<()> {
        if !self.reconciling.lock().insert(node.to_string()) {
            return Ok(()); // A pass for this node is running.
        }
        let r = self.reconcile_node_inner(node).await;
        self.reconciling.lock().remove(node);
        r
    }

    async fn reconcile_node_inner(&self, node: &str) -> Result<()> {
        let call = Call::new(SERVER_CALLER_PREFIX, "Reconcile", "", node);
        let mut c = self.server(node).await?;
        let server_vols: HashMap<String, u64> = c
            .list_volumes(server_req(&call, vpb::ListVolumesRequest {}))
            .await
            .map_err(|s| MetaError::server(node, &s))?
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| (v.name, v.size_bytes))
            .collect();
        let pool_id = self
            .get::<NodeRecord>(node)?
            .map(|n| n.pool_id)
            .unwrap_or_default();

        let failed = |what: &str, id: &str, e: MetaError| {
            tracing::warn!(node, object = id, error = %e, "reconcile could not repair {what}; next pass retries");
        };
        for v in records::list::<VolumeRecord>(&*self.store, None, 0)? {
            let copy = v.nodes().into_iter().find(|(n, _)| n == node);
            if let Some((_, copy_pool)) = copy {
                let r = self
                    .reconcile_volume(
                        &call,
                        node,
                        &pool_id,
                        &copy_pool,
                        &v.id,
                        server_vols.get(&v.id).copied(),
                    )
                    .await;
                if let Err(e) = r {
                    failed("volume", &v.id, e);
                }
            }
        }
        for s in records::list::<SnapshotRecord>(&*self.store, None, 0)? {
            if s.node == node && s.state != State::Ready {
                if let Err(e) = self.reconcile_snapshot(&call, node, &s.id).await {
                    failed("snapshot", &s.id, e);
                }
            }
        }
        for a in self.all_attachments()? {
            if a.server_node == node && a.state != State::Ready {
                if let Err(e) = self.reconcile_attachment(&call, node, &a.key()).await {
                    failed("attachment", &a.key(), e);
                }
            }
        }
        let unmanaged: Vec<&String> = server_vols
            .keys()
            .filter(|k| self.get::<VolumeRecord>(k).ok().flatten().is_none())
            .collect();
        if !unmanaged.is_empty() {
            tracing::info!(node, volumes = ?unmanaged, "volumes on the node that the catalog does not manage (left alone)");
        }
        self.pull_audit(node).await
    }

    /// Takes `key`'s name lock without waiting (a live call working on it
    /// wins; the next pass sees the outcome) and reads the record again under
    /// it, so reconcile never acts on a stale copy.
    fn locked_fresh<R: Record>(
        &self,
        lock: String,
        key: &str,
    ) -> Result<Option<(NameGuard<'_>, R)>> {
        let Some(g) = self.locks.try_lock(lock) else {
            return Ok(None);
        };
        Ok(self.get::<R>(key)?.map(|r| (g, r)))
    }

    async fn reconcile_volume(
        &self,
        call: &Call,
        node: &str,
        pool_id: &str,
        copy_pool: &str,
        id: &str,
        listed_size: Option<u64>,
    ) -> Result<()> {
        let _changing = self.changing();
        let Some((_g, v)) = self.locked_fresh::<VolumeRecord>(format!("v:{id}"), id)? else {
            return Ok(());
        };
        match v.state {
            State::Creating => {
                // A server call that timed out may have finished after the
                // listing: ask again under the lock before undoing.
                let on_server = match listed_size {
                    Some(_) => true,
                    None => self.server_volume_size(call, node, id).await?.is_some(),
                };
                self.undo_create(&v, on_server).await?;
                self.note(node, id, "undid a create that never finished")
                    .await;
            }
            State::Deleting => {
                for (n, _) in v.nodes() {
                    self.delete_on_server(&n, id, SERVER_CALLER_PREFIX).await?;
                }
                self.commit_intent(v.remove()).await?;
                self.reserve_copies(&v, -i128::from(v.size_bytes));
                self.note(node, id, "finished a delete that never finished")
                    .await;
            }
            State::Ready => {
                // The listing is older than a create that finished since:
                // ask the server again before calling anything lost.
                let size = match listed_size {
                    Some(s) => Some(s),
                    None => self.server_volume_size(call, node, id).await?,
                };
                let condition = match size {
                    None if copy_pool != pool_id => format!(
                        "lost: node {node} now serves pool {pool_id}, the volume was on pool \
                         {copy_pool}"
                    ),
                    None => format!("lost: volume server {node} does not have it"),
                    Some(_) => String::new(),
                };
                let mut fixed = VolumeRecord {
                    condition: condition.clone(),
                    ..v.clone()
                };
                // An expand that reached the server but not the catalog.
                if let Some(server_size) = size.filter(|s| *s > v.size_bytes) {
                    let spec = self.spec_of(&v)?;
                    fixed.size_bytes = server_size;
                    fixed.qos = spec.qos(server_size);
                    self.push_qos(call, &fixed, &spec).await?;
                }
                if fixed != v {
                    self.commit_intent(fixed.replace(&v)).await?;
                    self.reserve(
                        &v.pool_id,
                        i128::from(fixed.size_bytes) - i128::from(v.size_bytes),
                    );
                    if !condition.is_empty() {
                        tracing::error!(volume = %id, node, %condition, "volume missing on its server");
                    }
                    let what = if condition.is_empty() {
                        format!(
                            "adopted the size the server has: {} bytes",
                            fixed.size_bytes
                        )
                    } else {
                        condition
                    };
                    self.note(node, id, &what).await;
                }
            }
        }
        Ok(())
    }

    async fn server_volume_size(&self, call: &Call, node: &str, id: &str) -> Result<Option<u64>> {
        let mut c = self.server(node).await?;
        match c
            .get_volume(server_req(call, vpb::GetVolumeRequest { name: id.into() }))
            .await
        {
            Ok(v) => Ok(Some(v.into_inner().size_bytes)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(MetaError::server(node, &s)),
        }
    }

    async fn reconcile_snapshot(&self, call: &Call, node: &str, id: &str) -> Result<()> {
        let Some((_g, s)) = self.locked_fresh::<SnapshotRecord>(format!("s:{id}"), id)? else {
            return Ok(());
        };
        if s.state == State::Ready {
            return Ok(());
        }
        // Whatever a listing said: a timed-out server call may have finished
        // since. Deleting what is not there is fine; a replicated volume's
        // may be on each of its copies.
        for (n, _) in s.nodes() {
            self.delete_snapshot_on_server(call, &n, id).await?;
        }
        self.commit_intent(s.remove()).await?;
        self.note(
            node,
            id,
            "removed a snapshot left half-made or half-deleted",
        )
        .await;
        Ok(())
    }

    async fn reconcile_attachment(&self, call: &Call, node: &str, key: &str) -> Result<()> {
        let volume = key.split('/').next().unwrap_or_default();
        let Some((_g, a)) = self.locked_fresh::<AttachmentRecord>(format!("v:{volume}"), key)?
        else {
            return Ok(());
        };
        if a.state == State::Ready {
            return Ok(()); // Finished by a retry since the listing.
        }
        // A replicated volume's half-made publish may have granted on any
        // of its copies' nodes.
        let servers: Vec<String> = match self.get::<VolumeRecord>(&a.volume)? {
            Some(v) if v.replicas.is_some() => v.nodes().into_iter().map(|(n, _)| n).collect(),
            _ => vec![node.to_string()],
        };
        for s in &servers {
            self.revoke_on_server(call, s, &a.volume, &a.node).await?;
        }
        self.commit_intent(a.remove()).await?;
        self.note(
            node,
            &a.volume,
            &format!("removed an unfinished attachment to node {}", a.node),
        )
        .await;
        Ok(())
    }

    /// Rebuilds what each pool has promised from the catalog, so a count that
    /// drifted (a failed step between a reservation and its commit) heals.
    /// Only at a quiet moment: no size-changing call in progress (creates
    /// also wait for the placement lock held here). Returns whether the
    /// count had drifted (and is warned about).
    pub async fn recount(&self) -> Result<bool> {
        let _placing = self.placement.lock().await;
        if self.changing.load(Ordering::SeqCst) > 0 {
            return Ok(false); // Not a quiet moment; the next pass tries again.
        }
        let fresh = provisioned_by_pool(records::list::<VolumeRecord>(&*self.store, None, 0)?);
        let mut cur = self.provisioned.lock();
        // A pool counted at 0 and a pool not counted promise the same: only
        // a difference in bytes is drift.
        let drifted = nonzero(&cur) != nonzero(&fresh);
        if drifted {
            tracing::warn!(before = ?*cur, after = ?fresh, "provisioned bytes recounted from the catalog");
        }
        *cur = fresh;
        Ok(drifted)
    }

    /// Logs and audits what reconcile did.
    async fn note(&self, node: &str, object: &str, what: &str) {
        tracing::warn!(node, object, "reconcile: {what}");
        let call = Call::new(SERVER_CALLER_PREFIX, "Reconcile", object, node);
        if let Err(e) = self.record(call.entry(node, "ok", what.to_string())).await {
            tracing::error!(error = %e, "cannot append to the audit log");
        }
    }

    /// Chains the node's new audit events (connects, disconnects, refusals,
    /// and control calls nobody made through this service).
    pub async fn pull_audit(&self, node: &str) -> Result<()> {
        let Some(rec) = self.get::<NodeRecord>(node)? else {
            return Ok(());
        };
        let after = if rec.audit_pool_id == rec.pool_id {
            rec.audit_cursor
        } else {
            0
        };
        let mut c = self.server(node).await?;
        let call = Call::new(SERVER_CALLER_PREFIX, "PullAudit", "", node);
        let events = c
            .list_audit_events(server_req(
                &call,
                vpb::ListAuditEventsRequest {
                    target: String::new(),
                    client: String::new(),
                    after_seq: after,
                    limit: 1000,
                },
            ))
            .await
            .map_err(|s| MetaError::server(node, &s))?
            .into_inner()
            .events;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(());
        };
        let entries: Vec<AuditEntry> = events
            .into_iter()
            .filter(|e| !e.client.starts_with(SERVER_CALLER_PREFIX))
            .map(|e| AuditEntry {
                time_ms: e.time_unix_ms,
                actor: e.client,
                action: e.action,
                volume: e.target,
                target: String::new(),
                node: node.to_string(),
                result: e.result,
                peer: e.peer,
                read_bytes: e.read_bytes,
                write_bytes: e.write_bytes,
                detail: format!(
                    "{}{}node seq {}, {} reads, {} writes",
                    e.detail,
                    if e.detail.is_empty() { "" } else { "; " },
                    e.seq,
                    e.read_ops,
                    e.write_ops
                ),
                ..AuditEntry::default()
            })
            .collect();
        let moved = NodeRecord {
            audit_cursor: last,
            audit_pool_id: rec.pool_id.clone(),
            ..rec.clone()
        };
        // The entries and the cursor move together: nothing chained twice or lost.
        lost_race_is_fine(
            self.commit_entries(moved.replace(&rec), entries)
                .await
                .map(drop),
        )
    }

    /// One pass of the background work: liveness, then reconcile/audit pulls.
    pub async fn tick(self: &Arc<Self>, full_reconcile: bool) {
        if full_reconcile {
            if let Err(e) = self.recount().await {
                tracing::error!(error = %e, "recount of provisioned bytes failed");
            }
            // Copies of the head outside the catalog are what pin history.
            match self.audit_head() {
                Ok(h) => tracing::info!(seq = h.seq, hash = %h.hash, "audit chain head"),
                Err(e) => tracing::error!(error = %e, "cannot read the audit chain head"),
            }
        }
        let up = match self.check_nodes().await {
            Ok(up) => up,
            Err(e) => {
                tracing::error!(error = %e, "node check failed");
                return;
            }
        };
        if full_reconcile {
            if let Err(e) = self.replace_lost().await {
                tracing::error!(error = %e, "replacing the copies of lost nodes failed");
            }
        }
        for n in up {
            let me = self.clone();
            tokio::spawn(async move {
                let r = if full_reconcile {
                    me.reconcile_node(&n.name).await
                } else {
                    me.pull_audit(&n.name).await
                };
                match r {
                    Ok(()) => {}
                    // A node that just died: the liveness check will say so.
                    Err(MetaError::Unavailable(e)) => {
                        tracing::debug!(node = %n.name, error = %e, "node unreachable")
                    }
                    Err(e) => tracing::warn!(node = %n.name, error = %e, "reconcile pass failed"),
                }
            });
        }
    }
}

/// A compare-and-swap that lost to a concurrent change that did the same
/// work (a state already moved, a cursor already advanced) is not an error.
fn lost_race_is_fine(r: Result<()>) -> Result<()> {
    match r {
        Err(MetaError::Catalog(berth_catalog::CatalogError::Conflict { .. })) => Ok(()),
        r => r,
    }
}

fn node_client(node: &str) -> String {
    format!("node:{node}")
}

/// The IP of a host:port address, or empty (no restriction) when it is a
/// name or a wildcard.
fn peer_ip(addr: &str) -> String {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .filter(|a| !a.ip().is_unspecified())
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// A request to a volume server, naming the person behind it.
fn server_req<T>(call: &Call, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(30));
    berth_proto::name_caller(&mut r, &format!("{SERVER_CALLER_PREFIX}:{}", call.actor));
    r
}

/// A replicated volume's set; FAILED_PRECONDITION for any other volume.
fn replica_set(v: &VolumeRecord) -> Result<ReplicaSet> {
    v.replicas
        .clone()
        .ok_or_else(|| MetaError::FailedPrecondition(format!("volume {} is not replicated", v.id)))
}

/// Sorted, merged byte ranges, clipped to `size`.
fn coalesce_ranges(mut v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        let end = o.saturating_add(l).min(size);
        if end <= o {
            continue;
        }
        match out.last_mut() {
            Some((lo, ll)) if o <= *lo + *ll => *ll = (*ll).max(end - *lo),
            _ => out.push((o, end - o)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_csi_capacity_ranges() {
        assert_eq!(size_for(0, 0, 0).expect("default"), DEFAULT_VOLUME_BYTES);
        assert_eq!(size_for(0, 4096, 0).expect("small limit"), 4096);
        assert_eq!(size_for(1, 0, 0).expect("rounded"), 4096);
        assert_eq!(size_for(100, 0, 8192).expect("source floor"), 8192);
        assert!(matches!(size_for(10, 5, 0), Err(MetaError::OutOfRange(_))));
        assert!(matches!(size_for(1, 100, 0), Err(MetaError::OutOfRange(_))));
        assert!(matches!(
            size_for(0, 100, 8192),
            Err(MetaError::OutOfRange(_))
        ));
        // Sizes that would overflow when rounded, or pass the store's limit.
        for huge in [u64::MAX, u64::MAX - 4095, (1 << 60) + 1] {
            assert!(
                matches!(size_for(huge, 0, 0), Err(MetaError::OutOfRange(_))),
                "{huge}"
            );
        }
        assert_eq!(size_for(1 << 60, 0, 0).expect("largest"), 1 << 60);
    }

    #[test]
    fn rebuild_ranges_are_sorted_merged_and_clipped() {
        assert_eq!(
            coalesce_ranges(
                vec![
                    (8192, 4096),
                    (0, 4096),
                    (4096, 100),
                    (100, 10),
                    (90, 5000),
                    (60, 0)
                ],
                10000
            ),
            vec![(0, 5090), (8192, 1808)]
        );
        assert_eq!(coalesce_ranges(vec![(20000, 10)], 10000), vec![]);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_new_name("volume", "pvc-1234").is_ok());
        for bad in ["", "a/b", "a@b", "a b", "x\u{1}", "..", ".clone-x", "a:b"] {
            assert!(check_new_name("volume", bad).is_err(), "{bad:?}");
        }
        assert!(check_new_name("volume", &"a".repeat(129)).is_err());
        // Names made under the older rule can still be named (deleted,
        // expanded, unpublished); the separators and whitespace never could.
        for old in ["a:b", "x#1", "caf\u{e9}", "_x", "-x"] {
            assert!(check_new_name("volume", old).is_err(), "{old:?}");
            assert!(check_name("volume", old).is_ok(), "{old:?}");
        }
        for bad in ["", "a/b", "a@b", "a b", "x\u{1}"] {
            assert!(check_name("volume", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("volume", &"a".repeat(129)).is_err());
    }

    fn meta_on(store: Arc<berth_catalog::MemStore>) -> Arc<Meta> {
        Meta::new(
            store,
            MetaConfig {
                heartbeat_interval: Duration::from_secs(1),
                node_timeout: Duration::from_secs(5),
                reconcile_interval: Duration::from_secs(30),
                replica_grace: None,
                overcommit: 1.0,
                tiers: tiers::default_tiers(),
                volume_tls: None,
            },
        )
        .expect("meta")
    }

    /// A pool whose volumes were all deleted is counted at 0 bytes, the
    /// catalog has no entry for it: that is no drift (it was warned about
    /// after every run). A real difference still is.
    #[tokio::test]
    async fn recount_warns_only_about_bytes_that_differ() {
        let store = Arc::new(berth_catalog::MemStore::new());
        let vol = VolumeRecord {
            id: "db".into(),
            size_bytes: 1 << 20,
            tier: "standard".into(),
            parameters: BTreeMap::new(),
            qos: records::QosRecord::default(),
            fs_type: "ext4".into(),
            node: "node-1".into(),
            pool_id: "pool-a".into(),
            source: None,
            state: State::Ready,
            topology: BTreeMap::new(),
            copy_topology: Vec::new(),
            created_ms: 0,
            condition: String::new(),
            replicas: None,
        };
        store.commit(vol.create()).expect("volume");
        let meta = meta_on(store);
        assert!(!meta.recount().await.expect("recount"), "counted at start");

        // A volume created on pool-b and deleted again.
        meta.reserve("pool-b", 1 << 20);
        meta.reserve("pool-b", -(1 << 20));
        assert!(
            !meta.recount().await.expect("recount"),
            "created and deleted"
        );
        // However the 0 got there, it is not drift.
        meta.provisioned.lock().insert("pool-c".into(), 0);
        assert!(!meta.recount().await.expect("recount"), "a zero entry");

        meta.reserve("pool-a", 4096);
        assert!(meta.recount().await.expect("recount"), "a real drift");
        assert_eq!(
            *meta.provisioned.lock(),
            HashMap::from([("pool-a".to_string(), 1 << 20)]),
            "healed"
        );
    }

    #[tokio::test]
    async fn name_locks_serialize_and_clean_up() {
        let locks = NameLocks::default();
        let g = locks.lock("a".into()).await;
        assert!(locks.try_lock("a".into()).is_none());
        assert!(locks.try_lock("b".into()).is_some());
        drop(g);
        assert!(
            locks.map.lock().is_empty(),
            "entries are removed when unused"
        );
        assert!(locks.try_lock("a".into()).is_some());
    }
}
