//! A client session that outlives its connections: what a block device that
//! is attached over NBD needs when the server behind it restarts.
//!
//! Requests are pipelined on one connection (a writer task batches them; the
//! replies, out of order, are decoded by a codec the session's task polls).
//! When the connection breaks, the session reconnects with backoff, then:
//!
//! 1. **replays, in the order they were acknowledged, every write, trim and
//!    write-zeroes acknowledged since the last completed FLUSH.** NBD promises
//!    durability only for what a FLUSH covered; a server killed before a flush
//!    may have lost acknowledged writes that the filesystem above already
//!    counts on. Replaying them (one at a time: overlapping writes must land
//!    in order) makes the restart invisible. The replay log is bounded: past
//!    [`Options::replay_soft_limit_bytes`] (or as many entries) the session
//!    sends a FLUSH of its own to retire it;
//! 2. sends again what was in flight on the broken connection (NBD requests
//!    are idempotent), then what was queued meanwhile.
//!
//! A replayed write that fails cannot be reported to its writer (it was
//! acknowledged long ago), so the next FLUSH fails with EIO instead: the
//! filesystem learns that something it was promised did not hold.
//!
//! Requests wait while the server is away, up to
//! [`Options::reconnect_timeout`]; after that they fail with EIO (and new
//! ones fail at once) until a connection is made again. A server that answers
//! but refuses the export (a revoked grant) fails them at once, and is asked
//! again only every 30 s.
//!
//! The export's size is learnt at each handshake, and on
//! [`Session::refresh_size`] from a short second connection: NBD has no way
//! to tell a connected client that its export grew.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::codec::{Decoder, FramedRead};

use crate::client::{Client, ClientError};
use crate::proto::*;

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// A parsed `nbd://HOST[:PORT]/EXPORT`, `nbds://...` (TLS) or
/// `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub endpoint: Endpoint,
    pub export: String,
    /// `nbds://`: the connection must be encrypted.
    pub tls: bool,
}

fn unescape(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once unescaped"))
}

impl Uri {
    pub fn parse(uri: &str) -> Result<Uri, String> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| "an nbd+unix URI needs ?socket=PATH".to_string())?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| "an nbd+unix URI needs ?socket=PATH".to_string())?;
            let export = path.strip_prefix('/').unwrap_or(path);
            return Ok(Uri {
                endpoint: Endpoint::Unix(PathBuf::from(unescape(socket)?)),
                export: unescape(export)?,
                tls: false,
            });
        }
        let tcp = uri
            .strip_prefix("nbd://")
            .map(|r| (r, false))
            .or_else(|| uri.strip_prefix("nbds://").map(|r| (r, true)));
        if let Some((rest, tls)) = tcp {
            let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(format!("{uri}: no host"));
            }
            // A bare host (or [v6]) gets the IANA port.
            let has_port = match host.rfind(']') {
                Some(close) => host[close..].contains(':'),
                None => host.contains(':'),
            };
            let address = if has_port {
                host.to_string()
            } else {
                format!("{host}:10809")
            };
            let export = export.split('?').next().unwrap_or("");
            return Ok(Uri {
                endpoint: Endpoint::Tcp(address),
                export: unescape(export)?,
                tls,
            });
        }
        Err(format!(
            "{uri}: not an NBD URI (nbd://HOST:PORT/EXPORT, nbds://... or nbd+unix:///EXPORT?socket=PATH)"
        ))
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes },
    Flush,
    Trim { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32 },
}

impl Cmd {
    fn header(&self, handle: u64) -> Request {
        let (command, offset, len) = match self {
            Cmd::Read { offset, len } => (CMD_READ, *offset, *len),
            Cmd::Write { offset, data } => (CMD_WRITE, *offset, data.len() as u32),
            Cmd::Flush => (CMD_FLUSH, 0, 0),
            Cmd::Trim { offset, len } => (CMD_TRIM, *offset, *len),
            Cmd::WriteZeroes { offset, len } => (CMD_WRITE_ZEROES, *offset, *len),
        };
        Request {
            flags: 0,
            command,
            handle,
            offset,
            len,
        }
    }

    /// Whether it changes the export (and so must be replayed until flushed).
    fn mutates(&self) -> bool {
        matches!(
            self,
            Cmd::Write { .. } | Cmd::Trim { .. } | Cmd::WriteZeroes { .. }
        )
    }

    fn payload_bytes(&self) -> usize {
        match self {
            Cmd::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// A request's outcome: READ data (empty for the others), or the NBD error
/// (`proto::EIO`, …) it failed with.
pub type Outcome = Result<Vec<u8>, u32>;
/// Called once with a request's outcome, on the session's task: it must not
/// block.
pub type Done = Box<dyn FnOnce(Outcome) + Send>;

#[derive(Debug, Clone)]
pub struct Options {
    /// How long requests wait for a server that went away before failing.
    pub reconnect_timeout: Duration,
    /// Unflushed mutations kept for replay past which the session flushes:
    /// their payload bytes...
    pub replay_soft_limit_bytes: usize,
    /// ...or their number (trims and write-zeroes carry no payload).
    pub replay_soft_limit_entries: usize,
    /// Time allowed for one connection attempt and its handshake.
    pub connect_timeout: Duration,
    /// STARTTLS on every TCP connection (required for `nbds://`).
    pub tls: Option<crate::client::TlsClient>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            reconnect_timeout: Duration::from_secs(300),
            replay_soft_limit_bytes: 32 << 20,
            replay_soft_limit_entries: 1 << 16,
            connect_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// How often a server that refused the export is asked again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// What the session reports of itself.
#[derive(Debug, Default)]
pub struct Stats {
    pub reconnects: AtomicU64,
    pub replayed: AtomicU64,
    pub auto_flushes: AtomicU64,
}

enum Msg {
    Op(Cmd, Done),
    Refresh(oneshot::Sender<Result<u64, String>>),
    Disconnect(oneshot::Sender<()>),
}

/// The handle to a session; cheap to clone.
#[derive(Clone)]
pub struct Session {
    tx: mpsc::UnboundedSender<Msg>,
    size: Arc<AtomicU64>,
    flags: u16,
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("size_bytes", &self.size_bytes())
            .field("flags", &self.flags)
            .finish()
    }
}

impl Session {
    /// Connects (the first connection must succeed: a wrong URI or a refused
    /// grant is an error here, not a retry loop) and starts the session's
    /// task on the current runtime.
    pub async fn connect(uri: Uri, opts: Options) -> Result<Session, ClientError> {
        let (conn, size, flags) = open(&uri, &opts).await?;
        let size = Arc::new(AtomicU64::new(size));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            uri,
            opts,
            size: size.clone(),
            stats: stats.clone(),
            rx,
            next_handle: 1,
            conn: Some(conn),
            inflight: HashMap::new(),
            queued: VecDeque::new(),
            log: VecDeque::new(),
            log_bytes: 0,
            ack_seq: 0,
            replay: None,
            down_since: None,
            failing: false,
            next_try: Instant::now(),
            backoff: Duration::from_millis(100),
            lost_writes: false,
            auto_flush_pending: false,
        };
        tokio::spawn(actor.run());
        Ok(Session {
            tx,
            size,
            flags,
            stats,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The export's transmission flags (`proto::TF_*`) at the first handshake.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    /// Queues a request; `done` gets its outcome (EIO if the session ended).
    pub fn submit(&self, cmd: Cmd, done: Done) {
        if let Err(mpsc::error::SendError(Msg::Op(_, done))) = self.tx.send(Msg::Op(cmd, done)) {
            done(Err(EIO));
        }
    }

    pub async fn call(&self, cmd: Cmd) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.submit(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(EIO))
    }

    /// Asks the server for the export's size again and adopts it.
    pub async fn refresh_size(&self) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Refresh(tx))
            .map_err(|_| "the session has ended".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the session has ended".into()))
    }

    /// Flushes (unless the export is read-only), says goodbye to the server
    /// and ends the session.
    pub async fn close(self) -> Outcome {
        let flushed = if self.read_only() {
            Ok(Vec::new())
        } else {
            self.call(Cmd::Flush).await
        };
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Disconnect(tx)).is_ok() {
            let _ = rx.await;
        }
        flushed
    }
}

// ---- connections ------------------------------------------------------------

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// An encoded request header: sent by value, no allocation per request.
type Header = [u8; REQUEST_BYTES];

/// NBD_CMD_DISC, the goodbye.
fn disc(handle: u64) -> Header {
    encode_request(&Request {
        flags: 0,
        command: CMD_DISC,
        handle,
        offset: 0,
        len: 0,
    })
}

struct Conn {
    frames: FramedRead<Reader, ReplyCodec>,
    /// Request headers with their WRITE payloads, to the writer task.
    writer: mpsc::UnboundedSender<(Header, Option<Bytes>)>,
}

async fn handshake<S>(s: S, export: &str) -> Result<(S, u64, u16), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let c = Client::connect(s, export).await?;
    let (size, flags) = (c.size_bytes, c.flags);
    Ok((c.into_inner(), size, flags))
}

async fn open_halves(uri: &Uri, opts: &Options) -> Result<(Reader, Writer, u64, u16), ClientError> {
    match &uri.endpoint {
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await?;
            let (s, size, flags) = handshake(s, &uri.export).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), size, flags))
        }
        Endpoint::Tcp(addr) => {
            if uri.tls && opts.tls.is_none() {
                return Err(ClientError::Protocol(
                    "an nbds:// URI needs certificates (--tls-dir)".into(),
                ));
            }
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            match &opts.tls {
                Some(tls) => {
                    let c = Client::connect_tls(s, &uri.export, tls).await?;
                    let (size, flags) = (c.size_bytes, c.flags);
                    let (r, w) = tokio::io::split(c.into_inner());
                    Ok((Box::new(r), Box::new(w), size, flags))
                }
                None => {
                    let (s, size, flags) = handshake(s, &uri.export).await?;
                    let (r, w) = s.into_split();
                    Ok((Box::new(r), Box::new(w), size, flags))
                }
            }
        }
    }
}

async fn open(uri: &Uri, opts: &Options) -> Result<(Conn, u64, u16), ClientError> {
    let (r, w, size, flags) = tokio::time::timeout(opts.connect_timeout, open_halves(uri, opts))
        .await
        .map_err(|_| {
            ClientError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect and handshake timed out",
            ))
        })??;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(w, rx));
    Ok((
        Conn {
            frames: FramedRead::new(r, ReplyCodec),
            writer: tx,
        },
        size,
        flags,
    ))
}

/// Writes requests as they come, flushing the buffer when none are waiting.
async fn write_loop(w: Writer, mut rx: mpsc::UnboundedReceiver<(Header, Option<Bytes>)>) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some((hdr, payload)) = next.take() {
            if w.write_all(&hdr).await.is_err() {
                return;
            }
            if let Some(p) = payload {
                if w.write_all(&p).await.is_err() {
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// One reply frame.
#[derive(Debug)]
enum Frame {
    Simple {
        handle: u64,
        error: u32,
    },
    Chunk {
        handle: u64,
        flags: u16,
        kind: u16,
        payload: BytesMut,
    },
}

/// Decodes simple replies and structured reply chunks. A READ's simple reply
/// would carry unframed data, but structured replies are always negotiated.
struct ReplyCodec;

/// No chunk is longer than the largest request (32 MiB) plus its header.
const MAX_CHUNK_BYTES: usize = (32 << 20) + 64;

impl Decoder for ReplyCodec {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Frame>> {
        if src.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                if src.len() < 16 {
                    return Ok(None);
                }
                src.advance(4);
                let error = src.get_u32();
                let handle = src.get_u64();
                Ok(Some(Frame::Simple { handle, error }))
            }
            STRUCTURED_REPLY_MAGIC => {
                if src.len() < 20 {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([src[16], src[17], src[18], src[19]]) as usize;
                if len > MAX_CHUNK_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("reply chunk of {len} bytes"),
                    ));
                }
                if src.len() < 20 + len {
                    src.reserve(20 + len - src.len());
                    return Ok(None);
                }
                src.advance(4);
                let flags = src.get_u16();
                let kind = src.get_u16();
                let handle = src.get_u64();
                src.advance(4);
                let payload = src.split_to(len);
                Ok(Some(Frame::Chunk {
                    handle,
                    flags,
                    kind,
                    payload,
                }))
            }
            m => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply magic {m:#x}"),
            )),
        }
    }
}

// ---- the session's task -------------------------------------------------------

/// A request on its way.
struct Pending {
    cmd: Cmd,
    /// None for the session's own requests (replays, flushes of its own).
    done: Option<Done>,
    replay: bool,
    /// READ data as it arrives.
    buf: Vec<u8>,
    error: u32,
    /// For a FLUSH: the last acknowledgement it covers.
    covers: u64,
}

impl Pending {
    fn new(cmd: Cmd, done: Option<Done>) -> Self {
        Pending {
            cmd,
            done,
            replay: false,
            buf: Vec::new(),
            error: 0,
            covers: 0,
        }
    }
}

/// An acknowledged mutation not yet covered by a FLUSH.
struct Logged {
    seq: u64,
    cmd: Cmd,
}

struct Actor {
    uri: Uri,
    opts: Options,
    size: Arc<AtomicU64>,
    stats: Arc<Stats>,
    rx: mpsc::UnboundedReceiver<Msg>,
    next_handle: u64,
    conn: Option<Conn>,
    /// Sent on the current connection.
    inflight: HashMap<u64, Pending>,
    /// Waiting for a connection (or for a replay to end), in order.
    queued: VecDeque<Pending>,
    log: VecDeque<Logged>,
    log_bytes: usize,
    ack_seq: u64,
    /// Log entries still to replay on the new connection (one at a time).
    replay: Option<VecDeque<Cmd>>,
    down_since: Option<Instant>,
    /// Down for longer than the timeout: requests fail at once.
    failing: bool,
    next_try: Instant,
    backoff: Duration,
    /// A replayed mutation failed: the next FLUSH must say so.
    lost_writes: bool,
    auto_flush_pending: bool,
}

async fn next_frame(conn: &mut Option<Conn>) -> Option<io::Result<Frame>> {
    match conn {
        Some(c) => c.frames.next().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    async fn run(mut self) {
        loop {
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some(Msg::Op(cmd, done)) => self.submit(Pending::new(cmd, Some(done))),
                    Some(Msg::Refresh(reply)) => {
                        let r = self.refresh().await;
                        let _ = reply.send(r);
                    }
                    Some(Msg::Disconnect(reply)) => {
                        self.disconnect();
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.disconnect();
                        return;
                    }
                },
                f = next_frame(&mut self.conn) => match f {
                    Some(Ok(frame)) => {
                        if let Err(why) = self.on_frame(frame) {
                            self.lost(&why);
                        }
                    }
                    Some(Err(e)) => self.lost(&e.to_string()),
                    None => self.lost("the server closed the connection"),
                },
                _ = tokio::time::sleep_until(self.next_try.into()), if self.conn.is_none() => {
                    self.reconnect().await;
                }
            }
        }
    }

    fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.writer.send((disc(self.next_handle), None));
        }
        for p in self
            .inflight
            .drain()
            .map(|(_, p)| p)
            .chain(self.queued.drain(..))
        {
            if let Some(d) = p.done {
                d(Err(ESHUTDOWN));
            }
        }
    }

    fn submit(&mut self, p: Pending) {
        if self.conn.is_some() && self.replay.is_none() {
            self.send(p);
        } else if self.failing {
            if let Some(d) = p.done {
                d(Err(EIO));
            }
        } else {
            self.queued.push_back(p);
        }
    }

    fn send(&mut self, mut p: Pending) {
        let Some(conn) = &self.conn else {
            self.queued.push_back(p);
            return;
        };
        let handle = self.next_handle;
        self.next_handle += 1;
        if p.cmd == Cmd::Flush {
            p.covers = self.ack_seq;
        }
        if let Cmd::Read { len, .. } = p.cmd {
            p.buf = vec![0u8; len as usize];
        }
        p.error = 0;
        let hdr = encode_request(&p.cmd.header(handle));
        let payload = match &p.cmd {
            Cmd::Write { data, .. } => Some(data.clone()),
            _ => None,
        };
        if conn.writer.send((hdr, payload)).is_err() {
            self.inflight.insert(handle, p);
            self.lost("the connection's writer stopped");
            return;
        }
        self.inflight.insert(handle, p);
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), String> {
        match f {
            Frame::Simple { handle, error } => {
                let p = self
                    .inflight
                    .remove(&handle)
                    .ok_or_else(|| format!("reply for unknown handle {handle}"))?;
                if error == 0 && matches!(p.cmd, Cmd::Read { .. }) {
                    return Err("a simple reply to a READ (structured replies were agreed)".into());
                }
                self.complete(p, error);
            }
            Frame::Chunk {
                handle,
                flags,
                kind,
                payload,
            } => {
                let p = self
                    .inflight
                    .get_mut(&handle)
                    .ok_or_else(|| format!("reply chunk for unknown handle {handle}"))?;
                apply_chunk(p, kind, &payload)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    if let Some(p) = self.inflight.remove(&handle) {
                        let e = p.error;
                        self.complete(p, e);
                    }
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, mut p: Pending, error: u32) {
        if p.replay {
            if error != 0 {
                tracing::error!(
                    error,
                    "a write acknowledged before the server restarted failed when replayed: \
                     the next flush reports it"
                );
                self.lost_writes = true;
            }
            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
            self.replay_next();
            return;
        }
        if error == 0 && p.cmd.mutates() {
            self.ack_seq += 1;
            self.log_bytes += p.cmd.payload_bytes();
            self.log.push_back(Logged {
                seq: self.ack_seq,
                cmd: p.cmd.clone(),
            });
        }
        let mut error = error;
        if p.cmd == Cmd::Flush {
            if p.done.is_none() {
                self.auto_flush_pending = false;
            }
            if error == 0 {
                while self.log.front().is_some_and(|l| l.seq <= p.covers) {
                    if let Some(l) = self.log.pop_front() {
                        self.log_bytes -= l.cmd.payload_bytes();
                    }
                }
                if self.lost_writes && p.done.is_some() {
                    self.lost_writes = false;
                    error = EIO;
                }
            }
        }
        if let Some(d) = p.done.take() {
            d(if error == 0 {
                Ok(std::mem::take(&mut p.buf))
            } else {
                Err(error)
            });
        }
        let over = self.log_bytes > self.opts.replay_soft_limit_bytes
            || self.log.len() > self.opts.replay_soft_limit_entries;
        if over && !self.auto_flush_pending {
            self.auto_flush_pending = true;
            self.stats.auto_flushes.fetch_add(1, Ordering::Relaxed);
            self.send(Pending::new(Cmd::Flush, None));
        }
    }

    fn lost(&mut self, why: &str) {
        if self.conn.take().is_none() {
            return;
        }
        tracing::warn!(
            reason = why,
            in_flight = self.inflight.len(),
            unflushed = self.log.len(),
            "NBD connection lost; reconnecting"
        );
        // In-flight requests go first when the connection is back, replays
        // aside (the whole log is replayed again).
        let mut resend: Vec<(u64, Pending)> = self.inflight.drain().collect();
        resend.sort_by_key(|(h, _)| *h);
        for (_, p) in resend.into_iter().rev() {
            if p.replay {
                continue;
            }
            if p.cmd == Cmd::Flush && p.done.is_none() {
                self.auto_flush_pending = false;
                continue;
            }
            self.queued.push_front(p);
        }
        self.replay = None;
        self.down_since.get_or_insert_with(Instant::now);
        self.backoff = Duration::from_millis(100);
        self.next_try = Instant::now();
    }

    async fn reconnect(&mut self) {
        match open(&self.uri, &self.opts).await {
            Ok((conn, size, _flags)) => {
                let down = self.down_since.take().map(|t| t.elapsed());
                // As loud as the loss it ends.
                tracing::warn!(
                    after_ms = down.map_or(0, |d| d.as_millis() as u64),
                    replaying = self.log.len(),
                    resending = self.queued.len(),
                    "NBD connection back"
                );
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                self.size.store(size, Ordering::Release);
                self.failing = false;
                self.conn = Some(conn);
                self.replay = Some(self.log.iter().map(|l| l.cmd.clone()).collect());
                self.replay_next();
            }
            Err(ClientError::Refused {
                option,
                reply,
                message,
            }) => {
                // The server is there and says no: the grant was revoked (or
                // the volume deleted). Waiting will not change that; asking
                // every two seconds would only fill its audit log.
                if !self.failing {
                    tracing::error!(
                        option,
                        reply,
                        %message,
                        failed = self.queued.len(),
                        "the server refuses the export now: failing requests"
                    );
                }
                self.fail_queued();
                self.next_try = Instant::now() + REFUSED_RETRY;
            }
            Err(e) => {
                let down = self.down_since.map_or(Duration::ZERO, |t| t.elapsed());
                if !self.failing && down >= self.opts.reconnect_timeout {
                    tracing::error!(
                        down_s = down.as_secs(),
                        error = %e,
                        failed = self.queued.len(),
                        "NBD server unreachable: failing requests until it is back"
                    );
                    self.fail_queued();
                } else {
                    tracing::debug!(error = %e, "reconnect failed");
                }
                // Backing off, but trying again when the timeout falls due,
                // so requests fail at the timeout and not up to 2 s after it.
                let mut next = Instant::now() + self.backoff;
                if let Some(due) = self.down_since.map(|t| t + self.opts.reconnect_timeout) {
                    if !self.failing && due > Instant::now() {
                        next = next.min(due);
                    }
                }
                self.next_try = next;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// From now until a connection is made, requests fail with EIO at once.
    fn fail_queued(&mut self) {
        self.failing = true;
        for p in self.queued.drain(..) {
            if let Some(d) = p.done {
                d(Err(EIO));
            }
        }
    }

    /// Sends the next replayed mutation, or, when none is left, what waited.
    fn replay_next(&mut self) {
        let Some(replay) = &mut self.replay else {
            return;
        };
        match replay.pop_front() {
            Some(cmd) => {
                let mut p = Pending::new(cmd, None);
                p.replay = true;
                self.send(p);
            }
            None => {
                self.replay = None;
                while self.conn.is_some() && self.replay.is_none() {
                    let Some(p) = self.queued.pop_front() else {
                        break;
                    };
                    self.send(p);
                }
            }
        }
    }

    async fn refresh(&mut self) -> Result<u64, String> {
        let r = tokio::time::timeout(self.opts.connect_timeout, async {
            let (mut r, mut w, size, _) = open_halves(&self.uri, &self.opts).await?;
            w.write_all(&disc(0)).await?;
            w.shutdown().await?;
            // Wait for the server to close, so it is gone before we answer.
            let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            Ok::<_, ClientError>(size)
        })
        .await;
        match r {
            Ok(Ok(size)) => {
                self.size.store(size, Ordering::Release);
                Ok(size)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect and handshake timed out".into()),
        }
    }
}

/// Applies one structured reply chunk to its request.
fn apply_chunk(p: &mut Pending, kind: u16, payload: &[u8]) -> Result<(), String> {
    let offset = match p.cmd {
        Cmd::Read { offset, .. } => offset,
        _ => 0,
    };
    match kind {
        REPLY_TYPE_NONE | REPLY_TYPE_BLOCK_STATUS => Ok(()),
        REPLY_TYPE_OFFSET_DATA => {
            if payload.len() < 8 {
                return Err("short OFFSET_DATA chunk".into());
            }
            let at = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
            let data = &payload[8..];
            let start = at
                .checked_sub(offset)
                .and_then(|s| usize::try_from(s).ok())
                .filter(|s| s.saturating_add(data.len()) <= p.buf.len())
                .ok_or_else(|| format!("OFFSET_DATA at {at} outside the request"))?;
            p.buf[start..start + data.len()].copy_from_slice(data);
            Ok(())
        }
        REPLY_TYPE_OFFSET_HOLE => {
            // The buffer starts zeroed; only check the hole is inside it.
            if payload.len() < 12 {
                return Err("short OFFSET_HOLE chunk".into());
            }
            Ok(())
        }
        k if k & (1 << 15) != 0 => {
            p.error = if payload.len() >= 4 {
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]).max(1)
            } else {
                EIO
            };
            Ok(())
        }
        k => Err(format!("unknown reply chunk type {k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_berth_writes_them() {
        assert_eq!(
            Uri::parse("nbd+unix:///db%40tok?socket=/d/nbd.sock").expect("unix"),
            Uri {
                endpoint: Endpoint::Unix("/d/nbd.sock".into()),
                export: "db@tok".into(),
                tls: false,
            }
        );
        assert_eq!(
            Uri::parse("nbd://10.0.0.2:10900/v@t").expect("tcp"),
            Uri {
                endpoint: Endpoint::Tcp("10.0.0.2:10900".into()),
                export: "v@t".into(),
                tls: false,
            }
        );
        assert!(Uri::parse("nbds://10.0.0.2:10900/v@t").expect("tls").tls);
        assert_eq!(
            Uri::parse("nbd://[::1]/x").expect("v6").endpoint,
            Endpoint::Tcp("[::1]:10809".into())
        );
        for bad in [
            "http://x/y",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd:///x",
            "nbd://h/%zz",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_codec_waits_for_whole_frames_and_refuses_garbage() {
        let mut c = ReplyCodec;
        let mut b = BytesMut::new();
        put_chunk_header_into(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 12);
        let whole = b.len() + 12;
        assert!(c.decode(&mut b).expect("partial").is_none());
        b.extend_from_slice(&[0u8; 12]);
        assert_eq!(b.len(), whole);
        match c.decode(&mut b).expect("whole") {
            Some(Frame::Chunk {
                handle, payload, ..
            }) => {
                assert_eq!((handle, payload.len()), (7, 12))
            }
            other => panic!("{other:?}"),
        }
        assert!(b.is_empty());
        let mut junk = BytesMut::from(&[1u8, 2, 3, 4, 5][..]);
        assert!(c.decode(&mut junk).is_err());
        let mut huge = BytesMut::new();
        put_chunk_header_into(&mut huge, 0, REPLY_TYPE_OFFSET_DATA, 1, u32::MAX);
        assert!(c.decode(&mut huge).is_err());
    }

    fn put_chunk_header_into(b: &mut BytesMut, flags: u16, kind: u16, handle: u64, len: u32) {
        let mut v = Vec::new();
        put_chunk_header(&mut v, flags, kind, handle, len);
        b.extend_from_slice(&v);
    }

    #[test]
    fn chunks_land_where_their_offset_says() {
        let mut p = Pending::new(
            Cmd::Read {
                offset: 4096,
                len: 8,
            },
            None,
        );
        p.buf = vec![0; 8];
        let mut d = 4100u64.to_be_bytes().to_vec();
        d.extend_from_slice(&[9, 9, 9, 9]);
        apply_chunk(&mut p, REPLY_TYPE_OFFSET_DATA, &d).expect("inside");
        assert_eq!(p.buf, [0, 0, 0, 0, 9, 9, 9, 9]);
        let mut out = 4102u64.to_be_bytes().to_vec();
        out.extend_from_slice(&[1; 8]);
        assert!(apply_chunk(&mut p, REPLY_TYPE_OFFSET_DATA, &out).is_err());
        apply_chunk(&mut p, REPLY_TYPE_ERROR, &[0, 0, 0, 28, 0, 0]).expect("error chunk");
        assert_eq!(p.error, 28);
    }
}
