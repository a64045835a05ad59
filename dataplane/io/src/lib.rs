//! Berth's I/O engine: the layer between the block store and the disk.
//!
//! - [`buf`]: an aligned buffer arena registered with the kernel, and the owned
//!   [`IoBuf`]s cut from it.
//! - [`engine`]: the [`IoEngine`] trait (push tagged operations, submit in batches,
//!   sleep until completions), and [`open_engine`] which picks io_uring or, where
//!   io_uring is refused, the [`sync`] thread-pool fallback.
//! - [`depth`]: how many reads an engine keeps at the device, found by
//!   hill climbing on the rate of completed reads (a convoy's cure).
//! - [`fault`]: an engine that wraps another and injects errors, short
//!   transfers and slow completions into the operations a plan picks.
//!
//! This crate knows nothing of volumes, tokio or gRPC.

pub mod buf;
pub mod depth;
pub mod engine;
pub mod fault;
pub mod private;
pub mod sync;
pub mod uring;

pub use buf::{Arena, IoBuf, PAGE};
pub use engine::{
    open_engine, EngineChoice, FileId, IoCompletion, IoEngine, IoOp, OpKind, ReadDepthStats, Wake,
    Waker,
};

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Held by every thread of the data path: if the thread unwinds (a panic), the
/// process ends at once. A server whose I/O thread died would still answer
/// health checks while every request hangs; aborting hands the problem to the
/// supervisor and to the clients' reconnect logic, which can do something
/// about it. (The `berth` binary also aborts on a panic in any thread, through
/// its panic hook; this guard keeps the promise wherever the store is used.)
#[derive(Debug)]
pub struct AbortOnPanic(pub &'static str);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The panic message is already on stderr (the default hook ran).
            eprintln!(
                "berth: the {} thread panicked; aborting the process",
                self.0
            );
            std::process::abort();
        }
    }
}

/// Spawns a named data-path thread that takes the process with it if it dies.
pub fn spawn_critical<F>(name: &'static str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _guard = AbortOnPanic(name);
            f()
        })
}

/// Opens a file or block device for direct I/O (`O_DIRECT`), read-write.
///
/// Filesystems without `O_DIRECT` (tmpfs) get a buffered descriptor and a warning:
/// data still reaches the file, only the page cache is not bypassed.
pub fn open_direct(path: &Path, create: bool) -> std::io::Result<File> {
    let open = |flags| {
        // A new pool file is its owner's alone (see `private`).
        private::create_options()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT | libc::O_CLOEXEC) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT not supported here; using buffered I/O");
            open(libc::O_CLOEXEC)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    fn engines() -> Vec<EngineChoice> {
        vec![EngineChoice::Uring, EngineChoice::Sync]
    }

    type Fixture = (
        (tempfile::TempDir, std::fs::File),
        Arc<Arena>,
        Box<dyn IoEngine>,
    );

    /// A 1 MiB file opened for direct I/O, an arena, and an engine over them.
    fn fixture(choice: EngineChoice) -> Fixture {
        fixture_limited(choice, Default::default())
    }

    fn fixture_limited(choice: EngineChoice, reads: depth::ReadDepthMode) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = open_direct(&dir.path().join("pool"), true).expect("open");
        file.set_len(1 << 20).expect("size");
        let arena = Arena::new(1 << 20).expect("arena");
        let e = open_engine(choice, &[file.as_raw_fd()], &arena, 64, reads).expect("engine");
        ((dir, file), arena, e)
    }

    /// Reads blocks 0 to `n`, all at once, tagged `tag + i`.
    fn push_reads(e: &mut dyn IoEngine, arena: &Arc<Arena>, n: u64, tag: u64) {
        for i in 0..n {
            e.push(IoOp {
                kind: OpKind::Read,
                file: 0,
                offset: i * PAGE as u64,
                buf: Some(arena.alloc_uninit(PAGE)),
                user_data: tag + i,
            });
        }
    }

    /// Writes block `i` (of `n`) full of the byte `i + 1`, all at once.
    fn push_pattern(e: &mut dyn IoEngine, arena: &Arc<Arena>, n: u64) {
        for i in 0..n {
            let mut b = arena.alloc(PAGE);
            b.as_mut_slice().fill(i as u8 + 1);
            e.push(IoOp {
                kind: OpKind::Write,
                file: 0,
                offset: i * PAGE as u64,
                buf: Some(b),
                user_data: i,
            });
        }
    }

    fn wait_all(e: &mut dyn IoEngine, n: usize) -> Vec<IoCompletion> {
        let mut out = Vec::new();
        while out.len() < n {
            e.submit_and_wait(true, usize::MAX, &mut out)
                .expect("submit");
        }
        out
    }

    #[test]
    fn batched_writes_then_reads_round_trip_on_both_engines() {
        for choice in engines() {
            let (_dir, arena, mut e) = fixture(choice);
            push_pattern(e.as_mut(), &arena, 32);
            let done = wait_all(e.as_mut(), 32);
            assert!(
                done.iter().all(|c| matches!(c.result, Ok(n) if n == PAGE)),
                "{choice:?}"
            );
            e.push(IoOp {
                kind: OpKind::DataSync,
                file: 0,
                offset: 0,
                buf: None,
                user_data: 99,
            });
            let done = wait_all(e.as_mut(), 1);
            assert_eq!(done[0].user_data, 99);
            assert!(done[0].result.is_ok());
            push_reads(e.as_mut(), &arena, 32, 1000);
            let mut done = wait_all(e.as_mut(), 32);
            done.sort_by_key(|c| c.user_data);
            for (i, c) in done.iter().enumerate() {
                let buf = c.buf.as_ref().expect("buffer comes back");
                assert!(
                    buf.as_slice().iter().all(|&x| x == i as u8 + 1),
                    "{choice:?} block {i}"
                );
            }
            assert_eq!(e.in_flight(), 0);
        }
    }

    #[test]
    fn reads_beyond_the_depth_limit_wait_and_all_complete_whole() {
        let (_dir, arena, mut e) =
            fixture_limited(EngineChoice::Uring, depth::ReadDepthMode::Fixed(3));
        push_pattern(e.as_mut(), &arena, 32);
        // Writes are not limited: all 32 are at the device at once.
        assert_eq!(e.read_depth().map(|d| d.at_device), Some(0));
        wait_all(e.as_mut(), 32);
        push_reads(e.as_mut(), &arena, 32, 1000);
        let d = e.read_depth().expect("io_uring reports its read depth");
        assert_eq!((d.limit, d.at_device, d.held_total), (3, 3, 29));
        let mut done = Vec::new();
        while done.len() < 32 {
            e.submit_and_wait(true, 1, &mut done).expect("submit");
            let d = e.read_depth().expect("depth");
            assert!(d.at_device <= 3, "{d:?}");
        }
        done.sort_by_key(|c| c.user_data);
        for (i, c) in done.iter().enumerate() {
            assert_eq!(c.user_data, 1000 + i as u64);
            let buf = c.buf.as_ref().expect("buffer comes back");
            assert!(
                buf.as_slice().iter().all(|&x| x == i as u8 + 1),
                "block {i}"
            );
        }
        assert_eq!(e.in_flight(), 0);
        // Dropped with reads still waiting for the limit: the drop drains
        // them (the kernel may write into their buffers until then).
        push_reads(e.as_mut(), &arena, 32, 0);
        e.submit_and_wait(false, 0, &mut Vec::new())
            .expect("submit");
        drop(e);
    }

    #[test]
    fn completions_are_handed_out_at_most_max_at_a_time() {
        for choice in engines() {
            let (_dir, arena, mut e) = fixture(choice);
            push_reads(e.as_mut(), &arena, 16, 0);
            let mut seen = 0;
            while seen < 16 {
                let mut out = Vec::new();
                e.submit_and_wait(true, 3, &mut out).expect("submit");
                assert!(out.len() <= 3, "{choice:?}: {} completions", out.len());
                seen += out.len();
            }
            assert_eq!(e.in_flight(), 0);
        }
    }

    #[test]
    fn a_wake_up_that_arrives_between_waits_is_not_lost() {
        for choice in engines() {
            let (_dir, arena, mut e) = fixture(choice);
            // A wait that returns for an I/O completion leaves the wake-up armed.
            e.push(IoOp {
                kind: OpKind::Read,
                file: 0,
                offset: 0,
                buf: Some(arena.alloc_uninit(PAGE)),
                user_data: 1,
            });
            wait_all(e.as_mut(), 1);
            // Woken while not waiting; the next wait must return, not sleep.
            e.waker().wake();
            let (tx, rx) = std::sync::mpsc::channel();
            let t = std::thread::spawn(move || {
                let mut out = Vec::new();
                e.submit_and_wait(true, usize::MAX, &mut out).expect("wait");
                let _ = tx.send(out.len());
            });
            let n = rx
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("{choice:?}: slept through a wake-up"));
            assert_eq!(n, 0);
            t.join().expect("waiter");
        }
    }

    #[test]
    fn errors_come_back_as_completions() {
        for choice in engines() {
            let (_dir, arena, mut e) = fixture(choice);
            // Misaligned O_DIRECT offset: EINVAL from the kernel.
            e.push(IoOp {
                kind: OpKind::Write,
                file: 0,
                offset: 1,
                buf: Some(arena.alloc(PAGE)),
                user_data: 5,
            });
            let done = wait_all(e.as_mut(), 1);
            assert_eq!(done[0].user_data, 5);
            assert!(done[0].result.is_err(), "{choice:?}: {:?}", done[0].result);
            assert!(done[0].buf.is_some());
        }
    }

    #[test]
    fn an_idle_engine_sleeps_until_woken() {
        for choice in engines() {
            let arena = Arena::new(1 << 16).expect("arena");
            let mut e = open_engine(choice, &[], &arena, 8, Default::default()).expect("engine");
            let waker = e.waker();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                waker.wake();
            });
            let start = std::time::Instant::now();
            let mut out = Vec::new();
            e.submit_and_wait(true, usize::MAX, &mut out).expect("wait");
            assert!(out.is_empty());
            assert!(
                start.elapsed() >= Duration::from_millis(90),
                "{choice:?} returned early"
            );
            t.join().expect("waker thread");
            let _ = Arc::strong_count(&arena);
        }
    }
}
