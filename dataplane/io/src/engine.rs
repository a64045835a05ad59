//! The narrow asynchronous I/O interface the block store drives.
//!
//! One engine belongs to one thread. The thread pushes operations, each tagged
//! with its own `user_data` and owning its buffer, then calls
//! [`IoEngine::submit_and_wait`], which submits everything queued in one batch and
//! sleeps (no busy polling) until a completion arrives or another thread calls
//! [`Waker::wake`]. Completions hand the buffer back.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::buf::{Arena, IoBuf};

/// Index of a file given to the engine when it was built.
pub type FileId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    /// `fdatasync` of the file; carries no buffer.
    DataSync,
}

#[derive(Debug)]
pub struct IoOp {
    pub kind: OpKind,
    pub file: FileId,
    /// Byte offset in the file (aligned to 4 KiB for reads and writes).
    pub offset: u64,
    /// The whole buffer is read or written; `None` only for `DataSync`.
    pub buf: Option<IoBuf>,
    pub user_data: u64,
}

#[derive(Debug)]
pub struct IoCompletion {
    pub user_data: u64,
    /// Bytes transferred (a short count is the caller's to treat as an error).
    pub result: io::Result<usize>,
    pub buf: Option<IoBuf>,
}

/// Wakes an engine's thread out of `submit_and_wait` from any thread.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

pub type Waker = Arc<dyn Wake>;

pub trait IoEngine: Send {
    /// Queues an operation; nothing reaches the kernel until `submit_and_wait`.
    fn push(&mut self, op: IoOp);

    /// Submits everything queued, then waits until at least one completion is ready
    /// (if `wait`) or a wake-up arrives, and moves up to `max` ready completions
    /// into `out` (the rest stay for the next call). With `wait == false` it only
    /// reaps.
    fn submit_and_wait(
        &mut self,
        wait: bool,
        max: usize,
        out: &mut Vec<IoCompletion>,
    ) -> io::Result<()>;

    /// Operations pushed and not yet returned as completions.
    fn in_flight(&self) -> usize;

    /// Whether completions are waiting to be reaped (no system call).
    fn has_completions(&mut self) -> bool;

    fn waker(&self) -> Waker;

    /// `"io_uring"` or `"sync"`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Bytes of the buffer arena registered with the kernel (io_uring's fixed
    /// buffers, which skip pinning pages on every operation); 0 when none is.
    fn registered_bytes(&self) -> usize {
        0
    }

    /// Where the engine limits the reads at the device ([`crate::depth`]):
    /// the limit now, and how many reads have waited for it.
    fn read_depth(&self) -> Option<ReadDepthStats> {
        None
    }
}

/// What [`IoEngine::read_depth`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadDepthStats {
    /// Reads the device may hold now.
    pub limit: usize,
    /// Reads the device holds now.
    pub at_device: usize,
    /// Reads that waited for the limit since the engine started.
    pub held_total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring, or the thread-pool fallback (with a warning) where the kernel or a
    /// seccomp profile refuses it.
    Auto,
    Uring,
    Sync,
}

impl EngineChoice {
    /// Reads `BERTH_IO_ENGINE` (`auto`, `io_uring`, `sync`); unset means auto.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("BERTH_IO_ENGINE").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(EngineChoice::Auto),
            Ok("io_uring") | Ok("uring") => Ok(EngineChoice::Uring),
            Ok("sync") => Ok(EngineChoice::Sync),
            Ok(other) => Err(format!(
                "BERTH_IO_ENGINE={other:?}: expected auto, io_uring or sync"
            )),
        }
    }
}

/// Builds the engine for one I/O thread over `files` with room for `depth`
/// operations in flight, limiting the reads at the device as `read_depth`
/// says (io_uring only: the thread pool's depth is its threads).
pub fn open_engine(
    choice: EngineChoice,
    files: &[RawFd],
    arena: &Arc<Arena>,
    depth: u32,
    read_depth: crate::depth::ReadDepthMode,
) -> io::Result<Box<dyn IoEngine>> {
    let uring = || crate::uring::UringEngine::new(files, arena, depth, read_depth);
    match choice {
        EngineChoice::Sync => Ok(Box::new(crate::sync::SyncEngine::new(files, depth)?)),
        EngineChoice::Uring => Ok(Box::new(uring()?)),
        EngineChoice::Auto => match uring() {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "io_uring is unavailable (kernel or seccomp profile); using the pread/pwrite thread pool"
                );
                Ok(Box::new(crate::sync::SyncEngine::new(files, depth)?))
            }
        },
    }
}
