//! The store: one pool, its metadata database, its catalog of volumes and
//! snapshots, and the I/O thread that serves reads and writes.
//!
//! Control operations (create, snapshot, clone, delete, resize, scrub) run on the
//! caller's thread; data operations go to the I/O thread (`io_loop`). Both
//! change the catalog only under the catalog lock, and control operations hold
//! it only to change memory and append their batch to the WAL: the WAL sync,
//! the pool's fdatasync and the garbage collection of what a delete frees
//! happen off it (`gc`), so control work on one volume never holds up I/O on
//! another for more than a moment. A snapshot freezes only its own volume:
//! its new writes wait while the writes in flight land and the pool syncs,
//! so the snapshot holds every write acknowledged before it, durably.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use berth_io::depth::ReadDepthMode;
use berth_io::{Arena, EngineChoice, IoBuf, Waker};
use parking_lot::{Condvar, Mutex};
use rocksdb::{WriteBatch, WriteOptions, DB};

use crate::alloc::Allocator;
use crate::error::{Result, StoreError};
use crate::gc::{self, GcQueue, Pauses};
use crate::io_loop::{self, Op, Outcome, Reply, Request, Zeroing};
use crate::map::{self, Layer};
use crate::meta::{
    self, cf, BlockValue, SnapshotRec, TreeRec, VolumeRec, CF_HEAD, CF_HISTORY, CF_META,
    CF_SNAPSHOTS, CF_TREES, CF_VOLUMES,
};
use crate::pool::{Pool, BLOCK_SIZE};

/// Longest volume or snapshot name accepted.
pub const MAX_NAME_BYTES: usize = 253;
/// Largest volume: 2^60 bytes (1 EiB) keeps every block and byte offset in range.
pub const MAX_VOLUME_BYTES: u64 = 1 << 60;
/// Most mapped blocks one [`Store::block_status`] call examines (per layer); a
/// sparse range costs nothing however large, and the catalog lock is held
/// briefly whatever is asked.
pub const BLOCK_STATUS_MAX_BLOCKS: u64 = 4096;

/// A run of a target's address space: `data` is backed by pool blocks; otherwise
/// it reads as zeros and holds no space (never written, trimmed or zeroed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u64,
    pub data: bool,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Holds `meta/` (RocksDB) and, unless `pool_path` says otherwise, `pool.img`.
    pub data_dir: PathBuf,
    /// A block device or file for the pool; default `data_dir/pool.img`.
    pub pool_path: Option<PathBuf>,
    /// Size of a new pool file (ignored for block devices and existing pools).
    pub pool_size_bytes: u64,
    pub engine: EngineChoice,
    /// Registered buffer memory shared by all requests.
    pub arena_bytes: usize,
    /// Operations in flight in the ring.
    pub queue_depth: u32,
    /// How long to wait for the pool's lock: a crashed previous owner holds it
    /// until the kernel has drained its in-flight I/O.
    pub lock_wait: std::time::Duration,
    /// Block-map entries kept in memory in front of RocksDB
    /// ([`crate::map::HEAD_CACHE_ENTRY_BYTES`] each; see
    /// [`map_cache_entries_for`]).
    pub map_cache_entries: usize,
    /// How long the I/O thread keeps polling for work after its last request
    /// or completion before it sleeps (zero: it sleeps at once). See
    /// `io_loop`'s module documentation.
    pub poll: std::time::Duration,
    /// How many pool reads the engine lets the disk hold at once (found by
    /// measuring unless fixed or off; see `berth_io::depth`).
    pub read_depth: ReadDepthMode,
    /// Writes of at most this many bytes (and not FUA) are deferred: their
    /// data goes into the metadata commit, the write is answered when that
    /// lands, and the pool is written afterwards (zero: never). See
    /// `io_loop`'s module documentation.
    pub defer_max_bytes: u64,
    /// Faults to inject into pool I/O (tests; the volume server sets it from
    /// `BERTH_FAULTS` for fault drills); `None` in normal operation.
    pub faults: Option<Arc<berth_io::fault::FaultPlan>>,
    /// Points where tests hold control work (see [`Pauses`]).
    pub pauses: Option<Arc<Pauses>>,
}

/// The default for [`StoreConfig::defer_max_bytes`]: the small writes.
pub const DEFAULT_DEFER_MAX_BYTES: u64 = 64 << 10;

/// The default memory for the block-map cache, [`StoreConfig::map_cache_entries`]:
/// 2.5 million entries, the blocks of 10 GiB of hot data.
pub const DEFAULT_MAP_CACHE_BYTES: u64 = 128 << 20;

/// The block-map cache entries `bytes` of memory hold.
pub fn map_cache_entries_for(bytes: u64) -> usize {
    (bytes / crate::map::HEAD_CACHE_ENTRY_BYTES as u64).max(1) as usize
}

/// The I/O thread's default polling window, [`StoreConfig::poll`].
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_micros(100);

impl StoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>, pool_size_bytes: u64) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            pool_path: None,
            pool_size_bytes,
            // BERTH_IO_ENGINE=sync|io_uring|auto picks the engine (tests run on both).
            engine: EngineChoice::from_env().unwrap_or_else(|e| {
                tracing::warn!("{e}; using auto");
                EngineChoice::Auto
            }),
            arena_bytes: 64 << 20,
            queue_depth: 256,
            lock_wait: std::time::Duration::from_secs(10),
            map_cache_entries: map_cache_entries_for(DEFAULT_MAP_CACHE_BYTES),
            poll: DEFAULT_POLL,
            read_depth: ReadDepthMode::Auto,
            defer_max_bytes: DEFAULT_DEFER_MAX_BYTES,
            faults: None,
            pauses: None,
        }
    }

    pub fn pool_path(&self) -> PathBuf {
        self.pool_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pool.img"))
    }

    fn meta_dir(&self) -> PathBuf {
        self.data_dir.join("meta")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    /// The snapshot this volume was cloned from, if it still has a name.
    pub source_snapshot: Option<String>,
    /// Pool space the volume's own blocks take: what it wrote since it was
    /// created or cloned, and what its snapshots keep of its earlier
    /// contents. Blocks a clone still shares with its source are not counted.
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub volume: Option<String>,
    pub size_bytes: u64,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub block_size: u64,
    pub total_blocks: u64,
    /// Blocks referenced by some volume or snapshot.
    pub used_blocks: u64,
    /// Freed blocks waiting for a durable commit before reuse.
    pub pending_free_blocks: u64,
    /// Blocks of deferred writes whose records are still in the catalog:
    /// their data reaches the pool shortly after the write is answered, and
    /// the record goes at the next pool sync after that.
    pub deferred_blocks: u64,
    pub volumes: u64,
    pub snapshots: u64,
    /// Block-map entries cached, and how many the cache holds at most.
    pub map_cache_entries: u64,
    pub map_cache_capacity: u64,
    /// Block-map lookups the cache answered, and those that went to RocksDB,
    /// since the store opened.
    pub map_cache_hits: u64,
    pub map_cache_misses: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubError {
    /// Volume or snapshot names that read this block.
    pub owner: String,
    pub offset: u64,
    pub pool_block: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub blocks_checked: u64,
    pub errors: Vec<ScrubError>,
}

/// Mapped blocks a scrub collects before reading them in pool order.
const SCRUB_BATCH: usize = 16 << 10;
/// Most adjacent blocks one scrub read covers (1 MiB).
const SCRUB_RUN_BLOCKS: usize = 256;
/// Reads a scrub keeps in flight.
const SCRUB_THREADS: usize = 8;

/// A mapped block a scrub checks: where it is, its checksum, and its map key
/// (which names the owner when it is bad).
struct ScrubItem {
    block: u64,
    crc: u32,
    /// The epoch the mapping was written at.
    epoch: u64,
    key: Vec<u8>,
}

/// The blocks of a volume changed since its tracking started (or since a
/// round of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The point tracking started at.
    pub point: u64,
    /// The current round.
    pub round: u64,
    /// Sorted, merged byte ranges (offset, length).
    pub ranges: Vec<(u64, u64)>,
}

/// What a data request addresses: a volume's head, or a snapshot (read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Volume(u64),
    Snapshot(u64),
}

/// Counters the volume server exports as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub io_errors: AtomicU64,
    /// Pool reads that fetched a window of scattered blocks at once (an
    /// overwritten layout; see `alloc`).
    pub gathered_reads: AtomicU64,
    /// Times the I/O thread found work while polling, where it would
    /// otherwise have slept and been woken (see `io_loop`).
    pub polled_work: AtomicU64,
    /// Reads the I/O engine lets the device hold at once now (0: no limit,
    /// the thread-pool engine), found by measuring (`berth_io::depth`).
    pub read_depth_limit: AtomicU64,
    /// Reads that waited in the engine for that limit.
    pub reads_held: AtomicU64,
    /// Writes answered once their data was in the metadata commit, before
    /// it reached the pool (see `io_loop`).
    pub deferred_writes: AtomicU64,
    /// Deferred writes found in the catalog at open and written to the pool
    /// then (their process stopped before it had written them).
    pub deferred_replayed: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Tree {
    pub rec: TreeRec,
    /// Snapshot epoch -> snapshot id.
    pub readers: BTreeMap<u64, u64>,
    /// Writes and zeroings in progress (their ranges are the I/O thread's).
    pub writes_in_flight: u32,
    /// A snapshot is being taken: new writes wait until it is recorded.
    pub frozen: bool,
    /// Pool blocks this tree's map entries (head and history) reference,
    /// kept as commits land and rebuilt at open: what a volume costs in pool
    /// space, in O(1) (a clone's blocks shared with its source are the
    /// source's).
    pub owned_blocks: u64,
    /// Change tracking, while on (`changes`).
    pub tracking: Option<crate::changes::Tracking>,
}

impl Tree {
    pub fn new(rec: TreeRec) -> Tree {
        Tree {
            rec,
            readers: BTreeMap::new(),
            writes_in_flight: 0,
            frozen: false,
            owned_blocks: 0,
            tracking: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Snap {
    pub rec: SnapshotRec,
    pub clones: u32,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub trees: HashMap<u64, Tree>,
    pub volumes: HashMap<u64, VolumeRec>,
    pub volume_names: HashMap<String, u64>,
    pub snaps: HashMap<u64, Snap>,
    pub snap_names: HashMap<String, u64>,
    pub next_id: u64,
    pub alloc: Allocator,
    /// Orders frees against reads and WAL syncs (see `alloc`).
    pub seq: u64,
    pub active_reads: BTreeMap<u64, u32>,
    /// Frees with a sequence below this are durable.
    pub synced_seq: u64,
    pub cache: map::HeadCache,
    /// Group commits staged and not yet written (0 or 1).
    pub groups_in_flight: u32,
    /// Pool blocks with a deferred write's record in the catalog, and the
    /// record's key: such a block is not given back to the allocator until
    /// the I/O thread has deleted its record (else a replay at open could
    /// overwrite the block's next owner).
    pub deferred: HashMap<u64, u64>,
    /// The next deferred record's key.
    pub deferred_next: u64,
    /// Deferred blocks freed meanwhile, for the I/O thread.
    pub deferred_freed: Vec<u64>,
}

impl Inner {
    /// Fills `layers` with what a read of `target` walks; returns the size it
    /// may address.
    pub fn layers(&self, target: Target, layers: &mut Vec<Layer>) -> Result<u64> {
        let (tree, view, size) = match target {
            Target::Volume(id) => {
                let v = self
                    .volumes
                    .get(&id)
                    .ok_or_else(|| not_found("volume", id))?;
                (id, None, v.size_bytes)
            }
            Target::Snapshot(id) => {
                let s = self
                    .snaps
                    .get(&id)
                    .ok_or_else(|| not_found("snapshot", id))?;
                (s.rec.tree, Some(s.rec.epoch), s.rec.size_bytes)
            }
        };
        layers.clear();
        layers.push(Layer {
            tree,
            view,
            limit_blocks: u64::MAX,
        });
        let mut tree = tree;
        while let Some((pt, pe, pb)) = self.trees.get(&tree).and_then(|t| t.rec.parent) {
            let limit = layers.last().map_or(u64::MAX, |l| l.limit_blocks).min(pb);
            layers.push(Layer {
                tree: pt,
                view: Some(pe),
                limit_blocks: limit,
            });
            tree = pt;
        }
        Ok(size)
    }

    pub fn volume_id(&self, name: &str) -> Result<u64> {
        self.volume_names
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::NotFound {
                kind: "volume",
                name: name.to_string(),
            })
    }

    pub fn snapshot_id(&self, name: &str) -> Result<u64> {
        self.snap_names
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::NotFound {
                kind: "snapshot",
                name: name.to_string(),
            })
    }

    pub fn read_start(&mut self) -> u64 {
        self.seq += 1;
        *self.active_reads.entry(self.seq).or_default() += 1;
        self.seq
    }

    pub fn read_end(&mut self, seq: u64) {
        if let Some(n) = self.active_reads.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.active_reads.remove(&seq);
            }
        }
        self.release_frees();
    }

    /// Queues blocks freed by a commit that is now in the WAL. A block with
    /// a deferred write's record waits for the I/O thread instead; true if
    /// any does.
    pub fn free_blocks(&mut self, blocks: &[u64]) -> bool {
        if blocks.is_empty() {
            return false;
        }
        self.seq += 1;
        let mut deferred = false;
        for &b in blocks {
            if self.deferred.contains_key(&b) {
                self.deferred_freed.push(b);
                deferred = true;
            } else {
                self.alloc.free_later(self.seq, b);
            }
        }
        deferred
    }

    /// A WAL sync that started when `seq` was current has finished.
    pub fn synced(&mut self, seq: u64) {
        self.synced_seq = self.synced_seq.max(seq + 1);
        self.release_frees();
    }

    pub fn release_frees(&mut self) {
        if self.alloc.pending_blocks() == 0 {
            return;
        }
        let oldest_read = self.active_reads.keys().next().copied().unwrap_or(u64::MAX);
        self.alloc.release(self.synced_seq.min(oldest_read));
    }

    fn volume_info(&self, id: u64) -> Option<VolumeInfo> {
        let v = self.volumes.get(&id)?;
        let source_snapshot = self
            .trees
            .get(&id)
            .and_then(|t| t.rec.parent)
            .and_then(|(pt, pe, _)| {
                self.snaps
                    .values()
                    .find(|s| s.rec.tree == pt && s.rec.epoch == pe && !s.rec.hidden)
            })
            .map(|s| s.rec.name.clone());
        Some(VolumeInfo {
            id,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            created_unix: v.created_unix,
            source_snapshot,
            allocated_bytes: self.trees.get(&id).map_or(0, |t| t.owned_blocks) * BLOCK_SIZE,
        })
    }

    fn snapshot_info(&self, id: u64) -> Option<SnapshotInfo> {
        let s = self.snaps.get(&id)?;
        Some(SnapshotInfo {
            id,
            name: s.rec.name.clone(),
            volume: self.volumes.get(&s.rec.tree).map(|v| v.name.clone()),
            size_bytes: s.rec.size_bytes,
            created_unix: s.rec.created_unix,
        })
    }
}

fn not_found(kind: &'static str, id: u64) -> StoreError {
    StoreError::NotFound {
        kind,
        name: format!("#{id}"),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn reserve_blocks(total: u64) -> u64 {
    (total / 200).max(16)
}

/// Refuses a snapshot or clone the pool could not honour: once one exists,
/// every write to the volumes it shares blocks with needs new space, and a
/// pool already at its reserve would fail them all with ENOSPC. Space about
/// to be freed (pending the next flush) counts as free.
fn room_for(inner: &Inner, what: &'static str) -> Result<()> {
    let a = &inner.alloc;
    let free = a.free_blocks() + a.pending_blocks();
    let reserve = reserve_blocks(a.blocks());
    if free < reserve {
        return Err(StoreError::NoRoom {
            what,
            free_blocks: free,
            reserve_blocks: reserve,
        });
    }
    Ok(())
}

/// Checks a user-given name: non-empty, bounded, printable, no path separators.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(StoreError::InvalidArgument(format!(
            "{kind} name {name:?} {why}"
        )))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(&format!("is longer than {MAX_NAME_BYTES} bytes"));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return bad("contains a control character or a path separator");
    }
    if name == "." || name == ".." {
        return bad("is reserved");
    }
    Ok(())
}

/// The data folder and the catalog's folder are their owner's alone: the pool
/// and the block maps are every volume's data (see `berth_io::private`).
fn private_dir(dir: &std::path::Path) -> Result<()> {
    berth_io::private::dir(dir).map_err(|source| StoreError::PoolFile {
        path: dir.to_path_buf(),
        source,
    })
}

fn validate_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 || size_bytes > MAX_VOLUME_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "volume size {size_bytes} must be between 1 byte and {MAX_VOLUME_BYTES} bytes"
        )));
    }
    Ok(())
}

pub(crate) struct Shared {
    pub db: DB,
    pub pool: Pool,
    pub arena: Arc<Arena>,
    pub inner: Mutex<Inner>,
    pub queue: Mutex<Vec<Request>>,
    pub parked: AtomicBool,
    pub waker: OnceLock<Waker>,
    pub shutdown: AtomicBool,
    pub counters: Counters,
    /// The committer's result for the group in flight, for the I/O thread.
    pub committed: Mutex<Option<Result<()>>>,
    /// The WAL syncer's result for the sync in flight, with the sequence it covers.
    pub wal_synced: Mutex<Option<(u64, Result<()>)>>,
    /// Signalled when a group commit has landed, when a frozen volume's
    /// last write in flight lands, and when a snapshot thaws its volume.
    pub commit_idle: Condvar,
    /// Trees a snapshot has thawed, for the I/O thread to let their waiting
    /// writes go.
    pub thawed: Mutex<Vec<u64>>,
    /// Set when `thawed` gains a tree.
    pub thaw_pending: AtomicBool,
    /// Set when a deferred block was freed (`Inner::deferred_freed`).
    pub deferred_freed: AtomicBool,
    /// Trees with garbage to collect (see `gc`).
    pub gc: Mutex<GcQueue>,
    /// Signalled when a tree is queued and when a walk ends.
    pub gc_wake: Condvar,
    pub pauses: Option<Arc<Pauses>>,
}

impl Shared {
    /// The catalog lock, taken when no group commit is between staging and
    /// landing: for control operations that read or change the block maps
    /// (snapshots, deletes), so a staged batch never acts on a reader set that
    /// changed under it.
    pub fn lock_quiesced(&self) -> parking_lot::MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock();
        while inner.groups_in_flight > 0 {
            self.commit_idle.wait(&mut inner);
        }
        inner
    }

    /// Makes everything in the WAL so far durable, taking the catalog lock
    /// only for a moment before and after the sync; frees queued before it
    /// may then be reused. Control operations append their batch under the
    /// lock and call this after releasing it.
    pub fn sync_wal(&self) -> Result<()> {
        let seq = self.inner.lock().seq;
        self.db.flush_wal(true)?;
        self.inner.lock().synced(seq);
        Ok(())
    }

    /// Ends a snapshot's freeze of `tree`: the I/O thread lets the writes
    /// that waited go.
    fn thaw(&self, tree: u64) {
        if let Some(t) = self.inner.lock().trees.get_mut(&tree) {
            t.frozen = false;
        }
        self.thawed.lock().push(tree);
        self.thaw_pending.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.get() {
            w.wake();
        }
        self.commit_idle.notify_all();
    }

    /// Data of acknowledged writes on stable storage: pool first, then the WAL, so
    /// a durable map never points at data that is not.
    pub fn sync_pool(&self) -> Result<()> {
        self.pool.file.sync_data().map_err(|source| StoreError::Io {
            op: "fdatasync",
            offset: 0,
            source,
        })
    }
}

/// Submits data requests to a store's I/O thread; see [`Store::submitter`].
#[derive(Clone)]
pub struct Submitter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter").finish()
    }
}

impl Submitter {
    pub fn submit(&self, op: Op, tag: u64, reply: Arc<dyn Reply>) {
        io_loop::submit(&self.shared, Request { op, tag, reply });
    }

    /// A buffer for a write of `len` bytes at `offset`; the payload goes at the
    /// returned position.
    pub fn write_buffer(&self, offset: u64, len: usize) -> (IoBuf, usize) {
        io_loop::write_buffer(&self.shared.arena, offset, len)
    }
}

/// A Berth block store over one pool.
pub struct Store {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The garbage collector (`gc`).
    collector: Option<std::thread::JoinHandle<()>>,
    engine_name: &'static str,
    registered_buffer_bytes: usize,
    poll: std::time::Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pool", &self.shared.pool.path)
            .field("engine", &self.engine_name)
            .finish()
    }
}

impl Store {
    /// Formats a new pool and metadata database in `cfg.data_dir`.
    pub fn create(cfg: &StoreConfig) -> Result<Store> {
        let meta_dir = cfg.meta_dir();
        if meta_dir.exists() {
            return Err(StoreError::FailedPrecondition(format!(
                "{} already holds a store; open it instead",
                cfg.data_dir.display()
            )));
        }
        private_dir(&cfg.data_dir)?;
        let pool_path = cfg.pool_path();
        let pool = Pool::create(&pool_path, Some(cfg.pool_size_bytes), cfg.lock_wait)?;
        let db = match meta::open_db(&meta_dir, true).and_then(|db| {
            // RocksDB makes its files with the umask's modes: the folder keeps
            // everyone else out of them.
            private_dir(&meta_dir)?;
            Ok(db)
        }) {
            Ok(db) => db,
            Err(e) => {
                if cfg.pool_path.is_none() {
                    let _ = std::fs::remove_file(&pool_path);
                }
                return Err(e);
            }
        };
        let mut rec = pool.sb.uuid.as_bytes().to_vec();
        rec.extend_from_slice(&pool.sb.blocks.to_le_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&db, CF_META), b"pool", rec);
        batch.put_cf(cf(&db, CF_META), b"next_id", 1u64.to_le_bytes());
        db.write_opt(batch, &wo)?;
        tracing::info!(pool = %pool_path.display(), uuid = %pool.sb.uuid, blocks = pool.sb.blocks, "created pool");
        Self::start(cfg, pool, db)
    }

    /// Opens an existing store.
    pub fn open(cfg: &StoreConfig) -> Result<Store> {
        let meta_dir = cfg.meta_dir();
        if !meta_dir.exists() {
            return Err(StoreError::NotFound {
                kind: "store",
                name: cfg.data_dir.display().to_string(),
            });
        }
        private_dir(&cfg.data_dir)?;
        let pool = Pool::open(&cfg.pool_path(), cfg.lock_wait)?;
        let db = meta::open_db(&meta_dir, false)?;
        private_dir(&meta_dir)?;
        let rec = db.get_cf(cf(&db, CF_META), b"pool")?.unwrap_or_default();
        if rec.len() < 16 || rec[..16] != pool.sb.uuid.as_bytes()[..] {
            return Err(StoreError::BadPool {
                path: pool.path.clone(),
                reason: format!(
                    "pool {} is not the pool this metadata belongs to",
                    pool.sb.uuid
                ),
            });
        }
        Self::start(cfg, pool, db)
    }

    /// Opens the store in `cfg.data_dir`, creating it if there is none.
    pub fn open_or_create(cfg: &StoreConfig) -> Result<Store> {
        if cfg.meta_dir().exists() {
            Self::open(cfg)
        } else {
            Self::create(cfg)
        }
    }

    fn start(cfg: &StoreConfig, pool: Pool, db: DB) -> Result<Store> {
        let (replayed, deferred_next) = io_loop::replay_deferred(&db, &pool)?;
        let mut inner = load(&db, &pool, cfg.map_cache_entries)?;
        inner.deferred_next = deferred_next;
        // Walks a crash interrupted, and (to be safe) every dead tree.
        let mut gc_queue = GcQueue::default();
        gc_queue.pending.extend(gc::pending_at_open(&db)?);
        gc_queue.pending.extend(
            inner
                .trees
                .iter()
                .filter(|(_, t)| !t.rec.live)
                .map(|(&id, _)| id),
        );
        let arena = Arena::new(cfg.arena_bytes).map_err(|source| StoreError::Io {
            op: "allocate buffers",
            offset: 0,
            source,
        })?;
        let shared = Arc::new(Shared {
            db,
            pool,
            arena,
            inner: Mutex::new(inner),
            queue: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            waker: OnceLock::new(),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
            committed: Mutex::new(None),
            wal_synced: Mutex::new(None),
            commit_idle: Condvar::new(),
            thawed: Mutex::new(Vec::new()),
            thaw_pending: AtomicBool::new(false),
            deferred_freed: AtomicBool::new(false),
            gc: Mutex::new(gc_queue),
            gc_wake: Condvar::new(),
            pauses: cfg.pauses.clone(),
        });
        let (thread, engine_name, registered_buffer_bytes) = io_loop::spawn(
            shared.clone(),
            cfg.engine,
            cfg.queue_depth,
            cfg.read_depth,
            cfg.poll,
            cfg.defer_max_bytes,
            cfg.faults.clone(),
        )?;
        shared
            .counters
            .deferred_replayed
            .store(replayed, Ordering::Relaxed);
        let gsh = shared.clone();
        let collector = berth_io::spawn_critical("berth-gc", move || gc::run(&gsh));
        let mut store = Store {
            shared,
            thread: Some(thread),
            collector: None,
            engine_name,
            registered_buffer_bytes,
            poll: cfg.poll,
        };
        // On failure, dropping the store stops the I/O thread.
        store.collector = Some(collector.map_err(|source| StoreError::Io {
            op: "start the garbage collector",
            offset: 0,
            source,
        })?);
        Ok(store)
    }

    /// `"io_uring"` or `"sync"`.
    pub fn engine_name(&self) -> &'static str {
        self.engine_name
    }

    /// Bytes of the buffer arena registered with io_uring (0 on the sync engine,
    /// or when RLIMIT_MEMLOCK allowed none).
    pub fn registered_buffer_bytes(&self) -> usize {
        self.registered_buffer_bytes
    }

    /// The polling window ([`StoreConfig::poll`]); the frontends that feed
    /// the store poll for their next request as long.
    pub fn poll(&self) -> std::time::Duration {
        self.poll
    }

    pub fn arena(&self) -> &Arc<Arena> {
        &self.shared.arena
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn pool_uuid(&self) -> uuid::Uuid {
        self.shared.pool.sb.uuid
    }

    // ---- control ----------------------------------------------------------

    /// Creates a thin volume; the same name and size again returns the existing
    /// volume, a different size is `AlreadyExists`. Returns once the record
    /// is durable.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        validate_name("volume", name)?;
        validate_size(size_bytes)?;
        let sh = &self.shared;
        let info = {
            let mut inner = sh.inner.lock();
            match inner.volume_names.get(name) {
                Some(&id) => existing_volume(&inner, id, size_bytes, None)?,
                None => {
                    let id = new_volume(sh, &mut inner, name, size_bytes, None)?;
                    tracing::info!(volume = name, id, size_bytes, "created volume");
                    inner.volume_info(id).expect("just inserted")
                }
            }
        };
        // Also for an existing volume: another caller may still be syncing it.
        sh.sync_wal()?;
        Ok(info)
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let inner = self.shared.inner.lock();
        let id = inner.volume_id(name)?;
        Ok(inner.volume_info(id).expect("named volume exists"))
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let inner = self.shared.inner.lock();
        let mut v: Vec<_> = inner
            .volumes
            .keys()
            .filter_map(|&id| inner.volume_info(id))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Grows a volume online; shrinking is refused.
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        validate_size(size_bytes)?;
        let sh = &self.shared;
        let info = {
            let mut inner = sh.inner.lock();
            let id = inner.volume_id(name)?;
            let mut rec = inner.volumes[&id].clone();
            if size_bytes < rec.size_bytes {
                return Err(StoreError::ShrinkRefused {
                    volume: name.to_string(),
                    size_bytes: rec.size_bytes,
                    requested_bytes: size_bytes,
                });
            }
            if size_bytes > rec.size_bytes {
                rec.size_bytes = size_bytes;
                let mut b = WriteBatch::default();
                b.put_cf(cf(&sh.db, CF_VOLUMES), meta::id_key(id), rec.encode());
                sh.db.write(b)?;
                inner.volumes.insert(id, rec);
                tracing::info!(volume = name, size_bytes, "resized volume");
            }
            inner.volume_info(id).expect("named volume exists")
        };
        sh.sync_wal()?;
        Ok(info)
    }

    /// Starts recording which blocks of volume `name` change (see
    /// `changes`), from `point` (a replica-set generation, for the caller's
    /// bookkeeping) on, and starts a new round: writes staged after this
    /// returns are recorded in it (or a later one). Already tracking: the
    /// earlier point stays. Returns the point and the new round.
    ///
    /// Not synced: the caller is in a fault's critical path, and the WAL
    /// keeps order, so any later write that survives a crash finds the
    /// tracking point with it; a point lost with the WAL's unsynced tail is
    /// lost with every change it would have listed (the volume then says it
    /// is not tracking, and a rebuild from it copies everything).
    pub fn track_changes(&self, name: &str, point: u64) -> Result<(u64, u64)> {
        let sh = &self.shared;
        let mut inner = sh.inner.lock();
        let id = inner.volume_id(name)?;
        let t = inner.trees.get_mut(&id).expect("a volume has its tree");
        let next = match t.tracking {
            Some(c) => crate::changes::Tracking {
                point: c.point,
                round: c.round + 1,
            },
            None => crate::changes::Tracking { point, round: 1 },
        };
        sh.db.put_cf(
            cf(&sh.db, CF_META),
            crate::changes::track_key(id),
            next.encode(),
        )?;
        t.tracking = Some(next);
        tracing::info!(
            volume = name,
            point = next.point,
            round = next.round,
            "tracking changed blocks"
        );
        Ok((next.point, next.round))
    }

    /// The point volume `name` tracks changes from, if it does.
    pub fn tracking(&self, name: &str) -> Result<Option<u64>> {
        let inner = self.shared.inner.lock();
        let id = inner.volume_id(name)?;
        Ok(inner
            .trees
            .get(&id)
            .and_then(|t| t.tracking)
            .map(|t| t.point))
    }

    /// The byte ranges `(offset, len)` of volume `name` changed since its
    /// tracking started, sorted and merged: None when it is not tracking,
    /// or when there are more than `max_ranges` (copy everything instead).
    /// Writes not yet landed are not listed.
    /// `since`: only the blocks changed in that round or later (0: all).
    pub fn changed_ranges(
        &self,
        name: &str,
        since: u64,
        max_ranges: usize,
    ) -> Result<Option<Changes>> {
        let sh = &self.shared;
        let (id, t) = {
            let inner = sh.inner.lock();
            let id = inner.volume_id(name)?;
            match inner.trees.get(&id).and_then(|t| t.tracking) {
                Some(t) => (id, t),
                None => return Ok(None),
            }
        };
        let bs = BLOCK_SIZE;
        Ok(
            crate::changes::ranges(&sh.db, id, since, max_ranges)?.map(|v| {
                let ranges = v.into_iter().map(|(lba, n)| (lba * bs, n * bs)).collect();
                Changes {
                    point: t.point,
                    round: t.round,
                    ranges,
                }
            }),
        )
    }

    /// Stops tracking volume `name` and forgets what it recorded.
    pub fn stop_tracking(&self, name: &str) -> Result<()> {
        let sh = &self.shared;
        {
            let mut inner = sh.inner.lock();
            let id = inner.volume_id(name)?;
            let t = inner.trees.get_mut(&id).expect("a volume has its tree");
            if t.tracking.take().is_none() {
                return Ok(());
            }
            let mut b = WriteBatch::default();
            crate::changes::clear(&sh.db, &mut b, id);
            sh.db.write(b)?;
            tracing::info!(volume = name, "stopped tracking changed blocks");
        }
        sh.sync_wal()?;
        Ok(())
    }

    /// Deletes a volume: its record goes at once (durably, before this
    /// returns), its blocks in the background (`gc`), except those its
    /// snapshots (or clones through them) still read.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let sh = &self.shared;
        {
            let mut inner = sh.lock_quiesced();
            let id = inner.volume_id(name)?;
            if inner.trees[&id].writes_in_flight > 0 {
                return Err(StoreError::FailedPrecondition(format!(
                    "volume {name:?} has writes in flight; retry when they finish"
                )));
            }
            let mut b = WriteBatch::default();
            b.delete_cf(cf(&sh.db, CF_VOLUMES), meta::id_key(id));
            if let Some(t) = inner.trees.get_mut(&id) {
                t.rec.live = false;
                b.put_cf(cf(&sh.db, CF_TREES), meta::id_key(id), t.rec.encode());
            }
            gc::mark(sh, &mut b, id);
            if let Some(t) = inner.trees.get_mut(&id) {
                if t.tracking.take().is_some() {
                    crate::changes::clear(&sh.db, &mut b, id);
                }
            }
            sh.db.write(b)?;
            inner.volumes.remove(&id);
            inner.volume_names.remove(name);
            gc::wake(sh, [id]);
        }
        sh.sync_wal()?;
        tracing::info!(volume = name, "deleted volume");
        Ok(())
    }

    /// Takes a point-in-time, read-only snapshot of a volume (O(1)). The same
    /// name for the same volume again returns the existing snapshot.
    ///
    /// Only this volume pauses: its new writes wait while the writes in
    /// flight land and the pool syncs (so every write acknowledged before
    /// the snapshot is in it, durably), then the snapshot is recorded.
    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        validate_name("snapshot", name)?;
        let sh = &self.shared;
        // Freeze the volume (one snapshot of it at a time).
        let vid = {
            let mut inner = sh.inner.lock();
            loop {
                let vid = inner.volume_id(volume)?;
                if let Some(&sid) = inner.snap_names.get(name) {
                    drop(inner);
                    return self.existing_snapshot(sid, vid, name);
                }
                room_for(&inner, "snapshot")?;
                let t = inner.trees.get_mut(&vid).expect("volume has a tree");
                if !t.frozen {
                    t.frozen = true;
                    break vid;
                }
                sh.commit_idle.wait(&mut inner);
            }
        };
        let taken = self.snapshot_frozen(vid, volume, name);
        sh.thaw(vid);
        let info = taken?;
        sh.sync_wal()?;
        Ok(info)
    }

    /// A snapshot that exists already: the same one if it is of this volume.
    fn existing_snapshot(&self, sid: u64, vid: u64, name: &str) -> Result<SnapshotInfo> {
        let info = {
            let inner = self.shared.inner.lock();
            match inner.snaps.get(&sid) {
                Some(s) if s.rec.tree == vid => inner.snapshot_info(sid),
                Some(_) => {
                    return Err(StoreError::AlreadyExists {
                        kind: "snapshot",
                        name: name.to_string(),
                        detail: "it is a snapshot of another volume".into(),
                    })
                }
                None => None,
            }
        };
        // Another caller may still be syncing it.
        self.shared.sync_wal()?;
        info.ok_or_else(|| StoreError::NotFound {
            kind: "snapshot",
            name: name.to_string(),
        })
    }

    /// The part of a snapshot with its volume frozen.
    fn snapshot_frozen(&self, vid: u64, volume: &str, name: &str) -> Result<SnapshotInfo> {
        let sh = &self.shared;
        if let Some(p) = &sh.pauses {
            p.at("snapshot-frozen");
        }
        {
            let mut inner = sh.inner.lock();
            while inner
                .trees
                .get(&vid)
                .is_some_and(|t| t.writes_in_flight > 0)
            {
                sh.commit_idle.wait(&mut inner);
            }
        }
        // Acknowledged writes are in the pool, or in their deferred records
        // until they are; make them durable (pool, then WAL) before the
        // snapshot that captures them is. Off the lock: a slow disk delays
        // this volume only.
        sh.sync_pool()?;
        let mut inner = sh.inner.lock();
        if inner.volume_id(volume)? != vid {
            return Err(StoreError::NotFound {
                kind: "volume",
                name: volume.to_string(),
            });
        }
        if let Some(&sid) = inner.snap_names.get(name) {
            drop(inner);
            return self.existing_snapshot(sid, vid, name);
        }
        let sid = inner.next_id;
        let tree = inner.trees.get(&vid).expect("volume has a tree");
        let epoch = tree.rec.head_epoch;
        let mut trec = tree.rec.clone();
        trec.head_epoch += 1;
        let srec = SnapshotRec {
            name: name.to_string(),
            tree: vid,
            epoch,
            size_bytes: inner.volumes[&vid].size_bytes,
            created_unix: now_unix(),
            hidden: false,
        };
        let mut b = WriteBatch::default();
        b.put_cf(cf(&sh.db, CF_TREES), meta::id_key(vid), trec.encode());
        b.put_cf(cf(&sh.db, CF_SNAPSHOTS), meta::id_key(sid), srec.encode());
        b.put_cf(cf(&sh.db, CF_META), b"next_id", (sid + 1).to_le_bytes());
        sh.db.write(b)?;
        inner.next_id = sid + 1;
        let t = inner.trees.get_mut(&vid).expect("volume has a tree");
        t.rec = trec;
        t.readers.insert(epoch, sid);
        inner.snaps.insert(
            sid,
            Snap {
                rec: srec,
                clones: 0,
            },
        );
        inner.snap_names.insert(name.to_string(), sid);
        tracing::info!(volume, snapshot = name, epoch, "created snapshot");
        Ok(inner.snapshot_info(sid).expect("just inserted"))
    }

    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let inner = self.shared.inner.lock();
        let id = inner.snapshot_id(name)?;
        Ok(inner.snapshot_info(id).expect("named snapshot exists"))
    }

    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        let inner = self.shared.inner.lock();
        let mut v: Vec<_> = inner
            .snap_names
            .values()
            .filter_map(|&id| inner.snapshot_info(id))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Deletes a snapshot. While clones still read through it, it is only hidden
    /// (its name is free again); its blocks go back when the last clone does.
    /// Like a volume's, its blocks are collected in the background.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let sh = &self.shared;
        {
            let mut inner = sh.lock_quiesced();
            let sid = inner.snapshot_id(name)?;
            inner.snap_names.remove(name);
            let mut b = WriteBatch::default();
            let walk = drop_snapshot(sh, &mut inner, &mut b, sid);
            sh.db.write(b)?;
            gc::wake(sh, walk);
        }
        sh.sync_wal()?;
        tracing::info!(snapshot = name, "deleted snapshot");
        Ok(())
    }

    /// Creates a writable volume from a snapshot (O(1)). `size_bytes` defaults to
    /// the snapshot's size and may be larger, never smaller.
    pub fn clone_snapshot(
        &self,
        snapshot: &str,
        name: &str,
        size_bytes: Option<u64>,
    ) -> Result<VolumeInfo> {
        validate_name("volume", name)?;
        let sh = &self.shared;
        let info = {
            let mut inner = sh.inner.lock();
            let sid = inner.snapshot_id(snapshot)?;
            let src = inner.snaps[&sid].rec.clone();
            let size_bytes = size_bytes.unwrap_or(src.size_bytes);
            validate_size(size_bytes)?;
            if size_bytes < src.size_bytes {
                return Err(StoreError::InvalidArgument(format!(
                    "clone size {size_bytes} is smaller than snapshot {snapshot:?} ({} bytes)",
                    src.size_bytes
                )));
            }
            let parent = (src.tree, src.epoch, src.size_bytes.div_ceil(BLOCK_SIZE));
            match inner.volume_names.get(name) {
                Some(&id) => existing_volume(&inner, id, size_bytes, Some(parent))?,
                None => {
                    room_for(&inner, "clone")?;
                    let id = new_volume(sh, &mut inner, name, size_bytes, Some(parent))?;
                    if let Some(s) = inner.snaps.get_mut(&sid) {
                        s.clones += 1;
                    }
                    tracing::info!(snapshot, volume = name, "cloned snapshot");
                    inner.volume_info(id).expect("just inserted")
                }
            }
        };
        sh.sync_wal()?;
        Ok(info)
    }

    /// Waits until the background garbage collection has nothing left to do
    /// (the space of everything deleted so far is free), or the store stops.
    pub fn settle(&self) {
        let sh = &self.shared;
        let mut q = sh.gc.lock();
        while (!q.pending.is_empty() || q.running.is_some()) && !sh.shutdown.load(Ordering::SeqCst)
        {
            sh.gc_wake.wait(&mut q);
        }
    }

    /// The free blocks below which snapshots and clones are refused up front:
    /// 0.5% of the pool, at least 16 blocks.
    pub fn reserve_blocks(&self) -> u64 {
        reserve_blocks(self.shared.inner.lock().alloc.blocks())
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.shared.inner.lock();
        let a = &inner.alloc;
        PoolStats {
            block_size: BLOCK_SIZE,
            total_blocks: a.blocks(),
            used_blocks: a.blocks() - a.free_blocks() - a.pending_blocks(),
            pending_free_blocks: a.pending_blocks(),
            deferred_blocks: inner.deferred.len() as u64,
            volumes: inner.volumes.len() as u64,
            snapshots: inner.snap_names.len() as u64,
            map_cache_entries: inner.cache.len() as u64,
            map_cache_capacity: inner.cache.capacity() as u64,
            map_cache_hits: inner.cache.hits,
            map_cache_misses: inner.cache.misses,
        }
    }

    /// Waits for the garbage collection of everything deleted so far, makes
    /// every acknowledged write durable and returns freed space to the
    /// allocator (an NBD FLUSH does the last two): from a control thread.
    pub fn sync(&self) -> Result<()> {
        self.settle();
        self.flush()
    }

    /// Reads every allocated block of the pool and checks its checksum.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let sh = &self.shared;
        // Blocks freed while we scan are not reused until we finish.
        let seq = sh.inner.lock().read_start();
        let result = (|| {
            let mut report = ScrubReport::default();
            let mut batch = Vec::with_capacity(SCRUB_BATCH);
            for family in [CF_HEAD, CF_HISTORY] {
                let mut it = sh.db.raw_iterator_cf(cf(&sh.db, family));
                it.seek_to_first();
                while let (Some(k), Some(v)) = (it.key(), it.value()) {
                    let entry = meta::MapEntry::decode(v)?;
                    if let BlockValue::Data { block, crc } = entry.value {
                        batch.push(ScrubItem {
                            block,
                            crc,
                            epoch: entry.epoch,
                            key: k.to_vec(),
                        });
                        if batch.len() == SCRUB_BATCH {
                            self.scrub_batch(&mut batch, &mut report)?;
                        }
                    }
                    it.next();
                }
                it.status()?;
            }
            self.scrub_batch(&mut batch, &mut report)?;
            Ok(report)
        })();
        sh.inner.lock().read_end(seq);
        result
    }

    /// Checks a batch of mapped blocks: sorted by pool block, runs of adjacent
    /// blocks are read with one `pread` each (up to 1 MiB), by
    /// [`SCRUB_THREADS`] readers at once; then empties the batch. (One 4 KiB
    /// `pread` at a time was 47 MB/s on a virtio disk.)
    fn scrub_batch(&self, batch: &mut Vec<ScrubItem>, report: &mut ScrubReport) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let sh = &self.shared;
        batch.sort_unstable_by_key(|i| i.block);
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=batch.len() {
            let ends = i == batch.len()
                || batch[i].block != batch[i - 1].block + 1
                || i - start == SCRUB_RUN_BLOCKS;
            if ends {
                runs.push(start..i);
                start = i;
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let bad = parking_lot::Mutex::new(Vec::new());
        let items = &batch[..];
        std::thread::scope(|scope| {
            for _ in 0..SCRUB_THREADS.min(runs.len()) {
                scope.spawn(|| {
                    let mut buf = IoBuf::heap(SCRUB_RUN_BLOCKS * BLOCK_SIZE as usize);
                    loop {
                        let r = next.fetch_add(1, Ordering::Relaxed);
                        let Some(run) = runs.get(r) else { break };
                        let bytes = run.len() * BLOCK_SIZE as usize;
                        let data = &mut buf.as_mut_slice()[..bytes];
                        let off = sh.pool.block_offset(items[run.start].block);
                        let read = sh.pool.file.read_exact_at(data, off).is_ok();
                        for (k, item) in items[run.clone()].iter().enumerate() {
                            let b = &data[k * BLOCK_SIZE as usize..(k + 1) * BLOCK_SIZE as usize];
                            if !read || block_crc(item.block, b) != item.crc {
                                bad.lock().push(run.start + k);
                            }
                        }
                    }
                });
            }
        });
        report.blocks_checked += batch.len() as u64;
        let mut bad = bad.into_inner();
        bad.sort_unstable();
        // A deferred write's block may not be in the pool yet: its data is
        // in its record. Once the record is gone the data is in the pool, so
        // a block whose record went meanwhile is read again.
        bad.retain(|&i| {
            let item = &batch[i];
            if io_loop::record_copy(sh, item.block, item.crc).is_some() {
                return false;
            }
            let mut b = IoBuf::heap(BLOCK_SIZE as usize);
            let off = sh.pool.block_offset(item.block);
            sh.pool.file.read_exact_at(b.as_mut_slice(), off).is_err()
                || block_crc(item.block, b.as_slice()) != item.crc
        });
        for i in bad {
            let item = &batch[i];
            let (tree, lba, history) = meta::parse_key(&item.key).unwrap_or((0, 0, None));
            let until = match history {
                Some(_) => map::replaced_at(&sh.db, tree, lba, item.epoch)?,
                None => u64::MAX,
            };
            let owner = owner_names(&sh.inner.lock(), tree, history.is_none(), item.epoch, until);
            sh.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                owner,
                offset = lba * BLOCK_SIZE,
                pool_block = item.block,
                "scrub: checksum mismatch"
            );
            report.errors.push(ScrubError {
                owner,
                offset: lba * BLOCK_SIZE,
                pool_block: item.block,
            });
        }
        batch.clear();
        Ok(())
    }

    /// How `[offset, offset + len)` of a target is backed, as runs of extents in
    /// order from `offset` (what NBD's `base:allocation` reports, so sparse-aware
    /// clients skip holes). Stops early after examining
    /// [`BLOCK_STATUS_MAX_BLOCKS`] mapped blocks: the caller asks again from where
    /// the answer ends. O(mapped blocks examined), not O(range). The catalog
    /// lock is held only to find the target's layers: the scan reads RocksDB
    /// without it (a write racing it may or may not be seen, as with a read).
    pub fn block_status(&self, target: Target, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let sh = &self.shared;
        let mut layers = Vec::new();
        let size = sh.inner.lock().layers(target, &mut layers)?;
        let end = offset.checked_add(len).filter(|&e| e <= size && len > 0);
        let Some(end) = end else {
            return Err(StoreError::OutOfRange {
                op: "block status",
                volume: format!("{target:?}"),
                offset,
                len,
                size_bytes: size,
            });
        };
        let first = offset / BLOCK_SIZE;
        let last = end.div_ceil(BLOCK_SIZE);
        let (mapped, complete_to) = map::ancestor_lbas_upto(
            &sh.db,
            &layers,
            first,
            last - first,
            BLOCK_STATUS_MAX_BLOCKS as usize,
        )?;
        let end = end.min(complete_to * BLOCK_SIZE);
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, from: u64, to: u64, data: bool| {
            if to <= from {
                return;
            }
            match out.last_mut() {
                Some(e) if e.data == data => e.len_bytes += to - from,
                _ => out.push(Extent {
                    len_bytes: to - from,
                    data,
                }),
            }
        };
        let mut at = offset;
        for lba in mapped {
            let (value, _) = map::lookup_uncached(&sh.db, &layers, lba)?;
            if matches!(value, Some(BlockValue::Data { .. })) {
                let (b0, b1) = (
                    (lba * BLOCK_SIZE).max(offset),
                    ((lba + 1) * BLOCK_SIZE).min(end),
                );
                push(&mut out, at, b0, false);
                push(&mut out, b0, b1, true);
                at = b1;
            }
        }
        push(&mut out, at, end, false);
        Ok(out)
    }

    // ---- data -------------------------------------------------------------

    /// The data-path handle of a volume.
    pub fn volume_target(&self, name: &str) -> Result<Target> {
        Ok(Target::Volume(self.volume(name)?.id))
    }

    /// The read-only data-path handle of a snapshot.
    pub fn snapshot_target(&self, name: &str) -> Result<Target> {
        Ok(Target::Snapshot(self.snapshot(name)?.id))
    }

    /// Hands a request to the I/O thread; `reply` is called from it with `tag`.
    pub fn submit(&self, op: Op, tag: u64, reply: Arc<dyn Reply>) {
        io_loop::submit(&self.shared, Request { op, tag, reply });
    }

    /// A handle that submits requests (from any thread, including inside a
    /// `Reply`) without owning the store.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            shared: self.shared.clone(),
        }
    }

    fn call(&self, op: Op) -> Outcome {
        let waiter = Arc::new(Waiter::default());
        self.submit(op, 0, waiter.clone());
        let mut slot = waiter.result.lock();
        loop {
            if let Some(o) = slot.take() {
                return o;
            }
            waiter.cond.wait(&mut slot);
        }
    }

    /// Reads `len` bytes at `offset` (blocking).
    pub fn read(&self, target: Target, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self.call(Op::Read {
            target,
            offset,
            len,
        }) {
            Outcome::Read(r) => r.map(|d| d.bytes().to_vec()),
            Outcome::Done(Err(e)) => Err(e),
            other => unreachable_outcome(other),
        }
    }

    /// Writes `data` at `offset` (blocking); with `fua` it is durable on return.
    pub fn write(&self, target: Target, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let (buf, start) = self.write_buffer(offset, data.len());
        let mut buf = buf;
        buf.as_mut_slice()[start..start + data.len()].copy_from_slice(data);
        self.write_buf(target, offset, data.len(), buf, fua)
    }

    /// A buffer laid out for a write of `len` bytes at `offset`: the payload goes
    /// at the returned position (so the NBD frontend can receive straight into it).
    pub fn write_buffer(&self, offset: u64, len: usize) -> (IoBuf, usize) {
        io_loop::write_buffer(&self.shared.arena, offset, len)
    }

    /// Writes a buffer from [`Store::write_buffer`] (blocking).
    pub fn write_buf(
        &self,
        target: Target,
        offset: u64,
        len: usize,
        buf: IoBuf,
        fua: bool,
    ) -> Result<()> {
        self.done(self.call(Op::Write {
            target,
            offset,
            len,
            buf,
            fua,
        }))
    }

    /// Zeroes a range (see [`Zeroing`] for what `how` adds).
    pub fn write_zeroes(
        &self,
        target: Target,
        offset: u64,
        len: u64,
        how: Zeroing,
        fua: bool,
    ) -> Result<()> {
        self.done(self.call(Op::Zero {
            target,
            offset,
            len,
            how,
            fua,
        }))
    }

    /// Frees the whole blocks of a range (they read back as zeros).
    pub fn trim(&self, target: Target, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(target, offset, len, Zeroing::Trim, false)
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&self) -> Result<()> {
        self.done(self.call(Op::Flush))
    }

    fn done(&self, o: Outcome) -> Result<()> {
        match o {
            Outcome::Done(r) => r,
            other => unreachable_outcome(other),
        }
    }
}

fn unreachable_outcome<T>(o: Outcome) -> Result<T> {
    Err(StoreError::FailedPrecondition(format!(
        "unexpected outcome {o:?}"
    )))
}

#[derive(Default)]
struct Waiter {
    result: Mutex<Option<Outcome>>,
    cond: Condvar,
}

impl Reply for Waiter {
    fn reply(&self, _tag: u64, outcome: Outcome) {
        *self.result.lock() = Some(outcome);
        self.cond.notify_one();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            // Under its lock, so the collector cannot miss the wake-up.
            let _q = self.shared.gc.lock();
            self.shared.gc_wake.notify_all();
        }
        if let Some(p) = &self.shared.pauses {
            // A test that failed while holding a point must not hang here.
            p.release_all();
        }
        if let Some(t) = self.collector.take() {
            let _ = t.join();
        }
        if let Some(w) = self.shared.waker.get() {
            w.wake();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The checksum of a pool block: CRC32 seeded with the block's number, so data
/// that lands in (or is read from) the wrong place does not verify.
pub fn block_crc(block: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block.to_le_bytes());
    h.update(data);
    h.finalize()
}

/// Records a new volume (and its tree) in the WAL and in the catalog; the
/// caller syncs the WAL once it has released the lock.
fn new_volume(
    sh: &Shared,
    inner: &mut Inner,
    name: &str,
    size_bytes: u64,
    parent: Option<(u64, u64, u64)>,
) -> Result<u64> {
    let id = inner.next_id;
    let tree = TreeRec {
        parent,
        head_epoch: 1,
        live: true,
    };
    let vol = VolumeRec {
        name: name.to_string(),
        size_bytes,
        created_unix: now_unix(),
    };
    let mut b = WriteBatch::default();
    b.put_cf(cf(&sh.db, CF_TREES), meta::id_key(id), tree.encode());
    b.put_cf(cf(&sh.db, CF_VOLUMES), meta::id_key(id), vol.encode());
    b.put_cf(cf(&sh.db, CF_META), b"next_id", (id + 1).to_le_bytes());
    sh.db.write(b)?;
    inner.next_id = id + 1;
    inner.trees.insert(id, Tree::new(tree));
    inner.volumes.insert(id, vol);
    inner.volume_names.insert(name.to_string(), id);
    Ok(id)
}

fn existing_volume(
    inner: &Inner,
    id: u64,
    size_bytes: u64,
    parent: Option<(u64, u64, u64)>,
) -> Result<VolumeInfo> {
    let info = inner.volume_info(id).expect("named volume exists");
    let same_parent = inner.trees.get(&id).map(|t| t.rec.parent) == Some(parent);
    if info.size_bytes == size_bytes && same_parent {
        return Ok(info);
    }
    Err(StoreError::AlreadyExists {
        kind: "volume",
        name: info.name.clone(),
        detail: format!(
            "existing volume has {} bytes{}",
            info.size_bytes,
            if same_parent {
                ""
            } else {
                " and another source"
            }
        ),
    })
}

/// Who reads a mapping of `tree`: its volume if it is the head entry, and the
/// snapshots whose epoch falls in `[from, until)`, the mapping's validity.
fn owner_names(inner: &Inner, tree: u64, head: bool, from: u64, until: u64) -> String {
    let mut names = Vec::new();
    if head {
        if let Some(v) = inner.volumes.get(&tree) {
            names.push(format!("volume {}", v.name));
        }
    }
    if let Some(t) = inner.trees.get(&tree) {
        for sid in t.readers.range(from..until).map(|(_, sid)| sid) {
            if let Some(s) = inner.snaps.get(sid) {
                names.push(format!("snapshot {}", s.rec.name));
            }
        }
    }
    if names.is_empty() {
        format!("tree #{tree}")
    } else {
        names.join(", ")
    }
}

/// Removes a snapshot from the catalog in `b` (or only hides it while clones
/// read through it); returns the tree whose garbage a walk must now collect,
/// its `gc` key already in `b`.
pub(crate) fn drop_snapshot(
    sh: &Shared,
    inner: &mut Inner,
    b: &mut WriteBatch,
    sid: u64,
) -> Option<u64> {
    let s = inner.snaps.get_mut(&sid)?;
    if s.clones > 0 {
        s.rec.hidden = true;
        b.put_cf(cf(&sh.db, CF_SNAPSHOTS), meta::id_key(sid), s.rec.encode());
        return None;
    }
    let rec = s.rec.clone();
    inner.snaps.remove(&sid);
    b.delete_cf(cf(&sh.db, CF_SNAPSHOTS), meta::id_key(sid));
    if let Some(t) = inner.trees.get_mut(&rec.tree) {
        t.readers.remove(&rec.epoch);
    }
    gc::mark(sh, b, rec.tree);
    Some(rec.tree)
}

/// Reads the catalog and rebuilds the allocator from the block maps.
fn load(db: &DB, pool: &Pool, cache_entries: usize) -> Result<Inner> {
    let corrupt = |what: &str, detail: String| StoreError::Corrupt {
        what: what.into(),
        detail,
    };
    let be = |k: &[u8]| -> Result<u64> {
        let a: [u8; 8] = k.try_into().map_err(|_| corrupt("key", format!("{k:?}")))?;
        Ok(u64::from_be_bytes(a))
    };
    let next_id = db
        .get_cf(cf(db, CF_META), b"next_id")?
        .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
        .ok_or_else(|| corrupt("next_id", "missing".into()))?;
    let mut inner = Inner {
        trees: HashMap::new(),
        volumes: HashMap::new(),
        volume_names: HashMap::new(),
        snaps: HashMap::new(),
        snap_names: HashMap::new(),
        next_id,
        alloc: Allocator::new(pool.sb.blocks),
        seq: 0,
        active_reads: BTreeMap::new(),
        synced_seq: 0,
        cache: map::HeadCache::new(cache_entries),
        groups_in_flight: 0,
        deferred: HashMap::new(),
        deferred_next: 0,
        deferred_freed: Vec::new(),
    };
    for item in db.iterator_cf(cf(db, CF_TREES), rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        inner.trees.insert(be(&k)?, Tree::new(TreeRec::decode(&v)?));
    }
    for item in db.iterator_cf(cf(db, CF_VOLUMES), rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let id = be(&k)?;
        let rec = VolumeRec::decode(&v)?;
        inner.volume_names.insert(rec.name.clone(), id);
        inner.volumes.insert(id, rec);
    }
    for item in db.iterator_cf(cf(db, CF_SNAPSHOTS), rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let id = be(&k)?;
        let rec = SnapshotRec::decode(&v)?;
        let t = inner
            .trees
            .get_mut(&rec.tree)
            .ok_or_else(|| corrupt("snapshot", format!("{} has no tree", rec.name)))?;
        t.readers.insert(rec.epoch, id);
        if !rec.hidden {
            inner.snap_names.insert(rec.name.clone(), id);
        }
        inner.snaps.insert(id, Snap { rec, clones: 0 });
    }
    for (tree, tracking) in crate::changes::load(db)? {
        match inner.trees.get_mut(&tree) {
            Some(t) => t.tracking = Some(tracking),
            None => {
                return Err(corrupt(
                    "change tracking",
                    format!("tree {tree} does not exist"),
                ))
            }
        }
    }
    let parents: Vec<(u64, u64)> = inner
        .trees
        .values()
        .filter_map(|t| t.rec.parent.map(|(pt, pe, _)| (pt, pe)))
        .collect();
    for (pt, pe) in parents {
        let sid = inner
            .trees
            .get(&pt)
            .and_then(|t| t.readers.get(&pe))
            .copied();
        match sid.and_then(|sid| inner.snaps.get_mut(&sid)) {
            Some(s) => s.clones += 1,
            None => {
                return Err(corrupt(
                    "tree",
                    format!("clone of missing snapshot {pt}@{pe}"),
                ))
            }
        }
    }
    for family in [CF_HEAD, CF_HISTORY] {
        for item in db.iterator_cf(cf(db, family), rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            if let BlockValue::Data { block, .. } = meta::MapEntry::decode(&v)?.value {
                if !inner.alloc.mark_used(block) {
                    return Err(corrupt(
                        "block map",
                        format!("pool block {block} claimed twice or out of range (key {k:?})"),
                    ));
                }
                let tree = meta::parse_key(&k).map(|(t, _, _)| t);
                match tree.and_then(|t| inner.trees.get_mut(&t)) {
                    Some(t) => t.owned_blocks += 1,
                    None => {
                        return Err(corrupt(
                            "block map",
                            format!("entry {k:?} of a tree that does not exist"),
                        ))
                    }
                }
            }
        }
    }
    Ok(inner)
}
