//! The audit log: who did what to which volume, when, with how many bytes.
//!
//! Entries are numbered from 1 and hash-chained: each carries the SHA-256 of
//! the previous entry and its own hash over its content and that link. The
//! chain's head (last number and hash) is kept beside it and moved by
//! compare-and-swap in the same transaction as the entries, so an entry is
//! never half-appended and two writers can never fork the chain. [`verify`]
//! walks it and names the first entry altered or removed.
//!
//! What the chain proves: no entry was edited, removed or reordered without
//! also rewriting every later hash and the head. It does not stop someone who
//! can write the store from cutting the tail and pointing the head at an
//! earlier entry, or rewriting the chain from some entry on; the head hash
//! copied somewhere else (the service logs it at start and at every reconcile
//! pass) is what pins history against that.
//!
//! The hash covers a canonical encoding of the entry that is fixed per
//! entry format (`v`), not the stored JSON, so new fields in later formats
//! never invalidate old entries.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::collections::HashMap;
use std::sync::Arc;

use crate::{check_conditions, CatalogError, CatalogStore, Op, Result, Table, Txn};

const HEAD_KEY: &str = "audit-head";
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry. The fields mirror `berth.meta.v1.AuditEntry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Entry format: which canonical encoding the hash covers.
    #[serde(default = "format_v1")]
    pub v: u32,
    pub seq: u64,
    pub time_ms: u64,
    pub actor: String,
    pub action: String,
    pub volume: String,
    pub target: String,
    pub node: String,
    pub result: String,
    pub peer: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

fn format_v1() -> u32 {
    1
}

impl Default for AuditEntry {
    fn default() -> Self {
        AuditEntry {
            v: 1,
            seq: 0,
            time_ms: 0,
            actor: String::new(),
            action: String::new(),
            volume: String::new(),
            target: String::new(),
            node: String::new(),
            result: String::new(),
            peer: String::new(),
            read_bytes: 0,
            write_bytes: 0,
            detail: String::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

impl AuditEntry {
    /// The hash this entry must carry: SHA-256 over its canonical encoding,
    /// which includes `seq` and `prev_hash` (hence the chain). None for a
    /// format this build does not know.
    pub fn compute_hash(&self) -> Option<String> {
        if self.v != 1 {
            return None;
        }
        // Format 1: every field in this order, numbers as 8 bytes big-endian,
        // strings length-prefixed, so no two entries encode alike.
        let mut h = Sha256::new();
        let num = |h: &mut Sha256, n: u64| h.update(n.to_be_bytes());
        let text = |h: &mut Sha256, s: &str| {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        };
        num(&mut h, u64::from(self.v));
        num(&mut h, self.seq);
        num(&mut h, self.time_ms);
        for s in [
            &self.actor,
            &self.action,
            &self.volume,
            &self.target,
            &self.node,
            &self.result,
            &self.peer,
        ] {
            text(&mut h, s);
        }
        num(&mut h, self.read_bytes);
        num(&mut h, self.write_bytes);
        text(&mut h, &self.detail);
        text(&mut h, &self.prev_hash);
        Some(hex::encode(h.finalize()))
    }
}

pub fn key_of(seq: u64) -> String {
    // Fixed width, so key order is number order.
    format!("{seq:020}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    fn genesis() -> Self {
        Head {
            seq: 0,
            hash: ZERO_HASH.into(),
        }
    }
}

fn read_head(s: &dyn CatalogStore) -> Result<Option<(Head, Vec<u8>)>> {
    match s.get(Table::Meta, HEAD_KEY.as_bytes())? {
        None => Ok(None),
        Some(raw) => {
            let h = serde_json::from_slice(&raw).map_err(|e| CatalogError::Corrupt {
                table: "meta",
                key: HEAD_KEY.into(),
                reason: e.to_string(),
            })?;
            Ok(Some((h, raw)))
        }
    }
}

/// The chain's head now (entry 0 and zeros when empty).
pub fn head(s: &dyn CatalogStore) -> Result<Head> {
    Ok(read_head(s)?.map_or_else(Head::genesis, |(h, _)| h))
}

/// Appends to the chain, with group commit: callers that arrive while a
/// commit is being synced queue up, and the next leader writes all of them
/// in one synced transaction. Each caller's change is still all-or-nothing
/// and checked on its own: one whose conditions fail gets its conflict, the
/// others go through, in arrival order, with consecutive numbers.
///
/// One per process, and every catalog write of the process goes through it
/// (that exclusivity is what lets a group check its members' conditions
/// against the store plus the group's own earlier writes). The head's
/// compare-and-swap still guards against any other writer.
#[derive(Debug, Default)]
pub struct AuditLog {
    queue: parking_lot::Mutex<Vec<Arc<Pending>>>,
    leader: parking_lot::Mutex<()>,
}

#[derive(Debug)]
struct Pending {
    request: parking_lot::Mutex<Option<(Vec<AuditEntry>, Txn)>>,
    result: parking_lot::Mutex<Option<Result<Vec<AuditEntry>>>>,
}

/// The store as a group sees it: its own earlier writes over the store.
struct Overlay<'a> {
    store: &'a dyn CatalogStore,
    writes: HashMap<(Table, Vec<u8>), Option<Vec<u8>>>,
}

impl Overlay<'_> {
    fn get(&self, t: Table, k: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes.get(&(t, k.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(t, k),
        }
    }
    fn apply(&mut self, txn: &Txn) {
        for op in &txn.ops {
            match op {
                Op::Put(t, k, v) => self.writes.insert((*t, k.clone()), Some(v.clone())),
                Op::Delete(t, k) => self.writes.insert((*t, k.clone()), None),
            };
        }
    }
}

/// The head now, and the condition that it is still the head at commit.
fn head_guard(s: &dyn CatalogStore) -> Result<(Head, Txn)> {
    Ok(match read_head(s)? {
        Some((h, raw)) => (h, Txn::new().require_equals(Table::Meta, HEAD_KEY, raw)),
        None => (
            Head::genesis(),
            Txn::new().require_absent(Table::Meta, HEAD_KEY),
        ),
    })
}

/// Numbers `drafts` after `prev` and chains them; returns the ops that store
/// them (entries and the new head), the entries, and the new head.
fn chain(prev: &Head, drafts: Vec<AuditEntry>) -> (Txn, Vec<AuditEntry>, Head) {
    let mut txn = Txn::new();
    let mut head = prev.clone();
    let mut stored = Vec::with_capacity(drafts.len());
    for mut e in drafts {
        e.v = 1;
        e.seq = head.seq + 1;
        e.prev_hash = head.hash.clone();
        e.hash = e.compute_hash().unwrap_or_default();
        txn = txn.put(
            Table::Audit,
            key_of(e.seq),
            serde_json::to_vec(&e).unwrap_or_default(),
        );
        head = Head {
            seq: e.seq,
            hash: e.hash.clone(),
        };
        stored.push(e);
    }
    if !stored.is_empty() {
        txn = txn.put(
            Table::Meta,
            HEAD_KEY,
            serde_json::to_vec(&head).unwrap_or_default(),
        );
    }
    (txn, stored, head)
}

impl AuditLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `drafts` (their seq/hash fields are filled in) together with
    /// `with`, atomically: either the catalog change and its audit entries are
    /// both stored, or neither is. Returns the entries as stored.
    pub fn append(
        &self,
        s: &dyn CatalogStore,
        drafts: Vec<AuditEntry>,
        with: Txn,
    ) -> Result<Vec<AuditEntry>> {
        let me = Arc::new(Pending {
            request: parking_lot::Mutex::new(Some((drafts, with))),
            result: parking_lot::Mutex::new(None),
        });
        self.queue.lock().push(me.clone());
        let _leader = self.leader.lock();
        // A previous leader may have committed this request already.
        if let Some(r) = me.result.lock().take() {
            return r;
        }
        let group = std::mem::take(&mut *self.queue.lock());
        Self::commit_group(s, &group);
        let r = me.result.lock().take();
        r.unwrap_or_else(|| {
            Err(CatalogError::Backend(
                "audit group left a request unanswered".into(),
            ))
        })
    }

    /// Commits a group in one synced transaction; if that fails, each member
    /// alone, so every member gets its own answer.
    fn commit_group(s: &dyn CatalogStore, group: &[Arc<Pending>]) {
        let requests: Vec<(Arc<Pending>, Vec<AuditEntry>, Txn)> = group
            .iter()
            .filter_map(|p| p.request.lock().take().map(|(d, w)| (p.clone(), d, w)))
            .collect();
        let answer = |p: &Pending, r: Result<Vec<AuditEntry>>| *p.result.lock() = Some(r);
        let grouped = (|| -> Result<Vec<(usize, Result<Vec<AuditEntry>>)>> {
            let (mut head, mut all) = head_guard(s)?;
            let mut view = Overlay {
                store: s,
                writes: HashMap::new(),
            };
            let mut answers = Vec::with_capacity(requests.len());
            for (i, (_, drafts, with)) in requests.iter().enumerate() {
                if let Err(e) = check_conditions(with, |t, k| view.get(t, k)) {
                    answers.push((i, Err(e)));
                    continue;
                }
                let (entries_txn, stored, new_head) = chain(&head, drafts.clone());
                let member = Txn {
                    conditions: Vec::new(),
                    ops: with.ops.iter().cloned().chain(entries_txn.ops).collect(),
                };
                view.apply(&member);
                all = all.merge(member);
                head = new_head;
                answers.push((i, Ok(stored)));
            }
            if !all.ops.is_empty() {
                s.commit(all)?;
            }
            Ok(answers)
        })();
        match grouped {
            Ok(answers) => {
                for (i, r) in answers {
                    answer(&requests[i].0, r);
                }
            }
            // Another writer moved the head, or the store failed: fall back to
            // one transaction per member, each with its own outcome.
            Err(_) => {
                for (p, drafts, with) in requests {
                    let r = (|| {
                        let (head, guard) = head_guard(s)?;
                        let (entries_txn, stored, _) = chain(&head, drafts);
                        s.commit(guard.merge(entries_txn).merge(with))?;
                        Ok(stored)
                    })();
                    answer(&p, r);
                }
            }
        }
    }
}

/// Which entries a query wants.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub volume: String,
    /// Substring of the actor.
    pub actor: String,
    pub since_ms: u64,
    /// 0: no end.
    pub until_ms: u64,
    pub after_seq: u64,
    pub limit: usize,
}

impl Query {
    fn matches(&self, e: &AuditEntry) -> bool {
        (self.volume.is_empty() || e.volume == self.volume)
            && (self.actor.is_empty() || e.actor.contains(&self.actor))
            && e.time_ms >= self.since_ms
            && (self.until_ms == 0 || e.time_ms <= self.until_ms)
    }
}

/// Matching entries in order, and the last sequence number examined when the
/// limit stopped the walk (0 when the whole log was read).
pub fn query(s: &dyn CatalogStore, q: &Query) -> Result<(Vec<AuditEntry>, u64)> {
    let limit = if q.limit == 0 { 1000 } else { q.limit };
    let mut out = Vec::new();
    let mut cursor = key_of(q.after_seq);
    loop {
        let page = s.scan(Table::Audit, Some(cursor.as_bytes()), 4096)?;
        let Some((last, _)) = page.last() else {
            return Ok((out, 0));
        };
        cursor = String::from_utf8_lossy(last).into_owned();
        for (k, v) in page {
            let e: AuditEntry = decode(&k, &v)?;
            if q.matches(&e) {
                out.push(e);
                if out.len() == limit {
                    return Ok((out.clone(), out.last().map_or(0, |e| e.seq)));
                }
            }
        }
    }
}

fn decode(k: &[u8], v: &[u8]) -> Result<AuditEntry> {
    serde_json::from_slice(v).map_err(|e| CatalogError::Corrupt {
        table: "audit",
        key: String::from_utf8_lossy(k).into_owned(),
        reason: e.to_string(),
    })
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries_checked: u64,
    /// None when intact; else the first entry found altered, or the first
    /// number missing, and what is wrong.
    pub first_bad: Option<(u64, String)>,
    pub head: Head,
}

/// Walks the chain from entry 1 to the head as it was when the walk began
/// (entries appended meanwhile are left for the next walk).
pub fn verify(s: &dyn CatalogStore) -> Result<Verification> {
    let head = head(s)?;
    let mut checked = 0u64;
    let mut expected_seq = 1u64;
    let mut prev_hash = ZERO_HASH.to_string();
    let mut cursor: Option<Vec<u8>> = None;
    let bad = |seq: u64, why: String, checked: u64, head: &Head| Verification {
        entries_checked: checked,
        first_bad: Some((seq, why)),
        head: head.clone(),
    };
    loop {
        let page = s.scan(Table::Audit, cursor.as_deref(), 4096)?;
        let Some((last, _)) = page.last() else { break };
        cursor = Some(last.clone());
        let mut past_head = false;
        for (k, v) in page {
            let key = String::from_utf8_lossy(&k).into_owned();
            let key_seq: u64 = key.parse().unwrap_or(0);
            if key_seq > head.seq {
                past_head = true;
                break;
            }
            let e = match decode(&k, &v) {
                Ok(e) => e,
                Err(err) => {
                    return Ok(bad(
                        key_seq,
                        format!("entry {key_seq} was altered: it no longer decodes ({err})"),
                        checked,
                        &head,
                    ))
                }
            };
            if key_seq != expected_seq {
                let what = if key_seq > expected_seq + 1 {
                    format!("entries {expected_seq}..{} were removed", key_seq - 1)
                } else {
                    format!("entry {expected_seq} was removed")
                };
                return Ok(bad(expected_seq, what, checked, &head));
            }
            if e.seq != key_seq {
                return Ok(bad(
                    key_seq,
                    format!("entry {key_seq} was altered: it says it is entry {}", e.seq),
                    checked,
                    &head,
                ));
            }
            if e.compute_hash().is_none() {
                return Ok(bad(
                    key_seq,
                    format!("entry {key_seq} has format {}, unknown to this build", e.v),
                    checked,
                    &head,
                ));
            }
            if Some(&e.hash) != e.compute_hash().as_ref() {
                return Ok(bad(
                    key_seq,
                    format!("entry {key_seq} was altered: its content does not match its hash"),
                    checked,
                    &head,
                ));
            }
            if e.prev_hash != prev_hash {
                // This entry is intact but the one before was rewritten with a
                // fresh hash (or replaced by a forged one).
                let (seq, why) = if key_seq == 1 {
                    (
                        1,
                        "entry 1 was altered: it does not start the chain".to_string(),
                    )
                } else {
                    let p = key_seq - 1;
                    (
                        p,
                        format!(
                            "entry {p} was altered: entry {key_seq} chains to a different hash"
                        ),
                    )
                };
                return Ok(bad(seq, why, checked, &head));
            }
            prev_hash = e.hash.clone();
            expected_seq += 1;
            checked += 1;
        }
        if past_head {
            break;
        }
    }
    let last_seq = expected_seq - 1;
    if last_seq < head.seq {
        return Ok(bad(
            expected_seq,
            format!(
                "entries {expected_seq}..{} were removed (the log ends early)",
                head.seq
            ),
            checked,
            &head,
        ));
    }
    if last_seq > head.seq || prev_hash != head.hash {
        return Ok(bad(
            head.seq.max(1),
            format!(
                "the chain's head (entry {}, {}) does not match its last entry",
                head.seq, head.hash
            ),
            checked,
            &head,
        ));
    }
    Ok(Verification {
        entries_checked: checked,
        first_bad: None,
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn entry(action: &str, volume: &str, time_ms: u64) -> AuditEntry {
        AuditEntry {
            time_ms,
            actor: "berthctl:alice".into(),
            action: action.into(),
            volume: volume.into(),
            result: "ok".into(),
            ..Default::default()
        }
    }

    fn filled(n: u64) -> (MemStore, AuditLog) {
        let s = MemStore::new();
        let log = AuditLog::new();
        for i in 1..=n {
            let stored = log
                .append(
                    &s,
                    vec![entry("CreateVolume", &format!("v{}", i % 3), i * 10)],
                    Txn::new(),
                )
                .expect("append");
            assert_eq!(stored[0].seq, i);
        }
        (s, log)
    }

    fn raw(s: &MemStore, seq: u64) -> AuditEntry {
        let v = s
            .get(Table::Audit, key_of(seq).as_bytes())
            .expect("get")
            .expect("present");
        serde_json::from_slice(&v).expect("decode")
    }

    fn write(s: &MemStore, e: &AuditEntry) {
        s.commit(Txn::new().put(
            Table::Audit,
            key_of(e.seq),
            serde_json::to_vec(e).expect("json"),
        ))
        .expect("write");
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let (s, _) = filled(10);
        let v = verify(&s).expect("verify");
        assert_eq!(v.first_bad, None);
        assert_eq!(v.entries_checked, 10);
        assert_eq!(v.head.seq, 10);
        assert_eq!(raw(&s, 1).prev_hash, ZERO_HASH);
        assert_eq!(raw(&s, 2).prev_hash, raw(&s, 1).hash);
    }

    #[test]
    fn an_edited_entry_is_named() {
        let (s, _) = filled(10);
        let mut e = raw(&s, 4);
        e.write_bytes = 1;
        write(&s, &e);
        let v = verify(&s).expect("verify");
        let (seq, why) = v.first_bad.expect("tampering found");
        assert_eq!(seq, 4, "{why}");
        assert!(why.contains("altered"), "{why}");
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_is_named() {
        let (s, _) = filled(10);
        let mut e = raw(&s, 6);
        e.actor = "nobody".into();
        e.hash = e.compute_hash().expect("format 1");
        write(&s, &e);
        let (seq, why) = verify(&s).expect("verify").first_bad.expect("found");
        assert_eq!(seq, 6, "{why}");
    }

    #[test]
    fn removed_entries_are_named_in_the_middle_and_at_the_end() {
        let (s, _) = filled(10);
        s.commit(Txn::new().delete(Table::Audit, key_of(5)))
            .expect("delete");
        let (seq, why) = verify(&s).expect("verify").first_bad.expect("found");
        assert_eq!(seq, 5, "{why}");
        assert!(why.contains("removed"), "{why}");

        let (s, _) = filled(10);
        s.commit(Txn::new().delete(Table::Audit, key_of(10)))
            .expect("delete");
        let (seq, why) = verify(&s).expect("verify").first_bad.expect("found");
        assert_eq!(seq, 10, "{why}");
        assert!(why.contains("ends early"), "{why}");
    }

    #[test]
    fn concurrent_appends_form_one_chain_and_each_change_is_checked_alone() {
        let s = Arc::new(MemStore::new());
        let log = Arc::new(AuditLog::new());
        let winners: usize = (0..8)
            .map(|t| {
                let (s, log) = (s.clone(), log.clone());
                std::thread::spawn(move || {
                    let mut won = 0;
                    for i in 0..50u64 {
                        // Everyone races for the same few keys: only the
                        // first create of each may win, and losers must not
                        // leave an entry behind.
                        let key = format!("k{}", i % 10);
                        let with = Txn::new().require_absent(Table::Volumes, key.clone()).put(
                            Table::Volumes,
                            key,
                            vec![t],
                        );
                        if log.append(&*s, vec![entry("create", "v", i)], with).is_ok() {
                            won += 1;
                        }
                        log.append(&*s, vec![entry("note", "v", i)], Txn::new())
                            .expect("note");
                    }
                    won
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("join"))
            .sum();
        assert_eq!(winners, 10, "each key created once");
        let v = verify(&*s).expect("verify");
        assert_eq!((v.first_bad, v.entries_checked), (None, 400 + 10));
    }

    #[test]
    fn entries_appended_during_a_walk_are_not_tampering() {
        let (s, log) = filled(5);
        // Simulate an append that lands after the walk read the head: the
        // entry is there, the head the walk holds is older.
        let old_head = s
            .get(Table::Meta, HEAD_KEY.as_bytes())
            .expect("get")
            .expect("head");
        log.append(&s, vec![entry("late", "v", 99)], Txn::new())
            .expect("append");
        let late_head = s
            .get(Table::Meta, HEAD_KEY.as_bytes())
            .expect("get")
            .expect("head");
        s.commit(Txn::new().put(Table::Meta, HEAD_KEY, old_head))
            .expect("rewind head");
        let v = verify(&s).expect("verify");
        assert_eq!((v.first_bad, v.entries_checked), (None, 5));
        s.commit(Txn::new().put(Table::Meta, HEAD_KEY, late_head))
            .expect("head");
        assert_eq!(verify(&s).expect("verify").entries_checked, 6);
    }

    #[test]
    fn the_hash_covers_a_fixed_encoding_and_unknown_formats_are_named() {
        let (s, _) = filled(3);
        let mut e = raw(&s, 2);
        // Field order in storage does not matter; content does.
        let reordered: AuditEntry =
            serde_json::from_str(&serde_json::to_string(&e).expect("json")).expect("json");
        assert_eq!(reordered.compute_hash(), Some(e.hash.clone()));
        e.v = 9;
        write(&s, &e);
        let (seq, why) = verify(&s).expect("verify").first_bad.expect("found");
        assert_eq!(seq, 2);
        assert!(why.contains("format 9"), "{why}");
        // Entry 1 pointing somewhere else is entry 1's fault.
        let (s, _) = filled(3);
        let mut first = raw(&s, 1);
        first.prev_hash = "ab".repeat(32);
        first.hash = first.compute_hash().expect("v1");
        write(&s, &first);
        let (seq, _) = verify(&s).expect("verify").first_bad.expect("found");
        assert_eq!(seq, 1);
    }

    #[test]
    fn entries_and_the_change_they_describe_commit_together() {
        let (s, log) = filled(2);
        // A change whose condition fails takes its audit entry with it.
        let failing = Txn::new().require_absent(Table::Audit, key_of(1));
        assert!(log.append(&s, vec![entry("x", "v", 1)], failing).is_err());
        assert_eq!(verify(&s).expect("verify").head.seq, 2);
        let ok = Txn::new().put(Table::Volumes, "v9", b"x".to_vec());
        log.append(&s, vec![entry("a", "v9", 1), entry("b", "v9", 2)], ok)
            .expect("append");
        assert!(s.get(Table::Volumes, b"v9").expect("get").is_some());
        let v = verify(&s).expect("verify");
        assert_eq!((v.head.seq, v.first_bad), (4, None));
    }

    #[test]
    fn queries_filter_by_volume_actor_and_time_and_page() {
        let (s, _) = filled(30);
        let q = Query {
            volume: "v1".into(),
            since_ms: 50,
            until_ms: 200,
            ..Default::default()
        };
        let (got, _) = query(&s, &q).expect("query");
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [7, 10, 13, 16, 19]);
        let (page, next) = query(
            &s,
            &Query {
                limit: 4,
                ..Default::default()
            },
        )
        .expect("q");
        assert_eq!((page.len(), next), (4, 4));
        let (rest, next) = query(
            &s,
            &Query {
                after_seq: 4,
                ..Default::default()
            },
        )
        .expect("q");
        assert_eq!((rest.len(), next), (26, 0));
        let (none, _) = query(
            &s,
            &Query {
                actor: "mallory".into(),
                ..Default::default()
            },
        )
        .expect("q");
        assert!(none.is_empty());
    }
}
