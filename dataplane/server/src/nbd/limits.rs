//! What unauthenticated or misbehaving NBD clients may cost the node.
//!
//! Before a client has shown a grant it is nobody, and the NBD port is open to
//! the network. Three things bound what it can take:
//!
//! - [`Admission`]: connections still in the handshake, per peer address and in
//!   total, and connections in all; what is over a limit is closed at once,
//!   and file descriptors stay in reserve for the control plane (gRPC, the
//!   pool, RocksDB). 20,000 idle connections once exhausted the descriptors
//!   and hung good clients and the control API alike.
//! - [`Refusals`]: a refused export lookup is audited in full once per peer
//!   and window; the rest are counted into one summary entry when the window
//!   ends. A client guessing names once grew the audit log by 57 MB and its
//!   hash chain by 83,000 entries in 20 s; the chain still shows every
//!   refusal, now by count.
//! - [`PayloadBudget`]: request and reply payloads buffered in memory, across
//!   all connections. A client that sends reads and never reads the replies
//!   holds at most its connection's share; under pressure, a connection whose
//!   replies have not moved for [`STALL_UNDER_PRESSURE`] is cut off, so good
//!   clients wait seconds, not forever, and memory stays bounded.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::audit::AuditEvent;
use crate::node::Peer;

/// How many connections may be where, and how many descriptors to keep free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections in the handshake from one peer address.
    pub handshakes_per_peer: usize,
    /// Connections in the handshake in all.
    pub handshakes: usize,
    /// NBD connections in all (handshake and transmission).
    pub connections: usize,
}

impl ConnLimits {
    /// Descriptors kept for everything but NBD connections.
    pub const RESERVED_FDS: usize = 512;

    /// Limits for a process allowed `nofile` open descriptors.
    pub fn for_nofile(nofile: u64) -> ConnLimits {
        let spare = (nofile as usize).saturating_sub(Self::RESERVED_FDS).max(16);
        ConnLimits {
            handshakes_per_peer: 32.min(spare),
            handshakes: 256.min(spare),
            connections: 16_384.min(spare),
        }
    }

    /// Raises the soft descriptor limit to the hard one (as servers do) and
    /// returns the limits that leave [`Self::RESERVED_FDS`] free.
    pub fn from_process() -> ConnLimits {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for the call to fill in.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Self::for_nofile(1024);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: `raised` is a valid rlimit; raising the soft limit up to
            // the hard one needs no privilege.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        Self::for_nofile(lim.rlim_cur)
    }
}

/// Counts connections against [`ConnLimits`].
#[derive(Debug)]
pub struct Admission {
    limits: ConnLimits,
    state: Mutex<AdmissionState>,
}

#[derive(Debug, Default)]
struct AdmissionState {
    handshakes: usize,
    per_peer: HashMap<IpAddr, usize>,
    connections: usize,
}

/// A connection's place: in the handshake until [`Admitted::handshake_done`],
/// counted until dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    peer: Option<IpAddr>,
    handshaking: bool,
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            state: Mutex::new(AdmissionState::default()),
        })
    }

    /// A place for a new connection from `peer`, or why there is none.
    pub fn admit(self: &Arc<Self>, peer: &Peer) -> Result<Admitted, &'static str> {
        let ip = match peer {
            Peer::Tcp(a) => Some(a.ip()),
            Peer::Unix => None,
        };
        let mut s = self.state.lock();
        if s.connections >= self.limits.connections {
            return Err("too many NBD connections");
        }
        if s.handshakes >= self.limits.handshakes {
            return Err("too many connections in the handshake");
        }
        if let Some(ip) = ip {
            let n = s.per_peer.entry(ip).or_default();
            if *n >= self.limits.handshakes_per_peer {
                return Err("too many connections in the handshake from this address");
            }
            *n += 1;
        }
        s.handshakes += 1;
        s.connections += 1;
        Ok(Admitted {
            admission: self.clone(),
            peer: ip,
            handshaking: true,
        })
    }

    /// (connections in the handshake, connections in all).
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.handshakes, s.connections)
    }
}

impl Admitted {
    /// The client showed a grant: it no longer counts against the handshake
    /// limits.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut s = self.admission.state.lock();
            leave_handshake(&mut s, self.peer);
        }
    }
}

fn leave_handshake(s: &mut AdmissionState, peer: Option<IpAddr>) {
    s.handshakes -= 1;
    if let Some(ip) = peer {
        if let Some(n) = s.per_peer.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&ip);
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut s = self.admission.state.lock();
        if self.handshaking {
            leave_handshake(&mut s, self.peer);
        }
        s.connections -= 1;
    }
}

/// The window over which one peer's refusals are summed into one entry.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Peers whose refusals are tracked one by one; past that, all others are
/// summed together.
const MAX_REFUSING_PEERS: usize = 1024;
/// Export names a summary lists (the count says how many there were).
const SUMMARY_TARGETS: usize = 5;

/// Refused export lookups, summed per peer address (see the module doc).
#[derive(Debug, Default)]
pub struct Refusals {
    peers: Mutex<HashMap<String, Window>>,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    /// Refusals counted since the one audited in full.
    more: u64,
    targets: BTreeSet<String>,
    last_reason: String,
}

impl Refusals {
    /// The key a peer's refusals are summed under: its address without the
    /// port (a client opens a new connection, with a new port, each time).
    fn key(peer: &Peer) -> String {
        match peer {
            Peer::Tcp(a) => a.ip().to_string(),
            Peer::Unix => "unix".into(),
        }
    }

    /// Notes a refusal; returns the event to audit now: the refusal itself
    /// if it opens a window for its peer, else nothing (it is counted).
    pub fn note(&self, now: Instant, peer: &Peer, ev: AuditEvent) -> Option<AuditEvent> {
        let mut peers = self.peers.lock();
        let mut key = Self::key(peer);
        if !peers.contains_key(&key) && peers.len() >= MAX_REFUSING_PEERS {
            key = "other peers".into();
        }
        match peers.get_mut(&key) {
            Some(w) => {
                w.more += 1;
                if w.targets.len() < SUMMARY_TARGETS {
                    w.targets.insert(ev.target);
                }
                w.last_reason = ev.result;
                None
            }
            None => {
                peers.insert(
                    key,
                    Window {
                        opened: now,
                        more: 0,
                        targets: BTreeSet::new(),
                        last_reason: String::new(),
                    },
                );
                Some(ev)
            }
        }
    }

    /// Summary entries of the windows that ended by `now` (every window when
    /// `all`, at shutdown); the peers' next refusals open new windows.
    pub fn due(&self, now: Instant, all: bool) -> Vec<AuditEvent> {
        let mut peers = self.peers.lock();
        let ended: Vec<String> = peers
            .iter()
            .filter(|(_, w)| all || now.duration_since(w.opened) >= REFUSAL_WINDOW)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in ended {
            let Some(w) = peers.remove(&k) else { continue };
            if w.more == 0 {
                continue;
            }
            let secs = now.duration_since(w.opened).as_secs().max(1);
            let targets: Vec<&str> = w.targets.iter().map(String::as_str).collect();
            out.push(AuditEvent {
                action: "refused".into(),
                target: targets.first().copied().unwrap_or_default().to_string(),
                result: format!(
                    "{} more refusals in {secs} s, the last: {}",
                    w.more, w.last_reason
                ),
                peer: k,
                detail: format!(
                    "count={} exports={}{}",
                    w.more,
                    targets.join(","),
                    if w.more as usize > targets.len() {
                        ",..."
                    } else {
                        ""
                    }
                ),
                ..Default::default()
            });
        }
        out
    }
}

/// Payload bytes buffered in memory across all connections, in 4 KiB units.
#[derive(Debug)]
pub struct PayloadBudget {
    units: Semaphore,
    total: usize,
}

/// How long, with the budget under pressure, a connection's replies may
/// stay unread before the connection is cut off.
pub const STALL_UNDER_PRESSURE: Duration = Duration::from_secs(5);

impl PayloadBudget {
    pub fn new(bytes: u64) -> PayloadBudget {
        let total = ((bytes / 4096) as usize).clamp(1, Semaphore::MAX_PERMITS);
        PayloadBudget {
            units: Semaphore::new(total),
            total,
        }
    }

    /// Takes `units` (waiting while the budget is spent).
    pub async fn take(&self, units: u32) -> Result<(), tokio::sync::AcquireError> {
        let units = units.min(self.total as u32);
        self.units.acquire_many(units).await?.forget();
        Ok(())
    }

    /// Gives back what [`Self::take`] took.
    pub fn give(&self, units: u32) {
        self.units.add_permits((units as usize).min(self.total));
    }

    fn held(&self) -> usize {
        self.total - self.units.available_permits()
    }

    /// Bytes buffered now.
    pub fn held_bytes(&self) -> u64 {
        self.held() as u64 * 4096
    }

    /// Less than a quarter of the budget is left.
    pub fn under_pressure(&self) -> bool {
        self.held() * 4 > self.total * 3
    }

    /// The most one connection may hold: a quarter of the budget, so one
    /// client never has it all.
    pub fn per_connection_units(&self, cap: usize) -> usize {
        (self.total / 4).clamp(1, cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> Peer {
        Peer::Tcp(s.parse().expect("addr"))
    }

    #[test]
    fn handshakes_are_capped_per_peer_and_in_total() {
        let a = Admission::new(ConnLimits {
            handshakes_per_peer: 2,
            handshakes: 3,
            connections: 4,
        });
        let p1 = a.admit(&tcp("10.0.0.1:1")).expect("1");
        let mut p2 = a.admit(&tcp("10.0.0.1:2")).expect("2");
        assert!(a.admit(&tcp("10.0.0.1:3")).is_err(), "per peer");
        let _q = a.admit(&tcp("10.0.0.2:1")).expect("other peer");
        assert!(a.admit(&Peer::Unix).is_err(), "in total");
        // A finished handshake frees its handshake place, not its connection.
        p2.handshake_done();
        let _p3 = a.admit(&tcp("10.0.0.1:3")).expect("after GO");
        assert_eq!(a.counts(), (3, 4));
        assert!(a.admit(&tcp("10.0.0.3:1")).is_err(), "connections");
        drop(p1);
        drop(p2);
        assert_eq!(a.counts(), (2, 2));
    }

    #[test]
    fn refusals_are_audited_once_per_window_and_summed() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let ev = |name: &str| AuditEvent {
            action: "refused".into(),
            target: name.into(),
            result: "no such export".into(),
            ..Default::default()
        };
        assert!(r.note(t0, &tcp("10.0.0.1:5"), ev("a")).is_some());
        for i in 0..1000 {
            assert!(r
                .note(
                    t0,
                    &tcp(&format!("10.0.0.1:{}", 6 + i)),
                    ev(&format!("n{i}"))
                )
                .is_none());
        }
        // Another peer has its own window.
        assert!(r.note(t0, &tcp("10.0.0.2:5"), ev("b")).is_some());
        assert!(r.due(t0 + Duration::from_secs(1), false).is_empty());
        let s = r.due(t0 + REFUSAL_WINDOW, false);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].peer, "10.0.0.1");
        assert!(
            s[0].result.starts_with("1000 more refusals"),
            "{}",
            s[0].result
        );
        assert!(s[0].detail.starts_with("count=1000 "), "{}", s[0].detail);
        // The window closed: the next refusal is audited in full again.
        assert!(r.note(t0, &tcp("10.0.0.1:9"), ev("c")).is_some());
        assert!(r.due(t0, true).is_empty(), "no refusal was counted since");
    }

    #[test]
    fn the_payload_budget_counts_and_signals_pressure() {
        let b = PayloadBudget::new(16 * 4096);
        assert_eq!(b.per_connection_units(1000), 4);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            b.take(12).await.expect("take");
            assert!(!b.under_pressure());
            b.take(1).await.expect("take");
            assert!(b.under_pressure());
            assert_eq!(b.held_bytes(), 13 * 4096);
            // More than is left waits.
            let more = tokio::time::timeout(Duration::from_millis(50), b.take(4)).await;
            assert!(more.is_err());
            b.give(13);
            assert_eq!(b.held_bytes(), 0);
        });
    }
}
