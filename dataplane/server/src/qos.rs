//! Quality of service, enforced in the data path.
//!
//! - **Tiers** (`standard`, `premium`, `extreme`) give a volume its limits: a base
//!   plus a per-GiB share of IOPS and bytes per second, capped, and a priority.
//!   Explicit overrides replace what the tier computes.
//! - **Token buckets** per volume (one for operations, one for bytes), shared by
//!   all of the volume's connections, refilled continuously; a full bucket holds
//!   `burst_seconds` of the limit. A request waits (asynchronously, holding up
//!   only its own connection) until both buckets can pay for it. Limits change
//!   live.
//! - **Priority between tiers** ([`PoolGate`]): while a higher-priority volume
//!   has I/O in flight or had some in the last [`RECENT`], lower tiers may keep
//!   only a few requests in flight at the pool, so the device queue stays short
//!   for the higher tier. Alone, any tier may use the whole pool
//!   (work-conserving).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const GIB: f64 = (1u64 << 30) as f64;
const MB: u64 = 1_000_000;

/// Number of priority levels: 0 (served first) to 2.
pub const PRIORITIES: usize = 3;
/// How long a priority level counts as active after its last request.
pub const RECENT: Duration = Duration::from_millis(50);
/// Requests a lower priority may keep in flight while a higher one is active.
const YIELD_INFLIGHT: [u32; PRIORITIES] = [u32::MAX, 8, 2];

/// A tier's policy; `*_cap` bounds the scaled value, 0 = unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierPolicy {
    pub name: String,
    pub iops_base: u64,
    pub iops_per_gib: u64,
    pub iops_cap: u64,
    pub bytes_per_second_base: u64,
    pub bytes_per_second_per_gib: u64,
    pub bytes_per_second_cap: u64,
    pub burst_seconds: f64,
    pub priority: u32,
}

/// The built-in tiers. `extreme` is unlimited and served first.
pub fn default_tiers() -> Vec<TierPolicy> {
    vec![
        TierPolicy {
            name: "standard".into(),
            iops_base: 3_000,
            iops_per_gib: 10,
            iops_cap: 16_000,
            bytes_per_second_base: 125 * MB,
            bytes_per_second_per_gib: MB / 4,
            bytes_per_second_cap: 500 * MB,
            burst_seconds: 1.0,
            priority: 2,
        },
        TierPolicy {
            name: "premium".into(),
            iops_base: 10_000,
            iops_per_gib: 50,
            iops_cap: 80_000,
            bytes_per_second_base: 250 * MB,
            bytes_per_second_per_gib: MB,
            bytes_per_second_cap: 2_000 * MB,
            burst_seconds: 1.0,
            priority: 1,
        },
        TierPolicy {
            name: "extreme".into(),
            iops_base: 0,
            iops_per_gib: 0,
            iops_cap: 0,
            bytes_per_second_base: 0,
            bytes_per_second_per_gib: 0,
            bytes_per_second_cap: 0,
            burst_seconds: 1.0,
            priority: 0,
        },
    ]
}

pub const TIER_NAMES: &str = "standard, premium, extreme";

/// Explicit limits that replace the tier's; `None` keeps the tier's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    pub iops_limit: Option<u64>,
    pub bytes_per_second_limit: Option<u64>,
    pub burst_seconds: Option<f64>,
}

/// What a volume runs under; a limit of 0 means none.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub tier: String,
    pub iops_limit: u64,
    pub bytes_per_second_limit: u64,
    pub burst_seconds: f64,
    pub priority: u32,
}

fn scaled(base: u64, per_gib: u64, cap: u64, size_bytes: u64) -> u64 {
    if base == 0 && per_gib == 0 {
        return 0;
    }
    let v = base.saturating_add((per_gib as f64 * size_bytes as f64 / GIB) as u64);
    if cap == 0 {
        v
    } else {
        v.min(cap)
    }
}

impl TierPolicy {
    pub fn limits(&self, size_bytes: u64, o: &Overrides) -> Limits {
        Limits {
            tier: self.name.clone(),
            iops_limit: o.iops_limit.unwrap_or_else(|| {
                scaled(self.iops_base, self.iops_per_gib, self.iops_cap, size_bytes)
            }),
            bytes_per_second_limit: o.bytes_per_second_limit.unwrap_or_else(|| {
                scaled(
                    self.bytes_per_second_base,
                    self.bytes_per_second_per_gib,
                    self.bytes_per_second_cap,
                    size_bytes,
                )
            }),
            burst_seconds: o.burst_seconds.unwrap_or(self.burst_seconds),
            priority: self.priority.min(PRIORITIES as u32 - 1),
        }
    }
}

/// Checks overrides a person gave.
pub fn validate_overrides(o: &Overrides) -> Result<(), String> {
    if let Some(b) = o.burst_seconds {
        if !(0.001..=3600.0).contains(&b) {
            return Err(format!("burst_seconds {b} must be between 0.001 and 3600"));
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, burst_seconds: f64) -> Self {
        let capacity = (rate as f64 * burst_seconds).max(1.0);
        Bucket {
            rate: rate as f64,
            capacity,
            tokens: capacity,
        }
    }

    fn refill(&mut self, elapsed: f64) {
        self.tokens = (self.tokens + self.rate * elapsed).min(self.capacity);
    }

    /// Seconds until `n` tokens are there (0 if they are). A request larger than
    /// the bucket waits until the bucket is full, then drives it negative, so big
    /// requests still go through at the configured rate.
    fn wait_for(&self, n: f64) -> f64 {
        let need = n.min(self.capacity);
        if self.tokens >= need {
            0.0
        } else {
            (need - self.tokens) / self.rate
        }
    }
}

#[derive(Debug)]
struct BucketState {
    // tokio's clock: the real one in production, a controllable one in tests.
    last: tokio::time::Instant,
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
}

/// One volume's limiter, shared by its connections.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<BucketState>,
    limits: Mutex<Limits>,
    unlimited: std::sync::atomic::AtomicBool,
    priority: AtomicU32,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        let l = Limiter {
            state: Mutex::new(BucketState {
                last: tokio::time::Instant::now(),
                ops: None,
                bytes: None,
            }),
            limits: Mutex::new(limits.clone()),
            unlimited: true.into(),
            priority: AtomicU32::new(0),
        };
        l.set(limits);
        l
    }

    /// Changes the limits live; the buckets start full at the new size.
    pub fn set(&self, limits: Limits) {
        let mut st = self.state.lock();
        st.ops =
            (limits.iops_limit > 0).then(|| Bucket::new(limits.iops_limit, limits.burst_seconds));
        st.bytes = (limits.bytes_per_second_limit > 0)
            .then(|| Bucket::new(limits.bytes_per_second_limit, limits.burst_seconds));
        st.last = tokio::time::Instant::now();
        self.unlimited
            .store(st.ops.is_none() && st.bytes.is_none(), Ordering::Relaxed);
        self.priority.store(limits.priority, Ordering::Relaxed);
        *self.limits.lock() = limits;
    }

    pub fn limits(&self) -> Limits {
        self.limits.lock().clone()
    }

    pub fn priority(&self) -> usize {
        self.priority.load(Ordering::Relaxed) as usize
    }

    /// Takes one operation and `bytes` from the buckets, waiting as needed;
    /// returns how long it waited, in microseconds.
    pub async fn admit(&self, bytes: u64) -> u64 {
        if self.unlimited.load(Ordering::Relaxed) {
            return 0;
        }
        let started = tokio::time::Instant::now();
        loop {
            let wait = {
                let mut st = self.state.lock();
                let now = tokio::time::Instant::now();
                let elapsed = now.duration_since(st.last).as_secs_f64();
                st.last = now;
                let mut wait: f64 = 0.0;
                if let Some(b) = st.ops.as_mut() {
                    b.refill(elapsed);
                    wait = wait.max(b.wait_for(1.0));
                }
                if let Some(b) = st.bytes.as_mut() {
                    b.refill(elapsed);
                    wait = wait.max(b.wait_for(bytes as f64));
                }
                if wait <= 0.0 {
                    if let Some(b) = st.ops.as_mut() {
                        b.tokens -= 1.0;
                    }
                    if let Some(b) = st.bytes.as_mut() {
                        b.tokens -= bytes as f64;
                    }
                }
                wait
            };
            if wait <= 0.0 {
                break;
            }
            // At least 1 ms: a tiny float deficit must not become a busy loop.
            tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.001, 0.1))).await;
        }
        started.elapsed().as_micros() as u64
    }
}

/// Priority between tiers at the pool (see the module doc).
#[derive(Debug)]
pub struct PoolGate {
    inflight: [AtomicU32; PRIORITIES],
    /// Nanoseconds since `epoch` of each level's last admission.
    last_active: [AtomicU64; PRIORITIES],
    epoch: Instant,
    changed: Notify,
    /// Requests waiting in `enter`: exits notify only when someone waits.
    waiting: AtomicU32,
}

impl Default for PoolGate {
    fn default() -> Self {
        PoolGate {
            inflight: Default::default(),
            last_active: Default::default(),
            epoch: Instant::now(),
            changed: Notify::new(),
            waiting: AtomicU32::new(0),
        }
    }
}

impl PoolGate {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn higher_active(&self, prio: usize, now: u64) -> bool {
        (0..prio).any(|p| {
            self.inflight[p].load(Ordering::Relaxed) > 0
                || now.saturating_sub(self.last_active[p].load(Ordering::Relaxed))
                    < RECENT.as_nanos() as u64
        })
    }

    fn may_enter(&self, prio: usize) -> bool {
        prio == 0
            || self.inflight[prio].load(Ordering::Relaxed) < YIELD_INFLIGHT[prio]
            || !self.higher_active(prio, self.now_ns())
    }

    /// Waits until a request of priority `prio` may go to the pool and counts it.
    pub async fn enter(&self, prio: usize) {
        let prio = prio.min(PRIORITIES - 1);
        if !self.may_enter(prio) {
            // Counted while waiting, uncounted however the wait ends (the
            // future may be dropped).
            struct Waiting<'a>(&'a AtomicU32);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _counted = Waiting(&self.waiting);
            while !self.may_enter(prio) {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.may_enter(prio) {
                    break;
                }
                // The "recently active" window also ends by time alone.
                let _ = tokio::time::timeout(Duration::from_millis(2), notified).await;
            }
        }
        self.inflight[prio].fetch_add(1, Ordering::Relaxed);
        self.last_active[prio].store(self.now_ns(), Ordering::Relaxed);
    }

    /// A request of priority `prio` has left the pool.
    pub fn exit(&self, prio: usize) {
        let prio = prio.min(PRIORITIES - 1);
        self.inflight[prio].fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    pub fn inflight(&self, prio: usize) -> u32 {
        self.inflight[prio.min(PRIORITIES - 1)].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(name: &str) -> TierPolicy {
        default_tiers()
            .into_iter()
            .find(|t| t.name == name)
            .expect("built-in tier")
    }

    #[test]
    fn tiers_scale_by_size_up_to_their_caps_and_overrides_win() {
        let std = tier("standard");
        let small = std.limits(10 << 30, &Overrides::default());
        assert_eq!(small.iops_limit, 3_000 + 100);
        assert_eq!(small.bytes_per_second_limit, 125 * MB + 10 * MB / 4);
        let huge = std.limits(100 << 40, &Overrides::default());
        assert_eq!(huge.iops_limit, 16_000);
        assert_eq!(huge.bytes_per_second_limit, 500 * MB);
        let o = Overrides {
            iops_limit: Some(42),
            ..Default::default()
        };
        assert_eq!(std.limits(10 << 30, &o).iops_limit, 42);
        let ext = tier("extreme").limits(1 << 40, &Overrides::default());
        assert_eq!(
            (ext.iops_limit, ext.bytes_per_second_limit, ext.priority),
            (0, 0, 0)
        );
        assert!(validate_overrides(&Overrides {
            burst_seconds: Some(0.0),
            ..Default::default()
        })
        .is_err());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_limited_volume_is_held_to_its_rate_after_its_burst() {
        let l = Limiter::new(Limits {
            tier: "t".into(),
            iops_limit: 100,
            bytes_per_second_limit: 0,
            burst_seconds: 0.1,
            priority: 2,
        });
        let start = tokio::time::Instant::now();
        let mut waited = 0;
        for _ in 0..110 {
            waited += l.admit(4096).await;
        }
        // 10 from the full bucket, then 100 at 100/s: one second of (paused) time.
        let took = start.elapsed().as_secs_f64();
        assert!((0.95..1.1).contains(&took), "took {took} s");
        assert!(waited > 0);
        // Raised live: the next 50 go at once.
        l.set(Limits {
            iops_limit: 1000,
            ..l.limits()
        });
        let t = tokio::time::Instant::now();
        for _ in 0..50 {
            l.admit(4096).await;
        }
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn bytes_limit_paces_large_requests() {
        let l = Limiter::new(Limits {
            tier: "t".into(),
            iops_limit: 0,
            bytes_per_second_limit: 1 << 20,
            burst_seconds: 1.0,
            priority: 2,
        });
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            l.admit(1 << 20).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((3.9..4.2).contains(&took), "took {took} s");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_low_tier_yields_to_an_active_high_tier_and_not_otherwise() {
        let g = PoolGate::default();
        // Alone, the low tier fills as much as it likes.
        for _ in 0..20 {
            g.enter(2).await;
        }
        assert_eq!(g.inflight(2), 20);
        for _ in 0..20 {
            g.exit(2);
        }
        // A high-tier request in flight: the low tier gets only its small share.
        g.enter(0).await;
        g.enter(2).await;
        g.enter(2).await;
        let blocked = tokio::time::timeout(Duration::from_millis(20), g.enter(2)).await;
        assert!(blocked.is_err(), "third low-tier request should wait");
        g.exit(0);
        // Once the high tier has been quiet for RECENT, the low tier proceeds.
        tokio::time::timeout(RECENT * 4, g.enter(2))
            .await
            .expect("low tier proceeds once the high tier is idle");
        assert_eq!(g.inflight(2), 3);
    }
}
