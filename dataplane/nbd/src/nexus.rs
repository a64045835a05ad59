//! The nexus: one replicated volume as a [`BlockTarget`] over one leg (an NBD
//! session) per replica. It runs in the attaching process, beside the
//! consumer (see `docs/replication.md`).
//!
//! - **Writes, trims, write-zeroes and flushes** go to every active leg and
//!   are acknowledged once every active leg has them. A leg that fails one
//!   (an error, a lost connection that does not come back, or no answer
//!   within [`NexusOptions::leg_timeout`]) is *leaving*: nothing new is sent
//!   to it, and every request that it failed or that skipped it holds its
//!   acknowledgement until the [`Membership`] (the metadata service) has
//!   durably marked the leg out and moved the generation on. Only then does
//!   the set go on without it. A request that no leg took is an error; the
//!   last leg is never reported out.
//! - **Reads** go to the first active leg (the caller lists the local one
//!   first). A read that fails there is tried on the next; when another leg
//!   has the data, the failed range is **repaired**: written back to the
//!   failing leg under a range lock (client writes to that range wait, the
//!   ones in flight finish first, and the good data is read again under the
//!   lock, so a repair never overwrites a newer write).
//! - **Fencing**: a leg that answers `ESHUTDOWN` says this nexus's
//!   generation is no longer current (another nexus took the volume over).
//!   So does a membership that refuses a fault report. The nexus is then
//!   *deposed*: every request fails with EIO from then on.
//! - **Pending ranges**: with a fault report go the ranges the leg may be
//!   missing although the set has them: mutations that failed on it or were
//!   in flight to it, and those it acknowledged since its last flush (a
//!   killed volume server may lose them). A delta rebuild copies them.
//!
//! Request errors that every replica would give alike (past the end, not
//! supported, read-only) are passed through and fault nobody.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::proto::*;
use crate::session::{Cmd, Done, Outcome};
use crate::target::{call, BlockTarget, BoxFuture};

/// A byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    fn overlaps(&self, o: &Range) -> bool {
        self.offset < o.end() && o.offset < self.end()
    }
}

/// Why the membership did not mark a leg out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultError {
    /// The catalog has moved on past this nexus's generation (another nexus
    /// owns the volume), or refused the change for good: stop.
    Deposed(String),
    /// Not now (the metadata service is unreachable): asked again.
    Unavailable(String),
}

/// Who decides which replicas count: the metadata service, in production.
pub trait Membership: Send + Sync + 'static {
    /// Marks `leg` out of the set at `generation`, keeping `pending` (the
    /// ranges it may be missing) for its rebuild. Returns the new generation
    /// once the change is durable.
    fn fault(
        &self,
        leg: &str,
        generation: u64,
        pending: Vec<Range>,
    ) -> BoxFuture<'static, Result<u64, FaultError>>;

    /// `range` failed to read on `leg` and was rewritten there with the
    /// copy on `from` (for the audit log). Must not block.
    fn repaired(&self, leg: &str, range: Range, from: &str) {
        let _ = (leg, range, from);
    }
}

/// One replica: its name (the node) and the session to it.
pub struct Leg {
    pub name: String,
    pub target: Arc<dyn BlockTarget>,
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg")
            .field("name", &self.name)
            .field("size_bytes", &self.target.size_bytes())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct NexusOptions {
    /// A leg with requests outstanding that has answered none of them for
    /// this long has failed.
    pub leg_timeout: Duration,
    /// The first wait before a fault report is retried (it doubles, to 5 s).
    pub report_retry: Duration,
    /// How long a request waits for a fault report (the metadata service
    /// unreachable) before it fails with EIO. The leg stays out of the set
    /// meanwhile and the report goes on being retried: nothing is ever
    /// acknowledged without it.
    pub hold_timeout: Duration,
}

impl Default for NexusOptions {
    fn default() -> Self {
        NexusOptions {
            leg_timeout: Duration::from_secs(2),
            report_retry: Duration::from_millis(100),
            hold_timeout: Duration::from_secs(60),
        }
    }
}

/// What the nexus counts.
#[derive(Debug, Default)]
pub struct NexusStats {
    /// Legs marked out.
    pub faults: AtomicU64,
    /// Reads served by another leg after one failed.
    pub read_retries: AtomicU64,
    /// Ranges rewritten on a leg that failed to read them.
    pub repairs: AtomicU64,
    /// Repairs abandoned (the good leg failed too, or the bad one left).
    pub repairs_abandoned: AtomicU64,
    /// Bytes copied into rebuilding legs.
    pub rebuilt_bytes: AtomicU64,
}

/// A leg's state, as the nexus sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegState {
    Active,
    /// Written, not read: catching up through a rebuild.
    Rebuilding,
    /// Failed; its fault report is on its way.
    Leaving,
    /// Marked out: no longer written or read.
    Out,
}

const FENCED: &str = "a replica refused this nexus's generation: another nexus owns the volume";

/// Past this many unflushed ranges, a leg's list is coarsened into one.
const MAX_UNFLUSHED: usize = 1 << 16;

type SlotDone = Box<dyn FnOnce(Outcome) + Send>;

struct Sent {
    at: Instant,
    /// The range a mutation changes (none for reads and flushes).
    range: Option<Range>,
    /// A flush: the leg's last acknowledged mutation when it was sent.
    flush_covers: Option<u64>,
    done: SlotDone,
}

enum Status {
    Active,
    /// The outcome of the fault report: `Some(true)` marked out, `Some(false)`
    /// refused (deposed).
    Leaving(watch::Receiver<Option<bool>>),
    Out,
}

struct LegSlot {
    name: String,
    target: Option<Arc<dyn BlockTarget>>,
    status: Status,
    /// Read from (in sync); a leg that is catching up is only written.
    readable: bool,
    inflight: HashMap<u64, Sent>,
    /// Mutation ranges that failed on it (for its fault report).
    failed: Vec<Range>,
    /// Mutations acknowledged by it and not yet covered by a flush it
    /// completed, with the sequence number of each.
    unflushed: VecDeque<(u64, Range)>,
    seq: u64,
    /// When it last answered anything: a leg with requests outstanding that
    /// has not answered for the leg timeout has failed (a slow leg that
    /// answers, throttled by its QoS, has not).
    last_answer: Instant,
}

impl LegSlot {
    /// Keeps what a fault report needs from an answer: a mutation it
    /// acknowledged stays unflushed until a flush sent after it succeeds; one
    /// that failed on it is pending for its rebuild.
    fn answered(&mut self, s: &Sent, r: &Outcome) {
        self.last_answer = Instant::now();
        match r {
            Ok(_) => {
                if let Some(covers) = s.flush_covers {
                    while self.unflushed.front().is_some_and(|(q, _)| *q <= covers) {
                        self.unflushed.pop_front();
                    }
                } else if let Some(range) = s.range {
                    self.seq += 1;
                    self.unflushed.push_back((self.seq, range));
                    if self.unflushed.len() > MAX_UNFLUSHED {
                        let lo = self
                            .unflushed
                            .iter()
                            .map(|(_, r)| r.offset)
                            .min()
                            .unwrap_or(0);
                        let hi = self
                            .unflushed
                            .iter()
                            .map(|(_, r)| r.end())
                            .max()
                            .unwrap_or(0);
                        self.unflushed.clear();
                        self.unflushed.push_back((
                            self.seq,
                            Range {
                                offset: lo,
                                len: hi - lo,
                            },
                        ));
                    }
                }
            }
            Err(e) if !request_error(*e) && *e != ESHUTDOWN => {
                if let Some(range) = s.range {
                    self.failed.push(range);
                }
            }
            Err(_) => {}
        }
    }
}

struct State {
    generation: u64,
    legs: Vec<LegSlot>,
    next_id: u64,
    deposed: Option<String>,
    /// Client mutations in flight: id → range.
    writes: HashMap<u64, Range>,
    /// Ranges being repaired: client mutations overlapping them wait.
    repairs: Vec<Range>,
    parked: VecDeque<(Cmd, Done)>,
    /// Paused for a snapshot (see [`Nexus::quiesce`]): mutations and
    /// flushes are parked.
    paused: u32,
}

struct Inner {
    st: Mutex<State>,
    membership: Arc<dyn Membership>,
    opts: NexusOptions,
    flags: u16,
    size: AtomicU64,
    stats: Arc<NexusStats>,
    /// Fault reports go one at a time, so each carries the generation the
    /// previous one produced.
    report_lock: tokio::sync::Mutex<()>,
    /// A client mutation finished (repairs wait for the overlapping ones).
    drained: Notify,
}

/// A replicated volume: see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Nexus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Nexus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nexus")
            .field("generation", &self.generation())
            .field("legs", &self.legs())
            .finish()
    }
}

/// Errors every replica would give alike: the request's fault, not a leg's.
fn request_error(e: u32) -> bool {
    matches!(e, EPERM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP)
}

fn range_of(cmd: &Cmd) -> Option<Range> {
    match cmd {
        Cmd::Write { offset, data } => Some(Range {
            offset: *offset,
            len: data.len() as u64,
        }),
        Cmd::Trim { offset, len } | Cmd::WriteZeroes { offset, len } => Some(Range {
            offset: *offset,
            len: u64::from(*len),
        }),
        Cmd::Read { .. } | Cmd::Flush => None,
    }
}

/// One client mutation or flush fanned out to the active legs.
struct Fan {
    id: u64,
    range: Option<Range>,
    m: Mutex<FanState>,
}

struct FanState {
    remaining: usize,
    ok: usize,
    /// Legs it failed on, and legs that were leaving when it was sent: the
    /// acknowledgement waits for their reports.
    wait_for: Vec<usize>,
    failed_on: Vec<usize>,
    request_error: Option<u32>,
    fenced: bool,
    done: Option<Done>,
}

impl Nexus {
    /// A nexus at `generation` over `legs` (the preferred reader first).
    /// Must be called within a tokio runtime: it starts the watchdog that
    /// fails legs that stop answering.
    pub fn new(
        legs: Vec<Leg>,
        generation: u64,
        membership: Arc<dyn Membership>,
        opts: NexusOptions,
    ) -> Result<Nexus, String> {
        if legs.is_empty() {
            return Err("a nexus needs at least one leg".into());
        }
        let size = legs
            .iter()
            .map(|l| l.target.size_bytes())
            .min()
            .unwrap_or(0);
        // What every leg accepts: the read-only bit if any is read-only.
        let flags = legs.iter().fold(u16::MAX, |f, l| f & l.target.flags())
            | legs
                .iter()
                .fold(0, |f, l| f | (l.target.flags() & TF_READ_ONLY));
        let inner = Arc::new(Inner {
            st: Mutex::new(State {
                generation,
                legs: legs
                    .into_iter()
                    .map(|l| LegSlot {
                        name: l.name,
                        target: Some(l.target),
                        status: Status::Active,
                        readable: true,
                        inflight: HashMap::new(),
                        failed: Vec::new(),
                        unflushed: VecDeque::new(),
                        seq: 0,
                        last_answer: Instant::now(),
                    })
                    .collect(),
                next_id: 1,
                deposed: None,
                writes: HashMap::new(),
                repairs: Vec::new(),
                parked: VecDeque::new(),
                paused: 0,
            }),
            membership,
            opts,
            flags,
            size: AtomicU64::new(size),
            stats: Arc::new(NexusStats::default()),
            report_lock: tokio::sync::Mutex::new(()),
            drained: Notify::new(),
        });
        tokio::spawn(watchdog(Arc::downgrade(&inner)));
        Ok(Nexus { inner })
    }

    pub fn generation(&self) -> u64 {
        self.inner.st.lock().generation
    }

    pub fn stats(&self) -> Arc<NexusStats> {
        self.inner.stats.clone()
    }

    /// Each leg's name and state, in the order given.
    pub fn legs(&self) -> Vec<(String, LegState)> {
        self.inner
            .st
            .lock()
            .legs
            .iter()
            .map(|l| {
                let s = match l.status {
                    Status::Active if !l.readable => LegState::Rebuilding,
                    Status::Active => LegState::Active,
                    Status::Leaving(_) => LegState::Leaving,
                    Status::Out => LegState::Out,
                };
                (l.name.clone(), s)
            })
            .collect()
    }

    /// Adds `target` as leg `name`, written and not read, to be caught up
    /// by [`Nexus::copy`] and then [`Nexus::promote`]d. A leg of that name
    /// that was marked out is replaced.
    pub fn join(&self, name: &str, target: Arc<dyn BlockTarget>) -> Result<(), String> {
        let mut st = self.inner.st.lock();
        if let Some(why) = &st.deposed {
            return Err(why.clone());
        }
        let size = self.inner.size.load(Ordering::Acquire);
        if target.size_bytes() < size {
            return Err(format!(
                "the replica on {name} has {} bytes, the volume {size}",
                target.size_bytes()
            ));
        }
        let slot = LegSlot {
            name: name.to_string(),
            target: Some(target),
            status: Status::Active,
            readable: false,
            inflight: HashMap::new(),
            failed: Vec::new(),
            unflushed: VecDeque::new(),
            seq: 0,
            last_answer: Instant::now(),
        };
        match st.legs.iter().position(|l| l.name == name) {
            Some(i) if matches!(st.legs[i].status, Status::Out) => st.legs[i] = slot,
            Some(_) => return Err(format!("{name} is a member already")),
            None => st.legs.push(slot),
        }
        tracing::info!(
            leg = name,
            "a replica joins as a write member to be rebuilt"
        );
        Ok(())
    }

    /// Copies `range` from a readable leg to the joining leg `name` (see
    /// `copy_locked`).
    pub async fn copy(&self, name: &str, range: Range) -> Result<(), String> {
        let i = self.leg_index(name)?;
        match self.inner.copy_locked(i, None, range).await {
            Ok(_) => {
                self.inner
                    .stats
                    .rebuilt_bytes
                    .fetch_add(range.len, Ordering::Relaxed);
                Ok(())
            }
            Err(CopyError::Write(why)) => {
                // It failed a write: it leaves like any failing leg.
                self.inner.leave(i);
                Err(why)
            }
            Err(CopyError::Read(why)) => Err(why),
        }
    }

    /// Flushes leg `name` alone (a rebuild's copy made durable).
    pub async fn flush_leg(&self, name: &str) -> Result<(), String> {
        let i = self.leg_index(name)?;
        match self.inner.leg_call(i, Cmd::Flush).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.inner.leave(i);
                Err(format!(
                    "flushing the replica on {name} failed (NBD error {e})"
                ))
            }
        }
    }

    /// The joining leg `name` is in sync: it is read from now on.
    pub fn promote(&self, name: &str) -> Result<(), String> {
        let i = self.leg_index(name)?;
        self.inner.st.lock().legs[i].readable = true;
        Ok(())
    }

    /// Runs a membership change of this nexus's own (starting or finishing
    /// a rebuild) at its current generation, one at a time with its fault
    /// reports, and adopts the generation `change` returns with its answer.
    pub async fn change_membership<T, F, Fut>(&self, change: F) -> Result<T, String>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<(u64, T), String>>,
    {
        let _one = self.inner.report_lock.lock().await;
        let generation = {
            let st = self.inner.st.lock();
            if let Some(why) = &st.deposed {
                return Err(why.clone());
            }
            st.generation
        };
        let (g, answer) = change(generation).await?;
        let mut st = self.inner.st.lock();
        st.generation = st.generation.max(g);
        Ok(answer)
    }

    /// Reports leg `name` out as if it had failed (a rebuild that cannot go
    /// on); returns once the report is settled.
    pub async fn fail_leg(&self, name: &str) {
        let Ok(i) = self.leg_index(name) else { return };
        self.inner.leave(i);
        let rx = match &self.inner.st.lock().legs[i].status {
            Status::Leaving(rx) => Some(rx.clone()),
            _ => None,
        };
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|v| v.is_some()).await;
        }
    }

    /// Stops using leg `name` without reporting it (the membership retired
    /// it already): nothing more is sent to it; what it has in flight
    /// still completes.
    pub fn drop_leg(&self, name: &str) {
        let target = {
            let mut st = self.inner.st.lock();
            let Some(l) = st.legs.iter_mut().find(|l| l.name == name) else {
                return;
            };
            if matches!(l.status, Status::Out) {
                return;
            }
            l.status = Status::Out;
            l.target.take()
        };
        tracing::info!(leg = name, "a retired replica is no longer written");
        if let Some(t) = target {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), t.close()).await;
            });
        }
    }

    /// Pauses the volume for a snapshot every replica takes at the same
    /// point: new mutations and flushes wait, the ones in flight finish
    /// (and any replica that failed one is reported out first), and every
    /// in-sync leg is flushed. The pause lasts until the guard is dropped.
    pub async fn quiesce(&self) -> Result<Quiesced, String> {
        self.inner.st.lock().paused += 1;
        let guard = Quiesced {
            inner: self.inner.clone(),
        };
        loop {
            let notified = self.inner.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.st.lock().writes.is_empty() {
                break;
            }
            notified.await;
        }
        // Fault reports of legs that failed a write, settled first: the
        // snapshot is then taken on the replicas that have every write.
        let leaving: Vec<watch::Receiver<Option<bool>>> = {
            let st = self.inner.st.lock();
            st.legs
                .iter()
                .filter_map(|l| match &l.status {
                    Status::Leaving(rx) => Some(rx.clone()),
                    _ => None,
                })
                .collect()
        };
        for mut rx in leaving {
            let _ = rx.wait_for(|v| v.is_some()).await;
        }
        if let Some(why) = self.deposed() {
            return Err(why);
        }
        let readable: Vec<usize> = {
            let st = self.inner.st.lock();
            (0..st.legs.len())
                .filter(|&i| {
                    let l = &st.legs[i];
                    l.readable && matches!(l.status, Status::Active)
                })
                .collect()
        };
        for i in readable {
            if let Err(e) = self.inner.leg_call(i, Cmd::Flush).await {
                self.inner.leave(i);
                return Err(format!("a replica failed to flush (NBD error {e})"));
            }
        }
        Ok(guard)
    }

    /// The index of an active leg.
    fn leg_index(&self, name: &str) -> Result<usize, String> {
        let st = self.inner.st.lock();
        match st.legs.iter().position(|l| l.name == name) {
            Some(i) if matches!(st.legs[i].status, Status::Active) => Ok(i),
            Some(_) => Err(format!("the replica on {name} left the set")),
            None => Err(format!("no replica on {name}")),
        }
    }

    /// Why the nexus stopped serving, if it did.
    pub fn deposed(&self) -> Option<String> {
        self.inner.st.lock().deposed.clone()
    }
}

impl Inner {
    /// Registers `cmd` for leg `i`; `done` gets its outcome, or EIO if the
    /// leg fails first. The caller submits it once the state is unlocked (a
    /// session whose task has ended completes inside `submit`). None if the
    /// leg has no session any more.
    fn register(
        self: &Arc<Self>,
        st: &mut State,
        i: usize,
        cmd: Cmd,
        done: SlotDone,
    ) -> Option<Submission> {
        let t = st.legs[i].target.clone()?;
        let id = st.next_id;
        st.next_id += 1;
        let range = range_of(&cmd);
        let l = &mut st.legs[i];
        let flush_covers = (cmd == Cmd::Flush).then_some(l.seq);
        l.inflight.insert(
            id,
            Sent {
                at: Instant::now(),
                range,
                flush_covers,
                done,
            },
        );
        let me = Arc::downgrade(self);
        Some(Submission {
            target: t,
            cmd,
            done: Box::new(move |r| {
                if let Some(me) = me.upgrade() {
                    let sent = {
                        let mut st = me.st.lock();
                        let l = &mut st.legs[i];
                        let sent = l.inflight.remove(&id);
                        if let Some(s) = &sent {
                            l.answered(s, &r);
                        }
                        sent
                    };
                    if let Some(s) = sent {
                        (s.done)(r);
                    }
                }
            }),
        })
    }

    fn submit(self: &Arc<Self>, cmd: Cmd, done: Done) {
        let mut st = self.st.lock();
        if st.deposed.is_some() {
            drop(st);
            done(Err(EIO));
            return;
        }
        if let Cmd::Read { offset, len } = cmd {
            drop(st);
            self.read(offset, len, 0, None, done);
            return;
        }
        if st.paused > 0 {
            st.parked.push_back((cmd, done));
            return;
        }
        if let Some(r) = range_of(&cmd) {
            if st.repairs.iter().any(|x| x.overlaps(&r)) {
                st.parked.push_back((cmd, done));
                return;
            }
        }
        self.fan_out(st, cmd, done);
    }

    /// Sends a mutation or flush to every active leg.
    fn fan_out(self: &Arc<Self>, mut st: parking_lot::MutexGuard<'_, State>, cmd: Cmd, done: Done) {
        let id = st.next_id;
        st.next_id += 1;
        let range = range_of(&cmd);
        let mut targets = Vec::new();
        let mut wait_for = Vec::new();
        for (i, l) in st.legs.iter_mut().enumerate() {
            match l.status {
                Status::Active if l.target.is_some() => targets.push(i),
                Status::Leaving(_) => {
                    // It misses this one: pending for its rebuild.
                    if let Some(r) = range {
                        l.failed.push(r);
                    }
                    wait_for.push(i)
                }
                _ => {}
            }
        }
        if targets.is_empty() {
            drop(st);
            done(Err(EIO));
            return;
        }
        if let Some(r) = range {
            st.writes.insert(id, r);
        }
        let fan = Arc::new(Fan {
            id,
            range,
            m: Mutex::new(FanState {
                remaining: targets.len(),
                ok: 0,
                wait_for,
                failed_on: Vec::new(),
                request_error: None,
                fenced: false,
                done: Some(done),
            }),
        });

        let mut go = Vec::with_capacity(targets.len());
        for i in targets {
            let (me, f) = (Arc::downgrade(self), fan.clone());
            let done: SlotDone = Box::new(move |r| {
                if let Some(me) = me.upgrade() {
                    me.leg_done(&f, i, r.err());
                }
            });
            go.extend(self.register(&mut st, i, cmd.clone(), done));
        }
        drop(st);
        for s in go {
            s.go();
        }
    }

    /// One leg's outcome for a fanned-out request (its bookkeeping on the
    /// leg is done: `LegSlot::answered`).
    fn leg_done(self: &Arc<Self>, fan: &Arc<Fan>, leg: usize, err: Option<u32>) {
        let finished = {
            let mut f = fan.m.lock();
            f.remaining -= 1;
            match err {
                None => f.ok += 1,
                Some(ESHUTDOWN) => f.fenced = true,
                Some(e) if request_error(e) => f.request_error = Some(e),
                Some(_) => f.failed_on.push(leg),
            }
            f.remaining == 0
        };
        if finished {
            self.finish(fan);
        }
    }

    fn finish(self: &Arc<Self>, fan: &Arc<Fan>) {
        let (ok, failed_on, mut wait_for, request_error, fenced, done) = {
            let mut f = fan.m.lock();
            (
                f.ok,
                std::mem::take(&mut f.failed_on),
                std::mem::take(&mut f.wait_for),
                f.request_error,
                f.fenced,
                f.done.take(),
            )
        };
        if fan.range.is_some() {
            self.st.lock().writes.remove(&fan.id);
            self.drained.notify_waiters();
        }
        let Some(done) = done else { return };
        if fenced {
            self.depose(FENCED);
            done(Err(EIO));
            return;
        }
        if ok == 0 {
            // Nobody has it: an error, and nobody is reported (the set
            // must keep someone).
            done(Err(request_error.unwrap_or(EIO)));
            return;
        }
        for &leg in &failed_on {
            self.leave(leg);
        }
        wait_for.extend(failed_on);
        let outcome = request_error.map_or(Ok(Vec::new()), Err);
        let waits: Vec<watch::Receiver<Option<bool>>> = {
            let st = self.st.lock();
            wait_for
                .iter()
                .filter_map(|&i| match &st.legs[i].status {
                    Status::Leaving(rx) => Some(rx.clone()),
                    _ => None,
                })
                .collect()
        };
        if waits.is_empty() {
            done(if self.st.lock().deposed.is_some() {
                Err(EIO)
            } else {
                outcome
            });
            return;
        }
        let hold = self.opts.hold_timeout;
        tokio::spawn(async move {
            let mut out = outcome;
            let until = tokio::time::Instant::now() + hold;
            for mut rx in waits {
                let marked = match tokio::time::timeout_at(until, rx.wait_for(|v| v.is_some()))
                    .await
                {
                    Ok(Ok(v)) => *v == Some(true),
                    Ok(Err(_)) => false,
                    Err(_) => {
                        tracing::error!(waited = ?hold, "a failed replica could not be reported out in time: the request fails");
                        false
                    }
                };
                if !marked {
                    out = Err(EIO);
                }
            }
            done(out);
        });
    }

    fn depose(&self, why: &str) {
        let mut st = self.st.lock();
        if st.deposed.is_none() {
            tracing::error!(reason = why, "the nexus stops serving");
            st.deposed = Some(why.to_string());
        }
    }

    /// Starts leg `i`'s fault report (once) and fails what it has in flight.
    fn leave(self: &Arc<Self>, i: usize) {
        let (orphans, tx, name) = {
            let mut st = self.st.lock();
            let l = &mut st.legs[i];
            if !matches!(l.status, Status::Active) {
                return;
            }
            let (tx, rx) = watch::channel(None);
            l.status = Status::Leaving(rx);
            let orphans: Vec<Sent> = l.inflight.drain().map(|(_, s)| s).collect();
            for s in &orphans {
                if let Some(r) = s.range {
                    l.failed.push(r);
                }
            }
            (orphans, tx, l.name.clone())
        };
        tracing::warn!(leg = %name, failed_in_flight = orphans.len(), "a replica failed: reporting it out");
        for s in orphans {
            (s.done)(Err(EIO));
        }
        let me = self.clone();
        tokio::spawn(async move { me.report(i, name, tx).await });
    }

    async fn report(self: Arc<Self>, i: usize, name: String, tx: watch::Sender<Option<bool>>) {
        let _one = self.report_lock.lock().await;
        let mut wait = self.opts.report_retry;
        loop {
            let (generation, pending, mut sent) = {
                let st = self.st.lock();
                if let Some(why) = &st.deposed {
                    tracing::warn!(leg = %name, reason = %why, "deposed: the fault is not reported");
                    let _ = tx.send(Some(false));
                    return;
                }
                let l = &st.legs[i];
                let mut p: Vec<Range> = l.failed.clone();
                p.extend(l.unflushed.iter().map(|(_, r)| *r));
                (st.generation, coalesce(p), l.failed.len())
            };
            let mut answer = self.membership.fault(&name, generation, pending).await;
            // Mutations that skipped the leg while the report was on its way
            // may have reached the others before they recorded changes: the
            // same report again (it gets the same answer) adds them.
            while answer.is_ok() {
                let extra: Vec<Range> = {
                    let st = self.st.lock();
                    st.legs[i].failed.get(sent..).unwrap_or_default().to_vec()
                };
                if extra.is_empty() {
                    break;
                }
                sent += extra.len();
                answer = self
                    .membership
                    .fault(&name, generation, coalesce(extra))
                    .await;
            }
            match answer {
                Ok(g) => {
                    let target = {
                        let mut st = self.st.lock();
                        st.generation = st.generation.max(g);
                        let l = &mut st.legs[i];
                        l.status = Status::Out;
                        l.unflushed.clear();
                        l.failed.clear();
                        l.target.take()
                    };
                    self.stats.faults.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(leg = %name, generation = g, "replica marked out; the set goes on without it");
                    let _ = tx.send(Some(true));
                    // Its session ends in the background: it may be waiting
                    // for a server that does not answer.
                    if let Some(t) = target {
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(Duration::from_secs(5), t.close()).await;
                        });
                    }
                    return;
                }
                Err(FaultError::Deposed(why)) => {
                    self.depose(&format!("the fault report for {name} was refused: {why}"));
                    let _ = tx.send(Some(false));
                    return;
                }
                Err(FaultError::Unavailable(why)) => {
                    tracing::warn!(leg = %name, error = %why, retry_in = ?wait, "cannot report a failed replica yet; writes wait");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Reads from the `from`-th active leg on; `bad` is a leg that failed it.
    fn read(self: &Arc<Self>, offset: u64, len: u32, from: usize, bad: Option<usize>, done: Done) {
        let mut st = self.st.lock();
        let next = (from..st.legs.len()).find(|&i| {
            let l = &st.legs[i];
            matches!(l.status, Status::Active) && l.readable && l.target.is_some()
        });
        let Some(i) = next else {
            drop(st);
            done(Err(EIO));
            return;
        };
        let me = Arc::downgrade(self);
        let sub = self.register(
            &mut st,
            i,
            Cmd::Read { offset, len },
            Box::new(move |r| {
                let Some(me) = me.upgrade() else {
                    done(Err(EIO));
                    return;
                };
                match r {
                    Ok(data) => {
                        if let Some(b) = bad {
                            me.stats.read_retries.fetch_add(1, Ordering::Relaxed);
                            let m = me.clone();
                            tokio::spawn(async move { m.repair(b, i, offset, len).await });
                        }
                        done(Ok(data));
                    }
                    Err(e) if request_error(e) => done(Err(e)),
                    Err(ESHUTDOWN) => {
                        me.depose(FENCED);
                        done(Err(EIO));
                    }
                    Err(e) => {
                        tracing::warn!(
                            leg = i,
                            offset,
                            len,
                            error = e,
                            "a read failed; trying another replica"
                        );
                        me.read(offset, len, i + 1, bad.or(Some(i)), done);
                    }
                }
            }),
        );
        drop(st);
        if let Some(s) = sub {
            s.go();
        }
    }

    /// Rewrites `[offset, offset+len)` on leg `bad` with leg `good`'s data.
    async fn repair(self: Arc<Self>, bad: usize, good: usize, offset: u64, len: u32) {
        let range = Range {
            offset,
            len: u64::from(len),
        };
        let repaired = self.copy_locked(bad, Some(good), range).await;
        let name = self.st.lock().legs[bad].name.clone();
        match repaired {
            Ok(from) => {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(leg = %name, from = %from, offset, len, "repaired a range that failed to read, from another replica");
                self.membership.repaired(&name, range, &from);
            }
            Err(CopyError::Write(why)) => {
                self.stats.repairs_abandoned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(leg = %name, offset, len, reason = %why, "a repair was abandoned");
                // A failed rewrite is pending on the leg already (its answer).
                self.leave(bad);
            }
            Err(CopyError::Read(why)) => {
                self.stats.repairs_abandoned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(leg = %name, offset, len, reason = %why, "a repair was abandoned");
            }
        }
    }

    /// Copies `range` to leg `dst` from a readable leg (`prefer` first)
    /// under a range lock: client mutations of the range wait, the ones
    /// already sent finish first, and the data is read under the lock, so
    /// the copy never puts back older data than a write that raced it.
    /// Zeros are written as write-zeroes (a thin copy stays thin). Returns
    /// the name of the leg the data came from.
    async fn copy_locked(
        self: &Arc<Self>,
        dst: usize,
        prefer: Option<usize>,
        range: Range,
    ) -> Result<String, CopyError> {
        self.st.lock().repairs.push(range);
        // Released however this ends (a caller that drops the copy too).
        let _lock = RangeLock { inner: self, range };
        // The client writes to the range already sent finish first.
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.st.lock().writes.values().any(|w| w.overlaps(&range)) {
                break;
            }
            notified.await;
        }
        let copied = async {
            let sources: Vec<usize> = {
                let st = self.st.lock();
                let mut v: Vec<usize> = (0..st.legs.len())
                    .filter(|&i| i != dst && st.legs[i].readable)
                    .collect();
                if let Some(p) = prefer {
                    v.sort_by_key(|&i| i != p);
                }
                v
            };
            let len =
                u32::try_from(range.len).map_err(|_| CopyError::Read("range too long".into()))?;
            let mut last = String::from("no replica to read from");
            for src in sources {
                let data = match self
                    .leg_call(
                        src,
                        Cmd::Read {
                            offset: range.offset,
                            len,
                        },
                    )
                    .await
                {
                    Ok(d) => d,
                    Err(e) => {
                        last = format!("reading it failed (NBD error {e})");
                        continue;
                    }
                };
                let cmd = if data.iter().all(|&b| b == 0) {
                    Cmd::WriteZeroes {
                        offset: range.offset,
                        len,
                    }
                } else {
                    Cmd::Write {
                        offset: range.offset,
                        data: Bytes::from(data),
                    }
                };
                self.leg_call(dst, cmd)
                    .await
                    .map_err(|e| CopyError::Write(format!("the rewrite failed (NBD error {e})")))?;
                return Ok(self.st.lock().legs[src].name.clone());
            }
            Err(CopyError::Read(format!(
                "the good replica failed too: {last}"
            )))
        }
        .await;
        copied
    }

    /// One request to one leg, outside the client's bookkeeping.
    async fn leg_call(self: &Arc<Self>, i: usize, cmd: Cmd) -> Outcome {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sub = {
            let mut st = self.st.lock();
            if !matches!(st.legs[i].status, Status::Active) {
                return Err(EIO);
            }
            self.register(
                &mut st,
                i,
                cmd,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
        };
        let Some(sub) = sub else { return Err(EIO) };
        sub.go();
        rx.await.unwrap_or(Err(EIO))
    }
}

/// A pause of the nexus ([`Nexus::quiesce`]); dropping it lets the parked
/// requests go.
pub struct Quiesced {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Quiesced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Quiesced")
    }
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        let parked = {
            let mut st = self.inner.st.lock();
            st.paused -= 1;
            if st.paused > 0 {
                return;
            }
            std::mem::take(&mut st.parked)
        };
        for (cmd, done) in parked {
            self.inner.submit(cmd, done);
        }
    }
}

/// A range being copied: client mutations of it wait until this is dropped,
/// and then go.
struct RangeLock<'a> {
    inner: &'a Arc<Inner>,
    range: Range,
}

impl Drop for RangeLock<'_> {
    fn drop(&mut self) {
        let parked = {
            let mut st = self.inner.st.lock();
            if let Some(p) = st.repairs.iter().position(|r| *r == self.range) {
                st.repairs.swap_remove(p);
            }
            std::mem::take(&mut st.parked)
        };
        for (cmd, done) in parked {
            self.inner.submit(cmd, done);
        }
    }
}

/// Why a copy to a leg failed: reading it from every other leg, or
/// writing it to the leg.
enum CopyError {
    Read(String),
    Write(String),
}

/// A request registered for a leg, to be submitted with the state unlocked.
struct Submission {
    target: Arc<dyn BlockTarget>,
    cmd: Cmd,
    done: Done,
}

impl Submission {
    fn go(self) {
        self.target.submit(self.cmd, self.done)
    }
}

/// Sorted, merged ranges.
fn coalesce(mut v: Vec<Range>) -> Vec<Range> {
    v.sort_by_key(|r| r.offset);
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.offset <= last.end() => {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

/// Fails legs that have had requests outstanding, and answered nothing, for
/// the leg timeout.
async fn watchdog(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.opts.leg_timeout / 4).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(me) = inner.upgrade() else { return };
        let late: Vec<usize> = {
            let st = me.st.lock();
            let now = Instant::now();
            st.legs
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    let Some(oldest) = l.inflight.values().map(|s| s.at).min() else {
                        return false;
                    };
                    matches!(l.status, Status::Active)
                        && now.duration_since(oldest.max(l.last_answer)) > me.opts.leg_timeout
                })
                .map(|(i, _)| i)
                .collect()
        };
        for i in late {
            let name = me.st.lock().legs[i].name.clone();
            tracing::warn!(leg = %name, timeout = ?me.opts.leg_timeout, "a replica stopped answering");
            me.leave(i);
        }
    }
}

impl BlockTarget for Nexus {
    fn size_bytes(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    fn flags(&self) -> u16 {
        self.inner.flags
    }

    fn submit(&self, cmd: Cmd, done: Done) {
        self.inner.submit(cmd, done)
    }

    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let targets: Vec<Arc<dyn BlockTarget>> = {
                let st = self.inner.st.lock();
                st.legs
                    .iter()
                    .filter(|l| matches!(l.status, Status::Active))
                    .filter_map(|l| l.target.clone())
                    .collect()
            };
            let mut size = u64::MAX;
            for t in targets {
                size = size.min(t.refresh_size().await?);
            }
            if size == u64::MAX {
                return Err("no replica is active".into());
            }
            self.inner.size.store(size, Ordering::Release);
            Ok(size)
        })
    }

    fn close(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            let flushed = if self.read_only() {
                Ok(Vec::new())
            } else {
                call(self, Cmd::Flush).await
            };
            let targets: Vec<Arc<dyn BlockTarget>> = {
                let mut st = self.inner.st.lock();
                st.legs.iter_mut().filter_map(|l| l.target.take()).collect()
            };
            for t in targets {
                let _ = t.close().await;
            }
            flushed
        })
    }
}
