//! The metadata service's catalog, independent of where it is kept.
//!
//! - [`CatalogStore`]: the storage trait. It is deliberately small so that an
//!   etcd backend can implement it for high availability: point reads, ordered
//!   scans of a table (a key prefix in etcd), and atomic transactions guarded by
//!   compare-and-swap conditions (an etcd `Txn` with `value`/`create_revision`
//!   compares). Change notification is by polling (the service rescans on a
//!   timer), so watches are an optimisation a backend may add, not a need.
//!   The embedded RocksDB backend lives in `berth-catalog-rocksdb`.
//! - [`records`]: what is stored, versioned JSON per record.
//! - [`audit`]: the hash-chained audit log kept in the same store.
//! - [`replication`]: the replica set of a replicated volume and the rules its
//!   membership changes follow (`docs/replication.md`).

pub mod audit;
pub mod records;
pub mod replication;

use std::collections::BTreeMap;

/// One table per record type: a column family in RocksDB, a key prefix in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Nodes,
    Pools,
    Volumes,
    Snapshots,
    Attachments,
    Audit,
    /// Singletons: the audit chain's head, per-node audit cursors.
    Meta,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::Nodes,
        Table::Pools,
        Table::Volumes,
        Table::Snapshots,
        Table::Attachments,
        Table::Audit,
        Table::Meta,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Nodes => "nodes",
            Table::Pools => "pools",
            Table::Volumes => "volumes",
            Table::Snapshots => "snapshots",
            Table::Attachments => "attachments",
            Table::Audit => "audit",
            Table::Meta => "meta",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A transaction's condition did not hold; nothing was written.
    #[error("conflict on {table}/{key}: it changed since it was read")]
    Conflict { table: &'static str, key: String },
    #[error("catalog backend: {0}")]
    Backend(String),
    /// The store cannot be reached or has no quorum now; nothing is known to
    /// have been written. Worth trying again later.
    #[error("catalog unavailable: {0}")]
    Unavailable(String),
    /// This process no longer leads: the store refused the write because
    /// another process holds the leadership (see [`Role`]). Nothing was written.
    #[error("catalog refused the write: {0}")]
    Fenced(String),
    #[error("corrupt record {table}/{key}: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, CatalogError>;

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// What must hold for a transaction to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist.
    Absent(Table, Vec<u8>),
    /// The key holds exactly this value (compare-and-swap).
    Equals(Table, Vec<u8>, Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Table, Vec<u8>, Vec<u8>),
    Delete(Table, Vec<u8>),
}

/// An atomic unit of change: every op applies, durably, or none does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(mut self, t: Table, key: impl Into<Vec<u8>>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put(t, key.into(), value));
        self
    }
    pub fn delete(mut self, t: Table, key: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Delete(t, key.into()));
        self
    }
    pub fn require_absent(mut self, t: Table, key: impl Into<Vec<u8>>) -> Self {
        self.conditions.push(Condition::Absent(t, key.into()));
        self
    }
    pub fn require_equals(mut self, t: Table, key: impl Into<Vec<u8>>, value: Vec<u8>) -> Self {
        self.conditions
            .push(Condition::Equals(t, key.into(), value));
        self
    }
    /// Appends another transaction's conditions and ops.
    pub fn merge(mut self, other: Txn) -> Self {
        self.conditions.extend(other.conditions);
        self.ops.extend(other.ops);
        self
    }
}

/// Where the catalog lives. Implementations must make `commit` atomic and
/// durable (synced) before returning, and linearizable with respect to the
/// conditions it checks.
pub trait CatalogStore: Send + Sync + 'static {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Entries in key order, strictly after `start_after` when given, at most
    /// `limit` (0: all).
    fn scan(&self, table: Table, start_after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>>;
    /// Applies `txn` if every condition holds, else `CatalogError::Conflict`.
    fn commit(&self, txn: Txn) -> Result<()>;
}

/// What one metadata service may do with a shared catalog now.
///
/// A backend shared by several processes (etcd) elects one of them; the
/// leader gets a store whose every transaction carries a compare on its own
/// leadership, so that a leader that lost its lease (paused, partitioned) has
/// every write refused with [`CatalogError::Fenced`] from that moment on.
/// An embedded backend has one process and so one permanent leader.
#[derive(Clone)]
pub enum Role {
    Leader {
        /// Increases with every new leadership (etcd: the revision at which
        /// the leadership key was created).
        term: u64,
        /// Writes through this store are refused once the term ends.
        store: std::sync::Arc<dyn CatalogStore>,
    },
    Follower {
        /// Where the leader says it can be reached, when one leads.
        leader: Option<String>,
    },
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Leader { term, .. } => f.debug_struct("Leader").field("term", term).finish(),
            Role::Follower { leader } => {
                f.debug_struct("Follower").field("leader", leader).finish()
            }
        }
    }
}

type Tables = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// A store in memory: for unit tests of code above the trait, and the model
/// the property tests compare real backends against.
#[derive(Debug, Default)]
pub struct MemStore {
    tables: parking_lot::Mutex<Tables>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Checks `txn`'s conditions against a reader; shared by backends that
/// serialize commits themselves.
pub fn check_conditions(
    txn: &Txn,
    mut get: impl FnMut(Table, &[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<()> {
    for c in &txn.conditions {
        let (t, k, ok) = match c {
            Condition::Absent(t, k) => (*t, k, get(*t, k)?.is_none()),
            Condition::Equals(t, k, v) => (*t, k, get(*t, k)?.as_deref() == Some(v.as_slice())),
        };
        if !ok {
            return Err(CatalogError::Conflict {
                table: t.name(),
                key: String::from_utf8_lossy(k).into_owned(),
            });
        }
    }
    Ok(())
}

impl CatalogStore for MemStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tables.lock().get(&(table, key.to_vec())).cloned())
    }

    fn scan(&self, table: Table, start_after: Option<&[u8]>, limit: usize) -> Result<Vec<Entry>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let m = self.tables.lock();
        let lo = match start_after {
            Some(k) => Excluded((table, k.to_vec())),
            None => Included((table, Vec::new())),
        };
        let it = m
            .range((lo, Unbounded))
            .take_while(|((t, _), _)| *t == table)
            .map(|((_, k), v)| (k.clone(), v.clone()));
        Ok(if limit == 0 {
            it.collect()
        } else {
            it.take(limit).collect()
        })
    }

    fn commit(&self, txn: Txn) -> Result<()> {
        let mut m = self.tables.lock();
        check_conditions(&txn, |t, k| Ok(m.get(&(t, k.to_vec())).cloned()))?;
        for op in txn.ops {
            match op {
                Op::Put(t, k, v) => {
                    m.insert((t, k), v);
                }
                Op::Delete(t, k) => {
                    m.remove(&(t, k));
                }
            }
        }
        Ok(())
    }
}

/// Behaviour every backend must show; backends run it in their tests.
pub mod conformance {
    use super::*;

    /// Panics (a test failure) at the first behaviour that differs from the contract.
    pub fn run(s: &dyn CatalogStore) {
        let t = Table::Volumes;
        assert_eq!(s.get(t, b"a").expect("get"), None);
        s.commit(Txn::new().require_absent(t, "a").put(t, "a", b"1".to_vec()))
            .expect("create a");
        // The same key must not be created twice.
        let e = s
            .commit(Txn::new().require_absent(t, "a").put(t, "a", b"2".to_vec()))
            .expect_err("second create of a");
        assert!(matches!(e, CatalogError::Conflict { .. }), "{e}");
        assert_eq!(s.get(t, b"a").expect("get").as_deref(), Some(&b"1"[..]));
        // Compare-and-swap: a stale expected value changes nothing, atomically
        // across the whole transaction.
        let e = s
            .commit(
                Txn::new()
                    .require_equals(t, "a", b"0".to_vec())
                    .put(t, "a", b"3".to_vec())
                    .put(t, "b", b"3".to_vec()),
            )
            .expect_err("stale CAS");
        assert!(matches!(e, CatalogError::Conflict { .. }), "{e}");
        assert_eq!(s.get(t, b"b").expect("get"), None);
        s.commit(
            Txn::new()
                .require_equals(t, "a", b"1".to_vec())
                .put(t, "a", b"4".to_vec())
                .put(t, "b", b"4".to_vec())
                .put(Table::Snapshots, "z", b"s".to_vec()),
        )
        .expect("CAS");
        assert_eq!(s.get(t, b"a").expect("get").as_deref(), Some(&b"4"[..]));
        for k in ["c", "e", "d"] {
            s.commit(Txn::new().put(t, k, k.as_bytes().to_vec()))
                .expect("put");
        }
        let keys = |v: Vec<Entry>| -> Vec<String> {
            v.into_iter()
                .map(|(k, _)| String::from_utf8(k).expect("utf8"))
                .collect()
        };
        // Scans stay in their table, in key order, after the cursor, limited.
        assert_eq!(
            keys(s.scan(t, None, 0).expect("scan")),
            ["a", "b", "c", "d", "e"]
        );
        assert_eq!(keys(s.scan(t, Some(b"b"), 2).expect("scan")), ["c", "d"]);
        assert_eq!(
            keys(s.scan(t, Some(b"e"), 0).expect("scan")),
            Vec::<String>::new()
        );
        s.commit(Txn::new().delete(t, "c")).expect("delete");
        assert_eq!(
            keys(s.scan(t, None, 0).expect("scan")),
            ["a", "b", "d", "e"]
        );
        assert_eq!(
            keys(s.scan(Table::Snapshots, None, 0).expect("scan")),
            ["z"]
        );
    }
}

/// The model test every backend runs: random transactions with random
/// conditions, compared with [`MemStore`] (feature `model`, for backends'
/// tests).
#[cfg(feature = "model")]
pub mod model {
    use super::*;
    use proptest::prelude::*;

    pub const TABLES: [Table; 2] = [Table::Volumes, Table::Audit];

    fn key() -> impl Strategy<Value = (usize, Vec<u8>)> {
        (0..2usize, 0..4u8).prop_map(|(t, k)| (t, vec![b'k', b'0' + k]))
    }

    /// Up to three conditions and one to three ops on four keys of two
    /// tables, so that conflicts, repeated keys and put-then-delete happen.
    pub fn txn() -> impl Strategy<Value = Txn> {
        let cond = prop_oneof![
            key().prop_map(|(t, k)| Condition::Absent(TABLES[t], k)),
            (key(), 0..3u8).prop_map(|((t, k), v)| Condition::Equals(TABLES[t], k, vec![v])),
        ];
        let op = prop_oneof![
            (key(), 0..3u8).prop_map(|((t, k), v)| Op::Put(TABLES[t], k, vec![v])),
            key().prop_map(|(t, k)| Op::Delete(TABLES[t], k)),
        ];
        (
            proptest::collection::vec(cond, 0..3),
            proptest::collection::vec(op, 1..4),
        )
            .prop_map(|(conditions, ops)| Txn { conditions, ops })
    }

    /// Every table the model touches, scanned whole.
    pub fn dump(s: &dyn CatalogStore) -> Vec<(Table, Vec<Entry>)> {
        TABLES
            .iter()
            .map(|t| (*t, s.scan(*t, None, 0).expect("scan")))
            .collect()
    }

    /// Applies `txns` to `store` (empty at the start) and to a fresh model:
    /// the store must accept and refuse exactly what the model does and end
    /// in the same state.
    pub fn check(
        store: &dyn CatalogStore,
        txns: Vec<Txn>,
    ) -> std::result::Result<MemStore, TestCaseError> {
        let model = MemStore::new();
        for t in txns {
            let want = model.commit(t.clone()).is_ok();
            let got = store.commit(t.clone());
            prop_assert_eq!(got.is_ok(), want, "{:?}: {:?}", t, got);
        }
        prop_assert_eq!(dump(store), dump(&model));
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mem_store_meets_the_contract() {
        super::conformance::run(&super::MemStore::new());
    }
}
