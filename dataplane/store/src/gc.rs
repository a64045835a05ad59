//! Garbage collection of deleted volumes and snapshots, in the background.
//!
//! Deleting a volume or a snapshot is a tombstone: one small batch removes
//! the record, marks the tree dead (or drops a reader of it) and puts a `gc`
//! key naming the tree in the meta family. The call returns after that batch
//! is durable, in the same time whatever the volume's size. The `berth-gc`
//! thread then walks the tree's map entries in steps of at most [`GC_STEP`]:
//!
//! 1. off the catalog lock, read the next entries and decide which ones no
//!    reader can see (the tree's reader epochs are copied at the start of
//!    the step);
//! 2. write their deletes (WAL, not synced);
//! 3. under the catalog lock, for a moment: hand their blocks to the
//!    allocator (reused only after a WAL sync covers the deletes and no read
//!    that could still see them is in flight), drop cached heads, count the
//!    tree's blocks down;
//! 4. every [`SYNC_EVERY`] steps, sync the WAL, so the space is free for
//!    writes; then rest as long as the step took, so the walk never takes
//!    more than half a core from the data path.
//!
//! When the walk ends, a dead tree that nobody reads is dropped (which may
//! release a hidden parent snapshot and queue its tree in turn) and the `gc`
//! key goes. A crash leaves the key: the walk starts again at open, and what
//! it already removed is simply not there.
//!
//! Why a decision made off the lock stays right: a dead tree's entries never
//! change but by this walk. A live tree's (a snapshot of it was deleted)
//! change by writes, which only ever (a) add a history entry at the old
//! head's epoch, the end of validity the walk already used for the entry
//! below it, or (b) replace a head no snapshot sees, which stretches the
//! validity of the entry below it over epochs no snapshot has. New
//! snapshots take the head epoch, above every history entry's validity.
//! Readers only ever disappear while a walk runs, and an entry nobody saw
//! with more readers is still unseen with fewer (the tree is queued again
//! for the entries that became garbage).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;

use crate::error::Result;
use crate::meta::{self, cf, BlockValue, MapEntry, CF_HEAD, CF_HISTORY, CF_META, CF_TREES};
use crate::store::{Inner, Shared};

/// Most map entries one step looks at: a step's batch and its moment under
/// the catalog lock stay small whatever the size of what is deleted.
pub(crate) const GC_STEP: usize = 1024;

/// Steps between WAL syncs (which make their frees reusable): a sync per
/// step was a device flush every millisecond or two.
const SYNC_EVERY: u32 = 8;

/// Trees waiting for a walk, and the one being walked.
#[derive(Debug, Default)]
pub(crate) struct GcQueue {
    pub pending: BTreeSet<u64>,
    pub running: Option<u64>,
}

/// The key that says `tree` has garbage to collect.
pub(crate) fn gc_key(tree: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(b"gc");
    k[2..].copy_from_slice(&tree.to_be_bytes());
    k
}

/// Records, in the caller's batch, that `tree` needs a walk; [`wake`] once
/// the batch is written.
pub(crate) fn mark(sh: &Shared, b: &mut WriteBatch, tree: u64) {
    b.put_cf(cf(&sh.db, CF_META), gc_key(tree), []);
}

/// Queues trees whose `gc` key the caller wrote.
pub(crate) fn wake(sh: &Shared, trees: impl IntoIterator<Item = u64>) {
    let mut q = sh.gc.lock();
    q.pending.extend(trees);
    sh.gc_wake.notify_all();
}

/// The trees with a `gc` key (a walk a crash interrupted), at open.
pub(crate) fn pending_at_open(db: &rocksdb::DB) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut it = db.raw_iterator_cf(cf(db, CF_META));
    it.seek(b"gc");
    while let Some(k) = it.key() {
        if k.len() != 10 || &k[..2] != b"gc" {
            break;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&k[2..]);
        out.push(u64::from_be_bytes(id));
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// The `berth-gc` thread: walks queued trees until the store shuts down.
pub(crate) fn run(sh: &Shared) {
    loop {
        let tree = {
            let mut q = sh.gc.lock();
            loop {
                if sh.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(t) = q.pending.pop_first() {
                    q.running = Some(t);
                    break t;
                }
                sh.gc_wake.notify_all();
                sh.gc_wake.wait(&mut q);
            }
        };
        let walked = walk(sh, tree);
        let mut q = sh.gc.lock();
        q.running = None;
        match walked {
            Ok(true) => {}
            // Shutting down: the key stays, the walk resumes at open.
            Ok(false) => return,
            Err(e) => {
                // The key stays too: the next open tries again. Until then
                // the space stays used, which is safe.
                tracing::error!(tree, error = %e, "garbage collection failed");
            }
        }
        sh.gc_wake.notify_all();
    }
}

/// Where a walk is: the family, the next key to look at, and for history
/// entries the LBA of the last one and the end of its validity.
struct Cursor {
    family: &'static str,
    next: Vec<u8>,
    cur: Option<(u64, u64)>,
}

/// Collects the garbage of one tree; false if the store began shutting down.
fn walk(sh: &Shared, tree: u64) -> Result<bool> {
    let mut cursor = Cursor {
        family: CF_HEAD,
        next: tree.to_be_bytes().to_vec(),
        cur: None,
    };
    let mut removed = 0u64;
    let mut unsynced = 0;
    loop {
        if let Some(p) = &sh.pauses {
            p.at("gc-step");
        }
        let started = std::time::Instant::now();
        if sh.shutdown.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let seen = {
            let inner = sh.inner.lock();
            inner
                .trees
                .get(&tree)
                .map(|t| (t.rec.live, t.readers.keys().copied().collect::<Vec<_>>()))
        };
        let Some((live, readers)) = seen else {
            // Gone already (a second walk raced the first): nothing left.
            finish(sh, tree)?;
            return Ok(true);
        };
        let mut batch = WriteBatch::default();
        let mut freed = Vec::new();
        let mut heads = Vec::new();
        let more = step(
            sh,
            tree,
            live,
            &readers,
            &mut cursor,
            &mut batch,
            &mut freed,
            &mut heads,
        )?;
        if !batch.is_empty() {
            removed += batch.len() as u64;
            sh.db.write(batch)?;
            {
                let mut inner = sh.inner.lock();
                for &lba in &heads {
                    inner.cache.invalidate(tree, lba);
                }
                if let Some(t) = inner.trees.get_mut(&tree) {
                    t.owned_blocks = t.owned_blocks.saturating_sub(freed.len() as u64);
                }
                if inner.free_blocks(&freed) {
                    // The I/O thread deletes their records, then frees them.
                    sh.deferred_freed.store(true, Ordering::SeqCst);
                    if let Some(w) = sh.waker.get() {
                        w.wake();
                    }
                }
            }
            unsynced += 1;
            if unsynced == SYNC_EVERY || !more {
                sh.sync_wal()?;
                unsynced = 0;
            }
        }
        if !more {
            break;
        }
        // Half the time at most: on a small machine the walk would
        // otherwise take a core the data path needs (measured: a 16 GiB
        // volume's walk raised another volume's QD1 read p99 fourfold).
        std::thread::sleep(started.elapsed());
    }
    finish(sh, tree)?;
    tracing::debug!(tree, removed, "garbage collected");
    Ok(true)
}

/// Decides on up to [`GC_STEP`] entries from the cursor; false when the tree
/// has no more.
#[allow(clippy::too_many_arguments)]
fn step(
    sh: &Shared,
    tree: u64,
    live: bool,
    readers: &[u64],
    cursor: &mut Cursor,
    batch: &mut WriteBatch,
    freed: &mut Vec<u64>,
    heads: &mut Vec<u64>,
) -> Result<bool> {
    let db = &sh.db;
    // Does a reader's epoch fall in [from, until)?
    let sees = |from: u64, until: u64| {
        let i = readers.partition_point(|&r| r < from);
        readers.get(i).is_some_and(|&r| r < until)
    };
    let prefix = tree.to_be_bytes();
    let mut looked = 0;
    loop {
        if cursor.family == CF_HEAD && live {
            // A live tree's heads are its volume's: nothing to collect there.
            cursor.family = CF_HISTORY;
            cursor.next = prefix.to_vec();
        }
        let mut it = db.raw_iterator_cf(cf(db, cursor.family));
        it.seek(&cursor.next);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&prefix) {
                break;
            }
            if looked == GC_STEP {
                cursor.next = k.to_vec();
                return Ok(true);
            }
            looked += 1;
            let e = MapEntry::decode(v)?;
            let garbage = match meta::parse_key(k) {
                Some((_, lba, None)) => {
                    let g = !sees(e.epoch, u64::MAX);
                    if g {
                        heads.push(lba);
                    }
                    g
                }
                Some((_, lba, Some(epoch))) => {
                    // History entries of one LBA come newest first; each is
                    // valid until the one before it (or the head entry).
                    let until = match cursor.cur {
                        Some((l, until)) if l == lba => until,
                        _ => crate::map::get_head(db, tree, lba)?.map_or(u64::MAX, |h| h.epoch),
                    };
                    cursor.cur = Some((lba, epoch));
                    !sees(epoch, until)
                }
                None => false,
            };
            if garbage {
                batch.delete_cf(cf(db, cursor.family), k);
                if let BlockValue::Data { block, .. } = e.value {
                    freed.push(block);
                }
            }
            it.next();
        }
        it.status()?;
        if cursor.family == CF_HISTORY {
            return Ok(false);
        }
        cursor.family = CF_HISTORY;
        cursor.next = prefix.to_vec();
        cursor.cur = None;
    }
}

/// After a walk: drop a dead tree nobody reads (and release its parent
/// snapshot's pin), and remove the `gc` key unless the tree was queued again.
fn finish(sh: &Shared, tree: u64) -> Result<()> {
    let mut b = WriteBatch::default();
    let mut queue = Vec::new();
    {
        let mut inner = sh.lock_quiesced();
        let again = sh.gc.lock().pending.contains(&tree);
        if again {
            // A reader went while we walked: the next walk finishes the job.
            return Ok(());
        }
        b.delete_cf(cf(&sh.db, CF_META), gc_key(tree));
        drop_tree_if_unread(sh, &mut inner, &mut b, tree, &mut queue);
        sh.db.write(b)?;
    }
    wake(sh, queue);
    sh.sync_wal()
}

/// Removes a dead tree without readers from the catalog; if that was the
/// last clone of a hidden snapshot, the snapshot goes too and its tree is
/// queued (in `queue`) for a walk.
fn drop_tree_if_unread(
    sh: &Shared,
    inner: &mut Inner,
    b: &mut WriteBatch,
    tree: u64,
    queue: &mut Vec<u64>,
) {
    let Some(t) = inner.trees.get(&tree) else {
        return;
    };
    if t.rec.live || !t.readers.is_empty() {
        return;
    }
    let parent = t.rec.parent;
    inner.trees.remove(&tree);
    b.delete_cf(cf(&sh.db, CF_TREES), meta::id_key(tree));
    let Some((pt, pe, _)) = parent else {
        return;
    };
    let pin = inner
        .trees
        .get(&pt)
        .and_then(|t| t.readers.get(&pe))
        .copied();
    let Some(psid) = pin else {
        return;
    };
    let release = match inner.snaps.get_mut(&psid) {
        Some(s) => {
            s.clones = s.clones.saturating_sub(1);
            s.clones == 0 && s.rec.hidden
        }
        None => false,
    };
    if release {
        if let Some(t) = crate::store::drop_snapshot(sh, inner, b, psid) {
            queue.push(t);
        }
    }
}

/// Named points where a test holds a store's control work: `gc-step`
/// (between two steps of a garbage-collection walk) and `snapshot-frozen` (a
/// snapshot with its volume frozen, before it waits for the volume's
/// writes). Like [`crate::FaultPlan`], for tests and drills; `None` in normal
/// operation. What a test proves with them is structural: while the store is
/// held there, other volumes' I/O goes on.
#[derive(Debug, Default)]
pub struct Pauses {
    state: parking_lot::Mutex<PauseState>,
    cond: parking_lot::Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    held: std::collections::HashSet<&'static str>,
    reached: std::collections::HashMap<&'static str, u64>,
}

impl Pauses {
    /// From now on, work that reaches `point` waits there.
    pub fn hold(&self, point: &'static str) {
        self.state.lock().held.insert(point);
    }

    /// Lets the work waiting at `point` (and later arrivals) go.
    pub fn release(&self, point: &'static str) {
        self.state.lock().held.remove(point);
        self.cond.notify_all();
    }

    /// Lets everything go, for good (the store is closing).
    pub fn release_all(&self) {
        self.state.lock().held.clear();
        self.cond.notify_all();
    }

    /// Waits until `point` has been reached `times` times in all; false on
    /// timeout.
    pub fn wait_reached(
        &self,
        point: &'static str,
        times: u64,
        limit: std::time::Duration,
    ) -> bool {
        let until = std::time::Instant::now() + limit;
        let mut s = self.state.lock();
        while s.reached.get(point).copied().unwrap_or(0) < times {
            if self.cond.wait_until(&mut s, until).timed_out() {
                return false;
            }
        }
        true
    }

    pub(crate) fn at(&self, point: &'static str) {
        let mut s = self.state.lock();
        *s.reached.entry(point).or_default() += 1;
        self.cond.notify_all();
        while s.held.contains(point) {
            self.cond.wait(&mut s);
        }
    }
}
