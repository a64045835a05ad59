//! A reader that polls for its next request for a short while after one,
//! under a shallow load, instead of sleeping: a sleeping thread woken from
//! another CPU costs tens of µs on a VM. The NBD and FUSE readers both do
//! this; see `berth_store::Shallow` and docs/pod-path.md, "Wake-ups".

use std::time::{Duration, Instant};

pub(crate) struct ReaderPoll {
    shallow: berth_store::Shallow,
    until: Option<Instant>,
}

impl ReaderPoll {
    pub(crate) fn new() -> Self {
        ReaderPoll {
            shallow: berth_store::Shallow::new(),
            until: None,
        }
    }

    /// Whether the reader should look again rather than sleep now.
    pub(crate) fn polling(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }

    /// After a request that came at `last`, with `live` requests in flight:
    /// poll until `window` after it if the load is shallow.
    pub(crate) fn after(&mut self, live: usize, last: Instant, window: Duration) {
        self.until = self.shallow.observe(live).then(|| last + window);
    }

    /// The pause between two looks: the thread's other tasks and its reactor
    /// run, and the CPU is yielded, so a thread woken on it (the client, a
    /// loop device's worker) runs now, not when the scheduler would preempt
    /// the reader. A select on it goes through its cancellation first.
    pub(crate) async fn pause() {
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}
