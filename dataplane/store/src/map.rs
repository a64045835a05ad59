//! Block maps: how a volume, its snapshots and its clones share blocks.
//!
//! Each volume writes into a *tree*. A tree has a head epoch `E`; taking a
//! snapshot records `s = E` as a reader of the tree and bumps `E` (O(1): nothing
//! is copied). Every mapping carries the epoch it was written at:
//!
//! - `head[tree, lba]` holds the newest mapping, valid from its epoch onwards;
//! - `history[tree, lba, epoch]` holds older mappings some snapshot still reads,
//!   each valid until the next newer one.
//!
//! The live volume reads `head`. Snapshot `s` reads `head` when its epoch is
//! `<= s`, otherwise the newest `history` entry `<= s` (one seek). A clone is a
//! new tree whose parent is `(source tree, s)`: blocks it never wrote fall through
//! to the source as of `s`. Nothing is copied at snapshot or clone time, and a
//! write after a snapshot allocates only the 4 KiB blocks it writes (the old
//! mapping moves to `history`, the data stays where it is).
//!
//! Every pool block is referenced by exactly one map entry, so freeing is exact:
//! an entry is garbage when no reader's epoch falls in its validity range, and its
//! block goes back to the allocator.
//!
//! Invariant for a live tree: if `head` has no entry for an LBA, `history` has none
//! either (a trim over history leaves a `Zero` head entry instead of a hole).

use std::num::NonZeroUsize;

use rocksdb::{WriteBatch, DB};

use crate::error::Result;
use crate::meta::{self, cf, BlockValue, MapEntry, CF_HEAD, CF_HISTORY};

/// One level of a read: a tree seen at an epoch (`None` = its head), covering
/// LBAs below `limit_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    pub tree: u64,
    pub view: Option<u64>,
    pub limit_blocks: u64,
}

/// Recently used `head` entries (and known holes), in front of RocksDB: the read
/// path's lookups are then a hash probe instead of a memtable or SST search.
///
/// Write-through: every change to `head` is applied here after its batch is
/// written (the I/O thread's commits) or invalidated as it is staged (garbage
/// collection), always under the store's catalog lock.
pub struct HeadCache {
    lru: lru::LruCache<(u64, u64), Option<MapEntry>>,
    /// Bumped by every change ([`HeadCache::set`], [`HeadCache::invalidate`]):
    /// a value read from RocksDB off the lock is cached only if no change
    /// came in between (see [`HeadCache::fill`]).
    version: u64,
    pub hits: u64,
    pub misses: u64,
}

impl std::fmt::Debug for HeadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadCache")
            .field("len", &self.lru.len())
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish()
    }
}

impl HeadCache {
    pub fn new(entries: usize) -> Self {
        HeadCache {
            lru: lru::LruCache::new(NonZeroUsize::new(entries.max(1)).unwrap_or(NonZeroUsize::MIN)),
            version: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn get(&mut self, db: &DB, tree: u64, lba: u64) -> Result<Option<MapEntry>> {
        if let Some(e) = self.lru.get(&(tree, lba)) {
            self.hits += 1;
            return Ok(*e);
        }
        self.misses += 1;
        let e = get_head(db, tree, lba)?;
        self.lru.put((tree, lba), e);
        Ok(e)
    }

    /// Records the value a committed batch gave `head[tree, lba]`.
    pub fn set(&mut self, tree: u64, lba: u64, e: Option<MapEntry>) {
        self.version += 1;
        self.lru.put((tree, lba), e);
    }

    pub fn invalidate(&mut self, tree: u64, lba: u64) {
        self.version += 1;
        self.lru.pop(&(tree, lba));
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The cached head of (tree, lba), if the cache knows it.
    pub fn peek(&mut self, tree: u64, lba: u64) -> Option<Option<MapEntry>> {
        let e = self.lru.get(&(tree, lba)).copied();
        match e {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        e
    }

    /// Caches a head read from RocksDB while the cache was at `version`,
    /// unless a change came in since: that change may have been to this very
    /// entry, after the read.
    pub fn fill(&mut self, version: u64, tree: u64, lba: u64, e: Option<MapEntry>) {
        if self.version == version {
            self.lru.put((tree, lba), e);
        }
    }
}

pub fn get_head(db: &DB, tree: u64, lba: u64) -> Result<Option<MapEntry>> {
    match db.get_pinned_cf(cf(db, CF_HEAD), meta::head_key(tree, lba))? {
        Some(v) => Ok(Some(MapEntry::decode(&v)?)),
        None => Ok(None),
    }
}

/// Newest history entry of (tree, lba) with epoch <= `epoch`.
pub fn get_history(db: &DB, tree: u64, lba: u64, epoch: u64) -> Result<Option<MapEntry>> {
    let mut it = db.raw_iterator_cf(cf(db, CF_HISTORY));
    it.seek(meta::history_key(tree, lba, epoch));
    if let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k.len() == 24 && k[..16] == meta::head_key(tree, lba) {
            return Ok(Some(MapEntry::decode(v)?));
        }
    }
    it.status()?;
    Ok(None)
}

/// The epoch at which the history mapping of (tree, lba) written at `epoch`
/// was replaced: that of the next newer history entry, else of the head entry.
pub fn replaced_at(db: &DB, tree: u64, lba: u64, epoch: u64) -> Result<u64> {
    let mut it = db.raw_iterator_cf(cf(db, CF_HISTORY));
    // History keys of one block sort newest first: the newer entry is the previous key.
    it.seek(meta::history_key(tree, lba, epoch));
    it.prev();
    if let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k.len() == 24 && k[..16] == meta::head_key(tree, lba) {
            return Ok(MapEntry::decode(v)?.epoch);
        }
    }
    it.status()?;
    Ok(get_head(db, tree, lba)?.map_or(u64::MAX, |h| h.epoch))
}

pub fn has_history(db: &DB, tree: u64, lba: u64) -> Result<bool> {
    Ok(get_history(db, tree, lba, u64::MAX)?.is_some())
}

/// What a read of `lba` through `layers` returns: `None` means never written
/// (reads as zeros).
pub fn lookup(
    db: &DB,
    cache: &mut HeadCache,
    layers: &[Layer],
    lba: u64,
) -> Result<Option<BlockValue>> {
    lookup_with(db, layers, lba, |tree, lba| cache.get(db, tree, lba))
}

/// [`lookup`] from the cache alone: `None` when answering needs RocksDB (a
/// head the cache does not hold, or a snapshot's history).
pub fn lookup_cached(
    cache: &mut HeadCache,
    layers: &[Layer],
    lba: u64,
) -> Option<Option<BlockValue>> {
    for l in layers {
        if lba >= l.limit_blocks {
            return Some(None);
        }
        let head = cache.peek(l.tree, lba)?;
        match (l.view, head) {
            (None, Some(h)) => return Some(Some(h.value)),
            (None, None) => {}
            (Some(s), Some(h)) if h.epoch <= s => return Some(Some(h.value)),
            // A view needs the history (a dead tree may keep history
            // below a head that was collected).
            (Some(_), _) => return None,
        }
    }
    Some(None)
}

/// [`lookup`] straight from RocksDB, without the cache (and so without the
/// catalog lock that guards it); also returns the first layer's head as
/// read, for [`HeadCache::fill`].
pub fn lookup_uncached(
    db: &DB,
    layers: &[Layer],
    lba: u64,
) -> Result<(Option<BlockValue>, Option<MapEntry>)> {
    let mut first = None;
    let mut n = 0;
    let v = lookup_with(db, layers, lba, |tree, lba| {
        let h = get_head(db, tree, lba)?;
        if n == 0 {
            first = h;
        }
        n += 1;
        Ok(h)
    })?;
    Ok((v, first))
}

fn lookup_with(
    db: &DB,
    layers: &[Layer],
    lba: u64,
    mut head_of: impl FnMut(u64, u64) -> Result<Option<MapEntry>>,
) -> Result<Option<BlockValue>> {
    for l in layers {
        if lba >= l.limit_blocks {
            return Ok(None);
        }
        let head = head_of(l.tree, lba)?;
        match l.view {
            None => {
                if let Some(h) = head {
                    return Ok(Some(h.value));
                }
            }
            Some(s) => {
                if let Some(h) = head {
                    if h.epoch <= s {
                        return Ok(Some(h.value));
                    }
                }
                if let Some(e) = get_history(db, l.tree, lba, s)? {
                    return Ok(Some(e.value));
                }
            }
        }
    }
    Ok(None)
}

/// Head entries of `tree` in `[lba, lba + n)`, in LBA order.
pub fn heads_in(
    db: &DB,
    cache: &mut HeadCache,
    tree: u64,
    lba: u64,
    n: u64,
) -> Result<Vec<(u64, MapEntry)>> {
    let mut out = Vec::new();
    if n <= 16 {
        for x in lba..lba + n {
            if let Some(e) = cache.get(db, tree, x)? {
                out.push((x, e));
            }
        }
        return Ok(out);
    }
    let mut it = db.raw_iterator_cf(cf(db, CF_HEAD));
    it.seek(meta::head_key(tree, lba));
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        match meta::parse_key(k) {
            Some((t, x, None)) if t == tree && x < lba + n => out.push((x, MapEntry::decode(v)?)),
            _ => break,
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// LBAs in `[lba, lba + n)` for which any ancestor layer holds any entry: the only
/// places where a clone's hole could show its parent's data.
pub fn ancestor_lbas(db: &DB, layers: &[Layer], lba: u64, n: u64) -> Result<Vec<u64>> {
    Ok(ancestor_lbas_upto(db, layers, lba, n, usize::MAX)?.0)
}

/// Like [`ancestor_lbas`], looking at no more than `limit` entries per layer and
/// family: returns the LBAs found below the returned end, which is where the
/// answer is complete (`lba + n` unless a scan stopped early).
pub fn ancestor_lbas_upto(
    db: &DB,
    layers: &[Layer],
    lba: u64,
    n: u64,
    limit: usize,
) -> Result<(Vec<u64>, u64)> {
    let mut found = std::collections::BTreeSet::new();
    let mut complete_to = lba + n;
    for l in layers {
        let end = (lba + n).min(l.limit_blocks);
        if lba >= end {
            continue;
        }
        for family in [CF_HEAD, CF_HISTORY] {
            let mut it = db.raw_iterator_cf(cf(db, family));
            it.seek(meta::head_key(l.tree, lba));
            let mut seen = 0;
            while let Some(k) = it.key() {
                match meta::parse_key(k) {
                    Some((t, x, _)) if t == l.tree && x < end => {
                        if seen == limit && !found.contains(&x) {
                            // Entries of this layer past here were not looked at.
                            complete_to = complete_to.min(x);
                            break;
                        }
                        if found.insert(x) {
                            seen += 1;
                        }
                    }
                    _ => break,
                }
                it.next();
            }
            it.status()?;
        }
    }
    Ok((
        found.into_iter().filter(|&x| x < complete_to).collect(),
        complete_to,
    ))
}

/// The decision for one block written at the head of a live tree.
pub struct HeadUpdate<'a> {
    pub db: &'a DB,
    pub tree: u64,
    pub head_epoch: u64,
    /// Newest snapshot epoch of the tree, if any.
    pub newest_reader: Option<u64>,
    /// The tree's ancestors (empty for a tree that is not a clone).
    pub parents: &'a [Layer],
}

impl HeadUpdate<'_> {
    /// Stages `new` for `lba` whose current head entry is `old`; pool blocks that
    /// no one references any more are pushed to `freed`.
    /// The resulting head entry is pushed to `staged`, for the cache once the
    /// batch is written.
    #[allow(clippy::too_many_arguments)]
    pub fn stage(
        &self,
        cache: &mut HeadCache,
        batch: &mut WriteBatch,
        lba: u64,
        old: Option<MapEntry>,
        new: BlockValue,
        freed: &mut Vec<u64>,
        staged: &mut Vec<(u64, u64, Option<MapEntry>)>,
    ) -> Result<()> {
        let shared = match (old, self.newest_reader) {
            (Some(o), Some(r)) => r >= o.epoch,
            _ => false,
        };
        let head_cf = cf(self.db, CF_HEAD);
        if shared {
            if let Some(o) = old {
                batch.put_cf(
                    cf(self.db, CF_HISTORY),
                    meta::history_key(self.tree, lba, o.epoch),
                    o.encode(),
                );
            }
        } else if let Some(MapEntry {
            value: BlockValue::Data { block, .. },
            ..
        }) = old
        {
            freed.push(block);
        }
        if new == BlockValue::Zero && !shared && !self.zero_needs_entry(cache, lba)? {
            if old.is_some() {
                batch.delete_cf(head_cf, meta::head_key(self.tree, lba));
                staged.push((self.tree, lba, None));
            }
            return Ok(());
        }
        let entry = MapEntry {
            epoch: self.head_epoch,
            value: new,
        };
        batch.put_cf(head_cf, meta::head_key(self.tree, lba), entry.encode());
        staged.push((self.tree, lba, Some(entry)));
        Ok(())
    }

    /// Whether zeroing `lba` must leave an explicit entry: older history exists,
    /// or a parent would otherwise show through with data.
    fn zero_needs_entry(&self, cache: &mut HeadCache, lba: u64) -> Result<bool> {
        if has_history(self.db, self.tree, lba)? {
            return Ok(true);
        }
        Ok(matches!(
            lookup(self.db, cache, self.parents, lba)?,
            Some(BlockValue::Data { .. })
        ))
    }
}
