//! The pool's block allocator: a bitmap in memory, one bit per 4 KiB block.
//!
//! It is not persisted: at open it is rebuilt from the block maps (every mapped
//! block is in use, everything else is free), so it can never disagree with them
//! after a crash. Its size is one bit per pool block (32 MiB per TiB).
//!
//! Freed blocks are not reusable at once: they wait in `pending` until (a) the
//! metadata commit that freed them is durable (a synced WAL), so after a power
//! loss no map can point at a block that was overwritten, and (b) every read that
//! started before the free has finished, so no in-flight read sees reused space.
//!
//! **Layout after overwrites.** Every write goes to fresh space (redirect on
//! write), so a pass of random 4 KiB overwrites used to move each block to
//! wherever the cursor was: a volume laid out in order ended up in the order of
//! its overwrites, and a sequential 1 MiB read became 256 scattered 4 KiB reads
//! (a quarter of the fresh layout's throughput). So the pool is cut into groups
//! of 1.125 MiB, and new data (next-fit from the cursor) fills only the first
//! 1 MiB of each group while others have room: a volume written in 1 MiB
//! pieces puts each piece in a group of its own. The last 128 KiB is *slack*
//! for the overwrites of the blocks already in the group: [`Allocator::alloc_near`]
//! puts a block's new copy in its old copy's group. Overwritten blocks so stay
//! within a group of their neighbours, and the store's reads fetch such a
//! group with one I/O and pick the blocks out (see `io_loop`'s gathered
//! reads). The slack is not lost: once every group is at its limit, new data
//! takes it too. Crash safety is untouched: placement only chooses among free
//! blocks.

/// Blocks per allocation group: 1 MiB of new data and 128 KiB of slack.
pub const GROUP: u64 = 288;
/// A group keeps `1 / SLACK_DIV` of its blocks for overwrites.
const SLACK_DIV: u64 = 9;

#[derive(Debug)]
pub struct Allocator {
    used: Vec<u64>,
    /// Blocks in use per group.
    group_used: Vec<u16>,
    blocks: u64,
    free: u64,
    cursor: u64,
    /// (sequence at free time, block), in sequence order.
    pending: Vec<(u64, u64)>,
    /// Overwrites that found their group full since [`Self::take_near_misses`].
    near_misses: u64,
}

impl Allocator {
    pub fn new(blocks: u64) -> Self {
        Allocator {
            used: vec![0; blocks.div_ceil(64) as usize],
            group_used: vec![0; blocks.div_ceil(GROUP) as usize],
            blocks,
            free: blocks,
            cursor: 0,
            pending: Vec::new(),
            near_misses: 0,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks free now (not counting pending frees).
    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    pub fn pending_blocks(&self) -> u64 {
        self.pending.len() as u64
    }

    pub fn is_used(&self, b: u64) -> bool {
        self.used[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set(&mut self, b: u64, used: bool) {
        let w = &mut self.used[(b / 64) as usize];
        let g = &mut self.group_used[(b / GROUP) as usize];
        if used {
            *w |= 1 << (b % 64);
            *g += 1;
        } else {
            *w &= !(1 << (b % 64));
            *g -= 1;
        }
    }

    /// How many blocks of group `g` new data may take while other groups
    /// have room.
    fn fresh_limit(&self, g: u64) -> u64 {
        let cap = GROUP.min(self.blocks - g * GROUP);
        cap - cap / SLACK_DIV
    }

    /// Takes free block `b` into `out` (extending its last run if it can).
    fn take(&mut self, b: u64, out: &mut Vec<(u64, u64)>, start_len: usize) {
        self.set(b, true);
        self.free -= 1;
        let extends = out.len() > start_len && out.last().is_some_and(|&(f, l)| f + l == b);
        match out.last_mut() {
            Some((_, len)) if extends => *len += 1,
            _ => out.push((b, 1)),
        }
    }

    /// Marks a block found in a map at open; false if it was already marked (two
    /// map entries claim one block: the metadata is corrupt).
    pub fn mark_used(&mut self, b: u64) -> bool {
        if b >= self.blocks || self.is_used(b) {
            return false;
        }
        self.set(b, true);
        self.free -= 1;
        true
    }

    /// Allocates `n` blocks next-fit from the cursor as runs `(first, len)`, so
    /// sequential writes stay contiguous, leaving each group's slack while
    /// other groups have room. All or nothing.
    pub fn alloc(&mut self, n: u64, out: &mut Vec<(u64, u64)>) -> bool {
        if n > self.free {
            return false;
        }
        let start_len = out.len();
        let mut need = self.next_fit(n, out, start_len, true);
        if need > 0 {
            need = self.next_fit(need, out, start_len, false);
        }
        if need > 0 {
            self.undo(out, start_len);
            return false;
        }
        true
    }

    /// Gives back what an allocation that failed took (`out` from
    /// `start_len`): cannot happen while `free` is right, and keeps every
    /// allocation all or nothing.
    fn undo(&mut self, out: &mut Vec<(u64, u64)>, start_len: usize) {
        for (first, len) in out.drain(start_len..) {
            for x in first..first + len {
                self.set(x, false);
                self.free += 1;
            }
        }
    }

    /// One next-fit pass from the cursor; returns how many blocks it could
    /// not find. `keep_slack`: groups at their limit for new data are skipped.
    fn next_fit(
        &mut self,
        mut need: u64,
        out: &mut Vec<(u64, u64)>,
        start_len: usize,
        keep_slack: bool,
    ) -> u64 {
        let mut b = self.cursor;
        let mut scanned = 0u64;
        while need > 0 && scanned < self.blocks {
            if b >= self.blocks {
                b = 0;
            }
            let g = b / GROUP;
            if keep_slack && u64::from(self.group_used[g as usize]) >= self.fresh_limit(g) {
                let next = ((g + 1) * GROUP).min(self.blocks);
                scanned += next - b;
                b = next;
                continue;
            }
            // Skip full words.
            if b.is_multiple_of(64) && self.used[(b / 64) as usize] == u64::MAX {
                let step = 64.min(self.blocks - b);
                b += step;
                scanned += step;
                continue;
            }
            if !self.is_used(b) {
                self.take(b, out, start_len);
                need -= 1;
            }
            b += 1;
            scanned += 1;
        }
        self.cursor = b % self.blocks.max(1);
        need
    }

    /// Allocates `n` blocks for new copies of blocks whose old copy is at
    /// `hint`: from the hint's group first (its slack included), the rest as
    /// [`Self::alloc`] does. All or nothing.
    pub fn alloc_near(&mut self, hint: u64, n: u64, out: &mut Vec<(u64, u64)>) -> bool {
        if n > self.free {
            return false;
        }
        if hint >= self.blocks {
            return self.alloc(n, out);
        }
        let start_len = out.len();
        let g = hint / GROUP;
        let (lo, hi) = (g * GROUP, ((g + 1) * GROUP).min(self.blocks));
        let mut need = n;
        if u64::from(self.group_used[g as usize]) < hi - lo {
            for b in (hint..hi).chain(lo..hint) {
                if need == 0 {
                    break;
                }
                if !self.is_used(b) {
                    self.take(b, out, start_len);
                    need -= 1;
                }
            }
        }
        if need > 0 {
            self.near_misses += 1;
        }
        if need == 0 || self.alloc(need, out) {
            return true;
        }
        self.undo(out, start_len);
        false
    }

    /// How many overwrites found their group full (its slack taken, its own
    /// frees still pending) since the last call: the store then makes the
    /// pending frees reusable sooner.
    pub fn take_near_misses(&mut self) -> u64 {
        std::mem::take(&mut self.near_misses)
    }

    /// Gives back blocks that were allocated but never published in a map (a
    /// failed write): no one can reference them, so they are free at once.
    pub fn unalloc(&mut self, first: u64, len: u64) {
        for b in first..first + len {
            debug_assert!(self.is_used(b));
            self.set(b, false);
            self.free += 1;
        }
    }

    /// Queues a block freed by a metadata commit made at sequence `seq`.
    pub fn free_later(&mut self, seq: u64, b: u64) {
        self.pending.push((seq, b));
    }

    /// Releases pending frees with sequence below `bound`.
    pub fn release(&mut self, bound: u64) -> u64 {
        let n = self.pending.partition_point(|&(s, _)| s < bound);
        let drained: Vec<(u64, u64)> = self.pending.drain(..n).collect();
        for (_, b) in drained {
            debug_assert!(self.is_used(b));
            self.set(b, false);
            self.free += 1;
        }
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_are_contiguous_and_all_or_nothing() {
        let mut a = Allocator::new(100);
        let mut out = Vec::new();
        assert!(a.alloc(10, &mut out));
        assert_eq!(out, vec![(0, 10)]);
        out.clear();
        assert!(!a.alloc(91, &mut out));
        assert!(out.is_empty());
        assert_eq!(a.free_blocks(), 90);
        a.free_later(5, 3);
        a.free_later(7, 4);
        assert_eq!(a.release(6), 1);
        assert_eq!(a.free_blocks(), 91);
        assert_eq!(a.pending_blocks(), 1);
        assert!(a.alloc(91, &mut out));
        assert_eq!(a.free_blocks(), 0);
        assert!(out.contains(&(3, 1)));
    }

    #[test]
    fn new_data_leaves_each_groups_slack_and_overwrites_stay_in_their_group() {
        let mut a = Allocator::new(4 * GROUP);
        let mut out = Vec::new();
        // Three and a half MiB of new data: 1 MiB in each group, in order,
        // the slack skipped.
        assert!(a.alloc(3 * 256 + 100, &mut out));
        assert_eq!(out, vec![(0, 256), (288, 256), (576, 256), (864, 100)]);
        // An overwrite of block 10 lands in group 0's slack, near it.
        out.clear();
        assert!(a.alloc_near(10, 2, &mut out));
        assert_eq!(out, vec![(256, 2)]);
        // New data goes on after the cursor, not into the slack.
        out.clear();
        assert!(a.alloc(1, &mut out));
        assert_eq!(out, vec![(964, 1)]);
        // A full group sends the rest of an overwrite elsewhere.
        out.clear();
        assert!(a.alloc_near(300, 40, &mut out));
        assert_eq!(out, vec![(544, 32), (965, 8)], "group 1's slack first");
        // Once every group is at its limit, new data takes the slack too:
        // nothing is lost.
        out.clear();
        let free = a.free_blocks();
        assert!(a.alloc(free, &mut out));
        assert_eq!(a.free_blocks(), 0);
        assert!(!a.alloc_near(5, 1, &mut out));
    }

    proptest! {
        /// Against a set-based model: every allocation is disjoint from live blocks,
        /// and the free count always matches.
        #[test]
        fn allocator_matches_a_model(ops in prop::collection::vec((0u8..4, 1u64..40, 0u64..700), 1..300)) {
            let total = 700;
            let mut a = Allocator::new(total);
            let mut live: Vec<u64> = Vec::new();
            let mut seq = 0;
            for (op, n, hint) in ops {
                seq += 1;
                match op {
                    0 | 3 => {
                        let mut out = Vec::new();
                        let ok = if op == 0 { a.alloc(n, &mut out) } else { a.alloc_near(hint, n, &mut out) };
                        let avail = total - live.len() as u64 - a.pending_blocks();
                        prop_assert_eq!(ok, n <= avail);
                        prop_assert_eq!(out.iter().map(|r| r.1).sum::<u64>(), if ok { n } else { 0 });
                        for (f, l) in out {
                            for b in f..f + l {
                                prop_assert!(!live.contains(&b));
                                live.push(b);
                            }
                        }
                    }
                    1 => {
                        for _ in 0..n.min(live.len() as u64) {
                            let b = live.swap_remove(0);
                            a.free_later(seq, b);
                        }
                    }
                    _ => { a.release(seq); }
                }
                prop_assert_eq!(a.free_blocks(), total - live.len() as u64 - a.pending_blocks());
            }
        }
    }
}
