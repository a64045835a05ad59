//! The FUSE frontend: the volume server answers a local attachment's FUSE
//! requests itself, straight from the store.
//!
//! A pod's volume is a loop device over `berth attach`'s FUSE file. Over NBD
//! a request crossed six threads (the attach process's FUSE reader and its
//! runtime, the NBD thread, the store's I/O thread, and back through the NBD
//! thread and the attach process). Here the attach process mounts the file
//! and hands the mount's `/dev/fuse` descriptor over `fuse.sock` (see
//! [`berth_nbd::handoff`]); the session reads requests on an NBD thread,
//! admits them exactly as an NBD connection's (fence, QoS, the pool's tier
//! gate, the payload budget), and submits them to the store. The reply is
//! written to `/dev/fuse` by the store's I/O thread the moment the request
//! finishes: a write to `/dev/fuse` completes the kernel's request and never
//! blocks, so nothing is handed back to another thread.
//!
//! The filesystem has one folder and one file, `disk`, the size of the
//! volume (asked for at every `stat`: nothing is cached, so a grown volume
//! shows at once). Writes are refused on a read-only export; the namespace
//! cannot change; a truncate to another size is refused (the size is the
//! control plane's).
//!
//! A session ends when the kernel ends the mount (`ENODEV`), when the attach
//! process's connection closes (it died: the kernel then ends the mount once
//! the server lets go too), when the export is revoked, or at shutdown. Every
//! request read is answered first; then the store is flushed and the server
//! says `END` with the reason. A request that a server read and never
//! answered (it was killed) is sent again by the kernel when the next server
//! is handed the descriptor (`FUSE_NOTIFY_RESEND`); the store made every
//! acknowledged write durable against a process crash before answering it,
//! so nothing else needs replaying.

pub mod abi;

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_nbd::handoff::{self, Answer, Hello};
use berth_store::{Op, Outcome, Reply, StoreError, Target, Zeroing, MAX_REQUEST_BYTES};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use crate::nbd::server::{audit, audit_refusal, connect_event, disconnect_event};
use crate::node::{ConnCounters, FenceCheck, FenceGuard, Node, Peer, Refusal, Resolved};
use abi::*;

/// The largest write the kernel sends (and the largest read it asks for).
pub const MAX_WRITE: u32 = 1 << 20;
/// Asynchronous requests (a loop device's direct I/O) the kernel keeps in
/// flight. The kernel's default, 12, held a loop device at QD32 to 26K 4 KiB
/// reads per second on the 2-vCPU test VM; 128 gave 36K.
pub const MAX_BACKGROUND: u16 = 128;
/// A request buffer: the largest write and its headers.
const BUF_BYTES: usize = MAX_WRITE as usize + 4096;
/// Requests one session may have in the store at once.
const MAX_INFLIGHT: usize = 512;
/// Payload (4 KiB units) one session may have in flight.
const MAX_INFLIGHT_UNITS: usize = (128 << 20) / 4096;
/// Time an attach process has to send its hello, and a kernel its INIT.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// What the reader waits for: a request, or the kernel ending the
/// connection (poll says EPOLLERR then, never readable).
const WATCH: Interest = Interest::READABLE.add(Interest::ERROR);
/// Reads in a row (the kernel cuts a loop device's 1 MiB read into two FUSE
/// reads at a page boundary) are merged up to this size into one store read,
/// so an overwritten volume's window is fetched once (see the store's
/// gathered reads).
const MERGE_MAX: u32 = 4 << 20;
/// How long a session that ends waits for the requests it submitted.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one attach process's connection: the hello, then the mount until
/// it ends.
pub async fn serve(
    node: Arc<Node>,
    mut ctl: UnixStream,
    mut admitted: crate::nbd::limits::Admitted,
) {
    let peer = Peer::Unix;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            ctl.readable().await?;
            match ctl.try_io(Interest::READABLE, || handoff::recv_hello(ctl.as_raw_fd())) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    })
    .await;
    let (hello, dev) = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "FUSE handoff refused");
            let _ = answer(&mut ctl, Answer::Err(e.to_string())).await;
            return;
        }
        Err(_) => return,
    };
    if let Err(why) = is_fuse_device(&dev) {
        let _ = answer(&mut ctl, Answer::Err(why)).await;
        return;
    }
    let export = match node.resolve(&hello.export, &peer) {
        Ok(r) => r,
        Err(Refusal::Unknown(why) | Refusal::Policy(why)) => {
            audit_refusal(&node, &hello.export, &peer, &why).await;
            let _ = answer(&mut ctl, Answer::Err(why)).await;
            return;
        }
    };
    let Some((conn_id, cancel, counters)) = node.register_conn(&export, peer.clone()) else {
        let why = "export revoked during the handoff";
        audit_refusal(&node, &hello.export, &peer, why).await;
        let _ = answer(&mut ctl, Answer::Err(why.into())).await;
        return;
    };
    admitted.handshake_done();
    let span =
        tracing::info_span!("fuse", volume = %export.grant.name, client = %export.grant.client);
    serve_mount(node, ctl, hello, dev, export, conn_id, cancel, counters)
        .instrument(span)
        .await;
}

/// Serves a mount handed over and accepted, until it ends.
#[allow(clippy::too_many_arguments)]
async fn serve_mount(
    node: Arc<Node>,
    mut ctl: UnixStream,
    hello: Hello,
    dev: OwnedFd,
    export: Resolved,
    conn_id: u64,
    cancel: tokio_util::sync::CancellationToken,
    counters: Arc<ConnCounters>,
) {
    let peer = Peer::Unix;
    let g = export.grant.clone();
    let unit_cap = node.budget.per_connection_units(MAX_INFLIGHT_UNITS) as u32;
    let session = Arc::new(Session {
        node: node.clone(),
        size: AtomicU64::new(export.size_bytes),
        export,
        dev,
        pending: Mutex::new(slab::Slab::with_capacity(64)),
        slots: Semaphore::new(MAX_INFLIGHT),
        units: Semaphore::new(unit_cap as usize),
        unit_cap,
        counters,
        inflight: AtomicUsize::new(0),
        idle: Notify::new(),
        failures: Mutex::new(None),
    });
    let read_only = session.export.read_only;
    let how = if hello.resume {
        ", fuse, resumed"
    } else {
        ", fuse"
    };
    audit(&node, connect_event(&g, read_only, &peer, how)).await;
    let why = match session.start(&hello, &mut ctl).await {
        Ok(()) => session.run(&mut ctl, &cancel).await,
        Err(why) => why,
    };
    // Everything read is answered, then made durable.
    if tokio::time::timeout(DRAIN_TIMEOUT, session.drained())
        .await
        .is_err()
    {
        tracing::error!("FUSE requests still in the store after {DRAIN_TIMEOUT:?}");
    }
    if !read_only {
        let store = node.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.flush()).await {
            tracing::error!(error = %e, "flush at the end of a FUSE session failed");
        }
    }
    let _ = answer(&mut ctl, Answer::End(why.clone())).await;
    node.unregister_conn(conn_id, &session.export);
    let ev = disconnect_event(&g, &peer, &why, &session.counters, "fuse");
    tracing::info!(reason = %why, read_bytes = ev.read_bytes, write_bytes = ev.write_bytes, "FUSE session ended");
    // The last reference closes this server's copy of the descriptor: with
    // the attach process gone too, the kernel ends the mount. One kept
    // anywhere would leave the mount hanging, unserved.
    if Arc::strong_count(&session) != 1 {
        tracing::error!("a FUSE session is still referenced after it ended");
    }
    audit(&node, ev).await;
}

async fn answer(ctl: &mut UnixStream, a: Answer) -> std::io::Result<()> {
    ctl.write_all(a.line().as_bytes()).await
}

/// Only a FUSE device is served (character device 10:229).
fn is_fuse_device(fd: &OwnedFd) -> Result<(), String> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| format!("fstat: {e}"))?;
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if is_char && libc::major(st.st_rdev) == 10 && libc::minor(st.st_rdev) == 229 {
        Ok(())
    } else {
        Err("the descriptor handed over is not /dev/fuse".into())
    }
}

/// Who a store request answers: the FUSE request, and the reads merged
/// after it.
struct Replies {
    unique: u64,
    /// Bytes the first request wants (of the store request's).
    first_len: u32,
    /// (unique, bytes) of each read merged after it, in order.
    more: Vec<(u64, u32)>,
}

impl Replies {
    fn one(unique: u64, len: u32) -> Replies {
        Replies {
            unique,
            first_len: len,
            more: Vec::new(),
        }
    }

    fn uniques(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.unique).chain(self.more.iter().map(|m| m.0))
    }
}

/// A request in the store.
struct Pending {
    replies: Replies,
    opcode: u32,
    len: u32,
    offset: u64,
    started: Instant,
    units: u32,
    gated: Option<usize>,
    _fence: Option<FenceGuard>,
}

struct Session {
    node: Arc<Node>,
    export: Resolved,
    /// The file's size as last asked of the store.
    size: AtomicU64,
    dev: OwnedFd,
    pending: Mutex<slab::Slab<Pending>>,
    slots: Semaphore,
    units: Semaphore,
    unit_cap: u32,
    counters: Arc<ConnCounters>,
    inflight: AtomicUsize,
    idle: Notify,
    /// When a failed request was last logged (one line a second at most).
    failures: Mutex<Option<Instant>>,
}

/// The descriptor, borrowed for the reactor (the session owns it).
struct Dev(RawFd);

impl AsRawFd for Dev {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Session {
    /// A new mount: waits for the kernel's INIT and answers it. A resumed
    /// one: asks the kernel to send again what the last server had not
    /// answered. Then tells the attach process the mount is served.
    async fn start(&self, hello: &Hello, ctl: &mut UnixStream) -> Result<(), String> {
        set_nonblocking(&self.dev).map_err(|e| format!("fcntl: {e}"))?;
        if hello.resume {
            let h = out_header(OUT_HEADER, NOTIFY_RESEND, 0);
            if let Err(e) = nix::unistd::write(&self.dev, &h) {
                // Linux before 6.9: requests the last server read and never
                // answered stay unanswered.
                tracing::warn!(error = %e, "the kernel cannot send unanswered FUSE requests again");
            }
        } else {
            let afd = self.watch().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 8192];
            let n = tokio::time::timeout(HELLO_TIMEOUT, async {
                loop {
                    let mut g = afd.ready(WATCH).await?;
                    match g.try_io(|_| {
                        nix::unistd::read(&self.dev, &mut buf).map_err(std::io::Error::from)
                    }) {
                        Ok(r) => return r,
                        Err(_) => continue,
                    }
                }
            })
            .await
            .map_err(|_| "the kernel sent no FUSE_INIT".to_string())?
            .map_err(|e| format!("read FUSE_INIT: {e}"))?;
            let req = &buf[..n];
            let h = InHeader::parse(req).ok_or("short FUSE_INIT")?;
            if h.opcode != INIT {
                return Err(format!("the first FUSE request is {}, not INIT", h.opcode));
            }
            let (major, minor) = (
                u32_at(req, IN_HEADER).unwrap_or(0),
                u32_at(req, IN_HEADER + 4).unwrap_or(0),
            );
            if major != 7 || minor < MIN_MINOR {
                self.reply(h.unique, -libc::EPROTO, &[]);
                return Err(format!(
                    "FUSE protocol {major}.{minor}: 7.{MIN_MINOR} or later needed"
                ));
            }
            self.reply(h.unique, 0, &init_out(minor, MAX_WRITE, MAX_BACKGROUND));
        }
        answer(
            ctl,
            Answer::Ok {
                size_bytes: self.size.load(Ordering::Relaxed),
                read_only: self.export.read_only,
            },
        )
        .await
        .map_err(|e| format!("the attach process went away: {e}"))
    }

    /// Reads and serves requests until the session ends; returns why.
    async fn run(
        self: &Arc<Self>,
        ctl: &mut UnixStream,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> String {
        let afd = match self.watch() {
            Ok(a) => a,
            Err(e) => return format!("cannot watch /dev/fuse: {e}"),
        };
        let mut buf = vec![0u8; BUF_BYTES];
        // A read kept back for the next one to join (only while more
        // requests are queued: never across a wait).
        let mut held: Option<Held> = None;
        let mut last = std::time::Instant::now();
        let mut poll = crate::poll::ReaderPoll::new();
        loop {
            let polling = poll.polling();
            let mut g = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    return if self.node.shutdown.is_cancelled() {
                        "server shutting down".into()
                    } else {
                        "export revoked".into()
                    };
                }
                _ = closed(ctl) => return "the attach process closed its connection".into(),
                g = afd.ready(WATCH) => match g {
                    Ok(g) => g,
                    Err(e) => return format!("poll /dev/fuse: {e}"),
                },
                // Polling: look again (`crate::poll`).
                _ = crate::poll::ReaderPoll::pause(), if polling => continue,
            };
            // Everything the kernel has queued, then back to waiting.
            loop {
                let r = match nix::unistd::read(&self.dev, &mut buf) {
                    Ok(0) => return handoff::UNMOUNTED.into(),
                    Ok(n) => {
                        last = std::time::Instant::now();
                        self.next_request(&mut held, &buf[..n]).await
                    }
                    Err(nix::Error::EAGAIN) => {
                        g.clear_ready();
                        if let Err(why) = self.submit_held(&mut held).await {
                            return why;
                        }
                        // Shortly after a request, under a shallow load, poll
                        // for the next one rather than sleep: see
                        // `berth_store::Shallow`.
                        let live = self.inflight.load(Ordering::Acquire);
                        poll.after(live, last, self.node.store.poll());
                        break;
                    }
                    // Interrupted, or a request the kernel gave up on.
                    Err(nix::Error::EINTR | nix::Error::ENOENT) => Ok(()),
                    Err(nix::Error::ENODEV) => return handoff::UNMOUNTED.into(),
                    Err(e) => return format!("read /dev/fuse: {e}"),
                };
                // A read still held when the session ends is answered by the
                // next server (the kernel sends it again).
                if let Err(why) = r {
                    return why;
                }
            }
        }
    }

    /// One request read: a read joins the read held back, or is held back
    /// itself once that one is submitted; anything else is served after it.
    async fn next_request(
        self: &Arc<Self>,
        held: &mut Option<Held>,
        req: &[u8],
    ) -> Result<(), String> {
        let next = match (held.as_mut(), self.as_read(req)) {
            (Some(h), Some(r)) if h.joins(&r) => {
                h.join(r);
                return Ok(());
            }
            (_, next) => next,
        };
        self.submit_held(held).await?;
        match next {
            Some(r) => *held = Some(r),
            None => self.request(req).await?,
        }
        Ok(())
    }

    /// A READ of the file with bytes to read, as a read to merge with its
    /// neighbours; `None` for anything else (and for the reads `data`
    /// answers without the store).
    fn as_read(&self, req: &[u8]) -> Option<Held> {
        let h = InHeader::parse(req)?;
        if h.opcode != READ || h.nodeid != DISK || h.len as usize != req.len() {
            return None;
        }
        let body = &req[IN_HEADER..];
        let (offset, size) = (u64_at(body, 8)?, u32_at(body, 16)?);
        let end = self.size.load(Ordering::Relaxed);
        let len = u64::from(size).min(end.saturating_sub(offset));
        if len == 0 || len > MAX_REQUEST_BYTES {
            return None;
        }
        Some(Held {
            offset,
            len: len as u32,
            replies: Replies::one(h.unique, len as u32),
        })
    }

    /// Submits the read held back, if any.
    async fn submit_held(self: &Arc<Self>, held: &mut Option<Held>) -> Result<(), String> {
        let Some(h) = held.take() else {
            return Ok(());
        };
        let op = Op::Read {
            target: self.export.target,
            offset: h.offset,
            len: h.len as usize,
        };
        self.submit(h.replies, READ, h.offset, h.len, Some(op), &[])
            .await
    }

    /// The descriptor in this thread's reactor, for reading.
    fn watch(&self) -> std::io::Result<AsyncFd<Dev>> {
        // SAFETY: `dev` is open for as long as the session lives, and every
        // watch is dropped within a method of the session (borrowing it).
        unsafe { AsyncFd::register_with_interest(Dev(self.dev.as_raw_fd()), WATCH) }
            .map_err(|e| e.into())
    }

    async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Writes one reply (`error` 0 or a negated errno). A request the kernel
    /// gave up on meanwhile (ENOENT) needs none.
    fn reply(&self, unique: u64, error: i32, body: &[u8]) {
        let h = out_header(OUT_HEADER + body.len(), error, unique);
        match nix::sys::uio::writev(&self.dev, &[IoSlice::new(&h), IoSlice::new(body)]) {
            Ok(_) | Err(nix::Error::ENOENT) => {}
            // The mount is gone: the reader sees it too and ends the session.
            Err(nix::Error::ENODEV) => {}
            Err(e) => tracing::warn!(error = %e, unique, "cannot write a FUSE reply"),
        }
    }

    fn attr(&self, ino: u64) -> Attr {
        let (mode, nlink, size) = if ino == DISK {
            let perm = if self.export.read_only { 0o400 } else { 0o600 };
            (libc::S_IFREG | perm, 1, self.current_size())
        } else {
            (libc::S_IFDIR | 0o700, 2, 0)
        };
        Attr {
            ino,
            size,
            mode,
            nlink,
            // Root's, who mounted it (only root hands mounts over): not this
            // server's user, which may be any.
            uid: 0,
            gid: 0,
            time: 0,
        }
    }

    /// The volume's size now (a resize shows at the next stat).
    fn current_size(&self) -> u64 {
        let store = &self.node.store;
        let size = match self.export.target {
            Target::Volume(_) => store.volume(&self.export.grant.name).map(|v| v.size_bytes),
            Target::Snapshot(_) => store
                .snapshot(&self.export.grant.name)
                .map(|s| s.size_bytes),
        }
        .unwrap_or_else(|_| self.size.load(Ordering::Relaxed));
        self.size.store(size, Ordering::Relaxed);
        size
    }

    /// One request; `Err` ends the session.
    async fn request(self: &Arc<Self>, req: &[u8]) -> Result<(), String> {
        let Some(h) = InHeader::parse(req) else {
            return Err(format!("a FUSE request of {} bytes", req.len()));
        };
        if h.len as usize != req.len() {
            return Err(format!(
                "a FUSE request says {} bytes and has {}",
                h.len,
                req.len()
            ));
        }
        let body = &req[IN_HEADER..];
        let mut out = Vec::new();
        match h.opcode {
            FORGET | BATCH_FORGET | INTERRUPT => return Ok(()),
            DESTROY => {
                self.reply(h.unique, 0, &[]);
                return Err(handoff::UNMOUNTED.into());
            }
            INIT => self.reply(h.unique, -libc::EPROTO, &[]),
            LOOKUP => {
                let name = body.split(|b| *b == 0).next().unwrap_or_default();
                if h.nodeid == ROOT && name == b"disk" {
                    self.attr(DISK).entry_out(&mut out);
                    self.reply(h.unique, 0, &out);
                } else {
                    self.reply(h.unique, -libc::ENOENT, &[]);
                }
            }
            GETATTR => match h.nodeid {
                ROOT | DISK => {
                    self.attr(h.nodeid).attr_out(&mut out);
                    self.reply(h.unique, 0, &out);
                }
                _ => self.reply(h.unique, -libc::ENOENT, &[]),
            },
            SETATTR => {
                let valid = u32_at(body, 0).unwrap_or(0);
                let size = u64_at(body, 16).unwrap_or(0);
                if h.nodeid == DISK && valid & FATTR_SIZE != 0 && size != self.current_size() {
                    self.reply(h.unique, -libc::EPERM, &[]);
                } else {
                    self.attr(h.nodeid).attr_out(&mut out);
                    self.reply(h.unique, 0, &out);
                }
            }
            OPEN => {
                let flags = u32_at(body, 0).unwrap_or(0) as i32;
                let error = if h.nodeid != DISK {
                    libc::EISDIR
                } else if self.export.read_only && flags & libc::O_ACCMODE != libc::O_RDONLY {
                    libc::EROFS
                } else {
                    0
                };
                if error != 0 {
                    self.reply(h.unique, -error, &[]);
                } else {
                    // No page cache (the loop device above has its own), and
                    // direct writes in parallel (the store orders overlaps).
                    open_out(&mut out, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES);
                    self.reply(h.unique, 0, &out);
                }
            }
            OPENDIR => {
                if h.nodeid == ROOT {
                    open_out(&mut out, 0);
                    self.reply(h.unique, 0, &out);
                } else {
                    self.reply(h.unique, -libc::ENOTDIR, &[]);
                }
            }
            READDIR => {
                let offset = u64_at(body, 8).unwrap_or(0);
                let room = u32_at(body, 16).unwrap_or(0) as usize;
                let entries = [
                    (ROOT, libc::DT_DIR, "."),
                    (ROOT, libc::DT_DIR, ".."),
                    (DISK, libc::DT_REG, "disk"),
                ];
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if !put_dirent(&mut out, room, *ino, i as u64 + 1, u32::from(*kind), name) {
                        break;
                    }
                }
                self.reply(h.unique, 0, &out);
            }
            RELEASE | RELEASEDIR | FSYNCDIR => self.reply(h.unique, 0, &[]),
            STATFS => {
                let blocks = self.current_size() / 4096;
                for v in [blocks, 0, 0, 2, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [4096u32, 255, 4096] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.resize(80, 0);
                self.reply(h.unique, 0, &out);
            }
            // qemu-io and friends ask a file for its geometry: ENOTTY, as any
            // regular file answers.
            IOCTL => self.reply(h.unique, -libc::ENOTTY, &[]),
            op if NAMESPACE.contains(&op) => self.reply(h.unique, -libc::EPERM, &[]),
            READ | WRITE | FLUSH | FSYNC | FALLOCATE => self.data(h, body).await?,
            // Extended attributes, locks, lseek, poll and the rest: ENOSYS,
            // which the kernel remembers (it stops asking).
            _ => self.reply(h.unique, -libc::ENOSYS, &[]),
        }
        Ok(())
    }

    /// A request for the store: admitted as an NBD request is, then submitted.
    async fn data(self: &Arc<Self>, h: InHeader, body: &[u8]) -> Result<(), String> {
        let target = self.export.target;
        let writes = matches!(h.opcode, WRITE | FALLOCATE);
        if h.nodeid != DISK {
            self.reply(h.unique, -libc::EBADF, &[]);
            return Ok(());
        }
        if writes && self.export.read_only {
            self.reply(h.unique, -libc::EROFS, &[]);
            return Ok(());
        }
        let (offset, len, op) = match h.opcode {
            READ => {
                let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
                    return Err("short FUSE READ".into());
                };
                // `run` submits every read with bytes to read (`as_read`):
                // this one is past the end, or longer than any request.
                let nothing = size == 0 || offset >= self.size.load(Ordering::Relaxed);
                self.reply(h.unique, if nothing { 0 } else { -libc::EINVAL }, &[]);
                return Ok(());
            }
            WRITE => {
                let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
                    return Err("short FUSE WRITE".into());
                };
                let data = body.get(40..).unwrap_or_default();
                if data.len() != size as usize || size > MAX_WRITE {
                    return Err(format!(
                        "a FUSE WRITE of {size} bytes carries {}",
                        data.len()
                    ));
                }
                // Past the end: the store refuses it (EFBIG, in `finish`).
                (offset, size, None)
            }
            FLUSH | FSYNC => {
                if self.export.read_only {
                    self.reply(h.unique, 0, &[]);
                    return Ok(());
                }
                (0, 0, Some(Op::Flush))
            }
            _ => {
                let (Some(offset), Some(length), Some(mode)) =
                    (u64_at(body, 8), u64_at(body, 16), u32_at(body, 24))
                else {
                    return Err("short FUSE FALLOCATE".into());
                };
                let inside = offset
                    .checked_add(length)
                    .is_some_and(|e| e <= self.current_size());
                let how = match mode & !FALLOC_FL_KEEP_SIZE {
                    // A thin volume has nothing to reserve.
                    0 if inside => {
                        self.reply(h.unique, 0, &[]);
                        return Ok(());
                    }
                    FALLOC_FL_PUNCH_HOLE if inside => Zeroing::Trim,
                    FALLOC_FL_ZERO_RANGE if inside => Zeroing::Zero,
                    _ if !inside => {
                        self.reply(h.unique, -libc::EINVAL, &[]);
                        return Ok(());
                    }
                    _ => {
                        self.reply(h.unique, -libc::EOPNOTSUPP, &[]);
                        return Ok(());
                    }
                };
                (
                    offset,
                    0,
                    Some(Op::Zero {
                        target,
                        offset,
                        len: length,
                        how,
                        fua: false,
                    }),
                )
            }
        };
        self.submit(Replies::one(h.unique, len), h.opcode, offset, len, op, body)
            .await
    }

    /// Admits a request as an NBD request is admitted, then submits it
    /// (`op`, or without one a write of `body`'s payload).
    async fn submit(
        self: &Arc<Self>,
        replies: Replies,
        opcode: u32,
        offset: u64,
        len: u32,
        op: Option<Op>,
        body: &[u8],
    ) -> Result<(), String> {
        let started = Instant::now();
        let target = self.export.target;
        // Backpressure: requests and payload in flight, per session and for
        // the whole node.
        let closing = |_| "closing".to_string();
        self.slots.acquire().await.map_err(closing)?.forget();
        let units = if len > 0 {
            (len.div_ceil(4096)).min(self.unit_cap)
        } else {
            0
        };
        if units > 0 {
            self.units
                .acquire_many(units)
                .await
                .map_err(closing)?
                .forget();
            self.node.budget.take(units).await.map_err(closing)?;
        }
        let op = match op {
            Some(op) => op,
            None => {
                let (mut buf, start) = self.node.store.write_buffer(offset, len as usize);
                buf.as_mut_slice()[start..start + len as usize]
                    .copy_from_slice(&body[40..40 + len as usize]);
                Op::Write {
                    target,
                    offset,
                    len: len as usize,
                    buf,
                    fua: false,
                }
            }
        };
        let mut pending = Pending {
            replies,
            opcode,
            len,
            offset,
            started,
            units,
            gated: None,
            _fence: None,
        };
        let rt = &self.export.runtime;
        match rt.admit_past_fence(&self.export.grant) {
            FenceCheck::Open(g) => pending._fence = g,
            FenceCheck::Fenced => {
                self.inflight.fetch_add(1, Ordering::AcqRel);
                let tag = self.pending.lock().insert(pending) as u64;
                self.finish(tag, Outcome::Done(Err(StoreError::ShuttingDown)));
                return Ok(());
            }
        }
        rt.admit(if matches!(opcode, READ | WRITE) {
            u64::from(len)
        } else {
            0
        })
        .await;
        let prio = rt.limiter.priority();
        self.node.gate.enter(prio).await;
        pending.gated = Some(prio);
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let tag = self.pending.lock().insert(pending) as u64;
        self.node.store.submit(op, tag, self.clone());
        Ok(())
    }

    /// Answers a finished request (on the store's I/O thread) and gives back
    /// what it held.
    fn finish(&self, tag: u64, outcome: Outcome) {
        let Some(p) = self.pending.lock().try_remove(tag as usize) else {
            tracing::error!(tag, "completion for an unknown FUSE request");
            return;
        };
        let rt = &self.export.runtime;
        let m = &rt.metrics.op[match p.opcode {
            READ => 0,
            WRITE => 1,
            FLUSH | FSYNC => 2,
            _ => 4,
        }];
        let error = match outcome {
            Outcome::Read(Ok(data)) => {
                let (bytes, r) = (data.bytes(), &p.replies);
                let mut at = r.first_len as usize;
                self.reply(r.unique, 0, &bytes[..at]);
                for &(unique, len) in &r.more {
                    self.reply(unique, 0, &bytes[at..at + len as usize]);
                    at += len as usize;
                }
                self.counters
                    .read_ops
                    .fetch_add(1 + r.more.len() as u64, Ordering::Relaxed);
                self.counters
                    .read_bytes
                    .fetch_add(u64::from(p.len), Ordering::Relaxed);
                0
            }
            Outcome::Done(Ok(())) => {
                if p.opcode == WRITE {
                    let mut w = [0u8; 8];
                    w[..4].copy_from_slice(&p.len.to_le_bytes());
                    self.reply(p.replies.unique, 0, &w);
                    self.counters.write_ops.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .write_bytes
                        .fetch_add(u64::from(p.len), Ordering::Relaxed);
                } else {
                    self.reply(p.replies.unique, 0, &[]);
                }
                0
            }
            Outcome::Read(Err(e)) | Outcome::Done(Err(e)) => {
                let integrity = matches!(e, StoreError::Integrity { .. });
                if integrity {
                    rt.metrics.checksum_errors.inc();
                }
                if integrity || self.may_log_failure() {
                    tracing::warn!(volume = %rt.name, opcode = p.opcode, offset = p.offset, len = p.len, error = %e, "FUSE request failed");
                }
                let errno = match (&e, p.opcode) {
                    (StoreError::OutOfRange { .. }, WRITE) => libc::EFBIG,
                    _ => e.errno(),
                };
                for unique in p.replies.uniques() {
                    self.reply(unique, -errno, &[]);
                }
                errno
            }
        };
        if error == 0 {
            m.ops.inc();
            m.bytes.inc_by(u64::from(p.len));
        } else {
            m.errors.inc();
        }
        m.latency.observe(p.started.elapsed().as_secs_f64());
        if let Some(prio) = p.gated {
            self.node.gate.exit(prio);
        }
        if p.units > 0 {
            self.units.add_permits(p.units as usize);
            self.node.budget.give(p.units);
        }
        self.slots.add_permits(1);
        drop(p);
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn may_log_failure(&self) -> bool {
        let mut last = self.failures.lock();
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            true
        } else {
            false
        }
    }
}

impl Reply for Session {
    fn reply(&self, tag: u64, outcome: Outcome) {
        self.finish(tag, outcome);
    }
}

/// A read held back for the next one to join.
struct Held {
    offset: u64,
    /// All the merged reads' bytes.
    len: u32,
    replies: Replies,
}

impl Held {
    fn joins(&self, next: &Held) -> bool {
        self.offset + u64::from(self.len) == next.offset && self.len + next.len <= MERGE_MAX
    }

    fn join(&mut self, next: Held) {
        self.len += next.len;
        self.replies.more.push((next.replies.unique, next.len));
    }
}

/// `struct fuse_open_out`.
fn open_out(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&0u64.to_le_bytes()); // fh
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // backing_id
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Returns once the attach process's connection is closed (anything it
/// sends after its hello is ignored).
async fn closed(ctl: &UnixStream) {
    let mut b = [0u8; 64];
    loop {
        if ctl.readable().await.is_err() {
            return;
        }
        match ctl.try_read(&mut b) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
