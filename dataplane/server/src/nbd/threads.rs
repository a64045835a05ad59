//! The threads the NBD data path runs on.
//!
//! Each thread runs a single-threaded tokio runtime, and a connection lives
//! on one of them, its request reader and its reply writer together: a
//! request then crosses exactly two threads (this one and the store's I/O
//! thread) on its way in and out. On the process's multi-threaded runtime
//! the reader and writer of one connection landed on different workers, and
//! every request paid for waking both (and for idle workers looking for work
//! to steal). Measured on a 2-vCPU VM, one fio nbd connection, 5 s runs:
//! 4 KiB random writes at queue depth 1 went from 5,674 to 10,245 IOPS (p50
//! 165 to 91 µs, server CPU per request 94 to 43 µs), reads at QD1 from 6,679
//! to 9,822 IOPS, writes at QD32 from 63K to 79K; reads at QD32 stayed at 57K.
//!
//! A new connection goes to the thread with the fewest connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// One thread: its runtime's handle and how many connections it serves.
#[derive(Debug)]
struct Thread {
    handle: tokio::runtime::Handle,
    conns: Arc<AtomicUsize>,
}

/// The NBD threads; they end when this is dropped (their connections with them).
#[derive(Debug)]
pub struct NbdThreads {
    threads: Vec<Thread>,
    stop: CancellationToken,
}

/// Counts a connection on its thread while it lives.
#[derive(Debug)]
pub struct Placed(Arc<AtomicUsize>);

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A quarter of the cores, at least one and at most eight: one store I/O
/// thread keeps about one NBD thread busy.
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 4)
        .clamp(1, 8)
}

impl NbdThreads {
    pub fn start(count: usize) -> std::io::Result<NbdThreads> {
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let done = stop.clone();
            std::thread::Builder::new()
                .name(format!("berth-nbd-{i}"))
                .spawn(move || {
                    let _guard = berth_store::AbortOnPanic("berth-nbd");
                    rt.block_on(done.cancelled())
                })?;
            threads.push(Thread {
                handle,
                conns: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(NbdThreads { threads, stop })
    }

    /// The thread for a new connection, counted until the guard drops.
    pub fn place(&self) -> (tokio::runtime::Handle, Placed) {
        let t = self
            .threads
            .iter()
            .min_by_key(|t| t.conns.load(Ordering::Relaxed))
            .expect("at least one NBD thread");
        t.conns.fetch_add(1, Ordering::Relaxed);
        (t.handle.clone(), Placed(t.conns.clone()))
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Drop for NbdThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_thread_and_are_uncounted_when_done() {
        let t = NbdThreads::start(2).expect("threads");
        let (h1, a) = t.place();
        let (h2, b) = t.place();
        assert_ne!(
            h1.id(),
            h2.id(),
            "the second connection gets the idle thread"
        );
        drop(a);
        let (h3, _c) = t.place();
        assert_eq!(h3.id(), h1.id(), "the freed thread is the least loaded");
        drop(b);
        // Work placed on a thread runs there.
        let (tx, rx) = std::sync::mpsc::channel();
        h2.spawn(async move {
            tx.send(std::thread::current().name().map(str::to_string))
                .expect("send");
        });
        let name = rx.recv().expect("ran").unwrap_or_default();
        assert!(name.starts_with("berth-nbd-"), "{name}");
    }
}
