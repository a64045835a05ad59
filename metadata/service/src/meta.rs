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

mod attachments;
mod reconcile;
mod replicas;
mod snapshots;
mod volumes;

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
    /// In-process tests: the crash point at which this state "dies" (see
    /// [`Meta::simulate_crash_at`]), and whether it has.
    crash_at: Mutex<Option<&'static str>>,
    crashed: AtomicBool,
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
        // A node that was up gets one timeout to report before it is marked
        // down, counted from when it can have noticed: the service, not the
        // node, was away, and a node may still be waiting on a paused
        // predecessor for up to REGISTER_ANSWER_WITHIN. (An instant in the
        // future has elapsed nothing until then.)
        let heard = Instant::now() + berth_proto::REGISTER_ANSWER_WITHIN;
        let mut live = HashMap::new();
        for n in records::list::<NodeRecord>(&*store, None, 0)? {
            if n.state == NodeState::Up {
                live.insert(n.name, heard);
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
            crash_at: Mutex::new(None),
            crashed: AtomicBool::new(false),
        }))
    }

    /// For tests in one process: at crash point `point` (see
    /// [`fault::POINTS`]) this state stops as the process would under
    /// `BERTH_FAULT_CRASH`: the call fails there and nothing more is
    /// written through it, by that call or any other. A test then starts a
    /// new service over the same catalog, which is what a restart is.
    pub fn simulate_crash_at(&self, point: &'static str) {
        *self.crash_at.lock() = Some(point);
    }

    /// A crash point (`fault`), real or simulated.
    fn point(&self, name: &'static str) -> Result<()> {
        if *self.crash_at.lock() == Some(name) {
            self.crashed.store(true, Ordering::SeqCst);
            tracing::warn!(point = name, "simulated crash");
        }
        if self.crashed.load(Ordering::SeqCst) {
            return Err(MetaError::Unavailable(format!(
                "the service crashed at {name} (simulated)"
            )));
        }
        fault::point(name);
        Ok(())
    }

    // ---- catalog access ---------------------------------------------------

    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>> {
        Ok(records::get::<R>(&*self.store, key)?)
    }

    /// Commits `txn` with `entries` on a blocking thread (a synced write);
    /// returns the entries as chained.
    async fn commit_entries(&self, txn: Txn, entries: Vec<AuditEntry>) -> Result<Vec<AuditEntry>> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(MetaError::Unavailable(
                "the service crashed (simulated): nothing more is written".into(),
            ));
        }
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
        // The audit puller moves the node's cursor concurrently.
        node_cas(&r.name, || self.try_register(actor, &r)).await?;
        Ok(self.cfg.heartbeat_interval.as_millis() as u32)
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
}

/// Runs `attempt`, a read and a compare-and-swap of node `node`'s record,
/// again (up to 5 times) while a concurrent change to the record (its
/// heartbeats, the audit puller moving its cursor) makes the swap lose.
async fn node_cas<F, Fut>(node: &str, mut attempt: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for _ in 0..5 {
        match attempt().await {
            Err(MetaError::Catalog(berth_catalog::CatalogError::Conflict { .. })) => continue,
            other => return other,
        }
    }
    Err(MetaError::Aborted(format!(
        "node {node}: its record kept changing; retry"
    )))
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

    fn test_cfg() -> MetaConfig {
        MetaConfig {
            heartbeat_interval: Duration::from_secs(1),
            node_timeout: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(30),
            replica_grace: None,
            overcommit: 1.0,
            tiers: tiers::default_tiers(),
            volume_tls: None,
        }
    }

    fn meta_on(store: Arc<berth_catalog::MemStore>) -> Arc<Meta> {
        Meta::new(store, test_cfg()).expect("meta")
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

    /// A new leader (or a restarted service) does not count a node down
    /// for the silence of the service's own absence: a node that was up gets
    /// its timeout from when it can have moved off a paused predecessor. A
    /// node that was down stays down.
    #[test]
    fn a_new_leader_gives_nodes_that_were_up_time_to_find_it() {
        let store = Arc::new(berth_catalog::MemStore::new());
        for (name, state) in [("up", NodeState::Up), ("down", NodeState::Down)] {
            let n = NodeRecord {
                name: name.into(),
                control_endpoint: String::new(),
                nbd_address: String::new(),
                nbd_socket: String::new(),
                labels: BTreeMap::new(),
                version: String::new(),
                pool_id: String::new(),
                state,
                registered_ms: 0,
                last_heartbeat_ms: 0,
                audit_cursor: 0,
                audit_pool_id: String::new(),
                cordoned: false,
            };
            store.commit(n.create()).expect("node");
        }
        let meta = Meta::new(
            store,
            MetaConfig {
                node_timeout: Duration::from_millis(20),
                ..test_cfg()
            },
        )
        .expect("meta");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            meta.is_up("up"),
            "up past the node timeout, within the grace"
        );
        assert!(!meta.is_up("down"));
        assert!(!meta.is_up("unknown"));
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
