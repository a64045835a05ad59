//! The seam between a block frontend and what stores the blocks.
//!
//! A frontend (the FUSE file of `berth attach` today, a kernel frontend
//! later) serves any [`BlockTarget`]: one NBD [`Session`] to the volume
//! server holding an unreplicated volume, or a [`crate::nexus::Nexus`] that
//! fans the same requests out to the replicas of a replicated one. Requests
//! are submitted with a completion and never block the caller, so a frontend
//! keeps many in flight.

use std::future::Future;
use std::pin::Pin;

use crate::proto::TF_READ_ONLY;
use crate::session::{Cmd, Done, Outcome, Session};

/// A boxed future, for the trait's asynchronous calls.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A block device reached by NBD-shaped requests.
pub trait BlockTarget: Send + Sync + 'static {
    /// The size in bytes, as last learnt.
    fn size_bytes(&self) -> u64;
    /// NBD transmission flags (`proto::TF_*`): what the target accepts.
    fn flags(&self) -> u16;
    fn read_only(&self) -> bool {
        self.flags() & TF_READ_ONLY != 0
    }
    /// Queues a request; `done` is called once with its outcome, on a task
    /// of the target's, and must not block. It may be called within
    /// `submit` only when the target has ended (then with an error).
    fn submit(&self, cmd: Cmd, done: Done);
    /// Asks for the size again (after an expansion) and adopts it.
    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, String>>;
    /// Flushes (unless read-only) and ends the target's connections.
    fn close(&self) -> BoxFuture<'_, Outcome>;
}

/// Submits `cmd` and waits for its outcome.
pub async fn call(t: &dyn BlockTarget, cmd: Cmd) -> Outcome {
    let (tx, rx) = tokio::sync::oneshot::channel();
    t.submit(
        cmd,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await.unwrap_or(Err(crate::proto::EIO))
}

impl BlockTarget for Session {
    fn size_bytes(&self) -> u64 {
        Session::size_bytes(self)
    }

    fn flags(&self) -> u16 {
        Session::flags(self)
    }

    fn submit(&self, cmd: Cmd, done: Done) {
        Session::submit(self, cmd, done)
    }

    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(Session::refresh_size(self))
    }

    fn close(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(self.clone().close())
    }
}
