//! The catalog in an embedded RocksDB: one column family per [`Table`], every
//! transaction one synced `WriteBatch`.
//!
//! Conditions are checked and the batch written under one lock, so a
//! compare-and-swap is linearizable within the process that owns the
//! database (RocksDB's own lock file keeps a second process out). Reads take
//! no lock.

use std::path::Path;

use berth_catalog::{check_conditions, CatalogError, CatalogStore, Entry, Op, Result, Table, Txn};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

#[derive(Debug)]
pub struct RocksCatalog {
    db: DB,
    commit_lock: parking_lot::Mutex<()>,
}

fn backend(e: rocksdb::Error) -> CatalogError {
    CatalogError::Backend(e.into_string())
}

impl RocksCatalog {
    /// Opens (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Catalog records are small and few; keep the footprint small too.
        opts.set_max_total_wal_size(64 << 20);
        opts.set_keep_log_file_num(4);
        let cfs = Table::ALL
            .iter()
            .map(|t| ColumnFamilyDescriptor::new(t.name(), Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            CatalogError::Backend(format!(
                "open catalog {}: {}",
                path.display(),
                e.into_string()
            ))
        })?;
        Ok(Self {
            db,
            commit_lock: parking_lot::Mutex::new(()),
        })
    }

    fn cf(&self, t: Table) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(t.name())
            .ok_or_else(|| CatalogError::Backend(format!("column family {} missing", t.name())))
    }
}

impl CatalogStore for RocksCatalog {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(table)?, key).map_err(backend)
    }

    fn scan(&self, table: Table, start_after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        let mode = match start_after {
            Some(k) => IteratorMode::From(k, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(table)?, mode) {
            let (k, v) = item.map_err(backend)?;
            if start_after == Some(&k[..]) {
                continue;
            }
            out.push((k.into_vec(), v.into_vec()));
            if limit != 0 && out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    fn commit(&self, txn: Txn) -> Result<()> {
        let _serial = self.commit_lock.lock();
        check_conditions(&txn, |t, k| self.get(t, k))?;
        let mut batch = WriteBatch::default();
        for op in &txn.ops {
            match op {
                Op::Put(t, k, v) => batch.put_cf(self.cf(*t)?, k, v),
                Op::Delete(t, k) => batch.delete_cf(self.cf(*t)?, k),
            }
        }
        let mut wo = WriteOptions::default();
        // Acknowledged catalog changes must survive power loss.
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meets_the_catalog_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RocksCatalog::open(dir.path()).expect("open");
        berth_catalog::conformance::run(&s);
    }

    #[test]
    fn survives_reopen_and_keeps_tables_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = RocksCatalog::open(dir.path()).expect("open");
            s.commit(Txn::new().put(Table::Volumes, "v", b"vol".to_vec()).put(
                Table::Snapshots,
                "v",
                b"snap".to_vec(),
            ))
            .expect("commit");
        }
        let s = RocksCatalog::open(dir.path()).expect("reopen");
        assert_eq!(
            s.get(Table::Volumes, b"v").expect("get").as_deref(),
            Some(&b"vol"[..])
        );
        assert_eq!(
            s.get(Table::Snapshots, b"v").expect("get").as_deref(),
            Some(&b"snap"[..])
        );
        assert_eq!(s.get(Table::Pools, b"v").expect("get"), None);
    }

    #[test]
    fn a_second_process_cannot_open_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _s = RocksCatalog::open(dir.path()).expect("open");
        let e = RocksCatalog::open(dir.path()).expect_err("second open");
        assert!(e.to_string().contains("lock"), "{e}");
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Random transactions with random conditions: RocksDB accepts and
            /// refuses exactly what the in-memory model does, ends in the same
            /// state, and keeps it across a reopen.
            #[test]
            fn rocksdb_matches_the_in_memory_model(txns in proptest::collection::vec(berth_catalog::model::txn(), 1..40)) {
                let dir = tempfile::tempdir().expect("tempdir");
                let model = {
                    let db = RocksCatalog::open(dir.path()).expect("open");
                    berth_catalog::model::check(&db, txns)?
                };
                let db = RocksCatalog::open(dir.path()).expect("reopen");
                prop_assert_eq!(berth_catalog::model::dump(&db), berth_catalog::model::dump(&model));
            }
        }
    }

    #[test]
    fn concurrent_creates_of_one_key_admit_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = std::sync::Arc::new(RocksCatalog::open(dir.path()).expect("open"));
        let winners: usize = (0..16)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    s.commit(Txn::new().require_absent(Table::Volumes, "one").put(
                        Table::Volumes,
                        "one",
                        vec![i],
                    ))
                    .is_ok() as usize
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("join"))
            .sum();
        assert_eq!(winners, 1);
    }
}
