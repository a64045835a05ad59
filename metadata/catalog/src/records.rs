//! What the catalog stores. Each record is one versioned value: a format byte
//! (1) followed by JSON, so records stay readable with `ldb` and an old binary
//! refuses a format it does not know instead of misreading it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{CatalogError, CatalogStore, Result, Table, Txn};

const FORMAT_V1: u8 = 1;

/// A stored record type: its table and its key.
pub trait Record: Serialize + DeserializeOwned {
    const TABLE: Table;
    fn key(&self) -> String;

    fn encode(&self) -> Vec<u8> {
        let mut v = vec![FORMAT_V1];
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_writer(&mut v, self).unwrap_or_default();
        v
    }

    fn decode(key: &[u8], bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| CatalogError::Corrupt {
            table: Self::TABLE.name(),
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        };
        match bytes.split_first() {
            Some((&FORMAT_V1, json)) => {
                serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))
            }
            Some((v, _)) => Err(corrupt(format!("unknown record format {v}"))),
            None => Err(corrupt("empty value".into())),
        }
    }

    /// This record written unconditionally.
    fn put(&self) -> Txn {
        Txn::new().put(Self::TABLE, self.key(), self.encode())
    }
    /// This record written only if its key is new.
    fn create(&self) -> Txn {
        Txn::new().require_absent(Self::TABLE, self.key()).put(
            Self::TABLE,
            self.key(),
            self.encode(),
        )
    }
    /// This record replacing exactly `old` (compare-and-swap).
    fn replace(&self, old: &Self) -> Txn {
        Txn::new()
            .require_equals(Self::TABLE, old.key(), old.encode())
            .put(Self::TABLE, self.key(), self.encode())
    }
    /// Removes exactly this record (fails if it changed).
    fn remove(&self) -> Txn {
        Txn::new()
            .require_equals(Self::TABLE, self.key(), self.encode())
            .delete(Self::TABLE, self.key())
    }
}

/// Typed reads over any store.
pub fn get<R: Record>(s: &dyn CatalogStore, key: &str) -> Result<Option<R>> {
    s.get(R::TABLE, key.as_bytes())?
        .map(|v| R::decode(key.as_bytes(), &v))
        .transpose()
}

/// A page of records in key order after `start_after`; `limit` 0 is all.
pub fn list<R: Record>(
    s: &dyn CatalogStore,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Vec<R>> {
    s.scan(R::TABLE, start_after.map(str::as_bytes), limit)?
        .into_iter()
        .map(|(k, v)| R::decode(&k, &v))
        .collect()
}

/// A catalog object's life: written as `Creating` before its volume server is
/// asked, `Ready` once it confirmed, `Deleting` before the server is asked to
/// delete. Reconcile finishes or undoes anything left `Creating`/`Deleting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Creating,
    Ready,
    Deleting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub control_endpoint: String,
    pub nbd_address: String,
    pub nbd_socket: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub pool_id: String,
    pub state: NodeState,
    pub registered_ms: u64,
    /// When the catalog last recorded a heartbeat (the live value is in memory).
    pub last_heartbeat_ms: u64,
    /// The node's audit events already chained (its sequence numbers), and the
    /// pool they belong to (a new pool starts numbering again).
    pub audit_cursor: u64,
    pub audit_pool_id: String,
    /// Drained: nothing new is placed on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cordoned: bool,
}

impl Record for NodeRecord {
    const TABLE: Table = Table::Nodes;
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub id: String,
    pub node: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub media: String,
    pub volumes: u64,
    pub snapshots: u64,
    pub updated_ms: u64,
}

impl Record for PoolRecord {
    const TABLE: Table = Table::Pools;
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// What a volume runs under (computed from its tier, size and parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct QosRecord {
    pub tier: String,
    pub iops_limit: u64,
    pub bytes_per_second_limit: u64,
    pub burst_seconds: f64,
    pub priority: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub size_bytes: u64,
    pub tier: String,
    pub parameters: BTreeMap<String, String>,
    pub qos: QosRecord,
    pub fs_type: String,
    pub node: String,
    pub pool_id: String,
    pub source: Option<Source>,
    pub state: State,
    /// The node's labels when it was placed: where the volume is reachable.
    pub topology: BTreeMap<String, String>,
    /// A replicated volume: each copy's node's labels, in the order of its
    /// replicas (a pod may run near any of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_topology: Vec<BTreeMap<String, String>>,
    pub created_ms: u64,
    /// Empty when healthy; what is wrong otherwise (reconcile sets it).
    pub condition: String,
    /// `replicas` > 1: the copies and their generation. `node`/`pool_id`
    /// are then the first copy's (where snapshots and clones are anchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<crate::replication::ReplicaSet>,
}

impl VolumeRecord {
    /// Every node holding a copy (the one node of an unreplicated volume).
    pub fn nodes(&self) -> Vec<(String, String)> {
        match &self.replicas {
            Some(set) => set
                .replicas()
                .iter()
                .map(|r| (r.node.clone(), r.pool_id.clone()))
                .collect(),
            None => vec![(self.node.clone(), self.pool_id.clone())],
        }
    }
}

impl Record for VolumeRecord {
    const TABLE: Table = Table::Volumes;
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub source_volume: String,
    pub size_bytes: u64,
    pub node: String,
    pub pool_id: String,
    pub state: State,
    pub created_ms: u64,
    /// A replicated volume's snapshot: every copy that takes it (node,
    /// pool), `node`/`pool_id` first. Empty for a single copy's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<(String, String)>,
}

impl SnapshotRecord {
    /// Every node holding a copy of it.
    pub fn nodes(&self) -> Vec<(String, String)> {
        if self.copies.is_empty() {
            vec![(self.node.clone(), self.pool_id.clone())]
        } else {
            self.copies.clone()
        }
    }
}

impl Record for SnapshotRecord {
    const TABLE: Table = Table::Snapshots;
    fn key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub volume: String,
    /// The node that connects.
    pub node: String,
    pub read_only: bool,
    /// The node serving the volume.
    pub server_node: String,
    pub export_name: String,
    pub tcp_uri: String,
    pub unix_uri: String,
    pub state: State,
    pub created_ms: u64,
    /// A replicated volume: one export per replica written at publish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legs: Vec<LegRecord>,
    /// The generation the nexus's grants were made at (0: not replicated).
    #[serde(default)]
    pub generation: u64,
}

/// One replica's export in a replicated volume's attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegRecord {
    pub node: String,
    pub export_name: String,
}

impl AttachmentRecord {
    /// Attachments sort by volume, so one volume's are one key range.
    pub fn key_of(volume: &str, node: &str) -> String {
        // Names cannot contain '/', so the key is unambiguous.
        format!("{volume}/{node}")
    }
}

impl Record for AttachmentRecord {
    const TABLE: Table = Table::Attachments;
    fn key(&self) -> String {
        Self::key_of(&self.volume, &self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn vol(id: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            size_bytes: 1 << 30,
            tier: "standard".into(),
            parameters: BTreeMap::from([("tier".into(), "standard".into())]),
            qos: QosRecord::default(),
            fs_type: "ext4".into(),
            node: "n1".into(),
            pool_id: "p1".into(),
            source: Some(Source::Snapshot("s".into())),
            state: State::Creating,
            topology: BTreeMap::new(),
            copy_topology: Vec::new(),
            created_ms: 1,
            condition: String::new(),
            replicas: None,
        }
    }

    #[test]
    fn records_round_trip_and_refuse_unknown_formats() {
        let v = vol("a");
        let bytes = v.encode();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(VolumeRecord::decode(b"a", &bytes).expect("decode"), v);
        // A replicated volume's set round-trips; an unreplicated record
        // stays as it was written before replication existed.
        assert!(!String::from_utf8_lossy(&bytes).contains("replicas"));
        let placements = [
            ("n1".to_string(), "p1".to_string()),
            ("n2".to_string(), "p2".to_string()),
        ];
        let mut set = crate::replication::ReplicaSet::new(&placements).expect("set");
        set.new_nexus(1).expect("nexus");
        let r = VolumeRecord {
            replicas: Some(set),
            ..vol("r")
        };
        let back = VolumeRecord::decode(b"r", &r.encode()).expect("decode");
        assert_eq!(back, r);
        assert_eq!(
            back.replicas.as_ref().map(|s| (s.generation(), s.fence())),
            Some((2, 2))
        );
        assert_eq!(back.nodes(), placements);
        let mut future = bytes.clone();
        future[0] = 2;
        let e = VolumeRecord::decode(b"a", &future).expect_err("format 2");
        assert!(e.to_string().contains("unknown record format 2"), "{e}");
        assert!(VolumeRecord::decode(b"a", b"").is_err());
        assert!(VolumeRecord::decode(b"a", b"\x01{").is_err());
    }

    #[test]
    fn create_replace_remove_are_guarded() {
        let s = MemStore::new();
        let v = vol("a");
        s.commit(v.create()).expect("create");
        assert!(s.commit(v.create()).is_err(), "created twice");
        let mut ready = v.clone();
        ready.state = State::Ready;
        s.commit(ready.replace(&v)).expect("replace");
        // Replacing from a stale copy fails: someone else changed it.
        assert!(s.commit(ready.replace(&v)).is_err());
        assert!(s.commit(v.remove()).is_err(), "removed a stale copy");
        s.commit(ready.remove()).expect("remove");
        assert_eq!(get::<VolumeRecord>(&s, "a").expect("get"), None);
    }
}
