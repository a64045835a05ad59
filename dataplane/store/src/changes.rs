//! Change tracking: the blocks of a volume written since a point, for the
//! delta rebuild of a replica that was away (`docs/replication.md`).
//!
//! While a volume is *tracking* (from [`crate::Store::track_changes`] until
//! [`crate::Store::stop_tracking`]), every block a write, write-zeroes or trim
//! changes also gets a key in the `meta` family, in the same batch as its map
//! update: so the set is exactly as durable as the writes it lists, and
//! listing it costs O(changed), not O(volume). Nothing is recorded while a
//! volume is not tracking.
//!
//! Tracking goes in *rounds*: each [`crate::Store::track_changes`] call
//! starts a new one, and a block records the round it last changed in. So
//! "changed since tracking started" and "changed since round r" (what a
//! rebuild that was interrupted missed since) are both one scan of the
//! recorded blocks.
//!
//! | key                 | value                          |
//! |---------------------|--------------------------------|
//! | `ct` tree           | the point (a replica-set generation) tracking started at, the current round |
//! | `cd` tree lba       | the round the block last changed in |

use rocksdb::{WriteBatch, DB};

use crate::error::{Result, StoreError};
use crate::meta::{cf, Dec, CF_META};

const TRACK: &[u8; 2] = b"ct";
const DIRTY: &[u8; 2] = b"cd";

pub(crate) fn track_key(tree: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(TRACK);
    k[2..].copy_from_slice(&tree.to_be_bytes());
    k
}

pub(crate) fn dirty_key(tree: u64, lba: u64) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..2].copy_from_slice(DIRTY);
    k[2..10].copy_from_slice(&tree.to_be_bytes());
    k[10..].copy_from_slice(&lba.to_be_bytes());
    k
}

/// A volume's tracking: the point it started at and the current round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracking {
    pub point: u64,
    pub round: u64,
}

impl Tracking {
    pub(crate) fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.point.to_le_bytes());
        v[8..].copy_from_slice(&self.round.to_le_bytes());
        v
    }
}

/// Records that `lba` of `tree` changed in `round` (the caller stages it
/// with the map update).
pub(crate) fn mark(db: &DB, batch: &mut WriteBatch, tree: u64, lba: u64, round: u64) {
    batch.put_cf(cf(db, CF_META), dirty_key(tree, lba), round.to_le_bytes());
}

/// Stages the end of `tree`'s tracking: its point and every recorded block.
pub(crate) fn clear(db: &DB, batch: &mut WriteBatch, tree: u64) {
    batch.delete_cf(cf(db, CF_META), track_key(tree));
    batch.delete_range_cf(
        cf(db, CF_META),
        dirty_key(tree, 0),
        dirty_key(tree.wrapping_add(1), 0),
    );
    if tree == u64::MAX {
        // The range above stops short of the last tree's last block.
        batch.delete_cf(cf(db, CF_META), dirty_key(tree, u64::MAX));
    }
}

/// Every tree's tracking, at open.
pub(crate) fn load(db: &DB) -> Result<Vec<(u64, Tracking)>> {
    let mut out = Vec::new();
    let mut it = db.raw_iterator_cf(cf(db, CF_META));
    it.seek(TRACK);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k.len() != 10 || &k[..2] != TRACK {
            break;
        }
        if v.len() != 16 {
            return Err(StoreError::Corrupt {
                what: "change tracking point".into(),
                detail: format!("{v:?}"),
            });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&k[2..]);
        let mut d = Dec(v);
        out.push((
            u64::from_be_bytes(id),
            Tracking {
                point: d.u64(),
                round: d.u64(),
            },
        ));
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// The blocks of `tree` recorded as changed in round `since` or later, as
/// sorted, merged block ranges `(first_lba, blocks)`; None when there are
/// more than `max_ranges`.
pub(crate) fn ranges(
    db: &DB,
    tree: u64,
    since: u64,
    max_ranges: usize,
) -> Result<Option<Vec<(u64, u64)>>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut it = db.raw_iterator_cf(cf(db, CF_META));
    it.seek(dirty_key(tree, 0));
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k.len() != 18 || &k[..2] != DIRTY || k[2..10] != tree.to_be_bytes() {
            break;
        }
        let round = <[u8; 8]>::try_from(v).map_or(0, u64::from_le_bytes);
        if round < since {
            it.next();
            continue;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&k[10..]);
        let lba = u64::from_be_bytes(b);
        match out.last_mut() {
            Some((first, n)) if *first + *n == lba => *n += 1,
            _ => {
                if out.len() == max_ranges {
                    return Ok(None);
                }
                out.push((lba, 1));
            }
        }
        it.next();
    }
    it.status()?;
    Ok(Some(out))
}
