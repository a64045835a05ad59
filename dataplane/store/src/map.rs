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

use std::collections::BTreeMap;
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
        self.lru.put((tree, lba), e);
    }

    pub fn invalidate(&mut self, tree: u64, lba: u64) {
        self.lru.pop(&(tree, lba));
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
    for l in layers {
        if lba >= l.limit_blocks {
            return Ok(None);
        }
        let head = cache.get(db, l.tree, lba)?;
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

/// Drops every entry of `tree` that no reader can see. `readers` are the
/// snapshot epochs still pinned; `live` whether the volume still writes here.
/// Returns the number of entries removed.
pub fn collect_garbage(
    db: &DB,
    cache: &mut HeadCache,
    batch: &mut WriteBatch,
    tree: u64,
    live: bool,
    readers: &BTreeMap<u64, u64>,
    freed: &mut Vec<u64>,
) -> Result<u64> {
    let sees = |from: u64, until: u64| readers.range(from..until).next().is_some();
    let mut removed = 0;
    let prefix = tree.to_be_bytes();
    let free = |e: &MapEntry, freed: &mut Vec<u64>| {
        if let BlockValue::Data { block, .. } = e.value {
            freed.push(block);
        }
    };
    let mut it = db.raw_iterator_cf(cf(db, CF_HEAD));
    it.seek(prefix);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if !k.starts_with(&prefix) {
            break;
        }
        let e = MapEntry::decode(v)?;
        if !live && !sees(e.epoch, u64::MAX) {
            if let Some((_, lba, None)) = meta::parse_key(k) {
                cache.invalidate(tree, lba);
            }
            batch.delete_cf(cf(db, CF_HEAD), k);
            free(&e, freed);
            removed += 1;
        }
        it.next();
    }
    it.status()?;

    // History entries of one LBA come newest first; each is valid until the one
    // before it (or the head entry).
    let mut it = db.raw_iterator_cf(cf(db, CF_HISTORY));
    it.seek(prefix);
    let mut cur: Option<(u64, u64)> = None; // (lba, validity end)
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let Some((t, lba, Some(epoch))) = meta::parse_key(k) else {
            break;
        };
        if t != tree {
            break;
        }
        let until = match cur {
            Some((l, until)) if l == lba => until,
            _ => get_head(db, tree, lba)?.map_or(u64::MAX, |h| h.epoch),
        };
        let e = MapEntry::decode(v)?;
        if !sees(epoch, until) {
            batch.delete_cf(cf(db, CF_HISTORY), k);
            free(&e, freed);
            removed += 1;
        }
        cur = Some((lba, epoch));
        it.next();
    }
    it.status()?;
    Ok(removed)
}
