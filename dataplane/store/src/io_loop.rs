//! The I/O thread: owns the engine (one ring), turns requests into pool I/O, and
//! commits block maps in groups.
//!
//! Each loop turn: take new requests, submit their I/O in one batch, sleep until
//! completions, a new request or a landed commit arrive, verify read checksums
//! and answer reads. Writes whose data is on disk are staged as one RocksDB batch
//! (a group) and handed to the committer thread; while it writes, the next group
//! grows; when it lands, the loop answers that group's writes. Flushes sync the
//! pool, then the WAL, once for all flushes waiting.
//!
//! Polling. A thread woken on another CPU costs about 19 µs on the 2-vCPU
//! virtual machines Berth is measured on (a halted vCPU must be woken by the
//! host; `perf bench sched pipe`: 38 µs a round trip across CPUs, 5 µs on
//! one), and a request at queue depth 1 crosses several. So the loop does not
//! sleep for [`StoreConfig::poll`](crate::StoreConfig::poll) after its last
//! request or completion: it yields the CPU and looks again, and submitters
//! need not signal it either. An idle store sleeps as before. Measured
//! (release, 4 KiB, 100 µs): queue-depth-1 reads and writes 26-42% faster
//! over NBD and 30-46% on the pod path (where the FUSE session polls too).
//! Deep queues poll too since the engine holds reads back to the disk's best
//! depth (`berth_io::ReadDepth`): completions then come one by one rather
//! than in convoys, and each would wake the thread; polling through them
//! made QD8 reads 28-36% and QD32 reads 10-23% faster, for 1-4 µs more of
//! the thread's CPU a read (before that limit, polling a deep queue cost
//! QD32 reads 10%). docs/pod-path.md has the figures.
//!
//! Deferred writes. A small write (at most
//! [`StoreConfig::defer_max_bytes`](crate::StoreConfig::defer_max_bytes), not
//! FUA) does not wait for the pool: its data goes into the group's RocksDB
//! batch with its map entry (one record per pool block in the `deferred`
//! family), the write is answered when the batch lands, and the pool is
//! written right after (the "apply"). This is BlueStore's deferred write and
//! ZFS's intent log: the WAL append is a copy into the page cache, and on
//! the virtual disks Berth is measured on a pool write takes 50 µs at
//! queue depth 1 and 250 µs at 32, which the write no longer waits for. An
//! answered write survives a crash of the process (the WAL is in the page
//! cache; a flush syncs it) and is replayed at open if the apply did not
//! happen. The rules that keep that safe:
//! - a read (or a partial write's edge read) of a block not yet applied waits
//!   for the apply (`held`); other blocks and volumes do not;
//! - a flush waits for the applies of the writes answered before it, so it
//!   leaves their data in the pool, and a record is deleted only after a pool
//!   sync that began after its apply (the loop starts one itself after
//!   [`APPLIED_SYNC_BLOCKS`]);
//! - a block with a record is not freed until the record is deleted (else a
//!   replay could overwrite its next owner): `Inner::free_blocks` hands such
//!   blocks to the loop, which deletes their records, then frees them;
//! - an apply that fails keeps its record (replayed at the next open); until
//!   then a read of the block finds the pool's copy fails its checksum and
//!   takes the record's (`record_copy`), so an answered write reads back
//!   whatever the pool did.
//!
//! Larger writes, FUA writes and all writes beyond [`DEFER_MAX_BLOCKS`] not
//! yet applied go the direct way: pool write, then commit.
//!
//! Writes overlapping an unfinished write or zeroing of the same volume wait for
//! it, so concurrent overlapping writes resolve to one of them whole per 4 KiB
//! block, and the read-modify-write of a partial block cannot lose a neighbour's
//! bytes. A waiting write is parked on the one write it overlaps and looked at
//! again only when that one finishes (an index of the ranges in progress per
//! volume finds the overlap in O(log n)), so a completion costs nothing to the
//! writes of other volumes or other blocks. Writes to a volume being
//! snapshotted wait until the snapshot is recorded (`Tree::frozen`); other
//! volumes never wait for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use berth_io::{open_engine, EngineChoice, IoBuf, IoCompletion, IoEngine, IoOp, OpKind};
use rocksdb::WriteBatch;

use crate::error::{Result, StoreError};
use crate::map::{self, HeadUpdate, Layer};
use crate::meta::{self, cf, BlockValue, MapEntry, CF_DEFERRED};
use crate::pool::BLOCK_SIZE;
use crate::store::{block_crc, Inner, Shared, Target};

const BS: usize = BLOCK_SIZE as usize;
/// Largest single request (the NBD maximum payload).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Freed blocks waiting for a WAL sync before the loop syncs on its own (or
/// a 64th of the pool, if less: overwrites reuse the space freed in their
/// allocation group, whose slack is a ninth of the pool).
const PENDING_FREE_SYNC: u64 = 8192;
/// As many, once overwrites have found their group full: a small volume's
/// groups have less slack than the pool-wide bound would hold back.
const PENDING_FREE_SYNC_NEAR: u64 = 1024;
const PIECE_BITS: u32 = 20;
/// Completions taken per engine call: the loop resubmits between small
/// batches, so the device is fed steadily instead of in bursts (measured: 4 KiB
/// QD32 reads went from ~60% to ~90% of fio's IOPS).
const REAP_MAX: usize = 4;
/// Most writes committed in one metadata batch.
const GROUP_MAX: usize = 64;
/// A read whose blocks are not contiguous in the pool but lie close together
/// (an overwritten volume, see `alloc`) reads the whole pool window they lie
/// in with one I/O when the window is at most 5/4 of the blocks wanted and at
/// most this many blocks (4 MiB).
const GATHER_MAX_BLOCKS: u64 = 1024;
/// Most blocks of deferred writes not yet in the pool (16 MiB of buffers, a
/// quarter of the default arena); beyond it writes go the direct way.
const DEFER_MAX_BLOCKS: u64 = 4096;
/// Deferred blocks in the pool whose records wait for a pool sync before
/// they are deleted; at this many the loop syncs on its own, so the records
/// leave the memtable before it is flushed.
const APPLIED_SYNC_BLOCKS: usize = 256;

#[derive(Debug)]
pub enum Op {
    Read {
        target: Target,
        offset: u64,
        len: usize,
    },
    /// `buf` comes from `Store::write_buffer`: the payload starts at
    /// `offset % 4096` and the buffer covers whole blocks.
    Write {
        target: Target,
        offset: u64,
        len: usize,
        buf: IoBuf,
        fua: bool,
    },
    Zero {
        target: Target,
        offset: u64,
        len: u64,
        how: Zeroing,
        fua: bool,
    },
    Flush,
}

/// What a zeroing promises beyond reading back as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroing {
    /// Advisory (NBD TRIM): whole blocks inside the range are freed; the
    /// partial blocks at its edges are left as they are.
    Trim,
    /// The range reads as zeros; whole blocks hold no space afterwards.
    Zero,
    /// The range reads as zeros and stays allocated (NBD WRITE_ZEROES with
    /// NO_HOLE): zero blocks are written to the pool like data. At most
    /// [`MAX_REQUEST_BYTES`] per request, like a write.
    Allocate,
}

/// Whether a load is shallow enough for a frontend's reader to poll for its
/// next request: at most [`Shallow::LIVE`] requests were in flight at once
/// during the last [`Shallow::WINDOW`] and so far in this one. Under a deep
/// queue requests come often enough that a reader seldom sleeps, and the CPU
/// a poll takes is better left to the other threads (measured: with the NBD
/// and FUSE readers polling at QD32 as well, reads were no faster and the
/// server took 5-7 µs more CPU a read). The store's I/O thread polls at any
/// depth (see the module documentation).
#[derive(Debug)]
pub struct Shallow {
    peak: usize,
    since: std::time::Instant,
    was: bool,
}

impl Shallow {
    pub const LIVE: usize = 2;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

    pub fn new() -> Self {
        Shallow {
            peak: 0,
            since: std::time::Instant::now(),
            was: false,
        }
    }

    /// Notes `live` requests in flight now; true if the load is shallow.
    pub fn observe(&mut self, live: usize) -> bool {
        self.peak = self.peak.max(live);
        if self.since.elapsed() >= Self::WINDOW {
            self.was = self.peak <= Self::LIVE;
            self.peak = live;
            self.since = std::time::Instant::now();
        }
        self.was && self.peak <= Self::LIVE
    }
}

impl Default for Shallow {
    fn default() -> Self {
        Self::new()
    }
}

/// A finished read: `bytes()` is the data asked for.
#[derive(Debug)]
pub struct ReadDone {
    pub buf: IoBuf,
    pub start: usize,
    pub len: usize,
}

impl ReadDone {
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }
}

#[derive(Debug)]
pub enum Outcome {
    Read(Result<ReadDone>),
    Done(Result<()>),
}

/// Receives outcomes on the I/O thread; must not block.
pub trait Reply: Send + Sync {
    fn reply(&self, tag: u64, outcome: Outcome);

    /// Called after a batch of replies: once at the end of each turn of the
    /// I/O loop for every `Reply` answered in it, and right after an answer
    /// given outside the loop. A frontend may gather a turn's replies and
    /// send them together here (one system call, one wake-up of the client,
    /// instead of one per reply); it must not keep them past this call.
    fn flush(&self) {}
}

/// The replies given in one turn of the I/O loop, to flush at its end.
#[derive(Default)]
struct Answers {
    touched: Vec<Arc<dyn Reply>>,
}

impl Answers {
    fn send(&mut self, reply: Arc<dyn Reply>, tag: u64, outcome: Outcome) {
        reply.reply(tag, outcome);
        // A turn's replies mostly go to a few connections: a short scan.
        if !self.touched.iter().any(|r| Arc::ptr_eq(r, &reply)) {
            self.touched.push(reply);
        }
    }

    fn flush(&mut self) {
        for r in self.touched.drain(..) {
            r.flush();
        }
    }
}

pub struct Request {
    pub op: Op,
    pub tag: u64,
    pub reply: Arc<dyn Reply>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("op", &self.op)
            .field("tag", &self.tag)
            .finish()
    }
}

pub(crate) fn submit(sh: &Shared, req: Request) {
    if sh.shutdown.load(Ordering::SeqCst) {
        req.reply
            .reply(req.tag, fail(&req.op, StoreError::ShuttingDown));
        req.reply.flush();
        return;
    }
    sh.queue.lock().push(req);
    if sh.parked.swap(false, Ordering::SeqCst) {
        if let Some(w) = sh.waker.get() {
            w.wake();
        }
    }
}

fn fail(op: &Op, e: StoreError) -> Outcome {
    match op {
        Op::Read { .. } => Outcome::Read(Err(e)),
        _ => Outcome::Done(Err(e)),
    }
}

pub(crate) fn spawn(
    sh: Arc<Shared>,
    choice: EngineChoice,
    depth: u32,
    read_depth: berth_io::depth::ReadDepthMode,
    poll: std::time::Duration,
    defer_max: u64,
    faults: Option<Arc<berth_io::fault::FaultPlan>>,
) -> Result<(std::thread::JoinHandle<()>, &'static str, usize)> {
    use std::os::fd::AsRawFd;
    let io = |source| StoreError::Io {
        op: "start I/O engine",
        offset: 0,
        source,
    };
    let mut engine = open_engine(
        choice,
        &[sh.pool.file.as_raw_fd()],
        &sh.arena,
        depth,
        read_depth,
    )
    .map_err(io)?;
    if let Some(plan) = faults {
        tracing::warn!(?plan, "injecting faults into pool I/O");
        engine = Box::new(berth_io::fault::FaultEngine::new(engine, plan));
    }
    let name = engine.name();
    let registered = engine.registered_bytes();
    let _ = sh.waker.set(engine.waker());
    tracing::info!(
        engine = name,
        depth,
        registered_buffer_bytes = registered,
        "I/O engine ready"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let csh = sh.clone();
    // Each of these threads ends the process if it panics: without it, the
    // others would wait for it forever while the server looked healthy.
    let committer =
        berth_io::spawn_critical("berth-commit", move || commit_groups(&csh, &rx)).map_err(io)?;
    let (wal_tx, wal_rx) = std::sync::mpsc::channel();
    let wsh = sh.clone();
    let wal_syncer =
        berth_io::spawn_critical("berth-walsync", move || sync_wals(&wsh, &wal_rx)).map_err(io)?;
    let thread = berth_io::spawn_critical("berth-io", move || {
        Loop::new(sh, engine, tx, wal_tx, poll, defer_max).run();
        // The loop dropped its senders: the helpers end after their last job.
        let _ = committer.join();
        let _ = wal_syncer.join();
    })
    .map_err(io)?;
    Ok((thread, name, registered))
}

/// Writes the deferred writes a stopped process left in the catalog to the
/// pool, syncs it, and deletes their records; returns how many there were
/// and the next record key.
/// Runs at open, before anything reads the pool. A record is rewritten even
/// if its data reached the pool before the stop (the same bytes again), and
/// even if its block was freed since: a freed block with a record is not
/// reused until the record is gone, so nothing else lives there.
pub(crate) fn replay_deferred(db: &rocksdb::DB, pool: &crate::pool::Pool) -> Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let family = cf(db, CF_DEFERRED);
    let mut batch = WriteBatch::default();
    let mut buf = IoBuf::heap(BS);
    let (mut n, mut next) = (0u64, 0u64);
    for item in db.iterator_cf(family, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let (block, crc, data) = meta::deferred_decode(&v, BS)?;
        let key = <[u8; 8]>::try_from(&k[..]).map(u64::from_be_bytes);
        let (Ok(key), true) = (key, block < pool.sb.blocks) else {
            return Err(StoreError::Corrupt {
                what: "deferred write record".into(),
                detail: format!("key {k:?}, pool block {block} of {}", pool.sb.blocks),
            });
        };
        next = next.max(key + 1);
        if block_crc(block, data) != crc {
            // RocksDB checks its own records, so this is not a torn write;
            // the map's checksum will fail reads of the block, naming it.
            tracing::error!(
                pool_block = block,
                "deferred write record fails its checksum; not written"
            );
        } else {
            buf.as_mut_slice().copy_from_slice(data);
            pool.file
                .write_all_at(buf.as_slice(), pool.block_offset(block))
                .map_err(|source| StoreError::Io {
                    op: "write a deferred block",
                    offset: block * BLOCK_SIZE,
                    source,
                })?;
        }
        batch.single_delete_cf(family, k);
        n += 1;
    }
    if n > 0 {
        pool.file.sync_data().map_err(|source| StoreError::Io {
            op: "fdatasync",
            offset: 0,
            source,
        })?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo)?;
        tracing::info!(
            blocks = n,
            "wrote the deferred writes the last run left to the pool"
        );
    }
    Ok((n, next))
}

/// One group commit on its way to RocksDB.
pub(crate) struct Group {
    batch: WriteBatch,
    /// Head entries as the batch leaves them, for the cache.
    staged: Vec<(u64, u64, Option<MapEntry>)>,
    /// Pool blocks the batch stops referencing.
    freed: Vec<u64>,
    /// Per tree: pool blocks its entries reference after the batch, minus before.
    owned: Vec<(u64, i64)>,
}

/// The committer thread: writes each group's batch (WAL append and memtable
/// inserts, a good part of a write's CPU) on the second core while the I/O
/// thread keeps the ring busy, then publishes the result: cache, frees, and
/// the outcome the I/O thread picks up to answer the writes.
fn commit_groups(sh: &Shared, rx: &std::sync::mpsc::Receiver<Group>) {
    for g in rx {
        let result = write_group(sh, g);
        *sh.committed.lock() = Some(result);
        if sh.parked.swap(false, Ordering::SeqCst) {
            if let Some(w) = sh.waker.get() {
                w.wake();
            }
        }
    }
}

/// Writes a staged group's batch and publishes it: head cache, frees, and the
/// end of the group for control operations waiting in `lock_quiesced`.
fn write_group(sh: &Shared, g: Group) -> Result<()> {
    let result = sh.db.write(g.batch).map_err(StoreError::from);
    {
        let mut inner = sh.inner.lock();
        if result.is_ok() {
            for (tree, lba, e) in g.staged {
                inner.cache.set(tree, lba, e);
            }
            for (tree, delta) in g.owned {
                if let Some(t) = inner.trees.get_mut(&tree) {
                    t.owned_blocks = t.owned_blocks.saturating_add_signed(delta);
                }
            }
            if inner.free_blocks(&g.freed) {
                sh.deferred_freed.store(true, Ordering::SeqCst);
            }
        }
        inner.groups_in_flight -= 1;
    }
    sh.commit_idle.notify_all();
    result
}

/// The WAL syncer: one synced WAL per request, run while the I/O thread's pool
/// `fdatasync` is in flight, so a flush costs one device sync's latency, not two
/// in a row. The result goes back with the sequence number the sync covers.
fn sync_wals(sh: &Shared, rx: &std::sync::mpsc::Receiver<u64>) {
    for seq in rx {
        let result = sh.db.flush_wal(true).map_err(StoreError::from);
        *sh.wal_synced.lock() = Some((seq, result));
        if sh.parked.swap(false, Ordering::SeqCst) {
            if let Some(w) = sh.waker.get() {
                w.wake();
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the old contents of partially written edge blocks.
    Edges,
    Writing,
    Reading,
    /// Data written (or nothing to write); the map commit is next.
    Commit,
    /// Waiting for a pool fdatasync (flush, or a FUA write after its commit).
    Sync,
    /// A deferred write, answered already, writing its data to the pool.
    Applying,
}

/// A request in flight. Slots are reused, so their vectors keep their capacity.
struct Slot {
    tag: u64,
    /// Taken when the request is answered: a spare slot holds no client's
    /// reply (a FUSE session's closes its `/dev/fuse` when the last goes).
    reply: Option<Arc<dyn Reply>>,
    phase: Phase,
    kind: Kind,
    target: Target,
    tree: u64,
    offset: u64,
    len: u64,
    first_lba: u64,
    blocks: u64,
    fua: bool,
    /// Zero blocks are written like data (allocating zeroing), not mapped as zeros.
    provision: bool,
    ops_left: u32,
    error: Option<StoreError>,
    read_seq: Option<u64>,
    busy: bool,
    /// Writes that overlap this one, to look at again when it finishes.
    waiters: Vec<Request>,
    /// Buffer pieces by index (reads and writes split their buffer per disk run).
    pieces: Vec<Option<IoBuf>>,
    /// First block (relative) of each piece.
    piece_start: Vec<u64>,
    /// Gathered read pieces: (piece, where its blocks go, the window's
    /// first pool block). The I/O reads the window; see `submit_runs`.
    gathers: Vec<(usize, IoBuf, u64)>,
    /// Per block: the mapping read (reads) or the value to commit (writes).
    values: Vec<Option<BlockValue>>,
    /// Pool runs allocated for a write, returned if it fails.
    runs: Vec<(u64, u64)>,
    layers: Vec<Layer>,
    /// A deferred write: its data goes into the commit (see the module
    /// documentation), then to the pool.
    deferred: bool,
    /// A deferred write's place in the order applies started.
    apply_seq: u64,
    /// A deferred write's first record key (its data blocks' are
    /// consecutive).
    record_key: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zero,
    Flush,
}

pub(crate) struct Loop {
    sh: Arc<Shared>,
    engine: Box<dyn IoEngine>,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    spare: Vec<Slot>,
    /// Per tree: the block ranges `[first, end)` of the writes in progress, by
    /// first block: `(end, slot)`. Admitted writes never overlap, so the
    /// ranges are disjoint and one lookup finds an overlap.
    busy: HashMap<u64, BTreeMap<u64, (u64, usize)>>,
    /// Per tree: writes that arrived while the volume was frozen for a
    /// snapshot, in arrival order.
    frozen: HashMap<u64, Vec<Request>>,
    commit: Vec<usize>,
    /// Flushes and FUA writes waiting for the next sync.
    syncing: Vec<usize>,
    /// Those the sync in flight answers (it started after their writes).
    sync_batch: Vec<usize>,
    completions: Vec<IoCompletion>,
    /// Reused for resolving writes, so the data path does not allocate it.
    scratch_layers: Vec<Layer>,
    /// Reused for a read's blocks the cache did not know.
    scratch_misses: Vec<usize>,
    /// Slots of the group the committer is writing.
    committing: Vec<usize>,
    committer: std::sync::mpsc::Sender<Group>,
    wal_syncer: std::sync::mpsc::Sender<u64>,
    /// The sync in flight: the pool's fdatasync result once it is done, and the
    /// WAL's (with the sequence it covers) once that is.
    pool_synced: Option<Option<StoreError>>,
    wal_synced: Option<(u64, Result<()>)>,
    /// The polling window after the last work, and when that work was.
    poll: std::time::Duration,
    last_work: std::time::Instant,
    /// Largest write deferred (0: none).
    defer_max: u64,
    unapplied: Unapplied,
    /// Applies in flight, by `apply_seq`, and the last one started.
    applying: BTreeSet<u64>,
    apply_next: u64,
    /// Deferred blocks in the pool since the last pool sync began, and those
    /// the sync in flight covers, with their record keys: their records go
    /// when it is done (unless the block was freed, and perhaps deferred
    /// again, meanwhile: the key tells).
    applied_unsynced: Vec<(u64, u64)>,
    sync_covers: Vec<(u64, u64)>,
    /// When a sync of the loop's own last failed: it waits a while before
    /// the next (a failing disk must not make the loop spin).
    own_sync_failed: Option<std::time::Instant>,
    /// Some deferred block was freed while its apply was in flight.
    freed_waiting: bool,
    no_reply: Arc<dyn Reply>,
    /// This turn's replies, flushed before the loop waits and at the end of
    /// the turn.
    answers: Answers,
}

/// The reply of the loop's own flushes.
struct NoReply;

impl Reply for NoReply {
    fn reply(&self, _tag: u64, _outcome: Outcome) {}
}

/// Pool blocks of deferred writes whose data is not in the pool yet, and
/// the reads of them, held until it is.
struct Unapplied {
    blocks: BTreeSet<u64>,
    held: Vec<IoOp>,
    /// Where block 0 is in the pool file.
    data_offset: u64,
}

impl Unapplied {
    /// Pushes an I/O, unless it reads a block not yet applied: that one
    /// waits until the block is.
    fn push(&mut self, engine: &mut dyn IoEngine, op: IoOp) {
        if op.kind == OpKind::Read && !self.blocks.is_empty() {
            let first = (op.offset - self.data_offset) / BLOCK_SIZE;
            let n = op.buf.as_ref().map_or(1, |b| b.len().div_ceil(BS)) as u64;
            if self.blocks.range(first..first + n).next().is_some() {
                self.held.push(op);
                return;
            }
        }
        engine.push(op);
    }

    /// Pushes the held reads whose blocks are all in the pool now (call
    /// wherever `blocks` shrinks).
    fn release(&mut self, engine: &mut dyn IoEngine) {
        for op in std::mem::take(&mut self.held) {
            self.push(engine, op);
        }
    }
}

impl Loop {
    fn new(
        sh: Arc<Shared>,
        engine: Box<dyn IoEngine>,
        committer: std::sync::mpsc::Sender<Group>,
        wal_syncer: std::sync::mpsc::Sender<u64>,
        poll: std::time::Duration,
        defer_max: u64,
    ) -> Self {
        let data_offset = sh.pool.sb.data_offset;
        Loop {
            sh,
            engine,
            slots: Vec::new(),
            free_slots: Vec::new(),
            spare: Vec::new(),
            busy: HashMap::new(),
            frozen: HashMap::new(),
            commit: Vec::new(),
            syncing: Vec::new(),
            sync_batch: Vec::new(),
            completions: Vec::new(),
            scratch_layers: Vec::new(),
            scratch_misses: Vec::new(),
            committing: Vec::new(),
            committer,
            wal_syncer,
            pool_synced: None,
            wal_synced: None,
            poll,
            last_work: std::time::Instant::now(),
            defer_max,
            unapplied: Unapplied {
                blocks: BTreeSet::new(),
                held: Vec::new(),
                data_offset,
            },
            applying: BTreeSet::new(),
            apply_next: 0,
            applied_unsynced: Vec::new(),
            sync_covers: Vec::new(),
            own_sync_failed: None,
            freed_waiting: false,
            no_reply: Arc::new(NoReply),
            answers: Answers::default(),
        }
    }

    fn live(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Something for the loop to take: a request, a landed commit or WAL sync,
    /// a thaw or the shutdown.
    fn work_waiting(&self) -> bool {
        !self.sh.queue.lock().is_empty()
            || self.sh.committed.lock().is_some()
            || self.sh.wal_synced.lock().is_some()
            || self.sh.thaw_pending.load(Ordering::SeqCst)
            || self.sh.deferred_freed.load(Ordering::SeqCst)
            || self.sh.shutdown.load(Ordering::SeqCst)
    }

    /// Polls until there is work or a completion, or the window after the
    /// last work has passed. The thread stays unparked, so submitters do not
    /// signal it either (`submit` wakes only a parked loop).
    fn spin(&mut self) {
        while self.last_work.elapsed() < self.poll {
            if self.engine.has_completions() || self.work_waiting() {
                self.sh.counters.polled_work.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // Any other thread ready on this CPU (on a small node, often the
            // one about to send the next request) runs first.
            std::thread::yield_now();
        }
    }

    fn run(mut self) {
        let mut incoming = Vec::new();
        loop {
            std::mem::swap(&mut incoming, &mut *self.sh.queue.lock());
            let stopping = self.sh.shutdown.load(Ordering::SeqCst);
            if !incoming.is_empty() {
                self.last_work = std::time::Instant::now();
            }
            for req in incoming.drain(..) {
                if stopping {
                    let out = fail(&req.op, StoreError::ShuttingDown);
                    self.answers.send(req.reply, req.tag, out);
                } else {
                    self.accept(req);
                }
            }
            let landed = self.sh.committed.lock().take();
            if let Some(result) = landed {
                let ready = std::mem::take(&mut self.committing);
                self.end_group(ready, result);
            }
            let wal = self.sh.wal_synced.lock().take();
            if let Some(w) = wal {
                self.wal_synced = Some(w);
                self.sync_done();
            }
            // A flag first: the list's lock is taken only after a snapshot.
            let thawed = if self.sh.thaw_pending.swap(false, Ordering::SeqCst) {
                std::mem::take(&mut *self.sh.thawed.lock())
            } else {
                Vec::new()
            };
            for tree in thawed {
                for req in self.frozen.remove(&tree).unwrap_or_default() {
                    self.accept_write(req);
                }
            }
            if self.sh.deferred_freed.swap(false, Ordering::SeqCst) {
                self.free_deferred();
            }
            if stopping {
                // A snapshot cannot finish any more: its waiting writes fail.
                for (_, reqs) in self.frozen.drain() {
                    for req in reqs {
                        let out = fail(&req.op, StoreError::ShuttingDown);
                        self.answers.send(req.reply, req.tag, out);
                    }
                }
            }
            if stopping && self.live() == 0 {
                self.answers.flush();
                return;
            }
            // Group commit: while more completions are ready, let the group grow
            // (up to a bound) rather than writing a RocksDB batch per few writes.
            if self.commit.len() >= GROUP_MAX || !self.engine.has_completions() {
                self.start_group();
            }
            if self.applied_unsynced.len() >= APPLIED_SYNC_BLOCKS
                && self.syncing.is_empty()
                && self.sync_batch.is_empty()
                && self
                    .own_sync_failed
                    .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1))
            {
                // Deferred records wait for a pool sync: start one.
                let i = self.new_slot(0, self.no_reply.clone(), Kind::Flush);
                self.slot(i).phase = Phase::Sync;
                self.syncing.push(i);
            }
            self.start_sync();
            // Sleep only with nothing to stage, or while the committer has a group.
            let idle = self.commit.is_empty() || !self.committing.is_empty();
            // Poll instead, shortly after work: see the module documentation.
            let polling = idle && self.last_work.elapsed() < self.poll;
            if idle && !polling {
                self.sh.parked.store(true, Ordering::SeqCst);
                if self.work_waiting() {
                    self.sh.parked.store(false, Ordering::SeqCst);
                }
            }
            let wait = idle && !polling && self.sh.parked.load(Ordering::SeqCst);
            // What this turn answered goes out before the loop may sleep.
            self.answers.flush();
            let mut done = std::mem::take(&mut self.completions);
            if let Err(e) = self.engine.submit_and_wait(wait, REAP_MAX, &mut done) {
                tracing::error!(error = %e, "I/O engine failed");
            }
            self.sh.parked.store(false, Ordering::SeqCst);
            if let Some(d) = self.engine.read_depth() {
                let c = &self.sh.counters;
                c.read_depth_limit.store(d.limit as u64, Ordering::Relaxed);
                c.reads_held.store(d.held_total, Ordering::Relaxed);
            }
            if polling && done.is_empty() {
                self.spin();
            }
            if !done.is_empty() {
                self.last_work = std::time::Instant::now();
            }
            for c in done.drain(..) {
                self.complete(c);
            }
            self.completions = done;
            self.answers.flush();
        }
    }

    fn new_slot(&mut self, tag: u64, reply: Arc<dyn Reply>, kind: Kind) -> usize {
        let mut s = self.spare.pop().unwrap_or_else(|| Slot {
            tag: 0,
            reply: None,
            phase: Phase::Commit,
            kind,
            target: Target::Volume(0),
            tree: 0,
            offset: 0,
            len: 0,
            first_lba: 0,
            blocks: 0,
            fua: false,
            provision: false,
            ops_left: 0,
            error: None,
            read_seq: None,
            busy: false,
            waiters: Vec::new(),
            pieces: Vec::new(),
            piece_start: Vec::new(),
            gathers: Vec::new(),
            values: Vec::new(),
            runs: Vec::new(),
            layers: Vec::new(),
            deferred: false,
            apply_seq: 0,
            record_key: 0,
        });
        s.deferred = false;
        s.apply_seq = 0;
        s.tag = tag;
        s.reply = Some(reply);
        s.kind = kind;
        s.ops_left = 0;
        s.error = None;
        s.read_seq = None;
        s.busy = false;
        s.fua = false;
        s.provision = false;
        s.gathers.clear();
        s.pieces.clear();
        s.piece_start.clear();
        s.values.clear();
        s.runs.clear();
        s.layers.clear();
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        }
    }

    fn slot(&mut self, i: usize) -> &mut Slot {
        self.slots[i].as_mut().expect("live slot")
    }

    /// Validates the target and range; returns (tree, size) and layers.
    fn resolve(
        inner: &Inner,
        target: Target,
        offset: u64,
        len: u64,
        write: bool,
        op: &'static str,
        layers: &mut Vec<Layer>,
    ) -> Result<u64> {
        let size = inner.layers(target, layers)?;
        if write {
            if let Target::Snapshot(_) = target {
                return Err(StoreError::ReadOnly {
                    what: "a snapshot".into(),
                });
            }
        }
        let end = offset.checked_add(len);
        if len == 0 || end.is_none_or(|e| e > size) {
            let volume = match target {
                Target::Volume(id) => inner.volumes.get(&id).map(|v| v.name.clone()),
                Target::Snapshot(id) => inner.snaps.get(&id).map(|s| s.rec.name.clone()),
            };
            return Err(StoreError::OutOfRange {
                op,
                volume: volume.unwrap_or_default(),
                offset,
                len,
                size_bytes: size,
            });
        }
        if len > MAX_REQUEST_BYTES && op != "zero" {
            return Err(StoreError::InvalidArgument(format!(
                "{op} of {len} bytes is larger than the {MAX_REQUEST_BYTES}-byte maximum"
            )));
        }
        Ok(layers[0].tree)
    }

    fn accept(&mut self, req: Request) {
        match req.op {
            Op::Flush => {
                let barrier = self.apply_next;
                let i = self.new_slot(req.tag, req.reply, Kind::Flush);
                // It waits for the applies started before it (the writes it
                // covers were answered), so it leaves their data in the pool.
                self.slot(i).apply_seq = barrier;
                self.slot(i).phase = Phase::Sync;
                self.syncing.push(i);
            }
            Op::Read {
                target,
                offset,
                len,
            } => self.accept_read(req.tag, req.reply, target, offset, len),
            Op::Write { .. } | Op::Zero { .. } => self.accept_write(req),
        }
    }

    fn accept_read(
        &mut self,
        tag: u64,
        reply: Arc<dyn Reply>,
        target: Target,
        offset: u64,
        len: usize,
    ) {
        let i = self.new_slot(tag, reply, Kind::Read);
        let s = self.slots[i].as_mut().expect("live slot");
        s.phase = Phase::Reading;
        s.target = target;
        s.offset = offset;
        s.len = len as u64;
        // Resolve, register the read and map what the cache knows under the
        // catalog lock; look the rest up in RocksDB off it. Registering the
        // read first is what makes that safe: a block a commit frees after
        // this point is not reused until the read ends, so whatever mapping
        // the lookup finds (the one before or after a racing commit) points
        // at intact data.
        let mut misses = std::mem::take(&mut self.scratch_misses);
        let mut version = 0;
        let mapped: Result<()> = (|| {
            let mut inner = self.sh.inner.lock();
            // The range is checked (offset + len within the target) before any
            // arithmetic on it: offsets come from the network.
            Self::resolve(
                &inner,
                target,
                offset,
                len as u64,
                false,
                "read",
                &mut s.layers,
            )?;
            let first_lba = offset / BLOCK_SIZE;
            let blocks = (offset + len as u64).div_ceil(BLOCK_SIZE) - first_lba;
            s.first_lba = first_lba;
            s.blocks = blocks;
            s.tree = s.layers[0].tree;
            s.read_seq = Some(inner.read_start());
            version = inner.cache.version();
            for (k, lba) in (s.first_lba..s.first_lba + s.blocks).enumerate() {
                match map::lookup_cached(&mut inner.cache, &s.layers, lba) {
                    Some(v) => s.values.push(v),
                    None => {
                        s.values.push(None);
                        misses.push(k);
                    }
                }
            }
            Ok(())
        })();
        let mapped = mapped.and_then(|()| {
            let mut fills = Vec::new();
            for &k in &misses {
                let lba = s.first_lba + k as u64;
                let (value, head) = map::lookup_uncached(&self.sh.db, &s.layers, lba)?;
                s.values[k] = value;
                fills.push((lba, head));
            }
            if !fills.is_empty() {
                // Into the cache only if nothing changed it meanwhile.
                let mut inner = self.sh.inner.lock();
                for (lba, head) in fills {
                    inner.cache.fill(version, s.tree, lba, head);
                }
            }
            Ok(())
        });
        misses.clear();
        self.scratch_misses = misses;
        if let Err(e) = mapped {
            s.error = Some(e);
            return self.finish(i);
        }
        self.sh.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.sh
            .counters
            .read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let blocks = self.slot(i).blocks as usize;
        let buf = self.sh.arena.alloc_uninit(blocks * BS);
        self.submit_runs(i, buf, OpKind::Read);
        if self.slot(i).ops_left == 0 {
            self.finish(i);
        }
    }

    /// Splits `buf` into runs of blocks that are contiguous in the pool (or holes)
    /// and submits one read or write per data run; holes are zero-filled reads or
    /// skipped writes.
    fn submit_runs(&mut self, i: usize, mut buf: IoBuf, kind: OpKind) {
        let pool_offset = self.sh.pool.sb.data_offset;
        let s = self.slots[i].as_mut().expect("live slot");
        let n = s.values.len();
        let mut start = 0;
        while start < n {
            let first = s.values[start];
            let mut end = start + 1;
            while end < n {
                let contiguous = match (first, s.values[end]) {
                    (
                        Some(BlockValue::Data { block: a, .. }),
                        Some(BlockValue::Data { block: b, .. }),
                    ) => b == a + (end - start) as u64,
                    (Some(BlockValue::Data { .. }), _) | (_, Some(BlockValue::Data { .. })) => {
                        false
                    }
                    _ => true,
                };
                if !contiguous {
                    break;
                }
                end += 1;
            }
            // Not contiguous, but close: one read of the window they lie in.
            let mut gather = None;
            if let (OpKind::Read, Some(BlockValue::Data { block, .. })) = (kind, first) {
                let (mut lo, mut hi) = (block, block + (end - start) as u64 - 1);
                let mut k = end;
                while let Some(Some(BlockValue::Data { block: b, .. })) = s.values.get(k) {
                    let (l, h) = (lo.min(*b), hi.max(*b));
                    if h - l + 1 > GATHER_MAX_BLOCKS {
                        break;
                    }
                    (lo, hi, k) = (l, h, k + 1);
                    if (hi - lo + 1) * 4 <= (k - start) as u64 * 5 {
                        gather = Some((k, lo, hi));
                    }
                }
            }
            if let Some((k, _, _)) = gather {
                end = k;
            }
            let rest = if end < n {
                Some(buf.split_off((end - start) * BS))
            } else {
                None
            };
            let mut piece = buf;
            let idx = s.pieces.len();
            s.piece_start.push(start as u64);
            match first {
                Some(BlockValue::Data { .. }) if gather.is_some() => {
                    let (_, lo, hi) = gather.unwrap_or_default();
                    s.ops_left += 1;
                    s.pieces.push(None);
                    s.gathers.push((idx, piece, lo));
                    self.sh
                        .counters
                        .gathered_reads
                        .fetch_add(1, Ordering::Relaxed);
                    let op = IoOp {
                        kind,
                        file: 0,
                        offset: pool_offset + lo * BLOCK_SIZE,
                        buf: Some(self.sh.arena.alloc_uninit((hi - lo + 1) as usize * BS)),
                        user_data: ((i as u64) << PIECE_BITS) | idx as u64,
                    };
                    self.unapplied.push(self.engine.as_mut(), op);
                }
                Some(BlockValue::Data { block, .. }) => {
                    s.ops_left += 1;
                    s.pieces.push(None);
                    let op = IoOp {
                        kind,
                        file: 0,
                        offset: pool_offset + block * BLOCK_SIZE,
                        buf: Some(piece),
                        user_data: ((i as u64) << PIECE_BITS) | idx as u64,
                    };
                    self.unapplied.push(self.engine.as_mut(), op);
                }
                _ => {
                    if kind == OpKind::Read {
                        piece.as_mut_slice().fill(0);
                    }
                    s.pieces.push(Some(piece));
                }
            }
            match rest {
                Some(r) => buf = r,
                None => break,
            }
            start = end;
        }
    }

    fn accept_write(&mut self, mut req: Request) {
        let mut provision = false;
        if let Op::Zero {
            target,
            offset,
            len,
            how,
            fua,
        } = req.op
        {
            let end = offset.saturating_add(len);
            let trim = how == Zeroing::Trim;
            if offset % BLOCK_SIZE != 0 || end % BLOCK_SIZE != 0 || how == Zeroing::Allocate {
                // Validate the range as asked, before it is narrowed or rewritten
                // (and before any arithmetic on it: offsets come from the network).
                let mut layers = Vec::new();
                let checked = {
                    let inner = self.sh.inner.lock();
                    Self::resolve(&inner, target, offset, len, true, "zero", &mut layers)
                };
                if let Err(e) = checked {
                    return self.answers.send(req.reply, req.tag, Outcome::Done(Err(e)));
                }
                // In range, so below 2^60: no overflow from here on.
                let (lo, hi) = (
                    offset.next_multiple_of(BLOCK_SIZE),
                    end / BLOCK_SIZE * BLOCK_SIZE,
                );
                if trim {
                    // A trim is advisory: free the whole blocks inside the range.
                    if hi <= lo {
                        return self.answers.send(req.reply, req.tag, Outcome::Done(Ok(())));
                    }
                    req.op = Op::Zero {
                        target,
                        offset: lo,
                        len: hi - lo,
                        how,
                        fua,
                    };
                } else if len <= MAX_REQUEST_BYTES {
                    // Zeroing part of a block, or keeping the range allocated: a
                    // write of zeros (unless allocating, whole zero blocks inside
                    // it still become map entries only).
                    provision = how == Zeroing::Allocate;
                    let (mut buf, _) = write_buffer(&self.sh.arena, offset, len as usize);
                    buf.as_mut_slice().fill(0);
                    req.op = Op::Write {
                        target,
                        offset,
                        len: len as usize,
                        buf,
                        fua,
                    };
                } else {
                    let e = StoreError::InvalidArgument(if how == Zeroing::Allocate {
                        format!("allocating write-zeroes of {len} bytes is larger than the {MAX_REQUEST_BYTES}-byte maximum")
                    } else {
                        format!("write-zeroes of {len} bytes at {offset} is not 4096-byte aligned; unaligned zeroing is limited to {MAX_REQUEST_BYTES} bytes")
                    });
                    return self.answers.send(req.reply, req.tag, Outcome::Done(Err(e)));
                }
            }
        }
        let (target, offset, len, fua) = match &req.op {
            Op::Write {
                target,
                offset,
                len,
                fua,
                ..
            } => (*target, *offset, *len as u64, *fua),
            Op::Zero {
                target,
                offset,
                len,
                fua,
                ..
            } => (*target, *offset, *len, *fua),
            _ => return,
        };
        let mut layers = std::mem::take(&mut self.scratch_layers);
        let first_lba = offset / BLOCK_SIZE;
        {
            let mut inner = self.sh.inner.lock();
            let op = if matches!(req.op, Op::Write { .. }) {
                "write"
            } else {
                "zero"
            };
            let tree = match Self::resolve(&inner, target, offset, len, true, op, &mut layers) {
                Ok(t) => t,
                Err(e) => {
                    self.scratch_layers = layers;
                    return self.answers.send(req.reply, req.tag, Outcome::Done(Err(e)));
                }
            };
            let end_lba = (offset + len).div_ceil(BLOCK_SIZE);
            let t = inner.trees.get_mut(&tree).expect("resolved tree");
            if t.frozen {
                drop(inner);
                self.scratch_layers = layers;
                self.frozen.entry(tree).or_default().push(req);
                return;
            }
            if let Some(other) = self.overlap(tree, first_lba, end_lba) {
                drop(inner);
                self.scratch_layers = layers;
                self.slot(other).waiters.push(req);
                return;
            }
            t.writes_in_flight += 1;
        }
        let blocks = (offset + len).div_ceil(BLOCK_SIZE) - first_lba;
        let (kind, buf) = match req.op {
            Op::Write { buf, .. } => (Kind::Write, Some(buf)),
            _ => (Kind::Zero, None),
        };
        let i = self.new_slot(req.tag, req.reply, kind);
        {
            let s = self.slot(i);
            s.target = target;
            s.tree = layers[0].tree;
            s.offset = offset;
            s.len = len;
            s.first_lba = first_lba;
            s.blocks = blocks;
            s.fua = fua;
            s.provision = provision;
            s.busy = true;
            // Swap rather than move: the slot's old vector becomes the scratch.
            std::mem::swap(&mut s.layers, &mut layers);
        }
        self.scratch_layers = layers;
        let tree = self.slot(i).tree;
        self.busy
            .entry(tree)
            .or_default()
            .insert(first_lba, (first_lba + blocks, i));
        let Some(mut buf) = buf else {
            self.slot(i).phase = Phase::Commit;
            self.commit.push(i);
            return;
        };
        self.sh.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.sh
            .counters
            .write_bytes
            .fetch_add(len, Ordering::Relaxed);
        if buf.len() < blocks as usize * BS {
            self.slot(i).error = Some(StoreError::InvalidArgument(format!(
                "write buffer of {} bytes cannot hold {blocks} blocks",
                buf.len()
            )));
            return self.finish(i);
        }
        // Partial first or last block: read the old contents first.
        let head_partial = offset % BLOCK_SIZE != 0;
        let tail_partial = (offset + len) % BLOCK_SIZE != 0;
        let edges = [
            head_partial.then_some(0u64),
            (tail_partial && (blocks > 1 || !head_partial)).then_some(blocks - 1),
        ];
        if edges == [None, None] {
            return self.start_writes(i, buf);
        }
        self.slot(i).phase = Phase::Edges;
        let pool_offset = self.sh.pool.sb.data_offset;
        for rel in edges.into_iter().flatten() {
            let lba = first_lba + rel;
            let found = {
                let mut inner = self.sh.inner.lock();
                let layers = &self.slots[i].as_ref().expect("live slot").layers;
                map::lookup(&self.sh.db, &mut inner.cache, layers, lba)
            };
            match found {
                Ok(Some(BlockValue::Data { block, .. })) => {
                    let s = self.slot(i);
                    let idx = s.pieces.len();
                    s.pieces.push(None);
                    s.piece_start.push(rel);
                    s.values.push(found.ok().flatten());
                    s.ops_left += 1;
                    let tmp = self.sh.arena.alloc_uninit(BS);
                    let op = IoOp {
                        kind: OpKind::Read,
                        file: 0,
                        offset: pool_offset + block * BLOCK_SIZE,
                        buf: Some(tmp),
                        user_data: ((i as u64) << PIECE_BITS) | idx as u64,
                    };
                    self.unapplied.push(self.engine.as_mut(), op);
                }
                Ok(_) => {
                    // Never written or zero: the untouched bytes are zeros.
                    let (lo, hi) = edge_gap(offset, len, first_lba + rel);
                    let at = rel as usize * BS;
                    buf.as_mut_slice()[at..at + lo].fill(0);
                    buf.as_mut_slice()[at + hi..at + BS].fill(0);
                }
                Err(e) => {
                    self.slot(i).error = Some(e);
                }
            }
        }
        // Park the payload until the edge reads are merged into it.
        self.slot(i).pieces.push(Some(buf));
        if self.slot(i).ops_left == 0 {
            let buf = self.slot(i).pieces.pop().flatten().expect("payload");
            self.slot(i).pieces.clear();
            self.slot(i).piece_start.clear();
            self.slot(i).values.clear();
            if self.slot(i).error.is_some() {
                return self.finish(i);
            }
            self.start_writes(i, buf);
        }
    }

    /// Allocates pool blocks for the non-zero blocks of `buf`, stamps checksums
    /// and submits the writes.
    fn start_writes(&mut self, i: usize, buf: IoBuf) {
        let s = self.slots[i].as_mut().expect("live slot");
        s.phase = Phase::Writing;
        s.pieces.clear();
        s.piece_start.clear();
        s.values.clear();
        let blocks = s.blocks as usize;
        let data = buf.as_slice();
        // All-zero blocks become Zero entries (no pool space, no I/O), unless
        // the range must stay allocated; the rest are marked None until their
        // pool block is known.
        let provision = s.provision;
        s.values.extend((0..blocks).map(|b| {
            (!provision && !data[b * BS..(b + 1) * BS].iter().any(|&x| x != 0))
                .then_some(BlockValue::Zero)
        }));
        let need = s.values.iter().filter(|v| v.is_none()).count() as u64;
        let mut runs = std::mem::take(&mut s.runs);
        let ok = need == 0 || self.allocate(i, need, &mut runs);
        if !ok {
            let free = self.sh.inner.lock().alloc.free_blocks();
            let s = self.slot(i);
            s.runs = runs;
            s.error = Some(StoreError::NoSpace {
                needed_blocks: need,
                free_blocks: free,
            });
            return self.finish(i);
        }
        let s = self.slots[i].as_mut().expect("live slot");
        let mut next = runs.iter().flat_map(|&(f, l)| f..f + l);
        for (b, v) in s.values.iter_mut().enumerate() {
            if v.is_none() {
                let block = next.next().expect("allocated enough");
                *v = Some(BlockValue::Data {
                    block,
                    crc: block_crc(block, &data[b * BS..(b + 1) * BS]),
                });
            }
        }
        s.runs = runs;
        if self.defer_max > 0
            && s.kind == Kind::Write
            && !s.fua
            && s.len <= self.defer_max
            && need > 0
            && self.unapplied.blocks.len() as u64 + need <= DEFER_MAX_BLOCKS
        {
            // Deferred: the data rides in the commit, and the pool is
            // written once the write is answered (`start_apply`).
            s.deferred = true;
            for v in &s.values {
                if let Some(BlockValue::Data { block, .. }) = v {
                    self.unapplied.blocks.insert(*block);
                }
            }
            s.pieces.push(Some(buf));
            s.phase = Phase::Commit;
            self.commit.push(i);
            return;
        }
        self.submit_runs(i, buf, OpKind::Write);
        let s = self.slot(i);
        // Zero pieces were not written; only their buffers remain.
        s.pieces.clear();
        if s.ops_left == 0 {
            s.phase = Phase::Commit;
            self.commit.push(i);
        }
    }

    /// Answers a deferred write whose commit landed and writes its data to
    /// the pool.
    fn start_apply(&mut self, i: usize) {
        self.sh
            .counters
            .deferred_writes
            .fetch_add(1, Ordering::Relaxed);
        self.apply_next += 1;
        let seq = self.apply_next;
        self.applying.insert(seq);
        let s = self.slot(i);
        if let Some(reply) = s.reply.take() {
            let tag = s.tag;
            self.answers.send(reply, tag, Outcome::Done(Ok(())));
        }
        let s = self.slot(i);
        s.phase = Phase::Applying;
        s.apply_seq = seq;
        let buf = s
            .pieces
            .pop()
            .flatten()
            .expect("a deferred write keeps its data");
        s.pieces.clear();
        s.piece_start.clear();
        self.submit_runs(i, buf, OpKind::Write);
        let s = self.slot(i);
        s.pieces.clear();
        if s.ops_left == 0 {
            self.apply_done(i);
        }
    }

    /// A deferred write's data is in the pool (or failed to get there):
    /// reads of its blocks may go, and its records wait for the next sync.
    fn apply_done(&mut self, i: usize) {
        let s = self.slots[i].as_mut().expect("live slot");
        self.applying.remove(&s.apply_seq);
        let failed = s.error.take();
        let data = s.values.iter().filter_map(|v| match v {
            Some(BlockValue::Data { block, .. }) => Some(*block),
            _ => None,
        });
        for (key, block) in (s.record_key..).zip(data) {
            self.unapplied.blocks.remove(&block);
            if failed.is_none() {
                self.applied_unsynced.push((block, key));
            }
        }
        if let Some(e) = failed {
            // The record stays: the next start writes it again. Until then a
            // read of these blocks finds the pool's copy fails its checksum
            // and takes the record's (`record_copy`).
            tracing::error!(error = %e, offset = s.offset, "a deferred write did not reach the pool; reads take its record's copy, and the next start writes it again");
        }
        s.deferred = false;
        self.finish(i);
        self.unapplied.release(self.engine.as_mut());
        if self.freed_waiting {
            self.free_deferred();
        }
    }

    /// Deletes the records of deferred blocks that were freed (their
    /// writes' data is in the pool, or no one wants it any more), then
    /// gives the blocks back.
    fn free_deferred(&mut self) {
        self.freed_waiting = false;
        let mut inner = self.sh.inner.lock();
        if inner.deferred_freed.is_empty() {
            return;
        }
        let mut now = Vec::new();
        for b in std::mem::take(&mut inner.deferred_freed) {
            if self.unapplied.blocks.contains(&b) {
                // Its apply is in flight: the block is not free before it ends.
                inner.deferred_freed.push(b);
                self.freed_waiting = true;
            } else {
                now.push(b);
            }
        }
        if now.is_empty() {
            return;
        }
        let records: Vec<(u64, u64)> = now
            .iter()
            .filter_map(|b| inner.deferred.get(b).map(|&k| (*b, k)))
            .collect();
        match delete_records(&self.sh, &mut inner, &records) {
            Ok(()) => {
                inner.free_blocks(&now);
            }
            Err(e) => {
                // Kept (and not reused) until a later attempt succeeds.
                tracing::error!(error = %e, "deleting deferred write records failed");
                inner.deferred_freed.extend(now);
                self.freed_waiting = true;
            }
        }
    }

    /// After a pool sync: the deferred blocks applied before it began are
    /// durable in the pool, so their records go.
    fn drop_records(&mut self, covers: Vec<(u64, u64)>) {
        let mut inner = self.sh.inner.lock();
        if let Err(e) = delete_records(&self.sh, &mut inner, &covers) {
            tracing::error!(error = %e, "deleting deferred write records failed");
            drop(inner);
            self.applied_unsynced.extend(covers);
        }
    }

    /// Allocates `need` blocks for the write in slot `i`, near the old copy
    /// of its first data block (see [`old_copy`]).
    fn allocate(&mut self, i: usize, need: u64, runs: &mut Vec<(u64, u64)>) -> bool {
        let mut inner = self.sh.inner.lock();
        let hint = self.slots[i]
            .as_ref()
            .and_then(|s| old_copy(&self.sh.db, &mut inner, s));
        let alloc = |inner: &mut crate::store::Inner, runs: &mut Vec<(u64, u64)>| match hint {
            Some(h) => inner.alloc.alloc_near(h, need, runs),
            None => inner.alloc.alloc(need, runs),
        };
        if alloc(&mut inner, runs) {
            return true;
        }
        if inner.alloc.pending_blocks() == 0 {
            return false;
        }
        // Space is waiting for a durable commit: sync the WAL and retry.
        let seq = inner.seq;
        drop(inner);
        if let Err(e) = self.sh.db.flush_wal(true) {
            tracing::error!(error = %e, "WAL sync failed");
            return false;
        }
        let mut inner = self.sh.inner.lock();
        inner.synced(seq);
        alloc(&mut inner, runs)
    }

    fn complete(&mut self, c: IoCompletion) {
        let i = (c.user_data >> PIECE_BITS) as usize;
        let piece = (c.user_data & ((1 << PIECE_BITS) - 1)) as usize;
        let Some(Some(s)) = self.slots.get_mut(i) else {
            tracing::error!(user_data = c.user_data, "completion for no request");
            return;
        };
        s.ops_left -= 1;
        let want = c.buf.as_ref().map_or(0, |b| b.len());
        let res = match c.result {
            Ok(n) if n == want => Ok(()),
            Ok(n) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short transfer: {n} of {want} bytes"),
            )),
            Err(e) => Err(e),
        };
        if let Err(source) = res {
            self.sh.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            let op = match s.phase {
                Phase::Writing | Phase::Applying => "write",
                Phase::Sync => "fdatasync",
                _ => "read",
            };
            tracing::error!(op, error = %source, "pool I/O failed");
            if s.error.is_none() {
                s.error = Some(StoreError::Io {
                    op,
                    offset: s.offset,
                    source,
                });
            }
        }
        match s.phase {
            Phase::Reading | Phase::Edges => {
                let gathered = s
                    .gathers
                    .iter()
                    .position(|g| g.0 == piece)
                    .map(|at| s.gathers.swap_remove(at));
                if let (Some(window), Some((_, dest, lo))) = (&c.buf, gathered) {
                    let dest = self.pick_gathered(i, piece, window, dest, lo);
                    self.slot(i).pieces[piece] = Some(dest);
                } else if let Some(mut buf) = c.buf {
                    self.verify_piece(i, piece, &mut buf);
                    let s = self.slot(i);
                    if s.phase == Phase::Edges {
                        let rel = s.piece_start[piece];
                        let (offset, len, first) = (s.offset, s.len, s.first_lba);
                        if let Some(Some(payload)) = s.pieces.last_mut() {
                            let (lo, hi) = edge_gap(offset, len, first + rel);
                            let at = rel as usize * BS;
                            let old = buf.as_slice();
                            payload.as_mut_slice()[at..at + lo].copy_from_slice(&old[..lo]);
                            payload.as_mut_slice()[at + hi..at + BS].copy_from_slice(&old[hi..]);
                        }
                    } else {
                        s.pieces[piece] = Some(buf);
                    }
                }
                if self.slot(i).ops_left == 0 {
                    if self.slot(i).phase == Phase::Edges && self.slot(i).error.is_none() {
                        let s = self.slot(i);
                        let payload = s.pieces.pop().flatten().expect("payload");
                        self.start_writes(i, payload);
                    } else {
                        self.finish(i);
                    }
                }
            }
            Phase::Writing => {
                if s.ops_left == 0 {
                    s.phase = Phase::Commit;
                    self.commit.push(i);
                }
            }
            Phase::Sync => {
                let err = self.slot(i).error.take();
                self.pool_synced = Some(err);
                self.sync_done();
            }
            Phase::Applying => {
                if s.ops_left == 0 {
                    self.apply_done(i);
                }
            }
            Phase::Commit => {}
        }
    }

    /// Checks the checksum of every block in a completed read piece; a block
    /// whose pool copy fails it is taken from its deferred write's record
    /// if it has one (`record_copy`).
    fn verify_piece(&mut self, i: usize, piece: usize, buf: &mut IoBuf) {
        let s = self.slots[i].as_ref().expect("live slot");
        if s.error.is_some() {
            return;
        }
        let start = s.piece_start[piece] as usize;
        let values: &[Option<BlockValue>] = if s.phase == Phase::Edges {
            std::slice::from_ref(&s.values[piece])
        } else {
            &s.values[start..start + buf.len() / BS]
        };
        let mut bad = None;
        for (k, v) in values.iter().enumerate() {
            if let Some(BlockValue::Data { block, crc }) = *v {
                let data = &mut buf.as_mut_slice()[k * BS..(k + 1) * BS];
                if block_crc(block, data) != crc {
                    match record_copy(&self.sh, block, crc) {
                        Some(d) => data.copy_from_slice(&d),
                        None => {
                            bad = Some((start + k, block));
                            break;
                        }
                    }
                }
            }
        }
        if let Some((k, block)) = bad {
            self.checksum_mismatch(i, k, block);
        }
    }

    /// Records a block of slot `i` (by its index in `values`) whose data
    /// does not match its checksum: the request fails with EIO.
    fn checksum_mismatch(&mut self, i: usize, k: usize, block: u64) {
        let s = self.slots[i].as_mut().expect("live slot");
        let offset = (s.first_lba + k as u64) * BLOCK_SIZE;
        let volume = describe(&self.sh.inner.lock(), s.target);
        self.sh
            .counters
            .checksum_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            volume,
            offset,
            pool_block = block,
            "checksum mismatch on read"
        );
        s.error = Some(StoreError::Integrity {
            volume,
            offset,
            pool_block: block,
        });
    }

    /// A gathered piece's window arrived: checks each wanted block and
    /// copies it to its place in the piece.
    fn pick_gathered(
        &mut self,
        i: usize,
        piece: usize,
        window: &IoBuf,
        mut dest: IoBuf,
        lo: u64,
    ) -> IoBuf {
        let s = self.slots[i].as_ref().expect("live slot");
        if s.error.is_some() {
            return dest;
        }
        let start = s.piece_start[piece] as usize;
        let mut bad = None;
        for (k, v) in s.values[start..start + dest.len() / BS].iter().enumerate() {
            if let Some(BlockValue::Data { block, crc }) = *v {
                let at = (block - lo) as usize * BS;
                let to = &mut dest.as_mut_slice()[k * BS..(k + 1) * BS];
                to.copy_from_slice(&window.as_slice()[at..at + BS]);
                if block_crc(block, to) != crc {
                    match record_copy(&self.sh, block, crc) {
                        Some(d) => to.copy_from_slice(&d),
                        None => {
                            bad = Some((start + k, block));
                            break;
                        }
                    }
                }
            }
        }
        if let Some((k, block)) = bad {
            self.checksum_mismatch(i, k, block);
        }
        dest
    }

    /// Stages every write and zeroing ready so far as one batch and hands it to
    /// the committer thread; one group is in flight at a time, and the next one
    /// grows meanwhile.
    fn start_group(&mut self) {
        if self.commit.is_empty() || !self.committing.is_empty() {
            return;
        }
        let ready = std::mem::take(&mut self.commit);
        let mut batch = WriteBatch::default();
        let mut freed = Vec::new();
        let mut staged = Vec::new();
        let mut owned = Vec::new();
        let mut inner = self.sh.inner.lock();
        let mut staging: Result<()> = Ok(());
        for &i in &ready {
            let s = self.slots[i].as_mut().expect("live slot");
            if s.error.is_none() && !writable(&inner, s) {
                // Deleted while the write was in flight: nothing to publish.
                s.error = Some(StoreError::NotFound {
                    kind: "volume",
                    name: format!("#{}", s.tree),
                });
            }
            if s.error.is_none() {
                let (f0, s0) = (freed.len(), staged.len());
                staging = stage(&self.sh, &mut inner, s, &mut batch, &mut freed, &mut staged);
                if staging.is_err() {
                    break;
                }
                if s.deferred {
                    s.record_key = stage_deferred(&self.sh, &mut inner, s, &mut batch);
                }
                // Every new data entry is this tree's block; every block freed
                // was one of its own (shared ones move to its history).
                let added = staged[s0..]
                    .iter()
                    .filter(|(_, _, e)| matches!(e, Some(e) if e.value.is_data()))
                    .count();
                owned.push((s.tree, added as i64 - (freed.len() - f0) as i64));
            }
        }
        match staging {
            Ok(()) => {
                // Control operations that read or change the maps wait for this
                // group to land (see `Shared::lock_quiesced`).
                inner.groups_in_flight += 1;
                drop(inner);
                let group = Group {
                    batch,
                    staged,
                    freed,
                    owned,
                };
                if self.live() - self.applying.len() == ready.len() {
                    // Nothing else is in flight (but applies, which need no
                    // turn of the loop until they complete), so nothing waits
                    // behind this group on the I/O thread: write it here and
                    // spare the two thread hand-offs (what a lone,
                    // queue-depth-1 write pays).
                    let result = write_group(&self.sh, group);
                    self.end_group(ready, result);
                    return;
                }
                self.committing = ready;
                if let Err(std::sync::mpsc::SendError(group)) = self.committer.send(group) {
                    // The committer is gone (it never exits before the loop).
                    drop(group);
                    self.sh.inner.lock().groups_in_flight -= 1;
                    let ready = std::mem::take(&mut self.committing);
                    self.end_group(ready, Err(StoreError::ShuttingDown));
                }
            }
            // A failure while staging (metadata unreadable) may leave part of one
            // write in the batch: publish none of the group rather than a map that
            // points at blocks about to be given back.
            Err(e) => {
                drop(inner);
                self.end_group(ready, Err(e));
            }
        }
    }

    /// The committer finished the group in flight (or it never left).
    fn end_group(&mut self, ready: Vec<usize>, result: Result<()>) {
        if let Err(e) = &result {
            tracing::error!(error = %e, "block map commit failed");
        }
        let mut inner = self.sh.inner.lock();
        let mut again = Vec::new();
        let mut unheld = false;
        for &i in &ready {
            let s = self.slots[i].as_mut().expect("live slot");
            if let Err(e) = &result {
                s.error.get_or_insert_with(|| StoreError::Corrupt {
                    what: "block map commit".into(),
                    detail: e.to_string(),
                });
            }
            if s.error.is_some() {
                for (f, l) in s.runs.drain(..) {
                    inner.alloc.unalloc(f, l);
                }
                if s.deferred {
                    // No record was written, and the blocks are free again.
                    s.deferred = false;
                    for v in &s.values {
                        if let Some(BlockValue::Data { block, .. }) = v {
                            inner.deferred.remove(block);
                            self.unapplied.blocks.remove(block);
                            unheld = true;
                        }
                    }
                }
            }
            s.runs.clear();
            release_range(&mut self.busy, &self.sh, &mut inner, s, &mut again);
        }
        let pending = inner.alloc.pending_blocks();
        let sync_needed = pending > PENDING_FREE_SYNC.min(inner.alloc.blocks() / 64)
            || (pending > PENDING_FREE_SYNC_NEAR && inner.alloc.take_near_misses() > 0);
        drop(inner);
        if unheld {
            // A failed deferred write's blocks will never be applied: reads
            // held on them (a gathered window may span them) go.
            self.unapplied.release(self.engine.as_mut());
        }
        for i in ready {
            let s = self.slot(i);
            if s.fua && s.error.is_none() {
                s.phase = Phase::Sync;
                self.syncing.push(i);
            } else if s.deferred {
                self.start_apply(i);
            } else {
                self.finish(i);
            }
        }
        if sync_needed && self.syncing.is_empty() {
            let seq = self.sh.inner.lock().seq;
            match self.sh.db.flush_wal(true) {
                Ok(()) => self.sh.inner.lock().synced(seq),
                Err(e) => tracing::error!(error = %e, "WAL sync failed"),
            }
        }
        // Writes that waited for these may go now.
        for req in again {
            self.accept_write(req);
        }
    }

    /// Starts one pool fdatasync for every flush (and FUA write) waiting.
    fn start_sync(&mut self) {
        if self.syncing.is_empty() || !self.sync_batch.is_empty() {
            return;
        }
        // A flush waits for the applies of the writes it covers (those
        // started before it); flushes whose applies are done go now, the
        // others with a later sync.
        let oldest = self.applying.first().copied().unwrap_or(u64::MAX);
        let (ready, waiting): (Vec<usize>, Vec<usize>) = std::mem::take(&mut self.syncing)
            .into_iter()
            .partition(|&i| self.slots[i].as_ref().is_some_and(|s| s.apply_seq < oldest));
        self.syncing = waiting;
        if ready.is_empty() {
            return;
        }
        self.sync_covers = std::mem::take(&mut self.applied_unsynced);
        self.sync_batch = ready;
        let first = self.sync_batch[0];
        self.slot(first).ops_left += 1;
        self.engine.push(IoOp {
            kind: OpKind::DataSync,
            file: 0,
            offset: 0,
            buf: None,
            user_data: (first as u64) << PIECE_BITS,
        });
        // The WAL syncs at the same time. Both must finish before any waiter is
        // answered; their order does not matter for what a flush promises (see
        // the fault model: every write these waiters were acknowledged already
        // had its data written and its map in the WAL).
        let seq = self.sh.inner.lock().seq;
        if self.wal_syncer.send(seq).is_err() {
            self.wal_synced = Some((seq, Err(StoreError::ShuttingDown)));
        }
    }

    /// Once both the pool and the WAL are synced, answers every waiter that was
    /// there when the sync started.
    fn sync_done(&mut self) {
        if self.pool_synced.is_none() || self.wal_synced.is_none() {
            return;
        }
        let pool_err = self.pool_synced.take().flatten();
        let Some((seq, wal)) = self.wal_synced.take() else {
            return;
        };
        let waiters = std::mem::take(&mut self.sync_batch);
        let covers = std::mem::take(&mut self.sync_covers);
        if wal.is_ok() && pool_err.is_none() {
            self.sh.inner.lock().synced(seq);
            self.drop_records(covers);
            self.own_sync_failed = None;
        } else {
            self.applied_unsynced.extend(covers);
            self.own_sync_failed = Some(std::time::Instant::now());
        }
        if self.freed_waiting {
            self.free_deferred();
        }
        self.sh.counters.flushes.fetch_add(1, Ordering::Relaxed);
        for i in waiters {
            let s = self.slot(i);
            if let Some(e) = &pool_err {
                s.error.get_or_insert_with(|| StoreError::Io {
                    op: "fdatasync",
                    offset: 0,
                    source: std::io::Error::other(e.to_string()),
                });
            }
            if let Err(e) = &wal {
                s.error.get_or_insert_with(|| {
                    StoreError::FailedPrecondition(format!("WAL sync failed: {e}"))
                });
            }
            self.finish(i);
        }
    }

    /// A write in progress on `tree` overlapping blocks `[first, end)`.
    fn overlap(&self, tree: u64, first: u64, end: u64) -> Option<usize> {
        // The ranges are disjoint: only the last one starting before `end`
        // can reach past `first`.
        let (_, &(e, slot)) = self.busy.get(&tree)?.range(..end).next_back()?;
        (e > first).then_some(slot)
    }

    /// Answers a request and recycles its slot.
    fn finish(&mut self, i: usize) {
        let Some(mut s) = self.slots[i].take() else {
            return;
        };
        self.free_slots.push(i);
        if s.busy {
            let mut again = Vec::new();
            let mut inner = self.sh.inner.lock();
            for (f, l) in s.runs.drain(..) {
                inner.alloc.unalloc(f, l);
            }
            release_range(&mut self.busy, &self.sh, &mut inner, &mut s, &mut again);
            drop(inner);
            for req in again {
                self.accept_write(req);
            }
        }
        let outcome = match s.kind {
            Kind::Read => {
                if let Some(seq) = s.read_seq.take() {
                    self.sh.inner.lock().read_end(seq);
                }
                match s.error.take() {
                    Some(e) => Outcome::Read(Err(e)),
                    None => {
                        let mut pieces = s.pieces.drain(..).flatten();
                        let mut buf = pieces.next().expect("a read has a buffer");
                        for p in pieces {
                            // Pieces were split off this buffer in order.
                            buf.unsplit(p).expect("read pieces rejoin their buffer");
                        }
                        Outcome::Read(Ok(ReadDone {
                            buf,
                            start: (s.offset % BLOCK_SIZE) as usize,
                            len: s.len as usize,
                        }))
                    }
                }
            }
            _ => Outcome::Done(s.error.take().map_or(Ok(()), Err)),
        };
        s.gathers.clear();
        s.pieces.clear();
        let reply = s.reply.take();
        let tag = s.tag;
        self.spare.push(s);
        if let Some(reply) = reply {
            self.answers.send(reply, tag, outcome);
        }
    }
}

/// Where the old copy of the first block the write in `s` puts data in is (a
/// write's new blocks go to the same allocation group, so an overwritten
/// volume keeps its layout; see `alloc`). For a small write a head the cache
/// lacks is read from RocksDB into it: the commit needs it next (`stage`), so
/// the lookup only comes earlier. A large write asks the cache alone.
fn old_copy(db: &rocksdb::DB, inner: &mut Inner, s: &Slot) -> Option<u64> {
    let k = s.values.iter().position(|v| v.is_none())?;
    let (tree, lba) = (s.layers.first()?.tree, s.first_lba + k as u64);
    let head = if s.blocks <= 16 {
        inner.cache.get(db, tree, lba).ok()?
    } else {
        inner.cache.peek(tree, lba)?
    };
    match head?.value {
        BlockValue::Data { block, .. } => Some(block),
        BlockValue::Zero => None,
    }
}

/// A buffer for a write of `len` bytes at `offset`: whole blocks, the payload
/// at the returned position.
pub(crate) fn write_buffer(
    arena: &std::sync::Arc<berth_io::Arena>,
    offset: u64,
    len: usize,
) -> (IoBuf, usize) {
    let start = (offset % BLOCK_SIZE) as usize;
    let span = (start + len).div_ceil(BS) * BS;
    (arena.alloc_uninit(span.max(BS)), start)
}

/// Ends a write's claim on its blocks (`busy` is the I/O thread's index of
/// ranges in progress); the writes that waited for it go to `again`. A
/// volume's range map stays while the volume does, so one writing at queue
/// depth 1 does not rebuild it for every write.
fn release_range(
    busy: &mut HashMap<u64, BTreeMap<u64, (u64, usize)>>,
    sh: &Shared,
    inner: &mut Inner,
    s: &mut Slot,
    again: &mut Vec<Request>,
) {
    if !s.busy {
        return;
    }
    s.busy = false;
    again.append(&mut s.waiters);
    let tree = inner.trees.get_mut(&s.tree);
    let live = tree.as_ref().is_some_and(|t| t.rec.live);
    if let Some(t) = tree {
        t.writes_in_flight = t.writes_in_flight.saturating_sub(1);
        if t.frozen && t.writes_in_flight == 0 {
            // A snapshot waits for this volume's writes to drain.
            sh.commit_idle.notify_all();
        }
    }
    let emptied = busy.get_mut(&s.tree).is_some_and(|r| {
        r.remove(&s.first_lba);
        r.is_empty()
    });
    if emptied && !live {
        // Its volume is gone: so is its index.
        busy.remove(&s.tree);
    }
}

/// Byte range `[lo, hi)` of block `lba` that a write of `len` at `offset`
/// covers; the rest of the block keeps its old contents.
fn edge_gap(offset: u64, len: u64, lba: u64) -> (usize, usize) {
    let b0 = lba * BLOCK_SIZE;
    let lo = offset.max(b0) - b0;
    let hi = (offset + len).min(b0 + BLOCK_SIZE) - b0;
    (lo as usize, hi as usize)
}

fn describe(inner: &Inner, target: Target) -> String {
    match target {
        Target::Volume(id) => inner
            .volumes
            .get(&id)
            .map_or(format!("#{id}"), |v| v.name.clone()),
        Target::Snapshot(id) => inner
            .snaps
            .get(&id)
            .map_or(format!("#{id}"), |s| format!("snapshot {}", s.rec.name)),
    }
}

/// Whether the volume a write targets still exists.
fn writable(inner: &Inner, s: &Slot) -> bool {
    matches!(s.target, Target::Volume(id) if inner.volumes.contains_key(&id))
        && inner.trees.contains_key(&s.tree)
}

/// The data of `block` from its deferred write's record, if it has one that
/// matches `crc` (the I/O thread's reads and the scrub look there when the
/// pool's copy fails its checksum).
pub(crate) fn record_copy(sh: &Shared, block: u64, crc: u32) -> Option<Vec<u8>> {
    let key = sh.inner.lock().deferred.get(&block).copied()?;
    let v = sh
        .db
        .get_cf(cf(&sh.db, CF_DEFERRED), key.to_be_bytes())
        .ok()??;
    let (b, c, d) = meta::deferred_decode(&v, BS).ok()?;
    (b == block && c == crc && block_crc(block, d) == crc).then(|| d.to_vec())
}

/// Deletes the records `(block, key)` that are still the blocks' records
/// (a block freed meanwhile lost its record already, and may have a newer
/// one since), in one batch; on success those blocks are no longer deferred.
fn delete_records(sh: &Shared, inner: &mut Inner, records: &[(u64, u64)]) -> Result<()> {
    let mut batch = WriteBatch::default();
    let mut gone = Vec::new();
    for &(block, key) in records {
        if inner.deferred.get(&block) == Some(&key) {
            batch.single_delete_cf(cf(&sh.db, CF_DEFERRED), key.to_be_bytes());
            gone.push((block, key));
        }
    }
    if gone.is_empty() {
        return Ok(());
    }
    sh.db.write(batch)?;
    for (block, _) in gone {
        inner.deferred.remove(&block);
    }
    Ok(())
}

/// Puts a deferred write's data into the batch, one record per pool block
/// under consecutive keys, and notes the blocks as deferred (not freed
/// before their record goes); returns the first key.
fn stage_deferred(sh: &Shared, inner: &mut Inner, s: &Slot, batch: &mut WriteBatch) -> u64 {
    let first = inner.deferred_next;
    let Some(Some(buf)) = s.pieces.last() else {
        return first;
    };
    let data = buf.as_slice();
    for (k, v) in s.values.iter().enumerate() {
        if let Some(BlockValue::Data { block, crc }) = v {
            let key = inner.deferred_next;
            inner.deferred_next += 1;
            batch.put_cf(
                cf(&sh.db, CF_DEFERRED),
                key.to_be_bytes(),
                meta::deferred_encode(*block, *crc, &data[k * BS..(k + 1) * BS]),
            );
            inner.deferred.insert(*block, key);
        }
    }
    first
}

/// Stages one finished write or zeroing into the group's batch.
fn stage(
    sh: &Shared,
    inner: &mut Inner,
    s: &Slot,
    batch: &mut WriteBatch,
    freed: &mut Vec<u64>,
    staged: &mut Vec<(u64, u64, Option<MapEntry>)>,
) -> Result<()> {
    let Inner { trees, cache, .. } = inner;
    let tree = trees.get(&s.tree).ok_or_else(|| StoreError::NotFound {
        kind: "volume",
        name: format!("#{}", s.tree),
    })?;
    let upd = HeadUpdate {
        db: &sh.db,
        tree: s.tree,
        head_epoch: tree.rec.head_epoch,
        newest_reader: tree.readers.keys().next_back().copied(),
        parents: &s.layers[1..],
    };
    let old = map::heads_in(&sh.db, cache, s.tree, s.first_lba, s.blocks)?;
    let tracking = tree.tracking.map(|t| t.round);
    match s.kind {
        Kind::Write => {
            let mut old = old.into_iter().peekable();
            for (k, v) in s.values.iter().enumerate() {
                let lba = s.first_lba + k as u64;
                let prev = match old.peek() {
                    Some(&(x, e)) if x == lba => {
                        old.next();
                        Some(e)
                    }
                    _ => None,
                };
                let new = v.unwrap_or(BlockValue::Zero);
                if let Some(round) = tracking {
                    crate::changes::mark(&sh.db, batch, s.tree, lba, round);
                }
                if prev.is_none() && new == BlockValue::Zero && upd.parents.is_empty() {
                    continue; // zeros over a never-written block: nothing to record
                }
                upd.stage(cache, batch, lba, prev, new, freed, staged)?;
            }
        }
        Kind::Zero => {
            // Only blocks that hold something (here or in a parent) need work, so
            // trimming a huge, mostly empty range is cheap.
            let mut lbas: Vec<(u64, Option<MapEntry>)> =
                old.into_iter().map(|(x, e)| (x, Some(e))).collect();
            if !upd.parents.is_empty() {
                for x in map::ancestor_lbas(&sh.db, upd.parents, s.first_lba, s.blocks)? {
                    if !lbas.iter().any(|&(y, _)| y == x) {
                        lbas.push((x, None));
                    }
                }
            }
            for (lba, prev) in lbas {
                if let Some(round) = tracking {
                    crate::changes::mark(&sh.db, batch, s.tree, lba, round);
                }
                upd.stage(cache, batch, lba, prev, BlockValue::Zero, freed, staged)?;
            }
        }
        _ => {}
    }
    Ok(())
}
