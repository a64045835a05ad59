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

#[derive(Debug)]
pub struct Allocator {
    used: Vec<u64>,
    blocks: u64,
    free: u64,
    cursor: u64,
    /// (sequence at free time, block), in sequence order.
    pending: Vec<(u64, u64)>,
}

impl Allocator {
    pub fn new(blocks: u64) -> Self {
        Allocator {
            used: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            free: blocks,
            cursor: 0,
            pending: Vec::new(),
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
        if used {
            *w |= 1 << (b % 64);
        } else {
            *w &= !(1 << (b % 64));
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
    /// sequential writes stay contiguous. All or nothing.
    pub fn alloc(&mut self, n: u64, out: &mut Vec<(u64, u64)>) -> bool {
        if n > self.free {
            return false;
        }
        let start_len = out.len();
        let mut need = n;
        let mut b = self.cursor;
        let mut scanned = 0u64;
        while need > 0 && scanned < self.blocks {
            if b >= self.blocks {
                b = 0;
            }
            // Skip full words.
            if b.is_multiple_of(64) && self.used[(b / 64) as usize] == u64::MAX {
                let step = 64.min(self.blocks - b);
                b += step;
                scanned += step;
                continue;
            }
            if !self.is_used(b) {
                self.set(b, true);
                self.free -= 1;
                need -= 1;
                let extends = out.len() > start_len && out.last().is_some_and(|&(f, l)| f + l == b);
                match out.last_mut() {
                    Some((_, len)) if extends => *len += 1,
                    _ => out.push((b, 1)),
                }
            }
            b += 1;
            scanned += 1;
        }
        self.cursor = b % self.blocks.max(1);
        if need > 0 {
            // Cannot happen while `free` is right; undo to stay all-or-nothing.
            for (first, len) in out.drain(start_len..) {
                for x in first..first + len {
                    self.set(x, false);
                    self.free += 1;
                }
            }
            return false;
        }
        true
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

    proptest! {
        /// Against a set-based model: every allocation is disjoint from live blocks,
        /// and the free count always matches.
        #[test]
        fn allocator_matches_a_model(ops in prop::collection::vec((0u8..3, 1u64..20), 1..200)) {
            let total = 200;
            let mut a = Allocator::new(total);
            let mut live: Vec<u64> = Vec::new();
            let mut seq = 0;
            for (op, n) in ops {
                seq += 1;
                match op {
                    0 => {
                        let mut out = Vec::new();
                        let ok = a.alloc(n, &mut out);
                        let avail = total - live.len() as u64 - a.pending_blocks();
                        prop_assert_eq!(ok, n <= avail);
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
