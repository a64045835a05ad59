//! Node-local metadata in RocksDB: one column family per record type, versioned
//! little-endian value encodings, big-endian keys so iteration follows LBA order.
//!
//! | column family | key                         | value                              |
//! |---------------|-----------------------------|------------------------------------|
//! | `meta`        | `pool`, `next_id`           | pool UUID and block count; id counter |
//! | `trees`       | tree id                     | parent (tree, epoch, blocks), head epoch, live |
//! | `volumes`     | volume id (= its tree id)   | size, creation time, name          |
//! | `snapshots`   | snapshot id                 | tree, epoch, size, time, hidden, name |
//! | `head`        | tree, lba                   | the block's newest mapping         |
//! | `history`     | tree, lba, !epoch           | older mappings snapshots still see |
//! | `deferred`    | sequence number             | a deferred write's pool block, checksum and data, until they are in the pool |
//!
//! Every change is one `WriteBatch`. See `map` for what the two map families mean.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::error::{Result, StoreError};

pub const CF_META: &str = "meta";
pub const CF_TREES: &str = "trees";
pub const CF_VOLUMES: &str = "volumes";
pub const CF_SNAPSHOTS: &str = "snapshots";
pub const CF_HEAD: &str = "head";
pub const CF_HISTORY: &str = "history";
pub const CF_DEFERRED: &str = "deferred";
const ALL_CFS: [&str; 7] = [
    CF_META,
    CF_TREES,
    CF_VOLUMES,
    CF_SNAPSHOTS,
    CF_HEAD,
    CF_HISTORY,
    CF_DEFERRED,
];

const VERSION: u8 = 1;

pub fn open_db(dir: &Path, create: bool) -> Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    // A store made before a family existed (`deferred`) gains it at open.
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    let mut block = rocksdb::BlockBasedOptions::default();
    block.set_bloom_filter(10.0, false);
    block.set_block_cache(&rocksdb::Cache::new_lru_cache(64 << 20));
    let mut map_opts = opts.clone();
    map_opts.set_block_based_table_factory(&block);
    map_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Small memtables: an insert into a big skiplist of random LBAs is a chain of
    // cache misses on the write path; flushing more often costs a background core.
    map_opts.set_write_buffer_size(8 << 20);
    map_opts.set_max_write_buffer_number(4);
    let cfs = ALL_CFS.iter().map(|name| {
        let o = if *name == CF_HEAD || *name == CF_HISTORY {
            map_opts.clone()
        } else {
            opts.clone()
        };
        ColumnFamilyDescriptor::new(*name, o)
    });
    Ok(DB::open_cf_descriptors(&opts, dir, cfs)?)
}

/// A deferred write's record (keyed by a sequence number, so records go in
/// at the end of the memtable): its pool block, checksum and data.
pub fn deferred_encode(block: u64, crc: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(13 + data.len());
    v.push(VERSION);
    v.extend_from_slice(&block.to_le_bytes());
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// The pool block, checksum and data of a deferred write's record of
/// `block_bytes`.
pub fn deferred_decode(v: &[u8], block_bytes: usize) -> Result<(u64, u32, &[u8])> {
    if v.len() != 13 + block_bytes || v[0] != VERSION {
        return Err(StoreError::Corrupt {
            what: "deferred write record".into(),
            detail: format!("{} bytes, version {}", v.len(), v.first().unwrap_or(&0)),
        });
    }
    let mut d = Dec(&v[1..13]);
    let block = d.u64();
    let crc = d.u32();
    Ok((block, crc, &v[13..]))
}

pub fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    match db.cf_handle(name) {
        Some(cf) => cf,
        // Every family is created at open; a missing one is a programming error.
        None => panic!("column family {name} missing"),
    }
}

/// A block's mapping at some epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Epoch of the tree at which this value was written.
    pub epoch: u64,
    pub value: BlockValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockValue {
    /// The block's data is in pool block `block` with this checksum.
    Data { block: u64, crc: u32 },
    /// The block reads as zeros (written zeros or trimmed) and hides any parent.
    Zero,
}

impl BlockValue {
    pub fn is_data(&self) -> bool {
        matches!(self, BlockValue::Data { .. })
    }
}

impl MapEntry {
    pub fn encode(&self) -> [u8; 22] {
        let mut v = [0u8; 22];
        v[0] = VERSION;
        v[2..10].copy_from_slice(&self.epoch.to_le_bytes());
        if let BlockValue::Data { block, crc } = self.value {
            v[1] = 1;
            v[10..18].copy_from_slice(&block.to_le_bytes());
            v[18..22].copy_from_slice(&crc.to_le_bytes());
        }
        v
    }

    pub fn decode(v: &[u8]) -> Result<Self> {
        let bad = |detail: &str| StoreError::Corrupt {
            what: "block map entry".into(),
            detail: detail.into(),
        };
        if v.len() != 22 || v[0] != VERSION {
            return Err(bad("wrong length or version"));
        }
        let mut d = Dec(&v[2..]);
        let epoch = d.u64();
        let value = match v[1] {
            0 => BlockValue::Zero,
            1 => BlockValue::Data {
                block: d.u64(),
                crc: d.u32(),
            },
            _ => return Err(bad("unknown kind")),
        };
        Ok(MapEntry { epoch, value })
    }
}

pub fn head_key(tree: u64, lba: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&tree.to_be_bytes());
    k[8..].copy_from_slice(&lba.to_be_bytes());
    k
}

pub fn history_key(tree: u64, lba: u64, epoch: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&head_key(tree, lba));
    k[16..].copy_from_slice(&(!epoch).to_be_bytes());
    k
}

/// Splits a head or history key into (tree, lba, epoch); epoch is None for head.
pub fn parse_key(k: &[u8]) -> Option<(u64, u64, Option<u64>)> {
    let be = |s: &[u8]| {
        let mut x = [0u8; 8];
        x.copy_from_slice(s);
        u64::from_be_bytes(x)
    };
    match k.len() {
        16 => Some((be(&k[..8]), be(&k[8..16]), None)),
        24 => Some((be(&k[..8]), be(&k[8..16]), Some(!be(&k[16..24])))),
        _ => None,
    }
}

pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Little-endian field reader over a checked-length record.
pub(crate) struct Dec<'a>(pub(crate) &'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    pub(crate) fn u64(&mut self) -> u64 {
        let mut x = [0u8; 8];
        let s = self.take(8);
        x[..s.len()].copy_from_slice(s);
        u64::from_le_bytes(x)
    }
    fn u32(&mut self) -> u32 {
        let mut x = [0u8; 4];
        let s = self.take(4);
        x[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(x)
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
}

fn check(v: &[u8], min: usize, what: &str) -> Result<()> {
    if v.len() < min || v[0] != VERSION {
        return Err(StoreError::Corrupt {
            what: what.into(),
            detail: format!("{} bytes, version {:?}", v.len(), v.first()),
        });
    }
    Ok(())
}

fn name_of(b: &[u8], what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| StoreError::Corrupt {
        what: what.into(),
        detail: "name is not UTF-8".into(),
    })
}

/// A block map: a volume's, and after the volume is deleted, whatever of it its
/// snapshots still need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeRec {
    /// For a clone: the source tree and the snapshot epoch it was cloned at, and
    /// how many blocks of the source it sees.
    pub parent: Option<(u64, u64, u64)>,
    pub head_epoch: u64,
    /// Whether a volume writes to this tree.
    pub live: bool,
}

impl TreeRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        let (flag, (t, e, b)) = match self.parent {
            Some(p) => (1u8, p),
            None => (0, (0, 0, 0)),
        };
        v.push(flag);
        for x in [t, e, b, self.head_epoch] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.push(u8::from(self.live));
        v
    }

    pub fn decode(v: &[u8]) -> Result<Self> {
        check(v, 35, "tree")?;
        let mut d = Dec(&v[1..]);
        let flag = d.u8();
        let (t, e, b) = (d.u64(), d.u64(), d.u64());
        Ok(TreeRec {
            parent: (flag == 1).then_some((t, e, b)),
            head_epoch: d.u64(),
            live: d.u8() == 1,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRec {
    pub name: String,
    pub size_bytes: u64,
    pub created_unix: u64,
}

impl VolumeRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        v.extend_from_slice(&self.size_bytes.to_le_bytes());
        v.extend_from_slice(&self.created_unix.to_le_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Result<Self> {
        check(v, 17, "volume")?;
        let mut d = Dec(&v[1..]);
        Ok(VolumeRec {
            size_bytes: d.u64(),
            created_unix: d.u64(),
            name: name_of(&v[17..], "volume")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRec {
    pub name: String,
    pub tree: u64,
    pub epoch: u64,
    pub size_bytes: u64,
    pub created_unix: u64,
    /// Deleted by its user but kept while clones read through it.
    pub hidden: bool,
}

impl SnapshotRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![VERSION];
        for x in [self.tree, self.epoch, self.size_bytes, self.created_unix] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.push(u8::from(self.hidden));
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Result<Self> {
        check(v, 34, "snapshot")?;
        let mut d = Dec(&v[1..]);
        Ok(SnapshotRec {
            tree: d.u64(),
            epoch: d.u64(),
            size_bytes: d.u64(),
            created_unix: d.u64(),
            hidden: d.u8() == 1,
            name: name_of(&v[34..], "snapshot")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for e in [
            MapEntry {
                epoch: 7,
                value: BlockValue::Zero,
            },
            MapEntry {
                epoch: u64::MAX,
                value: BlockValue::Data {
                    block: 1 << 40,
                    crc: 0xdead_beef,
                },
            },
        ] {
            assert_eq!(MapEntry::decode(&e.encode()).expect("decode"), e);
        }
        let t = TreeRec {
            parent: Some((3, 4, 5)),
            head_epoch: 9,
            live: true,
        };
        assert_eq!(TreeRec::decode(&t.encode()).expect("decode"), t);
        let t = TreeRec {
            parent: None,
            head_epoch: 1,
            live: false,
        };
        assert_eq!(TreeRec::decode(&t.encode()).expect("decode"), t);
        let v = VolumeRec {
            name: "pg-data".into(),
            size_bytes: 1 << 30,
            created_unix: 1,
        };
        assert_eq!(VolumeRec::decode(&v.encode()).expect("decode"), v);
        let s = SnapshotRec {
            name: "s1".into(),
            tree: 1,
            epoch: 2,
            size_bytes: 3,
            created_unix: 4,
            hidden: true,
        };
        assert_eq!(SnapshotRec::decode(&s.encode()).expect("decode"), s);
        assert!(MapEntry::decode(&[2; 22]).is_err());
        assert!(VolumeRec::decode(&[1, 2]).is_err());
    }

    #[test]
    fn history_keys_sort_newest_epoch_first() {
        let a = history_key(1, 5, 3);
        let b = history_key(1, 5, 9);
        assert!(b < a);
        assert!(head_key(1, 5).as_slice() < history_key(1, 6, u64::MAX).as_slice());
        assert_eq!(parse_key(&a), Some((1, 5, Some(3))));
        assert_eq!(parse_key(&head_key(2, 8)), Some((2, 8, None)));
    }
}
