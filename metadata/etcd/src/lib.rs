//! The catalog on etcd v3, for clusters that run several metadata services.
//!
//! # Layout
//!
//! One etcd key per record: `PREFIX/t/TABLE/KEY` (the record's key is kept as
//! bytes), the value the record's versioned encoding, unchanged. A scan of a
//! table is a range over its key prefix, read page by page (`PAGE` keys a
//! request) at one revision, so a long table is never one response and a
//! scan sees one point in time. The leadership key is `PREFIX/leader`.
//!
//! # Transactions
//!
//! A [`Txn`] is one etcd `Txn`: `Absent(k)` is `version(k) == 0`,
//! `Equals(k, v)` is `value(k) == v` (false on a missing key, as etcd
//! defines it), the ops its success branch. etcd refuses a key written twice
//! in one `Txn`, so the ops are reduced to the last op per key first (which
//! is what applying them in order leaves). The failure branch reads back the
//! keys the compares name, so a refusal says which condition failed, and
//! whether the leadership was lost, in the same round trip.
//!
//! # Leadership and fencing
//!
//! [`campaign`] elects one metadata service: a lease of `ttl` seconds kept
//! alive every third of it, and the leadership key created with that lease
//! only if it does not exist. The winner's term is the revision that created
//! the key. Its store ([`Fenced`]) adds `create_revision(leader) == term` to
//! every transaction, so once the lease has expired (the leader was killed,
//! paused or cut off) and another service created the key again, etcd itself
//! refuses every write of the old term: there is no moment at which two
//! leaders can both write. This is the Mayastor control plane's pattern.
//!
//! A leader steps down when a write of its term is refused, or when no
//! keep-alive has been answered for a whole `ttl` (it confirms with an empty
//! fenced transaction, logged, and revokes its lease so that the key goes at
//! once when it was still there).
//!
//! # Blocking
//!
//! [`CatalogStore`] is synchronous (RocksDB's calls are). This backend owns
//! a small Tokio runtime of its own for the etcd client; a call is sent to it
//! and waited for (with `block_in_place` when called from a multi-threaded
//! Tokio runtime, so the caller's runtime keeps its other tasks moving).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_catalog::{CatalogError, CatalogStore, Condition, Entry, Op, Result, Role, Table, Txn};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, TxnOp, TxnOpResponse,
};

/// Keys a scan asks for at a time.
const PAGE: i64 = 512;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` or, with `tls`, `https://host:port`.
    pub endpoints: Vec<String>,
    /// Every key of this catalog starts with it (several clusters may share
    /// one etcd). No trailing '/'.
    pub prefix: String,
    /// Client certificate and CA, for etcd's `--client-cert-auth`.
    pub tls: Option<etcd_client::TlsOptions>,
    /// Every request fails after this long (a lost majority makes writes
    /// wait forever otherwise).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "/berth".into(),
            tls: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Parses `URL[,URL...]` (the part after `etcd:` in `--catalog`).
pub fn parse_endpoints(list: &str) -> std::result::Result<Vec<String>, String> {
    let v: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if v.is_empty() {
        return Err("etcd: give at least one endpoint (etcd:http://host:2379[,...])".into());
    }
    for e in &v {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!(
                "etcd endpoint {e:?} must start with http:// or https://"
            ));
        }
    }
    Ok(v)
}

/// The catalog in etcd. Writes through it are not fenced: use it alone only
/// where one process writes (tools, tests); services get [`Fenced`] stores
/// from [`campaign`].
pub struct EtcdCatalog {
    client: Client,
    prefix: Vec<u8>,
    leader_key: Vec<u8>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCatalog")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdCatalog {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// An etcd failure as the catalog sees it: unreachable, timed out or
/// without quorum is `Unavailable` (try again); anything else `Backend`.
fn etcd_error(what: &str, e: etcd_client::Error) -> CatalogError {
    use etcd_client::Error as E;
    let unavailable = match &e {
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        E::TransportError(_) | E::IoError(_) => true,
        _ => false,
    };
    let msg = format!("etcd {what}: {e}");
    if unavailable {
        CatalogError::Unavailable(msg)
    } else {
        CatalogError::Backend(msg)
    }
}

fn table_prefix(prefix: &[u8], t: Table) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(b"/t/");
    k.extend_from_slice(t.name().as_bytes());
    k.push(b'/');
    k
}

/// The first key after every key that starts with `p`.
fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0]
}

impl EtcdCatalog {
    /// Connects (the client connects lazily: an unreachable etcd shows in the
    /// first call, as `CatalogError::Unavailable`).
    pub fn connect(cfg: &EtcdConfig) -> Result<Arc<EtcdCatalog>> {
        if cfg.prefix.ends_with('/') || cfg.prefix.is_empty() {
            return Err(CatalogError::Backend(format!(
                "etcd prefix {:?} must be non-empty without a trailing '/'",
                cfg.prefix
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("berth-etcd")
            .enable_all()
            .build()
            .map_err(|e| CatalogError::Backend(format!("etcd client runtime: {e}")))?;
        let mut opts = ConnectOptions::new()
            .with_timeout(cfg.request_timeout)
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            // A member without a leader answers at once instead of waiting.
            .with_require_leader(true);
        if let Some(t) = &cfg.tls {
            opts = opts.with_tls(t.clone());
        }
        let endpoints = cfg.endpoints.clone();
        let client = rt
            .block_on(async move { Client::connect(endpoints, Some(opts)).await })
            .map_err(|e| etcd_error("connect", e))?;
        let prefix = cfg.prefix.as_bytes().to_vec();
        let mut leader_key = prefix.clone();
        leader_key.extend_from_slice(b"/leader");
        Ok(Arc::new(EtcdCatalog {
            client,
            prefix,
            leader_key,
            rt: Some(rt),
        }))
    }

    /// Runs `f` on the client's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        let wait = move || {
            rx.recv().unwrap_or_else(|_| {
                Err(CatalogError::Unavailable(
                    "etcd client runtime stopped".into(),
                ))
            })
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    fn key(&self, t: Table, k: &[u8]) -> Vec<u8> {
        let mut key = table_prefix(&self.prefix, t);
        key.extend_from_slice(k);
        key
    }

    /// The key that the leader holds with its lease.
    pub fn leader_key(&self) -> &[u8] {
        &self.leader_key
    }

    /// Who leads now: the address it advertises and its term.
    pub fn leader(&self) -> Result<Option<(String, u64)>> {
        let mut kv = self.client.kv_client();
        let key = self.leader_key.clone();
        self.run(async move {
            let r = kv.get(key, None).await.map_err(|e| etcd_error("get", e))?;
            Ok(r.kvs().first().map(|kv| {
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.create_revision() as u64,
                )
            }))
        })
    }

    /// The client, for tools that need more of etcd.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// `txn` under `fence` (a term: the revision that created the leader key).
    fn commit_fenced(&self, txn: Txn, fence: Option<i64>) -> Result<()> {
        let mut compares = Vec::with_capacity(txn.conditions.len() + 1);
        let mut reads = Vec::with_capacity(txn.conditions.len() + 1);
        if let Some(term) = fence {
            compares.push(Compare::create_revision(
                self.leader_key.clone(),
                CompareOp::Equal,
                term,
            ));
            reads.push(TxnOp::get(self.leader_key.clone(), None));
        }
        for c in &txn.conditions {
            let (t, k) = match c {
                Condition::Absent(t, k) => {
                    compares.push(Compare::version(self.key(*t, k), CompareOp::Equal, 0));
                    (t, k)
                }
                Condition::Equals(t, k, v) => {
                    compares.push(Compare::value(self.key(*t, k), CompareOp::Equal, v.clone()));
                    (t, k)
                }
            };
            reads.push(TxnOp::get(self.key(*t, k), None));
        }
        // The last op per key is the outcome of applying them in order.
        let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for op in txn.ops {
            match op {
                Op::Put(t, k, v) => last.insert(self.key(t, &k), Some(v)),
                Op::Delete(t, k) => last.insert(self.key(t, &k), None),
            };
        }
        let ops: Vec<TxnOp> = last
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k, v, None),
                None => TxnOp::delete(k, None),
            })
            .collect();
        let etxn = etcd_client::Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else(reads);
        let mut kv = self.client.kv_client();
        let resp = self.run(async move { kv.txn(etxn).await.map_err(|e| etcd_error("txn", e)) })?;
        if resp.succeeded() {
            return Ok(());
        }
        // Which compare failed, from the values read in the same revision.
        let mut got = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        if let Some(term) = fence {
            let leader = got.next().flatten();
            if leader.as_ref().map(|kv| kv.create_revision()) != Some(term) {
                return Err(CatalogError::Fenced(format!(
                    "term {term} has ended: {}",
                    match leader {
                        Some(kv) => format!(
                            "{} leads now (term {})",
                            String::from_utf8_lossy(kv.value()),
                            kv.create_revision()
                        ),
                        None => "no service leads".into(),
                    }
                )));
            }
        }
        for (c, kv) in txn.conditions.iter().zip(got) {
            let (t, k, ok) = match c {
                Condition::Absent(t, k) => (t, k, kv.is_none()),
                Condition::Equals(t, k, v) => (t, k, kv.is_some_and(|kv| kv.value() == &v[..])),
            };
            if !ok {
                return Err(CatalogError::Conflict {
                    table: t.name(),
                    key: String::from_utf8_lossy(k).into_owned(),
                });
            }
        }
        // Every compare holds on the values read after the refusal: another
        // write came between. The caller reads again either way.
        Err(CatalogError::Conflict {
            table: "etcd",
            key: "(changed between the compare and the read)".into(),
        })
    }
}

impl CatalogStore for EtcdCatalog {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let k = self.key(table, key);
        let mut kv = self.client.kv_client();
        self.run(async move {
            let mut r = kv.get(k, None).await.map_err(|e| etcd_error("get", e))?;
            Ok(r.take_kvs().pop().map(|kv| kv.into_key_value().1))
        })
    }

    fn scan(&self, table: Table, start_after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        let tp = table_prefix(&self.prefix, table);
        let end = prefix_end(&tp);
        let mut from = tp.clone();
        if let Some(k) = start_after {
            // The smallest key after `k`.
            from.extend_from_slice(k);
            from.push(0);
        }
        let mut kv = self.client.kv_client();
        self.run(async move {
            let mut out: Vec<Entry> = Vec::new();
            let mut revision = 0;
            loop {
                let want = if limit == 0 {
                    PAGE
                } else {
                    PAGE.min((limit - out.len()) as i64)
                };
                let mut opts = GetOptions::new().with_range(end.clone()).with_limit(want);
                if revision != 0 {
                    opts = opts.with_revision(revision);
                }
                let mut r = kv
                    .get(from.clone(), Some(opts))
                    .await
                    .map_err(|e| etcd_error("range", e))?;
                if revision == 0 {
                    revision = r.header().map_or(0, |h| h.revision());
                }
                let more = r.more();
                let kvs = r.take_kvs();
                let Some(last) = kvs.last() else { break };
                from = last.key().to_vec();
                from.push(0);
                for kv in kvs {
                    let (k, v) = kv.into_key_value();
                    out.push((k[tp.len()..].to_vec(), v));
                }
                if !more || (limit != 0 && out.len() >= limit) {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn commit(&self, txn: Txn) -> Result<()> {
        self.commit_fenced(txn, None)
    }
}

/// The leader's view of the catalog: every transaction carries the compare
/// on its term, so it is refused once another service leads. A refusal wakes
/// the campaign, which steps down.
///
/// During its term the leader is the only writer (the fence), so it keeps
/// every table but the audit log in memory, loaded at the first read and
/// changed by its own commits once etcd has them: reads cost no round trip
/// to etcd (a create reads nodes, pools and volumes several times; over the
/// network each read is a quorum read). A commit whose outcome is unknown
/// (etcd unreachable, timed out) drops the copy, which is read again. The
/// audit log is read from etcd, so `audit verify` checks what etcd holds.
#[derive(Debug)]
pub struct Fenced {
    inner: Arc<EtcdCatalog>,
    term: i64,
    lost: Arc<tokio::sync::Notify>,
    cache: parking_lot::RwLock<Option<Arc<berth_catalog::MemStore>>>,
    /// Commits, and loads of the copy, one at a time (so that a load never
    /// misses a commit that lands while it reads).
    commits: parking_lot::Mutex<()>,
}

/// Tables the leader keeps in memory: all but the audit log, which only
/// grows.
fn cached(t: Table) -> bool {
    t != Table::Audit
}

impl Fenced {
    fn new(inner: Arc<EtcdCatalog>, term: i64, lost: Arc<tokio::sync::Notify>) -> Self {
        Fenced {
            inner,
            term,
            lost,
            cache: parking_lot::RwLock::new(None),
            commits: parking_lot::Mutex::new(()),
        }
    }

    /// The copy in memory, read from etcd first when there is none.
    fn copy(&self) -> Result<Arc<berth_catalog::MemStore>> {
        if let Some(c) = self.cache.read().as_ref() {
            return Ok(c.clone());
        }
        let _one = self.commits.lock();
        if let Some(c) = self.cache.read().as_ref() {
            return Ok(c.clone());
        }
        let copy = berth_catalog::MemStore::new();
        for t in Table::ALL.into_iter().filter(|t| cached(*t)) {
            let mut txn = Txn::new();
            for (k, v) in self.inner.scan(t, None, 0)? {
                txn = txn.put(t, k, v);
            }
            copy.commit(txn)?;
        }
        let copy = Arc::new(copy);
        *self.cache.write() = Some(copy.clone());
        Ok(copy)
    }
}

impl CatalogStore for Fenced {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if !cached(table) {
            return self.inner.get(table, key);
        }
        self.copy()?.get(table, key)
    }

    fn scan(&self, table: Table, start_after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        if !cached(table) {
            return self.inner.scan(table, start_after, limit);
        }
        self.copy()?.scan(table, start_after, limit)
    }

    fn commit(&self, txn: Txn) -> Result<()> {
        let _one = self.commits.lock();
        let ops: Vec<Op> = txn
            .ops
            .iter()
            .filter(|op| match op {
                Op::Put(t, ..) | Op::Delete(t, _) => cached(*t),
            })
            .cloned()
            .collect();
        let r = self.inner.commit_fenced(txn, Some(self.term));
        match &r {
            Ok(()) => {
                if let Some(c) = self.cache.read().as_ref() {
                    c.commit(Txn {
                        conditions: Vec::new(),
                        ops,
                    })?;
                }
            }
            Err(CatalogError::Fenced(why)) => {
                tracing::warn!(
                    term = self.term,
                    "etcd refused a write of this service: {why}"
                );
                self.lost.notify_one();
            }
            // Nothing was written, but a condition the copy held was false
            // in etcd (someone wrote behind the leader's back), or the
            // outcome is unknown: read the catalog again.
            Err(_) => *self.cache.write() = None,
        }
        r
    }
}

/// Campaigns for the leadership of the catalog until the process ends,
/// on the catalog's own runtime (so nothing in the campaign may call the
/// store's blocking methods: they wait for that runtime),
/// publishing this service's role. `me` is where clients reach this service
/// (what followers tell them); `ttl` the lease (etcd's minimum is about
/// 2 s; failover takes about one `ttl` after a leader dies).
pub fn campaign(
    cat: &Arc<EtcdCatalog>,
    me: String,
    ttl: Duration,
) -> (tokio::sync::watch::Receiver<Role>, Resign) {
    let (tx, rx) = tokio::sync::watch::channel(Role::Follower { leader: None });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rt = cat.rt.as_ref().expect("runtime lives until drop");
    let task = rt.spawn(elect(Arc::downgrade(cat), me, ttl, tx, stop_rx));
    (
        rx,
        Resign {
            stop: stop_tx,
            task: Some(task),
            _catalog: cat.clone(),
        },
    )
}

/// Ends a campaign: a leader revokes its lease, so that another service
/// leads at once instead of one lease later (a rolling update). Dropping it
/// ends the campaign too, without waiting for the revoke.
#[derive(Debug)]
pub struct Resign {
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The campaign runs while this lives (it holds only a weak reference).
    _catalog: Arc<EtcdCatalog>,
}

impl Resign {
    /// Stops campaigning and waits (up to 2 s) for the lease to be revoked.
    pub async fn now(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

/// How often a follower looks at the leadership key.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

async fn elect(
    cat: std::sync::Weak<EtcdCatalog>,
    me: String,
    ttl: Duration,
    tx: tokio::sync::watch::Sender<Role>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ttl_s = ttl.as_secs().max(1) as i64;
    let mut announced: Option<String> = None;
    let follow = |leader: Option<String>, announced: &mut Option<String>| {
        if *announced != leader || matches!(*tx.borrow(), Role::Leader { .. }) {
            tracing::info!(leader = leader.as_deref().unwrap_or("(none)"), "following");
            *announced = leader.clone();
            let _ = tx.send(Role::Follower { leader });
        }
    };
    loop {
        // The catalog (and its runtime) went away with the process's service.
        let Some(c) = cat.upgrade() else { return };
        if tx.is_closed() || *stop.borrow() {
            return;
        }
        let client = c.client.clone();
        let key = c.leader_key.clone();
        let mut lease_client = client.lease_client();
        let lease = match lease_client.grant(ttl_s, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                tracing::warn!(error = %e, "etcd: cannot get a lease; retrying");
                drop(c);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let granted = Instant::now();
        let take = etcd_client::Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                me.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let r = client.kv_client().txn(take).await;
        match r {
            Ok(r) if r.succeeded() => {
                let term = r.header().map_or(0, |h| h.revision());
                let lost = Arc::new(tokio::sync::Notify::new());
                let store = Arc::new(Fenced::new(c.clone(), term, lost.clone()));
                drop(c);
                tracing::info!(term, me = %me, "leading the catalog");
                let _ = tx.send(Role::Leader {
                    term: term as u64,
                    store: store.clone(),
                });
                let why = lead(&client, lease, granted, ttl, &lost, &mut stop).await;
                // Serve nothing more from this term, first: what follows
                // waits on etcd, which may be gone.
                let _ = tx.send(Role::Follower { leader: None });
                announced = None;
                drop(store);
                if *stop.borrow() {
                    let _ = lease_client.revoke(lease).await;
                    tracing::info!(term, "resigned: the lease is revoked");
                    return;
                }
                tracing::warn!(term, "stepping down: {why}");
                // Show that etcd itself refuses this term now (or that the
                // step down was of this service's own caution): an empty
                // transaction under the term's compare. Asynchronous: the
                // store's own calls block, and this runs on its runtime.
                let fence = etcd_client::Txn::new()
                    .when([Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        term,
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]);
                match client.kv_client().txn(fence).await {
                    Ok(r) if !r.succeeded() => {
                        let now = r.op_responses().into_iter().find_map(|o| match o {
                            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                                format!(
                                    "{} leads (term {})",
                                    String::from_utf8_lossy(kv.value()),
                                    kv.create_revision()
                                )
                            }),
                            _ => None,
                        });
                        tracing::warn!(
                            term,
                            "confirmed: etcd refuses writes of term {term}: {}",
                            now.unwrap_or_else(|| "no service leads".into())
                        )
                    }
                    other => tracing::warn!(
                        term,
                        ok = other.is_ok(),
                        "etcd still accepted term {term}, or did not answer; revoking its lease"
                    ),
                }
                // Frees the key now if the lease still holds it.
                let _ = lease_client.revoke(lease).await;
            }
            Ok(r) => {
                drop(c);
                let _ = lease_client.revoke(lease).await;
                let holder = r.op_responses().into_iter().find_map(|o| match o {
                    TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                        (
                            String::from_utf8_lossy(kv.value()).into_owned(),
                            kv.create_revision(),
                        )
                    }),
                    _ => None,
                });
                let Some((leader, rev)) = holder else {
                    continue;
                };
                follow(Some(leader), &mut announced);
                // Until that leadership ends.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(FOLLOW_POLL) => {}
                        _ = stop.changed() => return,
                    }
                    if tx.is_closed() {
                        return;
                    }
                    match client.kv_client().get(key.clone(), None).await {
                        Ok(g) => match g.kvs().first() {
                            Some(kv) if kv.create_revision() == rev => {}
                            _ => break,
                        },
                        Err(e) => tracing::debug!(error = %e, "etcd: reading the leader key"),
                    }
                }
            }
            Err(e) => {
                drop(c);
                let _ = lease_client.revoke(lease).await;
                tracing::warn!(error = %e, "etcd: campaign failed; retrying");
                follow(announced.clone(), &mut announced);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Keeps the lease alive; returns why the leadership ended.
async fn lead(
    client: &Client,
    lease: i64,
    granted: Instant,
    ttl: Duration,
    lost: &tokio::sync::Notify,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> String {
    let every = ttl / 3;
    // The lease holds until `ttl` after the last keep-alive sent before an
    // answer; counting from the send keeps this side's view the earlier one.
    let mut valid_until = granted + ttl;
    let mut lc = client.lease_client();
    let mut stream = None;
    loop {
        tokio::select! {
            _ = lost.notified() => return "etcd refused a write of this term".into(),
            _ = stop.changed() => return "resigning".into(),
            _ = tokio::time::sleep(every) => {}
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(every, async {
            if stream.is_none() {
                stream = Some(lc.keep_alive(lease).await?);
            }
            let (keeper, s) = stream.as_mut().expect("just set");
            keeper.keep_alive().await?;
            s.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(r))) if r.ttl() > 0 => valid_until = sent + ttl,
            Ok(Ok(Some(_))) => return "the lease has expired".into(),
            Ok(Ok(None)) | Ok(Err(_)) => stream = None,
            Err(_) => {}
        }
        if Instant::now() >= valid_until {
            return format!("no keep-alive answered for {} ms", ttl.as_millis());
        }
    }
}

pub mod testing;
