//! The io_uring engine: registered files, the arena registered as fixed buffer 0,
//! batched submission, and an eventfd read kept armed in the ring so one
//! `io_uring_enter` sleeps on both completions and wake-ups. Reads beyond the
//! limit [`ReadDepth`] finds wait here, in order, and go to the kernel one per
//! completed read.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::buf::{Arena, IoBuf};
use crate::depth::{ReadDepth, ReadDepthMode, SMALL_READ_MAX};
use crate::engine::{FileId, IoCompletion, IoEngine, IoOp, OpKind, ReadDepthStats, Wake, Waker};

const WAKE_TAG: u64 = u64::MAX;

struct EventFd(RawFd);

impl Wake for EventFd {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own; a failure
        // (counter saturated) still leaves the reader woken.
        unsafe {
            libc::write(self.0, (&one as *const u64).cast(), 8);
        }
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: closing the eventfd this struct owns, once.
        unsafe {
            libc::close(self.0);
        }
    }
}

struct Slot {
    user_data: u64,
    buf: Option<IoBuf>,
    read: bool,
}

pub struct UringEngine {
    ring: IoUring,
    /// In-flight operations; the SQE's user_data is the slot index.
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    in_flight: usize,
    /// Arena range registered as buffer 0, when registration succeeded.
    fixed: Option<(usize, usize)>,
    eventfd: Arc<EventFd>,
    /// Target of the armed eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// Operations that failed before reaching the kernel, reported on the next reap.
    failed: Vec<IoCompletion>,
    /// Reads in the kernel, against the limit `depth` keeps (small ones:
    /// see [`SMALL_READ_MAX`]).
    reads_at_device: usize,
    depth: ReadDepth,
    /// Reads waiting for the limit (slot index and entry), oldest first.
    held: std::collections::VecDeque<(u32, squeue::Entry)>,
    reads_held: u64,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("in_flight", &self.in_flight)
            .field("fixed_buffers", &self.fixed.is_some())
            .finish()
    }
}

/// Registers as much of the arena as the kernel accepts, as fixed buffer 0.
///
/// Registered pages count against RLIMIT_MEMLOCK (per user, unless the process
/// has CAP_IPC_LOCK), which is 8 MiB in a default container, and the ring
/// itself takes some of it: where the whole arena does not fit, the largest
/// prefix of whole MiB that does is found by bisection (a refused probe costs
/// one system call). The arena then hands out that prefix first, so small
/// requests all get registered buffers and larger bursts spill into the rest
/// of the arena, unregistered, rather than to the heap (zeroed allocations).
/// Measured in bench/scripts/memlock.sh and the README. Returns the registered
/// range, or `None` when not even 1 MiB fits (the whole arena
/// is then used unregistered: the kernel pins pages on each operation).
fn register_arena(ring: &IoUring, arena: &Arena) -> Option<(usize, usize)> {
    const MIB: usize = 1 << 20;
    let full = arena.iovec();
    let register = |len: usize| {
        let iov = libc::iovec {
            iov_base: full.iov_base,
            iov_len: len,
        };
        // SAFETY: the arena outlives the registration: the caller keeps the Arc
        // for the engine's life (buffers from it hold it too), and the kernel only
        // uses the region for ops whose IoBuf we own until completion. `len`
        // never exceeds the arena's length and is a multiple of pages.
        unsafe { ring.submitter().register_buffers(&[iov]) }
    };
    // Some(true): registered; Some(false): RLIMIT_MEMLOCK refused it; None:
    // another error (logged), so registering is given up.
    let fits = |len: usize| match register(len) {
        Ok(()) => Some(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => Some(false),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot register the buffer arena; using unregistered buffers"
            );
            None
        }
    };
    if fits(full.iov_len)? {
        return Some((full.iov_base as usize, full.iov_len));
    }
    // lo MiB fit (0: none known), hi MiB do not (the whole arena, rounded up
    // to MiB, did not).
    let (mut lo, mut hi) = (0, full.iov_len.div_ceil(MIB));
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid * MIB)? {
            let _ = ring.submitter().unregister_buffers();
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let len = lo * MIB;
    if len == 0 || fits(len) != Some(true) {
        tracing::warn!(
            arena_bytes = full.iov_len,
            "RLIMIT_MEMLOCK leaves no room to register the buffer arena; using unregistered buffers (grant CAP_IPC_LOCK or raise the limit)"
        );
        return None;
    }
    arena.prefer_prefix(len);
    tracing::info!(
        registered_bytes = len,
        arena_bytes = full.iov_len,
        "registered part of the buffer arena (RLIMIT_MEMLOCK); grant CAP_IPC_LOCK or raise the limit to register all of it"
    );
    Some((full.iov_base as usize, len))
}

impl UringEngine {
    pub fn new(
        files: &[RawFd],
        arena: &Arc<Arena>,
        depth: u32,
        read_depth: ReadDepthMode,
    ) -> io::Result<Self> {
        let entries = depth.clamp(8, 4096).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        if !files.is_empty() {
            ring.submitter().register_files(files)?;
        }
        let fixed = register_arena(&ring, arena);
        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(UringEngine {
            ring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
            fixed,
            eventfd: Arc::new(EventFd(efd)),
            wake_buf: Box::new(0),
            wake_armed: false,
            failed: Vec::new(),
            reads_at_device: 0,
            depth: ReadDepth::new(read_depth),
            held: std::collections::VecDeque::new(),
            reads_held: 0,
        })
    }

    fn fixed_index(&self, buf: &IoBuf) -> Option<u16> {
        let (base, len) = self.fixed?;
        let p = buf.as_ptr() as usize;
        (buf.is_fixed() && p >= base && p + buf.len() <= base + len).then_some(0)
    }

    fn push_sqe(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE points at is owned by `self.slots` (or is
            // `wake_buf`) until its CQE is reaped.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand what is there to the kernel.
            self.ring.submit()?;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let ptr: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.eventfd.0), ptr.cast(), 8)
            .build()
            .user_data(WAKE_TAG);
        self.push_sqe(&sqe)?;
        self.wake_armed = true;
        Ok(())
    }

    /// Hands the kernel the reads that waited, as far as the limit allows.
    fn release_held(&mut self) {
        while !self.held.is_empty() && self.depth.admit(self.reads_at_device) {
            let Some((idx, sqe)) = self.held.pop_front() else {
                break;
            };
            self.reads_at_device += 1;
            if let Err(e) = self.push_sqe(&sqe) {
                tracing::error!(error = %e, "io_uring submit failed");
                self.reads_at_device -= 1;
                self.fail_slot(idx as usize, e);
            }
        }
        // A read waits only behind reads in the kernel, whose completions
        // release it: nothing can wait forever.
        debug_assert!(self.held.is_empty() || self.reads_at_device > 0);
    }

    /// Completes an operation that never reached the kernel with `e`.
    fn fail_slot(&mut self, idx: usize, e: io::Error) {
        if let Some(slot) = self.slots[idx].take() {
            self.free_slots.push(idx as u32);
            self.in_flight -= 1;
            self.failed.push(IoCompletion {
                user_data: slot.user_data,
                result: Err(e),
                buf: slot.buf,
            });
        }
    }

    /// Moves up to `max` completions to `out`; true if a wake-up was among them.
    fn reap(&mut self, max: usize, out: &mut Vec<IoCompletion>) -> bool {
        out.append(&mut self.failed);
        let mut woke = false;
        let mut reads = 0;
        for cqe in self.ring.completion().take(max) {
            if cqe.user_data() == WAKE_TAG {
                self.wake_armed = false;
                woke = true;
                continue;
            }
            let idx = cqe.user_data() as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
                tracing::error!(idx, "completion for an unknown io_uring slot");
                continue;
            };
            self.free_slots.push(idx as u32);
            self.in_flight -= 1;
            if slot.read {
                self.reads_at_device -= 1;
                reads += 1;
            }
            let res = cqe.result();
            out.push(IoCompletion {
                user_data: slot.user_data,
                result: if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                },
                buf: slot.buf,
            });
        }
        if reads > 0 {
            self.depth.completed(reads, std::time::Instant::now());
            self.release_held();
        }
        woke
    }

    fn enter(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: the caller reaps, then comes back.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl IoEngine for UringEngine {
    fn push(&mut self, mut op: IoOp) {
        let read =
            op.kind == OpKind::Read && op.buf.as_ref().is_some_and(|b| b.len() <= SMALL_READ_MAX);
        let fd = types::Fixed(op.file as FileId);
        let sqe = match (op.kind, op.buf.as_mut()) {
            (OpKind::DataSync, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (OpKind::Read, Some(buf)) => {
                let (ptr, len) = (buf.as_mut_ptr(), buf.len() as u32);
                match self.fixed_index(buf) {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
                        .offset(op.offset)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len).offset(op.offset).build(),
                }
            }
            (OpKind::Write, Some(buf)) => {
                let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
                match self.fixed_index(buf) {
                    Some(i) => opcode::WriteFixed::new(fd, ptr, len, i)
                        .offset(op.offset)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len).offset(op.offset).build(),
                }
            }
            (_, None) => {
                self.failed.push(IoCompletion {
                    user_data: op.user_data,
                    result: Err(io::Error::from_raw_os_error(libc::EINVAL)),
                    buf: None,
                });
                return;
            }
        };
        let idx = match self.free_slots.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let sqe = sqe.user_data(idx as u64);
        self.slots[idx] = Some(Slot {
            user_data: op.user_data,
            buf: op.buf,
            read,
        });
        self.in_flight += 1;
        if read {
            // In order: behind the reads already waiting, if any.
            if !self.held.is_empty() || !self.depth.admit(self.reads_at_device) {
                self.depth.hold();
                self.held.push_back((idx as u32, sqe));
                self.reads_held += 1;
                return;
            }
            self.reads_at_device += 1;
        }
        if let Err(e) = self.push_sqe(&sqe) {
            // The kernel refused the batch: complete this op with the error; the
            // buffer was never handed over.
            tracing::error!(error = %e, "io_uring submit failed");
            if read {
                self.reads_at_device -= 1;
            }
            self.fail_slot(idx, e);
        }
    }

    fn submit_and_wait(
        &mut self,
        wait: bool,
        max: usize,
        out: &mut Vec<IoCompletion>,
    ) -> io::Result<()> {
        let before = out.len();
        if wait {
            self.arm_wake()?;
        }
        // Completions, or a wake-up, may already be waiting: then there is no
        // reason to sleep (a consumed wake-up must not be slept through).
        let woke = self.reap(max, out);
        let want = usize::from(wait && !woke && out.len() == before);
        if want == 0 && self.ring.submission().is_empty() {
            return Ok(());
        }
        self.enter(want)?;
        let room = max.saturating_sub(out.len() - before);
        self.reap(room, out);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn has_completions(&mut self) -> bool {
        !self.failed.is_empty() || !self.ring.completion().is_empty()
    }

    fn waker(&self) -> Waker {
        self.eventfd.clone()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn registered_bytes(&self) -> usize {
        self.fixed.map_or(0, |(_, len)| len)
    }

    fn read_depth(&self) -> Option<ReadDepthStats> {
        Some(ReadDepthStats {
            limit: self.depth.limit(),
            at_device: self.reads_at_device,
            held_total: self.reads_held,
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Buffers must not be freed while the kernel may still write into them:
        // wake the armed eventfd read and drain everything in flight.
        if self.wake_armed {
            self.eventfd.wake();
        }
        let mut sink = Vec::new();
        while self.in_flight > 0 || self.wake_armed {
            if self.enter(1).is_err() {
                break;
            }
            self.reap(usize::MAX, &mut sink);
            sink.clear();
        }
        // Ring teardown is asynchronous in the kernel and would keep the files
        // (and their flock) alive for a while: let go of them synchronously.
        let _ = self.ring.submitter().unregister_files();
        let _ = self.ring.submitter().unregister_buffers();
    }
}
