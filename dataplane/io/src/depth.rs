//! How many reads an engine keeps at the device at once, found by measuring.
//!
//! A disk whose completions come back in batches (a virtio disk on a VM: here
//! a Firecracker guest, where 32 reads issued together complete within 30 µs
//! of each other about 290 µs later) turns a deep queue into a convoy. The
//! batch completes as one; every request then goes through the reply, the
//! client, the next request and the submission one after another while the
//! disk has nothing to do, and comes back to the disk as one batch again.
//! Over NBD at QD32 the disk was busy only half of the time, and its average
//! queue of 17 gave 41-46K reads per second where fio alone on the same file
//! keeps 24 queued and gets 90K.
//!
//! Keeping fewer reads at the device clocks the rest in one per completion
//! (as TCP's acknowledgements clock its sends): the disk never gets a burst
//! larger than the limit, the reads left waiting go out as the first ones
//! come back, and the disk works while the replies are on their way. With 16
//! at most, the same runs gave 52-60K (docs/pod-path.md has the figures).
//!
//! The right limit depends on the device (a cloud volume with 1 ms of latency
//! needs 64 reads queued for 64K per second) and on how long the rest of the
//! path takes, so it is found by hill climbing on the rate of completed
//! reads, an epoch ([`EPOCH`]) at a time:
//!
//! - in an epoch where some read had to wait for the limit (the limit
//!   decided something), the limit moves one step (a quarter, at least one
//!   read): on in the same direction while the rate clearly rises, back the
//!   other way when it clearly falls ([`NOISE`] decides what is clear), and
//!   down when it did neither (as deep as needed, no deeper: a shorter queue
//!   at the disk is shorter latency for everyone);
//! - in an epoch where no read waited, the limit becomes the most reads the
//!   device held (never below [`MIN_LIMIT`]), and then one step below that,
//!   to see whether the load is better off with less. A probe that makes
//!   things clearly worse comes back up and waits twice as long as the last
//!   one before the next (up to [`MAX_QUIET`] epochs), so a device that
//!   wants all the depth it gets loses one epoch in that many.
//!
//! On a device where more depth means more throughput the limit climbs until
//! it no longer binds; where the convoy costs more than depth gains, it
//! settles around the best depth and wanders a step or two on either side.
//! Only reads of at most [`SMALL_READ_MAX`] are limited: writes on the
//! store's path are mostly its own background work (deferred writes applied,
//! syncs), and holding them back cost 15-30% of QD32 writes when tried; large
//! reads are sequential streams bound by bandwidth, and an epoch of them
//! holds too few reads to compare (1 MiB reads on the pod lost 10-20% when
//! they were limited too).

use std::time::{Duration, Instant};

/// How long the rate of completed reads is measured before the limit moves.
pub const EPOCH: Duration = Duration::from_millis(50);
/// Nor before this many reads completed in it: fewer say too little (a
/// stream of 1 MiB reads completes about 60 in 50 ms here).
pub const MIN_EPOCH_READS: u64 = 256;
/// Reads larger than this are not limited (nor counted): they are
/// sequential streams bound by the disk's bandwidth, which a limit on the
/// number of reads would only starve, not convoys of small requests.
pub const SMALL_READ_MAX: usize = 128 << 10;
/// A rate within this fraction of the last one is neither better nor worse.
pub const NOISE: f64 = 0.03;
/// The limit never goes below this many reads at the device.
pub const MIN_LIMIT: usize = 4;
/// Nor above this many (an engine's ring has room for fewer anyway).
pub const MAX_LIMIT: usize = 4096;
/// Where the limit starts: above the depth most single clients keep, below
/// where this machine's convoy set in.
pub const START_LIMIT: usize = 16;
/// The most epochs between two probes below a depth the load does not fill.
pub const MAX_QUIET: u32 = 64;

/// How the reads at the device are limited (`--read-depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadDepthMode {
    /// Found by measuring, as the module documentation describes.
    #[default]
    Auto,
    /// Not limited: every read goes to the kernel at once.
    Off,
    /// At most this many (1 to [`MAX_LIMIT`]).
    Fixed(usize),
}

impl std::str::FromStr for ReadDepthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ReadDepthMode::Auto),
            "off" | "0" => Ok(ReadDepthMode::Off),
            n => match n.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(ReadDepthMode::Fixed(n)),
                _ => Err(format!(
                    "{s:?}: expected auto, off, or a number of reads from 1 to {MAX_LIMIT}"
                )),
            },
        }
    }
}

#[derive(Debug)]
pub struct ReadDepth {
    mode: ReadDepthMode,
    limit: usize,
    up: bool,
    start: Option<Instant>,
    done: u64,
    /// A read waited for the limit in this epoch.
    bound: bool,
    /// The most reads at the device in this epoch.
    peak: usize,
    /// Reads per second in the epoch before, when comparable.
    last_rate: Option<f64>,
    /// This epoch's limit is a probe below what the load used.
    probing: bool,
    /// Epochs until the next probe, and the wait after the last failed one.
    quiet: u32,
    quiet_len: u32,
}

impl ReadDepth {
    pub fn new(mode: ReadDepthMode) -> Self {
        ReadDepth {
            mode,
            limit: match mode {
                ReadDepthMode::Auto => START_LIMIT,
                ReadDepthMode::Off => usize::MAX,
                ReadDepthMode::Fixed(n) => n,
            },
            up: true,
            start: None,
            done: 0,
            bound: false,
            peak: 0,
            last_rate: None,
            probing: false,
            quiet: 0,
            quiet_len: 1,
        }
    }

    /// The reads the device may hold now (0: no limit).
    pub fn limit(&self) -> usize {
        if self.mode == ReadDepthMode::Off {
            0
        } else {
            self.limit
        }
    }

    /// Whether one more read may go to a device holding `at_device` reads;
    /// a refusal marks the epoch as bound.
    pub fn admit(&mut self, at_device: usize) -> bool {
        if at_device < self.limit {
            self.peak = self.peak.max(at_device + 1);
            true
        } else {
            self.bound = true;
            false
        }
    }

    /// A read waits behind others that wait: the epoch is bound.
    pub fn hold(&mut self) {
        self.bound = true;
    }

    /// `n` reads completed at `now`; ends the epoch (and may move the limit)
    /// once it has lasted [`EPOCH`].
    pub fn completed(&mut self, n: usize, now: Instant) {
        if self.mode != ReadDepthMode::Auto {
            return;
        }
        let Some(start) = self.start else {
            self.start = Some(now);
            self.done = n as u64;
            return;
        };
        self.done += n as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed < EPOCH || self.done < MIN_EPOCH_READS {
            return;
        }
        let rate = self.done as f64 / elapsed.as_secs_f64();
        let step = |l: usize| (l / 4).max(1);
        if self.bound {
            let probe = std::mem::take(&mut self.probing);
            match self.last_rate {
                // Nothing to compare with: a load that just grew is more
                // likely held back than helped.
                None => self.up = true,
                Some(last) => {
                    let better = rate > last * (1.0 + NOISE);
                    let worse = rate < last * (1.0 - NOISE);
                    if probe {
                        if worse {
                            // Less is worse: back up, and probe less often.
                            self.quiet_len = (self.quiet_len * 2).min(MAX_QUIET);
                            self.quiet = self.quiet_len;
                            self.up = true;
                        } else {
                            self.quiet_len = 1;
                            self.up = false;
                        }
                    } else if worse {
                        self.up = !self.up;
                    } else if !better {
                        self.up = false;
                    }
                }
            }
            self.limit = if self.up {
                self.limit + step(self.limit)
            } else {
                self.limit.saturating_sub(step(self.limit))
            };
            self.last_rate = Some(rate);
        } else {
            self.limit = self.peak;
            self.last_rate = None;
            if self.quiet > 0 {
                self.quiet -= 1;
            } else if self.peak > MIN_LIMIT {
                self.limit = self.peak - step(self.peak);
                self.last_rate = Some(rate);
                self.probing = true;
                self.up = false;
            }
        }
        self.limit = self.limit.clamp(MIN_LIMIT, MAX_LIMIT);
        self.start = Some(now);
        self.done = 0;
        self.bound = false;
        self.peak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the controller for `epochs` epochs against a device whose
    /// reads per second at a given depth are `rate(depth)`, under a client
    /// that keeps `offered` reads outstanding; returns the limit after each
    /// epoch and the depth the device had in it.
    fn drive(
        (d, now): &mut (ReadDepth, Instant),
        offered: usize,
        epochs: usize,
        rate: impl Fn(usize) -> f64,
    ) -> (Vec<usize>, Vec<usize>) {
        d.completed(0, *now);
        let (mut limits, mut depths) = (Vec::new(), Vec::new());
        for _ in 0..epochs {
            // The client's reads go out until the limit refuses one.
            let mut at = 0;
            while at < offered && d.admit(at) {
                at += 1;
            }
            *now += EPOCH;
            d.completed((rate(at) * EPOCH.as_secs_f64()) as usize, *now);
            limits.push(d.limit());
            depths.push(at);
        }
        (limits, depths)
    }

    fn auto() -> (ReadDepth, Instant) {
        (ReadDepth::new(ReadDepthMode::Auto), Instant::now())
    }

    fn mean(v: &[usize]) -> f64 {
        v.iter().sum::<usize>() as f64 / v.len() as f64
    }

    /// This machine's disk under a convoy: best at about 14 reads.
    fn convoy(depth: usize) -> f64 {
        let d = depth as f64;
        60_000.0 - 150.0 * (d - 14.0) * (d - 14.0)
    }

    #[test]
    fn settles_near_the_best_depth_of_a_convoying_device() {
        let (_, depths) = drive(&mut auto(), 32, 300, convoy);
        let tail = &depths[100..];
        assert!(
            tail.iter().all(|&l| (8..=22).contains(&l)),
            "depths after settling: {tail:?}"
        );
        let m = mean(tail);
        assert!((11.0..=17.0).contains(&m), "mean depth {m}: {tail:?}");
    }

    #[test]
    fn gives_a_device_that_wants_depth_nearly_all_of_it() {
        // A cloud volume: 1 ms per read whatever the depth, so the rate is
        // proportional to the depth.
        let (limits, depths) = drive(&mut auto(), 64, 400, |d| d as f64 * 1000.0);
        assert!(limits[..12].contains(&64), "climbs at once: {limits:?}");
        let m = mean(&depths[100..]);
        assert!(m >= 0.97 * 64.0, "mean depth {m}: {depths:?}");
    }

    #[test]
    fn a_shallow_load_is_not_held_back() {
        let (limits, depths) = drive(&mut auto(), 6, 400, |d| d as f64 * 5000.0);
        assert!(mean(&depths[100..]) >= 0.97 * 6.0, "{depths:?}");
        assert!(
            limits[100..].iter().all(|l| (5..=6).contains(l)),
            "{limits:?}"
        );
        let (limits, depths) = drive(&mut auto(), 1, 20, |_| 10_000.0);
        assert_eq!(limits.last(), Some(&MIN_LIMIT), "{limits:?}");
        assert!(depths.iter().all(|&d| d == 1));
    }

    #[test]
    fn a_deeper_load_after_a_shallow_one_climbs_back() {
        let mut d = auto();
        drive(&mut d, 1, 5, |_| 10_000.0);
        assert_eq!(d.0.limit(), MIN_LIMIT);
        let (limits, _) = drive(&mut d, 64, 20, |d| d as f64 * 2000.0);
        let reached = limits.iter().position(|&l| l >= 64);
        assert!(reached.is_some_and(|i| i <= 15), "{limits:?}");
    }

    #[test]
    fn an_epoch_ends_after_its_length_and_enough_reads() {
        for (first, then) in [
            // Many reads, too soon.
            ((1000, EPOCH / 2), (1000, EPOCH)),
            // A second of a slow stream: too few reads to compare rates.
            ((MIN_EPOCH_READS as usize - 1, EPOCH * 20), (1, EPOCH * 21)),
        ] {
            let mut d = ReadDepth::new(ReadDepthMode::Auto);
            let now = Instant::now();
            d.completed(0, now);
            assert!(!d.admit(START_LIMIT));
            d.completed(first.0, now + first.1);
            assert_eq!(d.limit(), START_LIMIT);
            d.completed(then.0, now + then.1);
            assert_eq!(d.limit(), START_LIMIT + START_LIMIT / 4);
        }
    }

    #[test]
    fn fixed_and_off_never_move_and_bad_values_say_why() {
        let now = Instant::now();
        for (mode, limit, admits) in [
            (ReadDepthMode::Fixed(3), 3, 3),
            (ReadDepthMode::Off, 0, 10_000),
        ] {
            let mut d = ReadDepth::new(mode);
            let mut at = 0;
            while at < 10_000 && d.admit(at) {
                at += 1;
            }
            assert_eq!(at, admits, "{mode:?}");
            for i in 0..10 {
                d.completed(100, now + EPOCH * i);
            }
            assert_eq!(d.limit(), limit, "{mode:?}");
        }
        assert_eq!("auto".parse(), Ok(ReadDepthMode::Auto));
        assert_eq!("off".parse(), Ok(ReadDepthMode::Off));
        assert_eq!("0".parse(), Ok(ReadDepthMode::Off));
        assert_eq!("24".parse(), Ok(ReadDepthMode::Fixed(24)));
        for bad in ["", "-1", "4097", "lots"] {
            let r = bad.parse::<ReadDepthMode>();
            assert!(
                r.as_ref().is_err_and(|e| e.contains("expected auto, off")),
                "{bad}: {r:?}"
            );
        }
    }
}
