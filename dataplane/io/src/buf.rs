//! Aligned I/O buffers.
//!
//! An [`Arena`] is one page-aligned memory region that every ring registers as a
//! fixed buffer, so reads and writes into it use `READ_FIXED`/`WRITE_FIXED` and
//! skip the kernel's per-I/O page pinning. An [`IoBuf`] owns a run of 4 KiB pages
//! of it; it can be split at page boundaries (one request's blocks go to several
//! disk locations) and the pieces joined again, without copying or allocating.
//! When the arena is exhausted, buffers come from the heap (still aligned for
//! `O_DIRECT`) and use plain `READ`/`WRITE`.

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

/// The unit of every buffer and of `O_DIRECT` alignment.
pub const PAGE: usize = 4096;

/// A page-aligned region registered with every ring as fixed buffer 0.
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
    pages: Mutex<PageMap>,
}

// SAFETY: the arena's memory is only reached through `IoBuf`s, each of which owns a
// disjoint page run handed out under the `pages` mutex.
unsafe impl Send for Arena {}
// SAFETY: as above; shared access only touches the mutex-protected page map.
unsafe impl Sync for Arena {}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena").field("len", &self.len).finish()
    }
}

struct PageMap {
    /// One bit per page, set when in use.
    used: Vec<u64>,
    pages: usize,
    free: usize,
    hint: usize,
    /// Pages `[0, preferred)` are handed out first (first fit), the part of the
    /// arena an engine registered; 0: no preference.
    preferred: usize,
}

impl PageMap {
    fn is_used(&self, p: usize) -> bool {
        self.used[p / 64] & (1 << (p % 64)) != 0
    }

    fn set(&mut self, first: usize, n: usize, used: bool) {
        for p in first..first + n {
            if used {
                self.used[p / 64] |= 1 << (p % 64);
            } else {
                self.used[p / 64] &= !(1 << (p % 64));
            }
        }
    }

    /// The preferred prefix first (first fit); then first fit from the hint,
    /// wrapping once.
    fn alloc(&mut self, n: usize) -> Option<usize> {
        if n == 0 || n > self.free {
            return None;
        }
        let first = match self.first_fit(0, self.preferred, n) {
            Some(first) => first,
            None => {
                let first = self
                    .first_fit(self.hint, self.pages, n)
                    .or_else(|| self.first_fit(0, (self.hint + n).min(self.pages), n))?;
                self.hint = (first + n) % self.pages;
                first
            }
        };
        self.set(first, n, true);
        self.free -= n;
        Some(first)
    }

    /// The first run of `n` free pages inside `[lo, hi)`.
    fn first_fit(&self, lo: usize, hi: usize, n: usize) -> Option<usize> {
        let mut start = lo;
        while start + n <= hi {
            // Skip whole used words quickly.
            if start.is_multiple_of(64) && self.used[start / 64] == u64::MAX {
                start += 64;
                continue;
            }
            match (start..start + n).find(|&p| self.is_used(p)) {
                None => return Some(start),
                Some(used) => start = used + 1,
            }
        }
        None
    }

    fn release(&mut self, first: usize, n: usize) {
        debug_assert!((first..first + n).all(|p| self.is_used(p)));
        self.set(first, n, false);
        self.free += n;
    }
}

impl Arena {
    /// Maps `len` bytes (rounded up to pages) of anonymous memory.
    pub fn new(len: usize) -> std::io::Result<Arc<Self>> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: an anonymous private mapping with no address hint; the result is
        // checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let pages = len / PAGE;
        Ok(Arc::new(Arena {
            base: NonNull::new(ptr.cast()).ok_or_else(std::io::Error::last_os_error)?,
            len,
            pages: Mutex::new(PageMap {
                used: vec![0; pages.div_ceil(64)],
                pages,
                free: pages,
                hint: 0,
                preferred: 0,
            }),
        }))
    }

    /// The region to register with a ring (`IORING_REGISTER_BUFFERS`).
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr().cast(),
            iov_len: self.len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// From now on, hands out pages from the first `len` bytes (rounded down to
    /// pages) first, the part an engine registered with the kernel, so small
    /// requests all get registered buffers; larger bursts spill into the rest
    /// of the arena (unregistered, but no heap allocation).
    pub fn prefer_prefix(&self, len: usize) {
        let mut map = self.pages.lock();
        map.preferred = (len / PAGE).min(map.pages);
    }

    /// Pages not handed out.
    pub fn free_bytes(&self) -> usize {
        self.pages.lock().free * PAGE
    }

    /// A zero-filled buffer of `len` bytes rounded up to pages; from the arena when
    /// it has room, otherwise from the heap.
    pub fn alloc(self: &Arc<Self>, len: usize) -> IoBuf {
        let mut buf = self.alloc_uninit(len);
        buf.as_mut_slice().fill(0);
        buf
    }

    /// Like [`Arena::alloc`] but the contents are whatever the pages held before:
    /// for buffers that a read or the caller fills completely.
    pub fn alloc_uninit(self: &Arc<Self>, len: usize) -> IoBuf {
        let pages = len.div_ceil(PAGE).max(1);
        let first = self.pages.lock().alloc(pages);
        match first {
            Some(first) => IoBuf {
                // SAFETY: `first + pages <= self.pages`, so the offset stays inside
                // the mapping.
                ptr: unsafe { NonNull::new_unchecked(self.base.as_ptr().add(first * PAGE)) },
                len: pages * PAGE,
                backing: Backing::Arena(self.clone()),
            },
            None => IoBuf::heap(pages * PAGE),
        }
    }

    fn release(&self, ptr: NonNull<u8>, len: usize) {
        let first = (ptr.as_ptr() as usize - self.base.as_ptr() as usize) / PAGE;
        self.pages.lock().release(first, len / PAGE);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: every IoBuf holds an Arc to the arena, so none is alive here; the
        // mapping is exactly the one made in `new`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

struct HeapBlock {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a plain owned allocation; access is coordinated by the IoBufs over it.
unsafe impl Send for HeapBlock {}
// SAFETY: as above.
unsafe impl Sync for HeapBlock {}

impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `IoBuf::heap` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

enum Backing {
    Arena(Arc<Arena>),
    Heap(Arc<HeapBlock>),
}

/// An owned, page-aligned, page-granular I/O buffer.
///
/// It is handed to the I/O engine by value and comes back with the completion, so
/// no one can touch it while the kernel does.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: an IoBuf owns its page run exclusively.
unsafe impl Send for IoBuf {}
// SAFETY: shared access is read-only through `as_slice`.
unsafe impl Sync for IoBuf {}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("fixed", &self.is_fixed())
            .finish()
    }
}

impl IoBuf {
    /// A zeroed, aligned heap buffer (no arena): for tests and rare large requests.
    pub fn heap(len: usize) -> IoBuf {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        let layout = match Layout::from_size_align(len, PAGE) {
            Ok(l) => l,
            Err(_) => panic!("buffer of {len} bytes is not representable"),
        };
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            backing: Backing::Heap(Arc::new(HeapBlock { ptr, layout })),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffer lies in a registered arena (usable with `*_FIXED` ops).
    pub fn is_fixed(&self) -> bool {
        matches!(self.backing, Backing::Arena(_))
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the IoBuf owns `len` initialized bytes at `ptr` (zeroed or written
        // by a completed read); `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Splits off the pages from `at` (a multiple of [`PAGE`], `0 < at < len`);
    /// `self` keeps `[0, at)`, the result owns `[at, len)`.
    pub fn split_off(&mut self, at: usize) -> IoBuf {
        assert!(
            at.is_multiple_of(PAGE) && at > 0 && at < self.len,
            "split at {at} of {}",
            self.len
        );
        let tail = IoBuf {
            // SAFETY: `at < len`, inside this buffer's run.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(at)) },
            len: self.len - at,
            backing: match &self.backing {
                Backing::Arena(a) => Backing::Arena(a.clone()),
                Backing::Heap(h) => Backing::Heap(h.clone()),
            },
        };
        self.len = at;
        tail
    }

    /// Joins `next`, which must directly follow `self` in the same backing (it was
    /// split off from it); gives `next` back otherwise.
    pub fn unsplit(&mut self, next: IoBuf) -> Result<(), IoBuf> {
        let same = match (&self.backing, &next.backing) {
            (Backing::Arena(a), Backing::Arena(b)) => Arc::ptr_eq(a, b),
            (Backing::Heap(a), Backing::Heap(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        // SAFETY: computing the one-past-the-end pointer of this buffer's run.
        let end = unsafe { self.ptr.as_ptr().add(self.len) };
        if !same || end != next.ptr.as_ptr() {
            return Err(next);
        }
        self.len += next.len;
        // The pages now belong to `self`; `next` must not release them.
        let next = std::mem::ManuallyDrop::new(next);
        // SAFETY: reading the backing out of a ManuallyDrop that is never used again,
        // so the Arc's count is dropped exactly once.
        drop(unsafe { std::ptr::read(&next.backing) });
        Ok(())
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Backing::Arena(a) = &self.backing {
            a.release(self.ptr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_hands_out_disjoint_aligned_pages_and_takes_them_back() {
        let arena = Arena::new(16 * PAGE).expect("arena");
        let a = arena.alloc(PAGE);
        let b = arena.alloc(3 * PAGE + 1);
        assert_eq!(b.len(), 4 * PAGE);
        assert_eq!(a.as_ptr() as usize % PAGE, 0);
        assert!(a.is_fixed() && b.is_fixed());
        assert_eq!(arena.free_bytes(), 11 * PAGE);
        drop(a);
        drop(b);
        assert_eq!(arena.free_bytes(), 16 * PAGE);
    }

    #[test]
    fn a_preferred_prefix_is_handed_out_first_then_the_rest_of_the_arena() {
        let arena = Arena::new(16 * PAGE).expect("arena");
        let base = arena.iovec().iov_base as usize;
        let page_of = |b: &IoBuf| (b.as_ptr() as usize - base) / PAGE;
        // Without a preference, allocation moves on through the arena.
        let a = arena.alloc(PAGE);
        let b = arena.alloc(PAGE);
        assert_eq!((page_of(&a), page_of(&b)), (0, 1));
        drop(a);
        let c = arena.alloc(PAGE);
        assert_eq!(page_of(&c), 2, "next fit");
        drop((b, c));
        arena.prefer_prefix(4 * PAGE + 100);
        // Freed prefix pages are reused at once: small requests stay inside.
        for _ in 0..3 {
            let x = arena.alloc(PAGE);
            let y = arena.alloc(2 * PAGE);
            assert!(page_of(&x) < 4 && page_of(&y) + 2 <= 4);
        }
        // A burst larger than the prefix spills into the rest, not the heap.
        let held: Vec<IoBuf> = (0..4).map(|_| arena.alloc(PAGE)).collect();
        assert!(held.iter().all(|b| page_of(b) < 4));
        let spill = arena.alloc(3 * PAGE);
        assert!(spill.is_fixed() && page_of(&spill) >= 4);
        drop((held, spill));
        assert_eq!(arena.free_bytes(), 16 * PAGE);
    }

    #[test]
    fn exhausted_arena_falls_back_to_heap() {
        let arena = Arena::new(2 * PAGE).expect("arena");
        let a = arena.alloc(2 * PAGE);
        let b = arena.alloc(PAGE);
        assert!(a.is_fixed());
        assert!(!b.is_fixed());
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn split_and_unsplit_keep_ownership_exact() {
        let arena = Arena::new(8 * PAGE).expect("arena");
        let mut a = arena.alloc(4 * PAGE);
        a.as_mut_slice()[PAGE] = 7;
        let mut tail = a.split_off(PAGE);
        assert_eq!(tail.as_slice()[0], 7);
        let tail2 = tail.split_off(PAGE);
        drop(tail);
        // One page went back; the rest are held.
        assert_eq!(arena.free_bytes(), 5 * PAGE);
        let other = arena.alloc(PAGE);
        let other = a.unsplit(other).expect_err("not adjacent");
        drop(other);
        drop(tail2);
        drop(a);
        assert_eq!(arena.free_bytes(), 8 * PAGE);

        let mut h = IoBuf::heap(2 * PAGE);
        let t = h.split_off(PAGE);
        h.unsplit(t).expect("adjacent heap halves");
        assert_eq!(h.len(), 2 * PAGE);
        let mut b = arena.alloc(2 * PAGE);
        let t = b.split_off(PAGE);
        b.unsplit(t).expect("adjacent arena halves");
        drop(b);
        assert_eq!(arena.free_bytes(), 8 * PAGE);
    }

    #[test]
    fn first_fit_finds_runs_after_fragmentation() {
        let arena = Arena::new(64 * 3 * PAGE).expect("arena");
        let bufs: Vec<_> = (0..192).map(|_| arena.alloc(PAGE)).collect();
        // Free every other page, then one run of four.
        let mut keep = Vec::new();
        for (i, b) in bufs.into_iter().enumerate() {
            if i % 2 == 0 || (100..104).contains(&i) {
                drop(b);
            } else {
                keep.push(b);
            }
        }
        let run = arena.alloc(4 * PAGE);
        assert!(run.is_fixed(), "a 4-page hole exists at pages 100..104");
        let too_big = arena.alloc(8 * PAGE);
        assert!(!too_big.is_fixed());
    }
}
