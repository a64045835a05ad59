//! The service's line to the nexuses of replicated volumes
//! (`docs/replication.md`). A nexus runs in the attaching process, which
//! the service cannot call; so each nexus calls `WatchNexus` and keeps the
//! stream open, and the service sends what it needs on it. Today that is a
//! pause for a snapshot: every in-sync replica must snapshot the same point,
//! so the nexus stops sending writes, lets the ones in flight land, flushes
//! its replicas and answers `Quiesced`; that call is held until the
//! snapshots are taken, then the nexus goes on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_proto::meta::v1 as pb;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::error::{MetaError, Result};

/// How long a pause waits for the nexus to say it has paused.
const PAUSE_WITHIN: Duration = Duration::from_secs(10);
/// The longest a nexus stays paused, whatever happens to the caller.
const MAX_PAUSE: Duration = Duration::from_secs(60);

pub type EventSender = mpsc::Sender<std::result::Result<pb::NexusEvent, tonic::Status>>;

struct Watcher {
    id: u64,
    node: String,
    tx: EventSender,
}

struct Pending {
    volume: String,
    paused: Option<oneshot::Sender<std::result::Result<(), String>>>,
    release: Option<oneshot::Receiver<()>>,
}

/// The nexuses listening, by volume, and the pauses in progress.
#[derive(Default)]
pub struct Nexuses {
    watchers: Mutex<HashMap<String, Watcher>>,
    pending: Mutex<HashMap<String, Pending>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Nexuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nexuses")
            .field("listening", &self.watchers.lock().len())
            .field("pauses", &self.pending.lock().len())
            .finish()
    }
}

/// A paused nexus: dropping this lets it go on.
#[derive(Debug)]
pub struct Pause {
    release: Option<oneshot::Sender<()>>,
}

impl Drop for Pause {
    fn drop(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

impl Nexuses {
    /// Lets every nexus go (this service stops leading): their streams end
    /// and they find the new leader; pauses in progress are released.
    pub fn close_all(&self) {
        self.watchers.lock().clear();
        self.pending.lock().clear();
    }

    /// A nexus on `node` listens for `volume` (the latest one replaces any
    /// earlier: a volume has one nexus).
    pub fn watch(&self, volume: &str, node: &str, tx: EventSender) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(volume, node, "a nexus listens");
        self.watchers.lock().insert(
            volume.to_string(),
            Watcher {
                id,
                node: node.to_string(),
                tx,
            },
        );
    }

    /// Pauses the nexus of `volume` on `node`, waiting up to `find_within`
    /// for it to be listening (it may be reconnecting after a restart of
    /// this service).
    pub async fn pause(
        &self,
        volume: &str,
        node: &str,
        reason: &str,
        find_within: Duration,
    ) -> Result<Pause> {
        let end = tokio::time::Instant::now() + find_within;
        let (tx, id) = loop {
            let found = {
                let w = self.watchers.lock();
                w.get(volume)
                    .filter(|w| w.node == node && !w.tx.is_closed())
                    .map(|w| (w.tx.clone(), w.id))
            };
            if let Some(f) = found {
                break f;
            }
            if tokio::time::Instant::now() >= end {
                return Err(MetaError::Unavailable(format!(
                    "the nexus of volume {volume} on node {node} is not listening: a snapshot \
                     of a replicated volume needs it to pause writes; retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let token = format!(
            "{volume}-{id}-{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (paused_tx, paused_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.pending.lock().insert(
            token.clone(),
            Pending {
                volume: volume.to_string(),
                paused: Some(paused_tx),
                release: Some(release_rx),
            },
        );
        let pause = Pause {
            release: Some(release_tx),
        };
        let event = pb::NexusEvent {
            quiesce_token: token.clone(),
            reason: reason.to_string(),
        };
        let answered = async {
            tx.send(Ok(event)).await.map_err(|_| {
                MetaError::Unavailable(format!("the nexus of volume {volume} stopped listening"))
            })?;
            match tokio::time::timeout(PAUSE_WITHIN, paused_rx).await {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(why))) => Err(MetaError::FailedPrecondition(format!(
                    "the nexus of volume {volume} could not pause: {why}"
                ))),
                Ok(Err(_)) => Err(MetaError::Aborted("the pause was dropped".into())),
                Err(_) => Err(MetaError::Unavailable(format!(
                    "the nexus of volume {volume} did not pause within {PAUSE_WITHIN:?}"
                ))),
            }
        }
        .await;
        if let Err(e) = answered {
            self.pending.lock().remove(&token);
            let mut w = self.watchers.lock();
            if w.get(volume)
                .is_some_and(|w| w.id == id && w.tx.is_closed())
            {
                w.remove(volume);
            }
            return Err(e);
        }
        Ok(pause)
    }

    /// The nexus paused for `token` (or could not: `error`). Returns when
    /// the pause is over.
    pub async fn paused(&self, volume: &str, token: &str, error: &str) -> Result<()> {
        let (paused, release) = {
            let mut p = self.pending.lock();
            match p.get_mut(token) {
                Some(x) if x.volume == volume => (x.paused.take(), x.release.take()),
                _ => {
                    return Err(MetaError::NotFound(format!(
                        "no pause {token} of volume {volume} is waiting (it timed out)"
                    )))
                }
            }
        };
        let result = if error.is_empty() {
            Ok(())
        } else {
            Err(error.to_string())
        };
        let ok = result.is_ok();
        if let Some(tx) = paused {
            let _ = tx.send(result);
        }
        if ok {
            if let Some(rx) = release {
                let _ = tokio::time::timeout(MAX_PAUSE, rx).await;
            }
        }
        self.pending.lock().remove(token);
        Ok(())
    }
}
