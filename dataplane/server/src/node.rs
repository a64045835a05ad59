//! The volume server's shared state: the block store, each volume's QoS and
//! metrics, the export grants, the live NBD connections, and the audit log.
//!
//! Control operations live here (the gRPC layer only converts types), each one
//! audited. They block (RocksDB syncs, fsync), so callers run them on blocking
//! threads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use berth_store::{Store, StoreError, Target};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog};
use crate::error::{Result, ServerError};
use crate::metrics::{Metrics, VolumeMetrics};
use crate::nbd::limits::{Admission, ConnLimits, PayloadBudget, Refusals};
use crate::qos::{self, Limiter, Limits, Overrides, PoolGate, TierPolicy};
use crate::state::{new_token, Grant, ServerState, StateFile, TargetKind, VolumeQos};

/// Where an NBD client came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Unix,
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix => write!(f, "unix"),
            Peer::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// What the data path needs of a volume (or exported snapshot): its limits and
/// metric handles, shared by its connections.
#[derive(Debug)]
pub struct VolumeRuntime {
    pub name: String,
    pub limiter: Limiter,
    pub metrics: VolumeMetrics,
    /// The volume's fence (see `ServerState::fences`): every request of a
    /// connection whose grant is older is refused with ESHUTDOWN.
    pub fence: AtomicU64,
    /// Requests that passed the fence check and have not finished: a grant
    /// that raises the fence waits for them, so no request it fences lands
    /// after it returns.
    pub past_fence: AtomicU64,
}

impl VolumeRuntime {
    /// Whether a connection through `grant` is fenced off.
    pub fn fenced(&self, grant: &Grant) -> bool {
        grant.generation < self.fence.load(Ordering::Acquire)
    }

    /// Checks a request of a connection through `grant` against the fence.
    /// A request that passes on a replicated volume is counted until its
    /// guard is dropped (with the request, once answered). Unreplicated
    /// volumes (no fence, no generation) pay one atomic load and count
    /// nothing; so a plain (generation 0) request racing a replicated
    /// volume's first publish is not waited for: only an administrator's
    /// grant makes one.
    pub fn admit_past_fence(self: &Arc<Self>, grant: &Grant) -> FenceCheck {
        if grant.generation == 0 && self.fence.load(Ordering::Acquire) == 0 {
            return FenceCheck::Open(None);
        }
        self.past_fence.fetch_add(1, Ordering::AcqRel);
        let g = FenceGuard(self.clone());
        // Counted before the check: a grant that raises the fence after this
        // load waits for it; one that raised it before is seen here.
        if self.fenced(grant) {
            FenceCheck::Fenced
        } else {
            FenceCheck::Open(Some(g))
        }
    }

    /// Waits (up to `limit`) for the requests that passed the fence check to
    /// finish; false if some are still running then.
    pub fn drain_past_fence(&self, limit: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        while self.past_fence.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }
}

/// A request's fence check: open (counted on a replicated volume), or
/// fenced off.
#[derive(Debug)]
pub enum FenceCheck {
    Open(Option<FenceGuard>),
    Fenced,
}

/// One request counted past the fence check (see
/// [`VolumeRuntime::admit_past_fence`]).
#[derive(Debug)]
pub struct FenceGuard(Arc<VolumeRuntime>);

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.0.past_fence.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VolumeRuntime {
    /// Admits a request against the volume's limits; time spent waiting is
    /// counted in its throttling metric.
    pub async fn admit(&self, bytes: u64) {
        let waited = self.limiter.admit(bytes).await;
        if waited > 0 {
            self.metrics.throttled_micros.inc_by(waited);
        }
    }
}

/// Per-connection counters, reported in the disconnect audit event.
#[derive(Debug, Default)]
pub struct ConnCounters {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
}

#[derive(Debug)]
pub struct ConnInfo {
    pub token: String,
    pub kind: TargetKind,
    pub name: String,
    pub client: String,
    pub peer: Peer,
    pub cancel: CancellationToken,
    pub counters: Arc<ConnCounters>,
}

/// A granted export resolved for a connecting client.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub grant: Grant,
    pub target: Target,
    pub size_bytes: u64,
    pub read_only: bool,
    pub runtime: Arc<VolumeRuntime>,
}

/// Why an export was refused, mapped to NBD's option errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No grant with that token, or the name does not match it.
    Unknown(String),
    /// A grant exists but this peer may not use it.
    Policy(String),
}

/// What NBD clients may take of the node (see `nbd::limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    pub connections: ConnLimits,
    /// Payload bytes buffered across all connections.
    pub buffer_bytes: u64,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            connections: ConnLimits::for_nofile(1 << 20),
            buffer_bytes: 512 << 20,
        }
    }
}

/// How clients reach this node's exports (for the URIs in grants).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// The host name or address put in TCP URIs.
    pub advertise_host: String,
}

#[derive(Debug)]
pub struct Node {
    pub store: Arc<Store>,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub gate: PoolGate,
    pub tiers: Vec<TierPolicy>,
    pub endpoints: Mutex<Endpoints>,
    pub started: std::time::Instant,
    /// Fires when the server shuts down: connections stop reading requests.
    pub shutdown: CancellationToken,
    /// NBD connections counted against their limits.
    pub admission: Arc<Admission>,
    /// Refused export lookups, summed per peer for the audit log.
    pub refusals: Refusals,
    /// Payload bytes all NBD connections may hold in memory.
    pub budget: PayloadBudget,
    state: Mutex<ServerState>,
    state_file: StateFile,
    runtimes: Mutex<HashMap<(TargetKind, String), Arc<VolumeRuntime>>>,
    conns: Mutex<HashMap<u64, ConnInfo>>,
    next_conn: AtomicU64,
}

/// The caller of a control operation, for the audit log.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub String);

impl Node {
    pub fn new(
        store: Arc<Store>,
        data_dir: &std::path::Path,
        tiers: Vec<TierPolicy>,
        limits: NbdLimits,
    ) -> Result<Node> {
        let audit = AuditLog::open(&data_dir.join("audit.log"))
            .map_err(ServerError::io("open audit log"))?;
        let state_file = StateFile::new(data_dir);
        let mut state = state_file
            .load()
            .map_err(ServerError::io("load server state"))?;
        // Volumes created before any QoS record (or by another tool) run as standard.
        let names: Vec<String> = store.list_volumes().into_iter().map(|v| v.name).collect();
        state.volumes.retain(|n, _| names.contains(n));
        for n in names {
            state.volumes.entry(n).or_default();
        }
        // Grants whose volume or snapshot is gone (a delete interrupted between
        // the store and this file) must not outlive it.
        state.grants.retain(|_, g| {
            let id = match g.kind {
                TargetKind::Volume => store.volume(&g.name).map(|v| v.id),
                TargetKind::Snapshot => store.snapshot(&g.name).map(|s| s.id),
            };
            let keep = id.is_ok_and(|id| g.target_id == 0 || g.target_id == id);
            if !keep {
                tracing::warn!(export = %g.name, client = %g.client, "dropping a grant whose target is gone");
            }
            keep
        });
        Ok(Node {
            store,
            audit,
            metrics: Arc::new(Metrics::new()),
            gate: PoolGate::default(),
            tiers,
            endpoints: Mutex::new(Endpoints::default()),
            started: std::time::Instant::now(),
            shutdown: CancellationToken::new(),
            admission: Admission::new(limits.connections),
            refusals: Refusals::default(),
            budget: PayloadBudget::new(limits.buffer_bytes),
            state: Mutex::new(state),
            state_file,
            runtimes: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        })
    }

    fn tier(&self, name: &str) -> Result<&TierPolicy> {
        let name = if name.is_empty() { "standard" } else { name };
        self.tiers.iter().find(|t| t.name == name).ok_or_else(|| {
            ServerError::InvalidArgument(format!(
                "unknown tier {name:?}; the tiers are {}",
                self.tiers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// A tier name (empty: standard) and overrides a person gave, checked.
    fn checked_qos(&self, tier: &str, overrides: Overrides) -> Result<VolumeQos> {
        qos::validate_overrides(&overrides).map_err(ServerError::InvalidArgument)?;
        Ok(VolumeQos {
            tier: self.tier(tier)?.name.clone(),
            overrides,
        })
    }

    /// The limits a volume runs under now.
    pub fn limits(&self, volume: &str) -> Result<(Limits, VolumeQos)> {
        let size = self.store.volume(volume)?.size_bytes;
        let q = self
            .state
            .lock()
            .volumes
            .get(volume)
            .cloned()
            .unwrap_or_default();
        Ok((self.tier(&q.tier)?.limits(size, &q.overrides), q))
    }

    fn save(&self, st: &ServerState) -> Result<()> {
        self.state_file
            .save(st)
            .map_err(ServerError::io("save server state"))
    }

    /// The runtime of a volume or snapshot, made on first use. A snapshot runs
    /// under its volume's limits (standard once the volume is gone).
    pub fn runtime(&self, kind: TargetKind, name: &str) -> Result<Arc<VolumeRuntime>> {
        if let Some(r) = self.runtimes.lock().get(&(kind, name.to_string())) {
            return Ok(r.clone());
        }
        let limits = match kind {
            TargetKind::Volume => self.limits(name)?.0,
            TargetKind::Snapshot => {
                let s = self.store.snapshot(name)?;
                match s.volume.as_deref().map(|v| self.limits(v)) {
                    Some(Ok((l, _))) => l,
                    _ => self
                        .tier("standard")?
                        .limits(s.size_bytes, &Overrides::default()),
                }
            }
        };
        let label = match kind {
            TargetKind::Volume => name.to_string(),
            TargetKind::Snapshot => format!("snapshot:{name}"),
        };
        let fence = match kind {
            TargetKind::Volume => self.state.lock().fences.get(name).copied().unwrap_or(0),
            TargetKind::Snapshot => 0,
        };
        let rt = Arc::new(VolumeRuntime {
            metrics: self.metrics.volume(&label),
            name: label,
            limiter: Limiter::new(limits),
            fence: AtomicU64::new(fence),
            past_fence: AtomicU64::new(0),
        });
        Ok(self
            .runtimes
            .lock()
            .entry((kind, name.to_string()))
            .or_insert(rt)
            .clone())
    }

    fn forget_runtime(&self, kind: TargetKind, name: &str) {
        if let Some(rt) = self.runtimes.lock().remove(&(kind, name.to_string())) {
            self.metrics.forget(&rt.name);
        }
    }

    /// Records a control call's outcome in the audit log and passes it on.
    fn audited<T>(&self, caller: &Caller, action: &str, target: &str, r: Result<T>) -> Result<T> {
        use berth_proto::validate::{bounded, AUDIT_FIELD_BYTES, AUDIT_TEXT_BYTES};
        self.audit.record(AuditEvent {
            action: action.into(),
            client: bounded(&caller.0, AUDIT_FIELD_BYTES),
            target: bounded(target, AUDIT_FIELD_BYTES),
            result: match &r {
                Ok(_) => "ok".into(),
                Err(e) => bounded(&e.to_string(), AUDIT_TEXT_BYTES),
            },
            ..Default::default()
        });
        r
    }

    fn check_running(&self) -> Result<()> {
        if self.shutdown.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        Ok(())
    }

    // ---- volumes ------------------------------------------------------------

    pub fn create_volume(
        &self,
        caller: &Caller,
        name: &str,
        size_bytes: u64,
        tier: &str,
        overrides: Overrides,
    ) -> Result<berth_store::VolumeInfo> {
        let r = (|| {
            self.check_running()?;
            let want = self.checked_qos(tier, overrides)?;
            let mut st = self.state.lock();
            if let (Ok(v), Some(q)) = (self.store.volume(name), st.volumes.get(name)) {
                if v.size_bytes == size_bytes && *q != want {
                    return Err(StoreError::AlreadyExists {
                        kind: "volume",
                        name: name.into(),
                        detail: format!("it has tier {:?} and other QoS overrides", q.tier),
                    }
                    .into());
                }
            }
            let v = self.store.create_volume(name, size_bytes)?;
            st.volumes.insert(name.to_string(), want);
            self.save(&st)?;
            Ok(v)
        })();
        self.audited(caller, "CreateVolume", name, r)
    }

    pub fn clone_volume(
        &self,
        caller: &Caller,
        name: &str,
        source: (TargetKind, &str),
        size_bytes: Option<u64>,
        tier: &str,
        overrides: Overrides,
    ) -> Result<berth_store::VolumeInfo> {
        let r = (|| {
            self.check_running()?;
            let qos = self.checked_qos(tier, overrides)?;
            let mut st = self.state.lock();
            let v = match source {
                (TargetKind::Snapshot, snap) => {
                    self.store.clone_snapshot(snap, name, size_bytes)?
                }
                (TargetKind::Volume, vol) => {
                    if let Ok(v) = self.store.volume(name) {
                        // Idempotent retry: the clone exists already.
                        return Ok(v);
                    }
                    // A volume clone is a clone of a snapshot taken now, which is
                    // then deleted (it stays, hidden, while the clone reads it).
                    let tmp = format!(".clone-{}", new_token().map_err(ServerError::io("token"))?);
                    self.store.create_snapshot(vol, &tmp)?;
                    let r = self.store.clone_snapshot(&tmp, name, size_bytes);
                    self.store.delete_snapshot(&tmp)?;
                    r?
                }
            };
            st.volumes.insert(name.to_string(), qos);
            self.save(&st)?;
            Ok(v)
        })();
        self.audited(caller, "CloneVolume", name, r)
    }

    pub fn delete_volume(&self, caller: &Caller, name: &str) -> Result<()> {
        let r = self.delete_target(TargetKind::Volume, name, || self.store.delete_volume(name));
        self.audited(caller, "DeleteVolume", name, r)
    }

    /// Deletes a volume or snapshot that no connection uses, with its grants,
    /// QoS record and metrics. Deleting what is gone is success (CSI's
    /// DeleteVolume / DeleteSnapshot), and its grants go either way.
    fn delete_target(
        &self,
        kind: TargetKind,
        name: &str,
        delete: impl FnOnce() -> berth_store::Result<()>,
    ) -> Result<()> {
        self.check_running()?;
        let users = self.connections_to(kind, name);
        if !users.is_empty() {
            return Err(ServerError::FailedPrecondition(format!(
                "{} {name:?} is in use by {}; revoke its exports first",
                kind.as_str(),
                users.join(", ")
            )));
        }
        match delete() {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut st = self.state.lock();
        if kind == TargetKind::Volume {
            st.volumes.remove(name);
            st.fences.remove(name);
        }
        st.grants.retain(|_, g| !(g.kind == kind && g.name == name));
        self.save(&st)?;
        drop(st);
        self.forget_runtime(kind, name);
        Ok(())
    }

    pub fn resize_volume(
        &self,
        caller: &Caller,
        name: &str,
        size_bytes: u64,
    ) -> Result<berth_store::VolumeInfo> {
        let r = (|| {
            self.check_running()?;
            let v = self.store.resize_volume(name, size_bytes)?;
            // Per-GiB limits follow the new size.
            self.refresh_limits(name)?;
            Ok(v)
        })();
        self.audited(caller, "ResizeVolume", name, r)
    }

    fn refresh_limits(&self, volume: &str) -> Result<()> {
        let rt = self
            .runtimes
            .lock()
            .get(&(TargetKind::Volume, volume.to_string()))
            .cloned();
        if let Some(rt) = rt {
            rt.limiter.set(self.limits(volume)?.0);
        }
        Ok(())
    }

    pub fn set_qos(
        &self,
        caller: &Caller,
        volume: &str,
        tier: &str,
        overrides: Overrides,
        clear: bool,
    ) -> Result<()> {
        let r = (|| {
            self.check_running()?;
            self.store.volume(volume)?;
            qos::validate_overrides(&overrides).map_err(ServerError::InvalidArgument)?;
            let mut st = self.state.lock();
            let cur = st.volumes.entry(volume.to_string()).or_default();
            let mut next = cur.clone();
            if !tier.is_empty() {
                next.tier = self.tier(tier)?.name.clone();
            }
            if clear {
                next.overrides = Overrides::default();
            }
            let o = &mut next.overrides;
            o.iops_limit = overrides.iops_limit.or(o.iops_limit);
            o.bytes_per_second_limit = overrides
                .bytes_per_second_limit
                .or(o.bytes_per_second_limit);
            o.burst_seconds = overrides.burst_seconds.or(o.burst_seconds);
            *cur = next;
            self.save(&st)?;
            drop(st);
            self.refresh_limits(volume)
        })();
        self.audited(caller, "SetQos", volume, r)
    }

    // ---- snapshots -------------------------------------------------------------

    pub fn create_snapshot(
        &self,
        caller: &Caller,
        volume: &str,
        name: &str,
    ) -> Result<berth_store::SnapshotInfo> {
        let r = (|| {
            self.check_running()?;
            Ok(self.store.create_snapshot(volume, name)?)
        })();
        self.audited(caller, "CreateSnapshot", name, r)
    }

    pub fn delete_snapshot(&self, caller: &Caller, name: &str) -> Result<()> {
        let r = self.delete_target(TargetKind::Snapshot, name, || {
            self.store.delete_snapshot(name)
        });
        self.audited(caller, "DeleteSnapshot", name, r)
    }

    // ---- exports ---------------------------------------------------------------

    pub fn grant(&self, caller: &Caller, req: &GrantRequest<'_>) -> Result<Grant> {
        let GrantRequest {
            kind,
            name,
            client,
            read_only,
            peer_address,
            generation,
        } = *req;
        let r = (|| {
            self.check_running()?;
            if generation > 0 && kind != TargetKind::Volume {
                return Err(ServerError::InvalidArgument(
                    "a generation fences a replicated volume's writers; snapshots have none".into(),
                ));
            }
            if client.is_empty() || client.len() > 253 || client.chars().any(char::is_control) {
                return Err(ServerError::InvalidArgument(format!(
                    "client {client:?} must be 1 to 253 printable characters"
                )));
            }
            if !peer_address.is_empty() && peer_address.parse::<IpAddr>().is_err() {
                return Err(ServerError::InvalidArgument(format!(
                    "peer_address {peer_address:?} is not an IP address"
                )));
            }
            let target_id = match kind {
                TargetKind::Volume => self.store.volume(name)?.id,
                TargetKind::Snapshot => self.store.snapshot(name)?.id,
            };
            let read_only = read_only || kind == TargetKind::Snapshot;
            let mut st = self.state.lock();
            // A grant left from an earlier object of the same name is replaced.
            st.grants.retain(|_, g| {
                !(g.kind == kind && g.name == name && g.target_id != target_id && g.target_id != 0)
            });
            if generation > 0 {
                let fence = st.fences.get(name).copied().unwrap_or(0);
                if generation < fence {
                    return Err(ServerError::FailedPrecondition(format!(
                        "generation {generation} of volume {name} is older than its fence \
                         ({fence}): a newer nexus owns it"
                    )));
                }
            }
            // The client's grant from an older generation (its previous
            // nexus) gives way: its connections are fenced by their grant.
            st.grants.retain(|_, g| {
                !(g.kind == kind
                    && g.name == name
                    && g.client == client
                    && g.generation < generation)
            });
            if let Some(g) = st
                .grants
                .values()
                .find(|g| g.kind == kind && g.name == name && g.client == client)
            {
                if g.generation > generation {
                    return Err(ServerError::FailedPrecondition(format!(
                        "{name} is granted to {client} at generation {}, newer than {generation}",
                        g.generation
                    )));
                }
                if g.read_only == read_only && g.peer_address == peer_address {
                    return Ok(g.clone());
                }
                return Err(StoreError::AlreadyExists {
                    kind: "export",
                    name: format!("{name} for {client}"),
                    detail: "granted with other access or peer address; revoke it first".into(),
                }
                .into());
            }
            let g = Grant {
                kind,
                name: name.to_string(),
                client: client.to_string(),
                read_only,
                peer_address: peer_address.to_string(),
                token: new_token().map_err(ServerError::io("token"))?,
                granted_unix: crate::audit::now_unix_ms() / 1000,
                target_id,
                generation,
            };
            st.grants.insert(g.token.clone(), g.clone());
            if generation > 0 {
                st.fences.insert(name.to_string(), generation);
            }
            self.save(&st)?;
            let mut raised = None;
            if generation > 0 {
                // Under the state lock, as connections register: a writer
                // from an older generation is refused from its next request.
                if let Some(rt) = self.runtimes.lock().get(&(kind, name.to_string())) {
                    if rt.fence.swap(generation, Ordering::AcqRel) < generation {
                        raised = Some(rt.clone());
                    }
                }
            }
            drop(st);
            // The requests that passed the check before the fence rose land
            // before the new nexus can start: it starts once this returns.
            if let Some(rt) = raised {
                if !rt.drain_past_fence(FENCE_DRAIN) {
                    tracing::warn!(volume = name, waited = ?FENCE_DRAIN, "requests from before the fence are still running");
                }
            }
            Ok(g)
        })();
        self.audited(caller, "GrantExport", name, r)
    }

    /// Removes a grant and closes its connections; returns how many.
    pub fn revoke(&self, caller: &Caller, export_name: &str) -> Result<u32> {
        let (name, token) = split_export_name(export_name);
        let r = (|| {
            let mut st = self.state.lock();
            let Some(g) = st.grants.get(token) else {
                return Err(ServerError::NotFound(format!(
                    "no export {export_name:?} is granted"
                )));
            };
            if g.name != name {
                return Err(ServerError::NotFound(format!(
                    "no export {export_name:?} is granted"
                )));
            }
            st.grants.remove(token);
            self.save(&st)?;
            // Still under the state lock: a connection registers under it too
            // (see `register_conn`), so none can slip in after this sweep.
            let mut closed = 0;
            for c in self.conns.lock().values() {
                if c.token == token {
                    c.cancel.cancel();
                    closed += 1;
                }
            }
            drop(st);
            Ok(closed)
        })();
        self.audited(caller, "RevokeExport", name, r)
    }

    pub fn grants(&self) -> Vec<Grant> {
        self.state.lock().grants.values().cloned().collect()
    }

    pub fn volume_qos(&self, name: &str) -> Option<VolumeQos> {
        self.state.lock().volumes.get(name).cloned()
    }

    /// Finds the grant behind an export name and checks the peer may use it.
    pub fn resolve(&self, export_name: &str, peer: &Peer) -> Result<Resolved, Refusal> {
        let (name, token) = split_export_name(export_name);
        let grant = self
            .state
            .lock()
            .grants
            .get(token)
            .filter(|g| g.name == name)
            .cloned()
            .ok_or_else(|| {
                Refusal::Unknown(format!(
                    "export {name:?} is not granted to this client (export names are NAME@TOKEN as GrantExport returns them)"
                ))
            })?;
        if let (Peer::Tcp(addr), false) = (peer, grant.peer_address.is_empty()) {
            let allowed: IpAddr = grant
                .peer_address
                .parse()
                .map_err(|_| Refusal::Policy("grant has a bad peer address".into()))?;
            // An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d.
            if addr.ip().to_canonical() != allowed.to_canonical() {
                return Err(Refusal::Policy(format!(
                    "export {name:?} is granted to {} only",
                    grant.peer_address
                )));
            }
        }
        let gone = |e: StoreError| Refusal::Unknown(e.to_string());
        let (target, size_bytes, id) = match grant.kind {
            TargetKind::Volume => {
                let v = self.store.volume(&grant.name).map_err(gone)?;
                (Target::Volume(v.id), v.size_bytes, v.id)
            }
            TargetKind::Snapshot => {
                let s = self.store.snapshot(&grant.name).map_err(gone)?;
                (Target::Snapshot(s.id), s.size_bytes, s.id)
            }
        };
        if grant.target_id != 0 && grant.target_id != id {
            return Err(Refusal::Unknown(format!(
                "export {name:?} was granted for an earlier {} of that name",
                grant.kind.as_str()
            )));
        }
        let runtime = self
            .runtime(grant.kind, &grant.name)
            .map_err(|e| Refusal::Unknown(e.to_string()))?;
        if runtime.fenced(&grant) {
            return Err(Refusal::Policy(format!(
                "export {name:?} is fenced: granted at generation {}, and a newer nexus owns the \
                 volume (generation {})",
                grant.generation,
                runtime.fence.load(Ordering::Acquire)
            )));
        }
        Ok(Resolved {
            read_only: grant.read_only || grant.kind == TargetKind::Snapshot,
            grant,
            target,
            size_bytes,
            runtime,
        })
    }

    // ---- connections -----------------------------------------------------------

    /// Records a connection entering transmission, if its grant still stands.
    /// Checked and inserted under the state lock, which `revoke` holds while it
    /// closes a grant's connections: a revoke either sees this connection or
    /// this check sees the revoke.
    pub fn register_conn(
        &self,
        r: &Resolved,
        peer: Peer,
    ) -> Option<(u64, CancellationToken, Arc<ConnCounters>)> {
        let st = self.state.lock();
        if st.grants.get(&r.grant.token) != Some(&r.grant) {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let cancel = self.shutdown.child_token();
        let counters = Arc::new(ConnCounters::default());
        self.conns.lock().insert(
            id,
            ConnInfo {
                token: r.grant.token.clone(),
                kind: r.grant.kind,
                name: r.grant.name.clone(),
                client: r.grant.client.clone(),
                peer,
                cancel: cancel.clone(),
                counters: counters.clone(),
            },
        );
        drop(st);
        r.runtime.metrics.connections.inc();
        Some((id, cancel, counters))
    }

    pub fn unregister_conn(&self, id: u64, r: &Resolved) {
        self.conns.lock().remove(&id);
        r.runtime.metrics.connections.dec();
    }

    pub fn connection_count(&self) -> usize {
        self.conns.lock().len()
    }

    /// Clients connected to a target, for error messages.
    pub fn connections_to(&self, kind: TargetKind, name: &str) -> Vec<String> {
        self.conns
            .lock()
            .values()
            .filter(|c| c.kind == kind && c.name == name)
            .map(|c| format!("{} ({})", c.client, c.peer))
            .collect()
    }

    pub fn connections_by_token(&self) -> HashMap<String, u32> {
        let mut m = HashMap::new();
        for c in self.conns.lock().values() {
            *m.entry(c.token.clone()).or_default() += 1;
        }
        m
    }

    /// Updates the pool gauges (before a metrics scrape).
    pub fn refresh_gauges(&self) {
        let s = self.store.stats();
        let m = &self.metrics;
        m.pool_total_bytes
            .set((s.total_blocks * s.block_size) as i64);
        m.pool_used_bytes.set((s.used_blocks * s.block_size) as i64);
        m.pool_pending_free_bytes
            .set((s.pending_free_blocks * s.block_size) as i64);
        m.pool_deferred_bytes
            .set((s.deferred_blocks * s.block_size) as i64);
        m.volumes.set(s.volumes as i64);
        m.snapshots.set(s.snapshots as i64);
        m.map_cache_entries.set(s.map_cache_entries as i64);
        m.map_cache_capacity.set(s.map_cache_capacity as i64);
        m.map_cache_hits.set(s.map_cache_hits as i64);
        m.map_cache_misses.set(s.map_cache_misses as i64);
        m.io_engine
            .with_label_values(&[self.store.engine_name()])
            .set(1);
        m.io_registered_buffer_bytes
            .set(self.store.registered_buffer_bytes() as i64);
        let c = self.store.counters();
        m.pool_checksum_errors
            .set(c.checksum_errors.load(Ordering::Relaxed) as i64);
        m.pool_gathered_reads
            .set(c.gathered_reads.load(Ordering::Relaxed) as i64);
        m.io_polled_work
            .set(c.polled_work.load(Ordering::Relaxed) as i64);
        m.io_read_depth_limit
            .set(c.read_depth_limit.load(Ordering::Relaxed) as i64);
        m.io_reads_held
            .set(c.reads_held.load(Ordering::Relaxed) as i64);
        m.pool_deferred_writes
            .set(c.deferred_writes.load(Ordering::Relaxed) as i64);
        m.pool_io_errors
            .set(c.io_errors.load(Ordering::Relaxed) as i64);
        m.nbd_buffered_bytes.set(self.budget.held_bytes() as i64);
        let (handshakes, connections) = self.admission.counts();
        m.nbd_handshakes.set(handshakes as i64);
        m.nbd_connections.set(connections as i64);
    }

    pub fn runtimes(&self) -> Vec<Arc<VolumeRuntime>> {
        self.runtimes.lock().values().cloned().collect()
    }
}

/// How long a grant that raises a fence waits for the requests it fences.
const FENCE_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// What a grant is asked for (GrantExport).
#[derive(Debug, Clone, Copy)]
pub struct GrantRequest<'a> {
    pub kind: TargetKind,
    /// The volume or snapshot.
    pub name: &'a str,
    /// Who is granted (recorded in every audit event).
    pub client: &'a str,
    pub read_only: bool,
    /// TCP peers must have this IP address when it is not empty.
    pub peer_address: &'a str,
    /// A replicated volume's nexus: its generation (0: not replicated).
    pub generation: u64,
}

/// `NAME@TOKEN` → (NAME, TOKEN); a name without `@` has an empty token.
pub fn split_export_name(s: &str) -> (&str, &str) {
    match s.rfind('@') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    }
}
