//! The replica set of a replicated volume: who holds a copy, which copies
//! count, and the generation that fences everything else
//! (`docs/replication.md`).
//!
//! The catalog keeps one [`ReplicaSet`] per volume and changes it only through
//! the methods here, inside a catalog transaction. Every method takes the
//! generation its caller acted on and refuses when it is not the current one
//! (another nexus, or the metadata service on another path, moved the set on
//! first). Every accepted change of who counts bumps the generation; a refused
//! call changes nothing. The rules:
//!
//! 1. a write is acknowledged only when every [`ReplicaState::InSync`] replica
//!    has it ([`ReplicaSet::counted`]); writes also go to replicas that are
//!    catching up ([`ReplicaSet::written`]);
//! 2. only in-sync replicas are read ([`ReplicaSet::readable`]);
//! 3. a replica leaves the counted set only through [`ReplicaSet::fault`] or
//!    [`ReplicaSet::retire`], which bump the generation; the last in-sync
//!    replica never leaves (writes fail instead of being acknowledged by
//!    nobody);
//! 4. a replica becomes in sync only by finishing a rebuild that copied the
//!    whole of what it lacked ([`ReplicaSet::finish_rebuild`]);
//! 5. a replica not in sync at the current generation is neither read nor
//!    counted, and a session (a nexus, a rebuild) acting at an older
//!    generation is refused ([`ReplicaSet::accepts`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Holds every acknowledged write: read, written and counted.
    InSync,
    /// Catching up: written (new writes reach it), not read, not counted.
    Rebuilding,
    /// Out of the set after an error; may come back through a rebuild.
    Faulted,
    /// Out for good (its node is gone): to be replaced, then dropped.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: String,
    pub pool_id: String,
    pub state: ReplicaState,
    /// The generation at which it was last in sync: where a delta rebuild of
    /// it starts (the markers the other replicas keep are named by it).
    pub synced_generation: u64,
    /// While rebuilding: bytes copied of `rebuild_total_bytes`.
    pub rebuild_done_bytes: u64,
    pub rebuild_total_bytes: u64,
    /// Byte ranges (offset, length) that were in flight to it when it failed:
    /// the other replicas applied them before the generation moved on, so
    /// their dirty sets (kept from the bump on) miss them; its rebuild copies
    /// them too. Bounded by what one nexus keeps in flight.
    pub pending: Vec<(u64, u64)>,
    /// A rebuild that stopped: the offset below which its copy was done
    /// (in the order it copies), kept so the next one resumes there.
    #[serde(default)]
    pub rebuild_cursor: u64,
    /// For each replica in sync when this one last stopped receiving
    /// writes: (node, the point its recording of changes started at, the
    /// round it started then). With the cursor: what a resumed rebuild must
    /// copy again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_rounds: Vec<(String, u64, u64)>,
}

/// Its fields change only through the methods below (they are private), so
/// every change keeps the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    generation: u64,
    replicas: Vec<Replica>,
    /// The generation the current nexus was published at: volume servers
    /// refuse sessions through grants older than this (the fence). Faults
    /// and rebuilds move `generation` on but not the fence: the nexus that
    /// reported them keeps writing.
    #[serde(default)]
    fence: u64,
    /// The last change, when it was a fault: (node, the generation it was
    /// reported at). A nexus that did not hear the answer asks again at
    /// that generation and gets the same one back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_fault: Option<(String, u64)>,
    /// The last change, when it started or finished a rebuild: (what,
    /// node, the generation it was asked at), answered the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_step: Option<(String, String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("generation {got} is not the current one ({current}): the replica set moved on")]
    StaleGeneration { got: u64, current: u64 },
    #[error("no replica on node {0}")]
    NoSuchReplica(String),
    #[error("the replica on {node} is {state:?}; this needs it {wanted}")]
    WrongState {
        node: String,
        state: ReplicaState,
        wanted: &'static str,
    },
    #[error("the replica on {0} is the last one in sync: the set cannot go on without it")]
    LastInSync(String),
    #[error("node {0} already holds a replica of this volume")]
    SameNode(String),
    #[error("a replica set has 1 to 3 replicas, not {0}")]
    Count(usize),
    #[error("the rebuild of the replica on {node} copied {done} of {total} bytes")]
    RebuildIncomplete { node: String, done: u64, total: u64 },
}

type Result<T> = std::result::Result<T, MembershipError>;

impl ReplicaSet {
    /// A new set, every replica in sync, at generation 1. `placements` are
    /// (node, pool) pairs on distinct nodes.
    pub fn new(placements: &[(String, String)]) -> Result<ReplicaSet> {
        if placements.is_empty() || placements.len() > 3 {
            return Err(MembershipError::Count(placements.len()));
        }
        let mut set = ReplicaSet {
            generation: 1,
            replicas: Vec::new(),
            fence: 0,
            last_fault: None,
            last_step: None,
        };
        for (node, pool) in placements {
            if set.find(node).is_some() {
                return Err(MembershipError::SameNode(node.clone()));
            }
            set.replicas.push(Replica {
                node: node.clone(),
                pool_id: pool.clone(),
                state: ReplicaState::InSync,
                synced_generation: 1,
                rebuild_done_bytes: 0,
                rebuild_total_bytes: 0,
                pending: Vec::new(),
                rebuild_cursor: 0,
                left_rounds: Vec::new(),
            });
        }
        Ok(set)
    }

    /// The current generation: what a session must present to write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The generation of the current nexus (0: none yet).
    pub fn fence(&self) -> u64 {
        self.fence
    }

    fn find(&self, node: &str) -> Option<usize> {
        self.replicas.iter().position(|r| r.node == node)
    }

    fn in_state(&self, state: ReplicaState) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(move |r| r.state == state)
    }

    /// Replicas a read may go to.
    pub fn readable(&self) -> impl Iterator<Item = &Replica> {
        self.in_state(ReplicaState::InSync)
    }

    /// Replicas whose acknowledgement a write needs.
    pub fn counted(&self) -> impl Iterator<Item = &Replica> {
        self.in_state(ReplicaState::InSync)
    }

    /// Replicas a write is sent to: the counted ones and those catching up.
    pub fn written(&self) -> impl Iterator<Item = &Replica> {
        self.replicas
            .iter()
            .filter(|r| matches!(r.state, ReplicaState::InSync | ReplicaState::Rebuilding))
    }

    /// Fewer replicas in sync than the set has.
    pub fn degraded(&self) -> bool {
        self.counted().count() < self.replicas.len()
    }

    /// Whether the nexus acting at `generation` is the current one: it was
    /// published at the fence or later (an earlier nexus never saw a
    /// generation that high). Changes the metadata service made on its own
    /// since (a replica retired or added) leave it current: they only take
    /// replicas out of what it must count, and it adopts the generation
    /// they moved to with its next answer.
    pub fn accepts(&self, generation: u64) -> bool {
        generation >= self.fence && generation <= self.generation
    }

    /// For the metadata service's own changes: exactly the current one.
    fn check_exact(&self, generation: u64) -> Result<()> {
        self.refuse_unless(generation == self.generation, generation)
    }

    /// For the nexus's calls: see [`ReplicaSet::accepts`].
    fn check(&self, generation: u64) -> Result<()> {
        self.refuse_unless(self.accepts(generation), generation)
    }

    fn refuse_unless(&self, ok: bool, generation: u64) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(MembershipError::StaleGeneration {
                got: generation,
                current: self.generation,
            })
        }
    }

    fn replica(&self, node: &str) -> Result<usize> {
        self.find(node)
            .ok_or_else(|| MembershipError::NoSuchReplica(node.to_string()))
    }

    fn wrong(&self, i: usize, wanted: &'static str) -> MembershipError {
        MembershipError::WrongState {
            node: self.replicas[i].node.clone(),
            state: self.replicas[i].state,
            wanted,
        }
    }

    /// Bumps the generation; in-sync replicas are in sync at the new one.
    fn bump(&mut self) -> u64 {
        self.last_fault = None;
        self.last_step = None;
        self.generation += 1;
        let g = self.generation;
        for r in &mut self.replicas {
            if r.state == ReplicaState::InSync {
                r.synced_generation = g;
            }
        }
        g
    }

    /// A replica that stops being counted must not be the last in sync.
    fn leave(&mut self, i: usize, to: ReplicaState) -> Result<u64> {
        let r = &self.replicas[i];
        if r.state == ReplicaState::InSync && self.counted().count() == 1 {
            return Err(MembershipError::LastInSync(r.node.clone()));
        }
        let r = &mut self.replicas[i];
        r.state = to;
        r.rebuild_done_bytes = 0;
        r.rebuild_total_bytes = 0;
        Ok(self.bump())
    }

    /// The nexus at `generation` saw the replica on `node` fail (an error, a
    /// timeout, a lost connection; a failed write to a rebuilding replica
    /// too): it leaves the set, with the ranges that were in flight to it.
    /// Returns the new generation, after which the nexus may acknowledge
    /// those writes.
    ///
    /// The same report again (its answer was lost) gets the same generation
    /// back, as long as nothing changed since.
    pub fn fault(&mut self, node: &str, generation: u64, in_flight: &[(u64, u64)]) -> Result<u64> {
        if self.last_fault.as_ref() == Some(&(node.to_string(), generation)) {
            let i = self.replica(node)?;
            self.replicas[i].pending.extend_from_slice(in_flight);
            return Ok(self.generation);
        }
        self.check(generation)?;
        let i = self.replica(node)?;
        match self.replicas[i].state {
            ReplicaState::InSync | ReplicaState::Rebuilding => {
                let was_rebuilding = self.replicas[i].state == ReplicaState::Rebuilding;
                let g = self.leave(i, ReplicaState::Faulted)?;
                let r = &mut self.replicas[i];
                r.pending.extend_from_slice(in_flight);
                r.left_rounds.clear();
                if !was_rebuilding {
                    r.rebuild_cursor = 0;
                }
                self.last_fault = Some((node.to_string(), generation));
                Ok(g)
            }
            // Out already (the service retired it, or an answer was lost
            // and something changed since): what the nexus asks holds.
            ReplicaState::Faulted => {
                self.replicas[i].pending.extend_from_slice(in_flight);
                Ok(self.generation)
            }
            ReplicaState::Stale => Ok(self.generation),
        }
    }

    /// A faulted replica is back (its server restarted within the grace
    /// period): it becomes a write member and is rebuilt from its
    /// `synced_generation` on; `total_bytes` is what the rebuild must copy.
    ///
    /// The same call again (its answer was lost) gets the same generation
    /// back, as long as nothing changed since.
    pub fn start_rebuild(&mut self, node: &str, generation: u64, total_bytes: u64) -> Result<u64> {
        if self.repeated("start", node, generation) {
            return Ok(self.generation);
        }
        self.check(generation)?;
        let i = self.replica(node)?;
        if self.replicas[i].state != ReplicaState::Faulted {
            return Err(self.wrong(i, "faulted"));
        }
        let r = &mut self.replicas[i];
        r.state = ReplicaState::Rebuilding;
        r.rebuild_done_bytes = 0;
        r.rebuild_total_bytes = total_bytes;
        let g = self.bump();
        self.last_step = Some(("start".into(), node.to_string(), generation));
        Ok(g)
    }

    fn repeated(&self, what: &str, node: &str, generation: u64) -> bool {
        self.last_step
            .as_ref()
            .is_some_and(|(w, n, g)| w == what && n == node && *g == generation)
    }

    /// The rebuild of the replica on `node` copies `total_bytes` (known once
    /// the nexus writes to it and the changed blocks are listed, from the
    /// cursor of the rebuild before, which this one replaces: the copy is in
    /// offset order, and below this one's cursor everything is up to date).
    pub fn plan_rebuild(&mut self, node: &str, generation: u64, total_bytes: u64) -> Result<()> {
        self.check(generation)?;
        let i = self.replica(node)?;
        if self.replicas[i].state != ReplicaState::Rebuilding {
            return Err(self.wrong(i, "rebuilding"));
        }
        let r = &mut self.replicas[i];
        r.rebuild_total_bytes = total_bytes;
        r.rebuild_done_bytes = 0;
        r.rebuild_cursor = 0;
        Ok(())
    }

    /// Where each replica in sync started a new round of recording changes
    /// when the faulted replica on `node` stopped receiving writes (the
    /// metadata service asks them in the fault's critical path).
    pub fn note_left_rounds(&mut self, node: &str, rounds: Vec<(String, u64, u64)>) -> Result<()> {
        let i = self.replica(node)?;
        if self.replicas[i].state != ReplicaState::Faulted {
            return Err(self.wrong(i, "faulted"));
        }
        self.replicas[i].left_rounds = rounds;
        Ok(())
    }

    /// Records a rebuild's progress: bytes copied, and the offset below
    /// which the copy is done (a later rebuild resumes there).
    pub fn rebuild_progress(
        &mut self,
        node: &str,
        generation: u64,
        done_bytes: u64,
        cursor: u64,
    ) -> Result<()> {
        self.check(generation)?;
        let i = self.replica(node)?;
        if self.replicas[i].state != ReplicaState::Rebuilding {
            return Err(self.wrong(i, "rebuilding"));
        }
        let r = &mut self.replicas[i];
        r.rebuild_done_bytes = done_bytes.min(r.rebuild_total_bytes);
        r.rebuild_cursor = r.rebuild_cursor.max(cursor);
        Ok(())
    }

    /// The rebuild copied everything: the replica counts again. The nexus
    /// calls this with no write to the replica outstanding (it holds new ones
    /// for the call), so nothing acknowledged meanwhile can be missing.
    /// Repeated after a lost answer: the same generation back.
    pub fn finish_rebuild(&mut self, node: &str, generation: u64) -> Result<u64> {
        if self.repeated("finish", node, generation) {
            return Ok(self.generation);
        }
        self.check(generation)?;
        let i = self.replica(node)?;
        let r = &self.replicas[i];
        if r.state != ReplicaState::Rebuilding {
            return Err(self.wrong(i, "rebuilding"));
        }
        if r.rebuild_done_bytes < r.rebuild_total_bytes {
            return Err(MembershipError::RebuildIncomplete {
                node: r.node.clone(),
                done: r.rebuild_done_bytes,
                total: r.rebuild_total_bytes,
            });
        }
        let r = &mut self.replicas[i];
        r.state = ReplicaState::InSync;
        r.pending.clear();
        r.rebuild_cursor = 0;
        r.left_rounds.clear();
        let g = self.bump();
        self.last_step = Some(("finish".into(), node.to_string(), generation));
        Ok(g)
    }

    /// The replica's node is gone for good: it is to be replaced.
    pub fn retire(&mut self, node: &str, generation: u64) -> Result<u64> {
        self.check_exact(generation)?;
        let i = self.replica(node)?;
        if self.replicas[i].state == ReplicaState::Stale {
            return Err(self.wrong(i, "not already stale"));
        }
        self.leave(i, ReplicaState::Stale)
    }

    /// A new replica on `node` (a replacement, or `replicas` raised): out
    /// of the set until a rebuild copies everything to it (it was never in
    /// sync, so no delta can serve it).
    pub fn add(&mut self, node: &str, pool_id: &str, generation: u64) -> Result<u64> {
        self.check_exact(generation)?;
        if self.find(node).is_some() {
            return Err(MembershipError::SameNode(node.to_string()));
        }
        let live = self
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Stale)
            .count();
        if live >= 3 {
            return Err(MembershipError::Count(live + 1));
        }
        self.replicas.push(Replica {
            node: node.to_string(),
            pool_id: pool_id.to_string(),
            state: ReplicaState::Faulted,
            synced_generation: 0,
            rebuild_done_bytes: 0,
            rebuild_total_bytes: 0,
            pending: Vec::new(),
            rebuild_cursor: 0,
            left_rounds: Vec::new(),
        });
        Ok(self.bump())
    }

    /// Forgets a stale replica (after its replacement, or its data is gone).
    pub fn remove_stale(&mut self, node: &str, generation: u64) -> Result<u64> {
        self.check_exact(generation)?;
        let i = self.replica(node)?;
        if self.replicas[i].state != ReplicaState::Stale {
            return Err(self.wrong(i, "stale"));
        }
        self.replicas.remove(i);
        Ok(self.bump())
    }

    /// The volume is published to a new nexus (another node, or the same one
    /// after a restart): the previous nexus is fenced from here on. A
    /// replica the previous nexus was rebuilding is faulted again: the new
    /// nexus does not write to it until it starts its rebuild anew.
    pub fn new_nexus(&mut self, generation: u64) -> Result<u64> {
        self.check_exact(generation)?;
        for r in &mut self.replicas {
            if r.state == ReplicaState::Rebuilding {
                // What it missed since the last nexus stopped is not
                // recorded apart: its next rebuild starts over.
                r.state = ReplicaState::Faulted;
                r.rebuild_done_bytes = 0;
                r.rebuild_total_bytes = 0;
                r.rebuild_cursor = 0;
                r.left_rounds.clear();
            }
        }
        let g = self.bump();
        self.fence = g;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_rebuild_step_repeated_after_a_lost_answer_gets_the_same_answer() {
        let mut s = set3();
        let g = s.fault("c", 1, &[]).expect("fault");
        let g1 = s.start_rebuild("c", g, 10).expect("start");
        assert_eq!(s.start_rebuild("c", g, 10), Ok(g1), "repeated start");
        s.rebuild_progress("c", g1, 10, 0).expect("progress");
        let g2 = s.finish_rebuild("c", g1).expect("finish");
        let before = s.clone();
        assert_eq!(s.finish_rebuild("c", g1), Ok(g2), "repeated finish");
        assert_eq!(s, before, "a repeat changes nothing");
        // Not once something else changed.
        assert!(s.start_rebuild("c", g, 10).is_err());
        s.fault("b", g2, &[]).expect("fault");
        assert!(s.finish_rebuild("c", g1).is_err());
    }

    fn set3() -> ReplicaSet {
        ReplicaSet::new(&[
            ("a".into(), "pa".into()),
            ("b".into(), "pb".into()),
            ("c".into(), "pc".into()),
        ])
        .expect("set")
    }

    #[test]
    fn a_fault_bumps_the_generation_and_a_stale_report_is_refused() {
        let mut s = set3();
        let fence = s.new_nexus(1).expect("nexus");
        let g = s.fault("b", fence, &[(0, 4096)]).expect("fault");
        assert_eq!(g, 3);
        assert!(s.degraded());
        assert_eq!(
            s.readable().map(|r| r.node.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        // A nexus from before the fence (it saw generation 1) is refused.
        let before = s.clone();
        assert_eq!(
            s.fault("c", 1, &[]),
            Err(MembershipError::StaleGeneration { got: 1, current: 3 })
        );
        assert_eq!(s, before, "a refused call changes nothing");
        // The current nexus is heard at any generation since its fence
        // (the service may have moved the set on without it).
        assert!(!s.accepts(1) && s.accepts(2) && s.accepts(3) && !s.accepts(4));
        // Reporting a replica that is out already changes nothing.
        assert_eq!(s.fault("b", 2, &[]), Ok(3));
        // b remembers where its delta starts.
        assert_eq!(s.replicas[1].synced_generation, 2);
        assert_eq!(s.replicas[0].synced_generation, 3);
    }

    #[test]
    fn a_report_repeated_after_its_answer_was_lost_gets_the_same_answer() {
        let mut s = set3();
        let g = s.fault("b", 1, &[(0, 4096)]).expect("fault");
        assert_eq!(s.fault("b", 1, &[(8192, 4096)]), Ok(g));
        assert_eq!(s.generation(), g);
        assert_eq!(s.replicas()[1].pending, [(0, 4096), (8192, 4096)]);
        // Once the set moved on, it is stale like any other.
        let g2 = s.new_nexus(g).expect("nexus");
        assert_eq!(
            s.fault("b", 1, &[]),
            Err(MembershipError::StaleGeneration {
                got: 1,
                current: g2
            })
        );
    }

    #[test]
    fn the_last_in_sync_replica_never_leaves() {
        let mut s = set3();
        let g = s.fault("a", 1, &[]).expect("a");
        let g = s.fault("b", g, &[]).expect("b");
        assert_eq!(
            s.fault("c", g, &[]),
            Err(MembershipError::LastInSync("c".into()))
        );
        assert_eq!(
            s.retire("c", g),
            Err(MembershipError::LastInSync("c".into()))
        );
        assert_eq!(s.readable().count(), 1);
    }

    #[test]
    fn only_a_finished_rebuild_makes_a_replica_count_again() {
        let mut s = set3();
        let g = s.fault("a", 1, &[(8192, 4096)]).expect("fault");
        assert_eq!(s.replicas()[0].pending, [(8192, 4096)]);
        assert!(matches!(
            s.finish_rebuild("a", g),
            Err(MembershipError::WrongState { .. })
        ));
        let g = s.start_rebuild("a", g, 100).expect("start");
        assert!(
            s.written().any(|r| r.node == "a"),
            "written while catching up"
        );
        assert!(!s.readable().any(|r| r.node == "a"), "not read");
        s.rebuild_progress("a", g, 60, 0).expect("progress");
        assert!(matches!(
            s.finish_rebuild("a", g),
            Err(MembershipError::RebuildIncomplete {
                done: 60,
                total: 100,
                ..
            })
        ));
        s.rebuild_progress("a", g, 100, 0).expect("progress");
        let g = s.finish_rebuild("a", g).expect("finish");
        assert!(!s.degraded());
        assert_eq!(s.replicas[0].synced_generation, g);
        assert!(s.replicas[0].pending.is_empty());
    }

    #[test]
    fn replacement_sizes_and_names_are_checked() {
        assert_eq!(ReplicaSet::new(&[]), Err(MembershipError::Count(0)));
        assert_eq!(
            ReplicaSet::new(&[("a".into(), "p".into()), ("a".into(), "q".into())]),
            Err(MembershipError::SameNode("a".into()))
        );
        let mut s = set3();
        assert_eq!(s.add("d", "pd", 1), Err(MembershipError::Count(4)));
        let g = s.retire("c", 1).expect("retire");
        assert_eq!(
            s.add("a", "pa", g),
            Err(MembershipError::SameNode("a".into()))
        );
        let g = s.add("d", "pd", g).expect("add");
        // Out until a full copy: it was never in sync.
        let d = s.replicas().iter().find(|r| r.node == "d").expect("d");
        assert_eq!((d.state, d.synced_generation), (ReplicaState::Faulted, 0));
        let g = s.remove_stale("c", g).expect("remove");
        assert_eq!(s.replicas.len(), 3);
        assert_eq!(s.new_nexus(g), Ok(g + 1));
    }

    // ---- the model ----------------------------------------------------------

    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const NODES: [&str; 4] = ["a", "b", "c", "d"];

    #[derive(Debug, Clone)]
    enum Step {
        /// A client write; the replicas in `fail` (indexes) fail it.
        Write {
            fail: Vec<usize>,
        },
        Fault(usize),
        StartRebuild(usize),
        /// The rebuild copies its delta from an in-sync replica.
        Copy(usize),
        Finish(usize),
        Retire(usize),
        Add(usize),
        RemoveStale(usize),
        NewNexus,
        /// A fault reported at an older generation.
        Stale(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let n = 0..NODES.len();
        prop_oneof![
            4 => prop::collection::vec(0..NODES.len(), 0..3).prop_map(|fail| Step::Write { fail }),
            1 => n.clone().prop_map(Step::Fault),
            1 => n.clone().prop_map(Step::StartRebuild),
            1 => n.clone().prop_map(Step::Copy),
            1 => n.clone().prop_map(Step::Finish),
            1 => n.clone().prop_map(Step::Retire),
            1 => n.clone().prop_map(Step::Add),
            1 => n.clone().prop_map(Step::RemoveStale),
            1 => Just(Step::NewNexus),
            1 => n.prop_map(Step::Stale),
        ]
    }

    /// What each node's copy holds: write id (a 4 KiB block of its own) →
    /// the generation it was applied at on that copy; what was acknowledged.
    #[derive(Debug, Default)]
    struct Model {
        held: [BTreeMap<u64, u64>; 4],
        acked: BTreeSet<u64>,
        next: u64,
    }

    fn idx(node: &str) -> usize {
        NODES.iter().position(|n| *n == node).expect("known node")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random faults, returns, rebuilds, replacements, new nexuses, reports
        /// at old generations and writes with failing legs. A rebuild copies
        /// only its delta, as docs/replication.md plans it: what the source
        /// applied after the generation at which the replica was last in sync
        /// (the dirty set kept from that bump on), plus the ranges that were in
        /// flight to it when it failed. Checked after every step: every
        /// acknowledged write is on every replica that is read, the replicas
        /// read are those in sync at the current generation, the set is never
        /// left without one, the generation grows at every change of who
        /// counts and at nothing else, and refused calls change nothing.
        #[test]
        fn membership_keeps_every_acknowledged_write_on_every_replica_read(
            steps in prop::collection::vec(step(), 1..80)
        ) {
            let mut s = ReplicaSet::new(&[
                ("a".into(), "pa".into()),
                ("b".into(), "pb".into()),
            ]).expect("set");
            let mut m = Model::default();
            for st in steps {
                let before = s.clone();
                let g = s.generation();
                let r = match &st {
                    Step::Write { fail } => {
                        let id = m.next;
                        m.next += 1;
                        let sent_at = s.generation();
                        let targets: Vec<String> = s.written().map(|r| r.node.clone()).collect();
                        for node in &targets {
                            if !fail.contains(&idx(node)) {
                                m.held[idx(node)].insert(id, sent_at);
                            }
                        }
                        // Failing legs leave the set with the write in flight
                        // to them, before the acknowledgement.
                        for node in &targets {
                            if fail.contains(&idx(node)) {
                                let _ = s.fault(node, s.generation(), &[(id * 4096, 4096)]);
                            }
                        }
                        // Acknowledged when every counted replica has it.
                        if s.counted().all(|r| m.held[idx(&r.node)].contains_key(&id)) {
                            m.acked.insert(id);
                        }
                        Ok(())
                    }
                    Step::Fault(n) => s.fault(NODES[*n], g, &[]).map(drop),
                    Step::StartRebuild(n) => s.start_rebuild(NODES[*n], g, 1).map(drop),
                    Step::Copy(n) => {
                        let node = NODES[*n];
                        let target = s.replicas().iter().find(|r| r.node == node).cloned();
                        let source = s.readable().next().map(|r| idx(&r.node));
                        match (target, source) {
                            (Some(t), Some(src)) if t.state == ReplicaState::Rebuilding => {
                                let pending: BTreeSet<u64> =
                                    t.pending.iter().map(|(off, _)| off / 4096).collect();
                                let delta: Vec<u64> = m.held[src]
                                    .iter()
                                    .filter(|(id, at)| **at > t.synced_generation || pending.contains(id))
                                    .map(|(id, _)| *id)
                                    .collect();
                                for id in delta {
                                    m.held[*n].entry(id).or_insert(g);
                                }
                                s.rebuild_progress(node, g, 1, 0)
                            }
                            _ => Ok(()),
                        }
                    }
                    Step::Finish(n) => s.finish_rebuild(NODES[*n], g).map(drop),
                    Step::Retire(n) => s.retire(NODES[*n], g).map(drop),
                    Step::Add(n) => {
                        // A new replica starts empty (an old copy on its node
                        // is gone).
                        let r = s.add(NODES[*n], "p", g);
                        if r.is_ok() {
                            m.held[*n].clear();
                        }
                        r.map(drop)
                    }
                    Step::RemoveStale(n) => s.remove_stale(NODES[*n], g).map(drop),
                    Step::NewNexus => s.new_nexus(g).map(drop),
                    Step::Stale(n) => {
                        let old = g.saturating_sub(1 + *n as u64);
                        s.fault(NODES[*n], old, &[]).map(drop)
                    }
                };
                // The same report again after its answer was lost.
                let retry = matches!(st, Step::Stale(n)
                    if before.last_fault.as_ref().is_some_and(|(node, at)| node == NODES[n] && *at + 1 == g && g.saturating_sub(1 + n as u64) == *at));
                // A report of a replica that is out already holds as it is.
                let out_already = |n: usize| {
                    before.replicas().iter().any(|r| {
                        r.node == NODES[n]
                            && matches!(r.state, ReplicaState::Faulted | ReplicaState::Stale)
                    })
                };
                match (&st, &r) {
                    (Step::Write { .. }, _) => {}
                    (_, Err(_)) => prop_assert_eq!(&s, &before, "a refused {:?} changed the set", st),
                    (Step::Stale(n) | Step::Fault(n), Ok(())) if retry || out_already(*n) => {
                        prop_assert_eq!(s.generation(), g, "{:?} moved the set", st)
                    }
                    (Step::Stale(n), Ok(())) => {
                        prop_assert!(
                            g.saturating_sub(1 + *n as u64) >= before.fence(),
                            "a report from a nexus before the fence was taken"
                        );
                        prop_assert_eq!(s.generation(), g + 1, "{:?} must bump", st)
                    }
                    (Step::Copy(_), Ok(())) => prop_assert_eq!(s.generation(), g),
                    (_, Ok(())) => prop_assert_eq!(s.generation(), g + 1, "{:?} must bump", st),
                }
                prop_assert!(s.generation() >= before.generation());
                prop_assert!(s.counted().count() >= 1, "no replica in sync after {:?}", st);
                for r in s.readable() {
                    prop_assert_eq!(r.synced_generation, s.generation(), "{} is read but was in sync at an older generation", &r.node);
                    let held = &m.held[idx(&r.node)];
                    let missing: Vec<&u64> = m.acked.iter().filter(|id| !held.contains_key(id)).collect();
                    prop_assert!(missing.is_empty(), "{} is read but lacks acknowledged writes {:?}", &r.node, missing);
                }
                let nodes: BTreeSet<&str> = s.replicas().iter().map(|r| r.node.as_str()).collect();
                prop_assert_eq!(nodes.len(), s.replicas().len(), "two replicas on one node");
            }
        }
    }
}
