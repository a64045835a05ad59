//! A fault-injecting engine: wraps a real engine and, for the operations a
//! [`FaultPlan`] picks, fails them with an errno, reports a short transfer,
//! or holds their completion back for a while. Tests arm and disarm faults on
//! a live store; `BERTH_FAULTS` arms them in a running volume server.
//!
//! What each fault means for the data:
//! - [`Effect::Error`]: the operation never reaches the disk (a failed write
//!   writes nothing); its completion carries the errno.
//! - [`Effect::Short`]: the operation runs, but its completion reports only
//!   the given number of bytes, the way a device that stopped partway would.
//!   The caller cannot know how much landed and must treat it as failed.
//! - [`Effect::Delay`]: the operation runs; its completion is handed back only
//!   after the delay (other operations complete meanwhile).
//! - [`Effect::Panic`]: the thread submitting the operation panics: a drill
//!   for the rule that a data-path thread that dies takes the process with it.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::engine::{IoCompletion, IoEngine, IoOp, OpKind, Waker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Fail with this errno (`libc::EIO`, `libc::ENOSPC`...).
    Error(i32),
    /// Report this many bytes transferred (less than asked).
    Short(usize),
    Delay(Duration),
    /// Panic on the submitting (I/O) thread.
    Panic,
}

/// Which operations a fault applies to, and how many times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `None`: reads, writes and syncs alike.
    pub kind: Option<OpKind>,
    /// File byte offsets `[start, end)` an operation must overlap. A sync
    /// covers the whole file: only a fault without a range (or one for syncs
    /// alone) picks it.
    pub range: std::ops::Range<u64>,
    pub effect: Effect,
    /// Operations still to hit (`None`: every matching one until disarmed).
    pub remaining: Option<u64>,
}

impl Fault {
    pub fn new(kind: Option<OpKind>, effect: Effect) -> Self {
        Fault {
            kind,
            range: 0..u64::MAX,
            effect,
            remaining: None,
        }
    }

    pub fn times(mut self, n: u64) -> Self {
        self.remaining = Some(n);
        self
    }

    pub fn within(mut self, range: std::ops::Range<u64>) -> Self {
        self.range = range;
        self
    }

    fn matches(&self, op: &IoOp) -> bool {
        if self.kind.is_some_and(|k| k != op.kind) || self.remaining == Some(0) {
            return false;
        }
        if op.kind == OpKind::DataSync {
            return self.kind == Some(OpKind::DataSync) || self.range == (0..u64::MAX);
        }
        let len = op.buf.as_ref().map_or(0, |b| b.len() as u64);
        op.offset < self.range.end && op.offset + len.max(1) > self.range.start
    }

    /// Parses `kind:effect[:count][@start-end]`, for example `write:eio`,
    /// `read:short=512:3`, `sync:enospc`, `any:delay=50ms:10@0-1048576`.
    pub fn parse(s: &str) -> Result<Fault, String> {
        let (spec, range) = match s.split_once('@') {
            Some((a, r)) => {
                let (lo, hi) = r
                    .split_once('-')
                    .ok_or_else(|| format!("{s:?}: range must be START-END"))?;
                let n = |x: &str| {
                    x.parse::<u64>()
                        .map_err(|_| format!("{s:?}: {x:?} is not a byte offset"))
                };
                (a, n(lo)?..n(hi)?)
            }
            None => (s, 0..u64::MAX),
        };
        let mut parts = spec.split(':');
        let kind = match parts.next() {
            Some("read") => Some(OpKind::Read),
            Some("write") => Some(OpKind::Write),
            Some("sync") => Some(OpKind::DataSync),
            Some("any") => None,
            other => {
                return Err(format!(
                    "{s:?}: kind {other:?} is not read, write, sync or any"
                ))
            }
        };
        let effect = match parts.next().map(|e| e.split_once('=').unwrap_or((e, ""))) {
            Some(("eio", "")) => Effect::Error(libc::EIO),
            Some(("enospc", "")) => Effect::Error(libc::ENOSPC),
            Some(("panic", "")) => Effect::Panic,
            Some(("short", n)) => Effect::Short(
                n.parse()
                    .map_err(|_| format!("{s:?}: short=BYTES needs a byte count"))?,
            ),
            Some(("delay", d)) => {
                let ms = d
                    .strip_suffix("ms")
                    .and_then(|m| m.parse::<u64>().ok())
                    .ok_or_else(|| format!("{s:?}: delay=Nms needs milliseconds"))?;
                Effect::Delay(Duration::from_millis(ms))
            }
            other => {
                return Err(format!(
                    "{s:?}: effect {other:?} is not eio, enospc, short=N, delay=Nms or panic"
                ))
            }
        };
        let remaining = match parts.next() {
            Some(n) => Some(
                n.parse()
                    .map_err(|_| format!("{s:?}: count {n:?} is not a number"))?,
            ),
            None => None,
        };
        if parts.next().is_some() {
            return Err(format!("{s:?}: too many fields"));
        }
        Ok(Fault {
            kind,
            range,
            effect,
            remaining,
        })
    }
}

/// The faults armed on an engine; shared, so they change while it runs.
#[derive(Debug, Default)]
pub struct FaultPlan {
    faults: Mutex<Vec<Fault>>,
    injected: std::sync::atomic::AtomicU64,
}

impl FaultPlan {
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// Reads `BERTH_FAULTS` (faults separated by commas); unset: none.
    pub fn from_env() -> Result<Option<Arc<FaultPlan>>, String> {
        match std::env::var("BERTH_FAULTS") {
            Err(_) => Ok(None),
            Ok(s) if s.trim().is_empty() => Ok(None),
            Ok(s) => {
                let plan = FaultPlan::new();
                for f in s.split(',') {
                    plan.arm(Fault::parse(f.trim())?);
                }
                Ok(Some(plan))
            }
        }
    }

    pub fn arm(&self, f: Fault) {
        self.faults.lock().push(f);
    }

    pub fn disarm_all(&self) {
        self.faults.lock().clear();
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The effect for `op`, if a fault picks it (and counts it).
    fn pick(&self, op: &IoOp) -> Option<Effect> {
        let mut faults = self.faults.lock();
        let f = faults.iter_mut().find(|f| f.matches(op))?;
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
        }
        self.injected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(f.effect)
    }
}

/// What to do with an operation's completion when it comes back.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Short(usize),
    Delay(Duration),
}

pub struct FaultEngine {
    inner: Box<dyn IoEngine>,
    plan: Arc<FaultPlan>,
    /// Completions made up here (failed operations), handed out first.
    made: VecDeque<IoCompletion>,
    /// Operations passed on with a fault to apply to their completion, by
    /// `user_data` (tags are unique among operations in flight).
    altered: std::collections::HashMap<u64, Pending>,
    /// Delayed completions and when they may go.
    held: Vec<(Instant, IoCompletion)>,
    /// The inner engine's completions of one call (kept for its capacity).
    got: Vec<IoCompletion>,
}

impl std::fmt::Debug for FaultEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultEngine")
            .field("inner", &self.inner.name())
            .field("made", &self.made.len())
            .field("held", &self.held.len())
            .finish()
    }
}

impl FaultEngine {
    pub fn new(inner: Box<dyn IoEngine>, plan: Arc<FaultPlan>) -> Self {
        FaultEngine {
            inner,
            plan,
            made: VecDeque::new(),
            altered: std::collections::HashMap::new(),
            held: Vec::new(),
            got: Vec::new(),
        }
    }

    /// Moves ready completions (made up, then delayed ones whose time came) to `out`.
    fn release(&mut self, max: usize, out: &mut Vec<IoCompletion>, before: usize) {
        while out.len() - before < max {
            let Some(c) = self.made.pop_front() else {
                break;
            };
            out.push(c);
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() && out.len() - before < max {
            if self.held[i].0 <= now {
                out.push(self.held.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
    }
}

impl IoEngine for FaultEngine {
    fn push(&mut self, op: IoOp) {
        match self.plan.pick(&op) {
            Some(Effect::Error(errno)) => self.made.push_back(IoCompletion {
                user_data: op.user_data,
                result: Err(io::Error::from_raw_os_error(errno)),
                buf: op.buf,
            }),
            Some(Effect::Short(n)) => {
                self.altered.insert(op.user_data, Pending::Short(n));
                self.inner.push(op);
            }
            Some(Effect::Delay(d)) => {
                self.altered.insert(op.user_data, Pending::Delay(d));
                self.inner.push(op);
            }
            Some(Effect::Panic) => {
                panic!("injected fault: panic on a {:?} at {}", op.kind, op.offset)
            }
            None => self.inner.push(op),
        }
    }

    fn submit_and_wait(
        &mut self,
        wait: bool,
        max: usize,
        out: &mut Vec<IoCompletion>,
    ) -> io::Result<()> {
        let before = out.len();
        self.release(max, out, before);
        // Sleep only if nothing is ready here; a held completion's deadline
        // wakes the inner engine (see below).
        let wait = wait && out.len() == before;
        let mut got = std::mem::take(&mut self.got);
        self.inner.submit_and_wait(wait, max, &mut got)?;
        for mut c in got.drain(..) {
            match self.altered.remove(&c.user_data) {
                Some(Pending::Short(n)) => {
                    if let Ok(done) = c.result {
                        c.result = Ok(n.min(done.saturating_sub(1)));
                    }
                    self.made.push_back(c);
                }
                Some(Pending::Delay(d)) => {
                    let waker = self.inner.waker();
                    std::thread::spawn(move || {
                        std::thread::sleep(d);
                        waker.wake();
                    });
                    self.held.push((Instant::now() + d, c));
                }
                None => self.made.push_back(c),
            }
        }
        self.got = got;
        self.release(max, out, before);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.made.len() + self.held.len()
    }

    fn has_completions(&mut self) -> bool {
        !self.made.is_empty()
            || self.held.iter().any(|(t, _)| *t <= Instant::now())
            || self.inner.has_completions()
    }

    fn waker(&self) -> Waker {
        self.inner.waker()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn registered_bytes(&self) -> usize {
        self.inner.registered_bytes()
    }

    fn read_depth(&self) -> Option<crate::engine::ReadDepthStats> {
        self.inner.read_depth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_and_bad_ones_say_why() {
        assert_eq!(
            Fault::parse("write:eio").expect("parse"),
            Fault::new(Some(OpKind::Write), Effect::Error(libc::EIO))
        );
        assert_eq!(
            Fault::parse("read:short=512:3@4096-8192").expect("parse"),
            Fault::new(Some(OpKind::Read), Effect::Short(512))
                .times(3)
                .within(4096..8192)
        );
        assert_eq!(
            Fault::parse("any:delay=20ms").expect("parse"),
            Fault::new(None, Effect::Delay(Duration::from_millis(20)))
        );
        assert_eq!(
            Fault::parse("read:panic:1").expect("parse"),
            Fault::new(Some(OpKind::Read), Effect::Panic).times(1)
        );
        assert_eq!(
            Fault::parse("sync:enospc:1").expect("parse"),
            Fault::new(Some(OpKind::DataSync), Effect::Error(libc::ENOSPC)).times(1)
        );
        for bad in [
            "",
            "erase:eio",
            "write",
            "write:boom",
            "write:short",
            "write:short=x",
            "read:delay=5",
            "read:eio:x",
            "read:eio:1:2",
            "read:eio@5",
            "read:eio@a-b",
        ] {
            let e = Fault::parse(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
