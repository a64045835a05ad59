//! Serving NBD connections: the fixed newstyle handshake, then the
//! transmission phase with many requests in flight and out-of-order replies.
//!
//! Each connection has a reader task and a writer task. The reader parses
//! request headers, receives WRITE payloads straight into the store's aligned
//! (registered) buffers, admits the request against the volume's QoS and the
//! pool's tier priority, and submits it to the store's I/O thread; shortly
//! after a request, under a shallow load, it polls for the next one instead
//! of sleeping. On a plain socket the I/O thread sends a finished request's
//! reply itself when nothing else is on the wire (see [`Wire`]); otherwise it
//! hands the outcome back through the connection's [`Completions`] queue, and
//! the writer takes everything queued at once and sends the replies with one
//! vectored write (headers and read payloads from the store's buffers, no
//! copies). Steady state allocates nothing per request: the in-flight table,
//! the queues and the header buffers are reused.
//!
//! Bad input never takes the server down: a malformed option gets the
//! protocol's error, a bad request magic or an oversized WRITE closes that
//! connection, anything else is answered with an errno. A client that vanishes
//! mid-request is noticed by the reader; requests already in the store finish
//! and their buffers are returned before the connection is gone.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_store::{
    Extent, Op, Outcome, ReadDone, Reply, StoreError, Submitter, Target, Zeroing, MAX_REQUEST_BYTES,
};
use parking_lot::Mutex;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};
use tokio::sync::{Notify, Semaphore};

use super::limits::STALL_UNDER_PRESSURE;
use super::proto::*;
use crate::audit::AuditEvent;
use crate::node::{ConnCounters, Node, Peer, Refusal, Resolved};

/// Requests one connection may have in flight.
pub const MAX_INFLIGHT: usize = 512;
/// Payload bytes (reads and writes) one connection may have in flight, in 4 KiB units.
const MAX_INFLIGHT_UNITS: usize = (128 << 20) / 4096;
/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a started request frame (header or WRITE payload) may take to arrive.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// BLOCK_STATUS requests one connection may have running at once (each scans
/// block maps on a blocking thread).
const MAX_BLOCK_STATUS: usize = 2;
/// Longest a reply batch may wait for the client to read it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Option payloads up to this size are read and refused with ERR_TOO_BIG;
/// larger ones close the connection (a denial of service, per the spec).
const SKIP_OPTION_BYTES: u32 = 1 << 20;

/// What the handshake settled.
#[derive(Debug)]
pub struct Session {
    pub export: Resolved,
    pub structured: bool,
    pub meta_context: bool,
}

#[derive(Debug)]
enum HandshakeEnd {
    Go(Session),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
    /// The client aborted or went away; nothing to serve.
    Closed,
}

/// NBD's STARTTLS, offered on TCP connections: the server's certificate, the
/// CA client certificates must be signed by, and whether a client may skip
/// it (with `required`, every option but STARTTLS and ABORT is refused with
/// ERR_TLS_REQD until TLS is on, so no export name or data crosses in clear).
#[derive(Clone)]
pub struct NbdTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub required: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("required", &self.required)
            .finish()
    }
}

/// A connection's byte stream, and how it splits into the reader's and the
/// writer's halves for the transmission phase (sockets split without a lock;
/// a TLS stream shares one state, so its halves take turns).
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::R, Self::W);
    /// The socket under the writer's half (replies may be sent on it directly).
    fn socket(w: &Self::W) -> RawFd;
}

impl Transport for tokio::net::TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn socket(w: &Self::W) -> RawFd {
        w.as_ref().as_raw_fd()
    }
}

impl Transport for tokio::net::UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn socket(w: &Self::W) -> RawFd {
        w.as_ref().as_raw_fd()
    }
}

/// How the handshake ended, with the stream to serve on.
enum Negotiated<S> {
    Plain(Session, S),
    Tls(Session, Box<tokio_rustls::server::TlsStream<S>>),
    Closed,
}

/// What the option haggling carries across STARTTLS.
#[derive(Debug)]
struct Haggle {
    no_zeroes: bool,
    refusals: u32,
    /// STARTTLS may be asked for.
    tls_offered: bool,
    /// Nothing but STARTTLS and ABORT before TLS is on.
    tls_required: bool,
    /// TLS is on.
    encrypted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    Timeout,
}

fn export_flags(read_only: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
    if read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    // A FLUSH syncs the whole pool and WAL: every write acknowledged on any
    // connection is durable when it returns, which is what multi-conn requires.
    f | TF_CAN_MULTI_CONN
}

/// Serves one accepted connection to its end; `tls` offers STARTTLS.
pub async fn serve<S: Transport>(
    node: Arc<Node>,
    stream: S,
    peer: Peer,
    tls: Option<NbdTls>,
    mut admitted: super::limits::Admitted,
) {
    // A connection still haggling when the server shuts down is simply closed.
    let hs = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&node, stream, &peer, tls)) => r,
        _ = node.shutdown.cancelled() => return,
    };
    if matches!(hs, Ok(Ok(Negotiated::Plain(..) | Negotiated::Tls(..)))) {
        // It showed a grant: it no longer counts against the handshake limits
        // (it still counts as a connection until it ends).
        admitted.handshake_done();
    }
    match hs {
        Ok(Ok(Negotiated::Plain(s, stream))) => {
            let (rd, wr) = stream.halves();
            let fd = S::socket(&wr);
            transmission(node, s, rd, wr, peer, Some(fd)).await
        }
        Ok(Ok(Negotiated::Tls(s, stream))) => {
            let (rd, wr) = tokio::io::split(*stream);
            transmission(node, s, rd, wr, peer, None).await
        }
        Ok(Ok(Negotiated::Closed)) => {}
        Ok(Err(e)) => tracing::info!(peer = %peer, error = %e, "nbd handshake ended"),
        Err(_) => tracing::info!(peer = %peer, "nbd handshake timed out"),
    }
}

/// The greeting, the options, and STARTTLS's TLS handshake when asked for.
async fn negotiate<S: Transport>(
    node: &Arc<Node>,
    mut stream: S,
    peer: &Peer,
    tls: Option<NbdTls>,
) -> Result<Negotiated<S>, ConnError> {
    let no_zeroes = greet(&mut stream).await?;
    let mut st = Haggle {
        no_zeroes,
        refusals: 0,
        tls_offered: tls.is_some(),
        tls_required: tls.as_ref().is_some_and(|t| t.required),
        encrypted: false,
    };
    let end = {
        let (mut rd, mut wr) = tokio::io::split(&mut stream);
        options(node, &mut rd, &mut wr, peer, &mut st).await?
    };
    match (end, tls) {
        (HandshakeEnd::Go(s), _) => Ok(Negotiated::Plain(s, stream)),
        (HandshakeEnd::Closed, _) => Ok(Negotiated::Closed),
        (HandshakeEnd::StartTls, Some(tls)) => {
            // A client without a certificate signed by the CA fails here.
            let mut t = tls
                .acceptor
                .accept(stream)
                .await
                .map_err(|e| ConnError::Protocol(format!("TLS handshake: {e}")))?;
            st.encrypted = true;
            // Per the spec, nothing negotiated before TLS carries over: the
            // options start again on the encrypted stream.
            let end = {
                let (mut rd, mut wr) = tokio::io::split(&mut t);
                options(node, &mut rd, &mut wr, peer, &mut st).await?
            };
            match end {
                HandshakeEnd::Go(s) => Ok(Negotiated::Tls(s, Box::new(t))),
                HandshakeEnd::Closed => Ok(Negotiated::Closed),
                HandshakeEnd::StartTls => Err(ConnError::Protocol("STARTTLS twice".into())),
            }
        }
        (HandshakeEnd::StartTls, None) => Err(ConnError::Protocol("STARTTLS not offered".into())),
    }
}

/// Sends the newstyle greeting and reads the client's flags; returns whether
/// the client asked for NO_ZEROES.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, ConnError> {
    let mut greet = [0u8; 18];
    greet[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greet[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greet[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greet).await?;
    s.flush().await?;
    let cflags = s.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    Ok(cflags & FLAG_C_NO_ZEROES != 0)
}

async fn send_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    put_option_reply(&mut out, option, reply, data);
    wr.write_all(&out).await?;
    // Every reply leaves at once: over TLS the stream holds what the socket
    // did not take, and the client waits for this reply before its next.
    wr.flush().await
}

/// Refused export lookups one connection may make before it is closed.
const MAX_REFUSALS: u32 = 4;

/// The audit event of a client connecting to an export (`how`: what the
/// detail adds after the kind and mode, such as ", tls").
pub(crate) fn connect_event(
    g: &crate::state::Grant,
    read_only: bool,
    peer: &Peer,
    how: &str,
) -> AuditEvent {
    let mode = if read_only { "read-only" } else { "read-write" };
    AuditEvent {
        action: "connect".into(),
        client: g.client.clone(),
        target: g.name.clone(),
        result: "ok".into(),
        peer: peer.to_string(),
        detail: format!("{} {mode}{how}", g.kind.as_str()),
        ..Default::default()
    }
}

/// The audit event of a connection's end: why, and what it read and wrote.
pub(crate) fn disconnect_event(
    g: &crate::state::Grant,
    peer: &Peer,
    why: &str,
    c: &ConnCounters,
    detail: &str,
) -> AuditEvent {
    AuditEvent {
        action: "disconnect".into(),
        client: g.client.clone(),
        target: g.name.clone(),
        result: why.to_string(),
        peer: peer.to_string(),
        read_ops: c.read_ops.load(Ordering::Relaxed),
        read_bytes: c.read_bytes.load(Ordering::Relaxed),
        write_ops: c.write_ops.load(Ordering::Relaxed),
        write_bytes: c.write_bytes.load(Ordering::Relaxed),
        detail: detail.to_string(),
        ..Default::default()
    }
}

/// Appends an audit event (an fdatasync) on a blocking thread, and waits for it
/// so events stay in order without stalling the async workers.
pub(crate) async fn audit(node: &Arc<Node>, ev: AuditEvent) {
    let n = node.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || n.audit.record(ev)).await {
        tracing::error!(error = %e, "audit task failed");
    }
}

/// Audits a refused export lookup: in full if it is the first of its peer's
/// window, else counted into the window's summary (see `limits::Refusals`).
pub(crate) async fn audit_refusal(node: &Arc<Node>, export: &str, peer: &Peer, why: &str) {
    let (name, _) = crate::node::split_export_name(export);
    if let Some(ev) = note_refusal(node, peer, name.chars().take(256).collect(), why) {
        audit(node, ev).await;
    }
}

/// A refusal for the audit log: the event to write now if it opens its
/// peer's window, else `None` (it is counted into the window's summary).
fn note_refusal(node: &Node, peer: &Peer, target: String, why: &str) -> Option<AuditEvent> {
    let ev = AuditEvent {
        action: "refused".into(),
        target,
        result: why.to_string(),
        peer: peer.to_string(),
        ..Default::default()
    };
    node.refusals.note(Instant::now(), peer, ev)
}

/// A connection closed at accept because a connection limit was reached: the
/// audit log hears of it like a refused lookup (summed per peer), in the
/// background, since the accept loop must not wait on a disk write.
pub(crate) fn refuse_connection(node: &Arc<Node>, peer: &Peer, why: &'static str) {
    tracing::debug!(peer = %peer, why, "NBD connection refused");
    if let Some(ev) = note_refusal(node, peer, String::new(), why) {
        tracing::warn!(peer = %peer, why, "refusing NBD connections");
        let node = node.clone();
        tokio::spawn(async move { audit(&node, ev).await });
    }
}

fn refusal_reply(r: Refusal) -> (u32, String) {
    match r {
        Refusal::Unknown(w) => (REP_ERR_UNKNOWN, w),
        Refusal::Policy(w) => (REP_ERR_POLICY, w),
    }
}

/// Audits a refused export lookup and counts it; past the limit, the
/// connection ends.
async fn refused(
    node: &Arc<Node>,
    export: &str,
    peer: &Peer,
    why: &str,
    refusals: &mut u32,
) -> Result<(), ConnError> {
    audit_refusal(node, export, peer, why).await;
    *refusals += 1;
    if *refusals >= MAX_REFUSALS {
        return Err(ConnError::Protocol(format!("{refusals} refused exports")));
    }
    Ok(())
}

/// The option haggling, up to GO, EXPORT_NAME, ABORT or an acknowledged
/// STARTTLS.
async fn options<R, W>(
    node: &Arc<Node>,
    rd: &mut R,
    wr: &mut W,
    peer: &Peer,
    st: &mut Haggle,
) -> Result<HandshakeEnd, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let no_zeroes = st.no_zeroes;
    let refusals = &mut st.refusals;
    let mut structured = false;
    // SET_META_CONTEXT's selection: (export name it was for, base:allocation chosen).
    let mut meta: Option<(String, bool)> = None;
    loop {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await?;
        let opt = parse_option_header(&h).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if opt.len > MAX_OPTION_BYTES {
            // EXPORT_NAME has no reply header: its only refusal is closing.
            if opt.len > SKIP_OPTION_BYTES || opt.option == OPT_EXPORT_NAME {
                return Err(ConnError::Protocol(format!(
                    "option {} of {} bytes",
                    opt.option, opt.len
                )));
            }
            tokio::io::copy(&mut (&mut *rd).take(opt.len as u64), &mut tokio::io::sink()).await?;
            send_reply(wr, opt.option, REP_ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; opt.len as usize];
        rd.read_exact(&mut data).await?;
        if node.shutdown.is_cancelled() && opt.option != OPT_ABORT {
            if opt.option == OPT_EXPORT_NAME {
                return Err(ConnError::Protocol("shutting down".into()));
            }
            send_reply(wr, opt.option, REP_ERR_SHUTDOWN, b"server is shutting down").await?;
            continue;
        }
        if st.tls_required && !st.encrypted && !matches!(opt.option, OPT_STARTTLS | OPT_ABORT) {
            if opt.option == OPT_EXPORT_NAME {
                // No reply can refuse it: the connection closes.
                return Err(ConnError::Protocol("EXPORT_NAME before STARTTLS".into()));
            }
            send_reply(
                wr,
                opt.option,
                REP_ERR_TLS_REQD,
                b"this server requires STARTTLS first",
            )
            .await?;
            continue;
        }
        match opt.option {
            OPT_EXPORT_NAME => {
                // The same rule as GO's name: UTF-8 without NUL (a lossy
                // decode could turn two different byte strings into one name).
                let name = match std::str::from_utf8(&data) {
                    Ok(n) if !n.contains('\0') => n.to_string(),
                    _ => {
                        return Err(ConnError::Protocol(
                            "EXPORT_NAME is not UTF-8 without NUL".into(),
                        ))
                    }
                };
                match node.resolve(&name, peer) {
                    Ok(export) => {
                        let mut out = Vec::with_capacity(134);
                        out.extend_from_slice(&export.size_bytes.to_be_bytes());
                        out.extend_from_slice(&export_flags(export.read_only).to_be_bytes());
                        if !no_zeroes {
                            out.extend_from_slice(&[0u8; 124]);
                        }
                        wr.write_all(&out).await?;
                        wr.flush().await?;
                        // EXPORT_NAME has no way to negotiate meta contexts' export.
                        return Ok(HandshakeEnd::Go(Session {
                            export,
                            structured,
                            meta_context: false,
                        }));
                    }
                    Err(Refusal::Unknown(why) | Refusal::Policy(why)) => {
                        let _ = refused(node, &name, peer, &why, refusals).await;
                        // The only way to refuse EXPORT_NAME is to close.
                        return Err(ConnError::Protocol(format!("refused export: {why}")));
                    }
                }
            }
            OPT_ABORT => {
                let _ = send_reply(wr, opt.option, REP_ACK, &[]).await;
                return Ok(HandshakeEnd::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_reply(wr, opt.option, REP_ERR_INVALID, b"LIST takes no data").await?;
                } else if *peer != Peer::Unix {
                    // Over TCP the export names are the secrets: nothing is listed.
                    send_reply(
                        wr,
                        opt.option,
                        REP_ERR_POLICY,
                        b"exports are listed on the node's unix socket only",
                    )
                    .await?;
                } else {
                    for g in node.grants() {
                        let name = g.export_name();
                        let desc = format!("{} {} for {}", g.kind.as_str(), g.name, g.client);
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        d.extend_from_slice(desc.as_bytes());
                        send_reply(wr, opt.option, REP_SERVER, &d).await?;
                    }
                    send_reply(wr, opt.option, REP_ACK, &[]).await?;
                }
            }
            OPT_STARTTLS => {
                let refusal: Option<(u32, &[u8])> = if !st.tls_offered {
                    Some((REP_ERR_POLICY, b"TLS is not configured on this server"))
                } else if st.encrypted {
                    Some((REP_ERR_INVALID, b"TLS is already on"))
                } else if !data.is_empty() {
                    Some((REP_ERR_INVALID, b"STARTTLS takes no data"))
                } else {
                    None
                };
                match refusal {
                    Some((code, why)) => send_reply(wr, opt.option, code, why).await?,
                    None => {
                        send_reply(wr, opt.option, REP_ACK, &[]).await?;
                        return Ok(HandshakeEnd::StartTls);
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_reply(
                        wr,
                        opt.option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    structured = true;
                    send_reply(wr, opt.option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt.option == OPT_SET_META_CONTEXT;
                if set {
                    meta = None;
                }
                let req = match parse_meta_context_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send_reply(wr, opt.option, REP_ERR_INVALID, e.to_string().as_bytes())
                            .await?;
                        continue;
                    }
                };
                if !structured {
                    send_reply(
                        wr,
                        opt.option,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                if let Err(r) = node.resolve(&req.name, peer) {
                    let (code, why) = refusal_reply(r);
                    refused(node, &req.name, peer, &why, refusals).await?;
                    send_reply(wr, opt.option, code, why.as_bytes()).await?;
                    continue;
                }
                let chosen = if set {
                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                if chosen {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    send_reply(wr, opt.option, REP_META_CONTEXT, &d).await?;
                }
                if set {
                    meta = Some((req.name, chosen));
                }
                send_reply(wr, opt.option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send_reply(wr, opt.option, REP_ERR_INVALID, e.to_string().as_bytes())
                            .await?;
                        continue;
                    }
                };
                let export = match node.resolve(&req.name, peer) {
                    Ok(x) => x,
                    Err(r) => {
                        let (code, why) = refusal_reply(r);
                        refused(node, &req.name, peer, &why, refusals).await?;
                        send_reply(wr, opt.option, code, why.as_bytes()).await?;
                        continue;
                    }
                };
                let mut out = Vec::new();
                put_option_reply(
                    &mut out,
                    opt.option,
                    REP_INFO,
                    &info_export(export.size_bytes, export_flags(export.read_only)),
                );
                // Any byte range works (partial blocks are read-modify-written);
                // 4 KiB is what the pool stores; 32 MiB is the largest request.
                put_option_reply(
                    &mut out,
                    opt.option,
                    REP_INFO,
                    &info_block_size(1, 4096, MAX_REQUEST_BYTES as u32),
                );
                for r in &req.requests {
                    match *r {
                        INFO_NAME => {
                            let mut d = INFO_NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(req.name.as_bytes());
                            put_option_reply(&mut out, opt.option, REP_INFO, &d);
                        }
                        INFO_DESCRIPTION => {
                            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            d.extend_from_slice(
                                format!(
                                    "berth {} {} for {}",
                                    export.grant.kind.as_str(),
                                    export.grant.name,
                                    export.grant.client
                                )
                                .as_bytes(),
                            );
                            put_option_reply(&mut out, opt.option, REP_INFO, &d);
                        }
                        _ => {}
                    }
                }
                put_option_reply(&mut out, opt.option, REP_ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
                if opt.option == OPT_GO {
                    let meta_context = matches!(&meta, Some((n, true)) if *n == req.name);
                    return Ok(HandshakeEnd::Go(Session {
                        export,
                        structured,
                        meta_context,
                    }));
                }
            }
            other => {
                send_reply(wr, other, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
}

// ---- transmission ---------------------------------------------------------

/// A request between its header and its reply.
#[derive(Debug)]
struct Pending {
    handle: u64,
    command: u16,
    offset: u64,
    len: u32,
    flags: u16,
    started: Instant,
    /// Payload units (4 KiB) held against the connection's byte budget.
    units: u32,
    /// The priority it was counted under in the pool's gate, if it was.
    gated: Option<usize>,
    /// Counted as past the volume's fence check until it is answered.
    _fence: Option<crate::node::FenceGuard>,
}

#[derive(Debug)]
enum Completion {
    Store(u64, Outcome),
    Status(u64, Result<Vec<Extent>, StoreError>),
    /// Answered without the store: (tag, errno, message).
    Refused(u64, u32, &'static str),
}

/// The queue of finished requests the writer drains; the store's I/O thread
/// pushes into it through [`Reply`].
#[derive(Debug)]
struct Completions {
    queue: Mutex<VecDeque<Completion>>,
    ready: Notify,
    pending: Mutex<slab::Slab<Pending>>,
}

impl Completions {
    fn push(&self, c: Completion) {
        self.queue.lock().push_back(c);
        self.ready.notify_one();
    }
}

/// What the store answers a connection's requests into. It holds the
/// connection weakly: a request the store holds (a disk that stopped
/// answering) must not keep the connection, and through it the node and the
/// store itself, alive once the connection is gone.
struct ConnReply(std::sync::Weak<Conn>);

impl Reply for ConnReply {
    fn reply(&self, tag: u64, outcome: Outcome) {
        let Some(conn) = self.0.upgrade() else {
            return;
        };
        if let Some(outcome) = conn.send_direct(tag, outcome) {
            conn.done.push(Completion::Store(tag, outcome));
        }
    }

    fn flush(&self) {
        if let Some(conn) = self.0.upgrade() {
            conn.flush_direct();
        }
    }
}

struct Conn {
    node: Arc<Node>,
    export: Resolved,
    done: Arc<Completions>,
    slots: Semaphore,
    units: Semaphore,
    /// The payload units `units` started with: this connection's share.
    unit_cap: u32,
    block_status: Arc<Semaphore>,
    counters: Arc<ConnCounters>,
    structured: bool,
    meta_context: bool,
    /// The reader has stopped: no new requests will come.
    reader_done: std::sync::atomic::AtomicBool,
    /// The writer could not send replies: the reader stops too.
    broken: tokio_util::sync::CancellationToken,
    /// When a failed request was last logged, and how many were not since.
    failure_log: Mutex<(Option<Instant>, u64)>,
    /// The socket, where the store's I/O thread sends replies itself (plain
    /// sockets only: a TLS stream's state belongs to the writer).
    direct_fd: Option<RawFd>,
    /// Who sends on the socket now: see [`Wire`].
    wire: Mutex<Wire>,
    /// Given to the store with every request.
    replier: Arc<ConnReply>,
}

/// Replies the store's I/O thread sends itself, without waking the writer.
///
/// A request's reply is sent by the thread that finishes it when nothing
/// else is on the wire: the writer task is not sending, nothing waits in its
/// queue, and no earlier direct reply is half-sent. The thread stages the
/// replies of one turn of its loop here and sends them together when the
/// store flushes the turn ([`Reply::flush`]): one `sendmsg`, and one wake-up
/// of the client, for the turn rather than one per reply. The send never
/// blocks (`MSG_DONTWAIT`): whatever the socket does not take right away is
/// kept here and the writer sends it first, so a client that stops reading
/// holds no thread, and other volumes on the same I/O thread never wait for
/// it. Read payloads above [`DIRECT_MAX_BYTES`] are left to the writer, so
/// the I/O thread copies little. Saves a thread wake-up per request: see
/// `docs/pod-path.md`, "NBD: replies from the I/O thread, and a polling
/// reader".
struct Wire {
    /// The writer task is sending: replies go to its queue.
    busy: bool,
    /// No more direct replies: the writer has ended, or the client stopped
    /// taking replies.
    closed: bool,
    /// The end of a reply that a direct send left unsent.
    rest: Vec<u8>,
    /// The payload units and slots the replies in `rest` held: they stay
    /// counted against the connection's and the node's budgets until they
    /// are sent, as any reply the client has not taken yet.
    rest_units: u32,
    rest_slots: u32,
    /// Replies staged in this turn of the I/O loop, not sent yet; the writer
    /// takes them if it starts sending first.
    staged: Batch,
}

/// The largest read payload the I/O thread sends itself.
const DIRECT_MAX_BYTES: usize = 128 << 10;
/// Staged read payloads past which the I/O thread sends at once rather than
/// at the end of its turn: what the socket does not take is copied.
const STAGED_MAX_BYTES: usize = 256 << 10;

impl Conn {
    /// Stages a finished request's reply to be sent by the calling thread
    /// if the wire is free (see [`Wire`]); gives the outcome back if the
    /// writer must send it.
    fn send_direct(&self, tag: u64, outcome: Outcome) -> Option<Outcome> {
        let Some(fd) = self.direct_fd else {
            return Some(outcome);
        };
        if matches!(&outcome, Outcome::Read(Ok(d)) if d.len > DIRECT_MAX_BYTES) {
            return Some(outcome);
        }
        let mut wire = self.wire.lock();
        let w = &mut *wire;
        if w.busy || w.closed || !w.rest.is_empty() || !self.done.queue.lock().is_empty() {
            return Some(outcome);
        }
        encode(
            self,
            &mut self.done.pending.lock(),
            Completion::Store(tag, outcome),
            &mut w.staged,
        );
        // Staged replies are at most two pieces a read (its header run and
        // its payload) and a last header run. Room for one more reply in a
        // `sendmsg`, and few bytes to copy if the socket is full: otherwise
        // it all goes now.
        let staged = &w.staged.reads;
        if (staged.len() + 1) * 2 + 1 > IOVECS
            || staged.iter().map(|r| r.len).sum::<usize>() >= STAGED_MAX_BYTES
        {
            self.send_staged(fd, w);
        }
        None
    }

    /// Sends the replies the I/O thread staged (see [`Wire`]).
    fn flush_direct(&self) {
        if let Some(fd) = self.direct_fd {
            self.send_staged(fd, &mut self.wire.lock());
        }
    }

    fn send_staged(&self, fd: RawFd, w: &mut Wire) {
        if w.staged.headers.is_empty() {
            return;
        }
        let b = &mut w.staged;
        let mut iov = [IoSlice::new(&[]); IOVECS];
        let mut n = 0;
        for p in b.pieces() {
            iov[n] = IoSlice::new(p);
            n += 1;
        }
        let total: usize = iov[..n].iter().map(|p| p.len()).sum();
        let flags =
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
        // The descriptor is open: the writer closes the socket only after
        // setting `closed` under the wire's lock, which is held.
        let sent = loop {
            match nix::sys::socket::sendmsg::<()>(fd, &iov[..n], &[], flags, None) {
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => break Ok(0),
                r => break r,
            }
        };
        match sent {
            Ok(k) if k == total => {}
            Ok(mut k) => {
                // The socket is full: the writer sends the rest, first.
                for p in b.pieces() {
                    let skip = k.min(p.len());
                    w.rest.extend_from_slice(&p[skip..]);
                    k -= skip;
                }
                w.rest_units = std::mem::take(&mut b.release_units);
                w.rest_slots = std::mem::take(&mut b.release_slots);
                self.done.ready.notify_one();
            }
            Err(e) => {
                // The client is gone: the reader notices too and ends the
                // connection; the replies still to come are dropped.
                tracing::warn!(error = %e, "reply send failed: client gone; dropping its replies");
                w.closed = true;
                self.broken.cancel();
            }
        }
        b.clear();
        self.release(b);
        // The writer ends once the reader has and every request is
        // answered: it must look again after the last answer.
        if self.reader_done.load(Ordering::SeqCst) {
            self.done.ready.notify_one();
        }
    }

    /// Gives back the budgets a batch's requests held, once their replies are
    /// sent (or dropped).
    fn release(&self, b: &mut Batch) {
        if b.release_units > 0 {
            self.units.add_permits(b.release_units as usize);
            self.node.budget.give(b.release_units);
        }
        self.slots.add_permits(b.release_slots as usize);
        b.release_units = 0;
        b.release_slots = 0;
    }

    /// At most one failure line per second per connection (an ENOSPC storm must
    /// not flood the log; the error metrics count every one). Checksum errors
    /// are always logged. Returns how many were left out since the last line.
    fn may_log_failure(&self, always: bool) -> Option<u64> {
        let mut g = self.failure_log.lock();
        let now = Instant::now();
        if always
            || g.0
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            let suppressed = g.1;
            *g = (Some(now), 0);
            Some(suppressed)
        } else {
            g.1 += 1;
            None
        }
    }
}

fn op_index(command: u16) -> usize {
    match command {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_FLUSH => 2,
        CMD_TRIM => 3,
        CMD_WRITE_ZEROES => 4,
        _ => 5,
    }
}

/// Serves requests until the connection ends; `direct_fd` is the socket
/// under `wr` if it is a plain one (not TLS).
async fn transmission<R, W>(
    node: Arc<Node>,
    s: Session,
    rd: R,
    wr: W,
    peer: Peer,
    direct_fd: Option<RawFd>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Some((conn_id, cancel, counters)) = node.register_conn(&s.export, peer.clone()) else {
        audit_refusal(
            &node,
            &s.export.grant.export_name(),
            &peer,
            "export revoked during the handshake",
        )
        .await;
        return;
    };
    let g = &s.export.grant;
    let span = tracing::info_span!("nbd", volume = %g.name, client = %g.client, peer = %peer);
    tracing::info!(parent: &span, kind = g.kind.as_str(), read_only = s.export.read_only, "export connected");
    let how = if direct_fd.is_none() { ", tls" } else { "" };
    audit(&node, connect_event(g, s.export.read_only, &peer, how)).await;
    let unit_cap = node.budget.per_connection_units(MAX_INFLIGHT_UNITS) as u32;
    let conn = Arc::new_cyclic(|me| Conn {
        node: node.clone(),
        export: s.export,
        done: Arc::new(Completions {
            queue: Mutex::new(VecDeque::with_capacity(MAX_INFLIGHT)),
            ready: Notify::new(),
            pending: Mutex::new(slab::Slab::with_capacity(MAX_INFLIGHT)),
        }),
        slots: Semaphore::new(MAX_INFLIGHT),
        units: Semaphore::new(unit_cap as usize),
        unit_cap,
        block_status: Arc::new(Semaphore::new(MAX_BLOCK_STATUS)),
        counters,
        structured: s.structured,
        meta_context: s.meta_context,
        reader_done: false.into(),
        broken: tokio_util::sync::CancellationToken::new(),
        failure_log: Mutex::new((None, 0)),
        direct_fd,
        wire: Mutex::new(Wire {
            busy: false,
            closed: false,
            rest: Vec::new(),
            rest_units: 0,
            rest_slots: 0,
            staged: Batch::new(IOVECS / 2),
        }),
        replier: Arc::new(ConnReply(me.clone())),
    });
    let writer = tokio::spawn(writer(conn.clone(), wr));
    // A buffer of exactly one request header: `fill_buf` gives the reader a
    // cancel-safe wait for the next request, and a WRITE payload finds the
    // buffer empty (unless its header arrived in pieces) and is received
    // straight into the store's registered buffer: BufReader bypasses an empty
    // buffer for reads at least its size. A 64 KiB buffer saved syscalls but
    // copied payloads; the difference was within the noise of `berth-bench nbd`.
    let mut rd = tokio::io::BufReader::with_capacity(REQUEST_BYTES, rd);
    let why = reader(&conn, &mut rd, &cancel).await;
    conn.reader_done.store(true, Ordering::SeqCst);
    conn.done.ready.notify_one();
    let _ = writer.await;
    node.unregister_conn(conn_id, &conn.export);
    let ev = disconnect_event(&conn.export.grant, &peer, &why, &conn.counters, "");
    tracing::info!(parent: &span, reason = %why, read_bytes = ev.read_bytes, write_bytes = ev.write_bytes, "export disconnected");
    audit(&node, ev).await;
}

/// Reads and submits requests until the client disconnects or breaks the
/// protocol, the export is revoked, or the server shuts down; returns why it
/// stopped. Those last two are noticed only between requests, never halfway
/// through one, so every request read is answered and the stream stays framed.
async fn reader<R: AsyncBufRead + Unpin>(
    conn: &Arc<Conn>,
    rd: &mut R,
    cancel: &tokio_util::sync::CancellationToken,
) -> String {
    let mut hdr = [0u8; REQUEST_BYTES];
    let mut poll = crate::poll::ReaderPoll::new();
    loop {
        let polling = poll.polling();
        // `fill_buf` consumes nothing, so dropping it on cancellation loses nothing.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                if conn.node.shutdown.is_cancelled() {
                    // Requests the client already sent get ESHUTDOWN rather than
                    // silence, so it knows to retry elsewhere or later.
                    refuse_remaining(conn, rd).await;
                    return "server shutting down".into();
                }
                return "export revoked".into();
            }
            _ = conn.broken.cancelled() => return "client stopped reading replies".into(),
            r = rd.fill_buf() => match r {
                Ok([]) => return "client closed the connection".into(),
                Ok(_) => {}
                Err(e) => return format!("read failed: {e}"),
            },
            // Shortly after a request, under a shallow load, look again
            // rather than sleep (`crate::poll`).
            _ = crate::poll::ReaderPoll::pause(), if polling => continue,
        }
        // A frame that has started must finish in reasonable time, or a client
        // could hold a revoke or a shutdown open with half a header.
        match tokio::time::timeout(FRAME_TIMEOUT, rd.read_exact(&mut hdr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "client closed the connection mid-request".into()
            }
            Ok(Err(e)) => return format!("read failed: {e}"),
            Err(_) => return format!("request header unfinished after {FRAME_TIMEOUT:?}"),
        }
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "closing connection: bad request");
                return format!("protocol violation: {e}");
            }
        };
        if req.command == CMD_DISC {
            return "client disconnected".into();
        }
        if let Err(why) = handle(conn, rd, req).await {
            return why;
        }
        let live = MAX_INFLIGHT - conn.slots.available_permits();
        poll.after(live, Instant::now(), conn.node.store.poll());
    }
}

/// During shutdown: answers whatever requests arrive within a short grace
/// period with ESHUTDOWN (reading WRITE payloads off the wire), then stops.
async fn refuse_remaining<R: AsyncRead + Unpin>(conn: &Arc<Conn>, rd: &mut R) {
    let mut hdr = [0u8; REQUEST_BYTES];
    let grace = Duration::from_millis(200);
    while let Ok(Ok(_)) = tokio::time::timeout(grace, rd.read_exact(&mut hdr)).await {
        let Ok(req) = parse_request(&hdr) else { return };
        if req.command == CMD_DISC {
            return;
        }
        if req.command == CMD_WRITE {
            if req.len as u64 > MAX_REQUEST_BYTES {
                return;
            }
            let mut sink = (&mut *rd).take(req.len as u64);
            match tokio::time::timeout(grace, tokio::io::copy(&mut sink, &mut tokio::io::sink()))
                .await
            {
                Ok(Ok(n)) if n == req.len as u64 => {}
                _ => return,
            }
        }
        let Ok(slot) = conn.slots.acquire().await else {
            return;
        };
        slot.forget();
        let tag = conn.done.pending.lock().insert(Pending {
            handle: req.handle,
            command: req.command,
            offset: req.offset,
            len: req.len,
            flags: req.flags,
            started: Instant::now(),
            units: 0,
            gated: None,
            _fence: None,
        }) as u64;
        conn.done.push(Completion::Refused(
            tag,
            ESHUTDOWN,
            "server is shutting down",
        ));
    }
}

/// Flags each command accepts (FUA is accepted on every command).
fn allowed_flags(command: u16) -> u16 {
    CMD_FLAG_FUA
        | match command {
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

async fn handle<R: AsyncRead + Unpin>(
    conn: &Arc<Conn>,
    rd: &mut R,
    req: Request,
) -> Result<(), String> {
    let started = Instant::now();
    let len = req.len as u64;
    if req.command == CMD_WRITE && len > MAX_REQUEST_BYTES {
        // Reading a payload this large would be a denial of service (spec).
        return Err(format!("write of {len} bytes exceeds the 32 MiB maximum"));
    }
    // Capped at what the connection may hold at all (a larger request would
    // wait forever for units that do not exist).
    let payload_units = if matches!(req.command, CMD_READ | CMD_WRITE) && len <= MAX_REQUEST_BYTES {
        (len.div_ceil(4096).max(1) as u32).min(conn.unit_cap)
    } else {
        0
    };
    // Backpressure: bounded requests and payload bytes in flight.
    let slot = conn
        .slots
        .acquire()
        .await
        .map_err(|_| "closing".to_string())?;
    slot.forget();
    if payload_units > 0 {
        let u = conn
            .units
            .acquire_many(payload_units)
            .await
            .map_err(|_| "closing".to_string())?;
        u.forget();
        // And from the node's budget: the memory of all connections together
        // is bounded too.
        conn.node
            .budget
            .take(payload_units)
            .await
            .map_err(|_| "closing".to_string())?;
    }
    let mut pending = Pending {
        handle: req.handle,
        command: req.command,
        offset: req.offset,
        len: req.len,
        flags: req.flags,
        started,
        units: payload_units,
        gated: None,
        _fence: None,
    };
    let ex = &conn.export;
    let store = &conn.node.store;
    // The payload of a WRITE is on the wire whatever we answer: read it first.
    let mut payload = None;
    if req.command == CMD_WRITE {
        let (mut buf, start) = store.write_buffer(req.offset, req.len as usize);
        let body = &mut buf.as_mut_slice()[start..start + req.len as usize];
        match tokio::time::timeout(FRAME_TIMEOUT, rd.read_exact(body)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("client vanished mid-write: {e}")),
            Err(_) => return Err(format!("write payload unfinished after {FRAME_TIMEOUT:?}")),
        }
        payload = Some(buf);
    }
    let refuse = |pending: Pending, errno: u32, msg: &'static str| {
        let tag = conn.done.pending.lock().insert(pending) as u64;
        conn.done.push(Completion::Refused(tag, errno, msg));
    };
    if req.flags & !allowed_flags(req.command) != 0 {
        refuse(pending, EINVAL, "flag not valid for this command");
        return Ok(());
    }
    match ex.runtime.admit_past_fence(&ex.grant) {
        crate::node::FenceCheck::Open(g) => pending._fence = g,
        crate::node::FenceCheck::Fenced => {
            refuse(pending, ESHUTDOWN, "fenced: a newer nexus owns this volume");
            return Ok(());
        }
    }
    let write_kind = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if write_kind && ex.read_only {
        refuse(pending, EPERM, "export is read-only");
        return Ok(());
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let op = match req.command {
        CMD_READ => {
            if len > MAX_REQUEST_BYTES {
                refuse(pending, EINVAL, "read longer than the 32 MiB maximum");
                return Ok(());
            }
            Op::Read {
                target: ex.target,
                offset: req.offset,
                len: req.len as usize,
            }
        }
        CMD_WRITE => Op::Write {
            target: ex.target,
            offset: req.offset,
            len: req.len as usize,
            buf: payload.take().ok_or("write without payload")?,
            fua,
        },
        CMD_FLUSH => Op::Flush,
        CMD_TRIM => Op::Zero {
            target: ex.target,
            offset: req.offset,
            len,
            how: Zeroing::Trim,
            fua,
        },
        CMD_WRITE_ZEROES if req.flags & CMD_FLAG_NO_HOLE != 0 => {
            if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                // Zeros that stay allocated are written like data: not fast,
                // and the spec asks for ENOTSUP rather than a slow success.
                refuse(pending, ENOTSUP, "allocating zeroes are not fast");
                return Ok(());
            }
            Op::Zero {
                target: ex.target,
                offset: req.offset,
                len,
                how: Zeroing::Allocate,
                fua,
            }
        }
        CMD_WRITE_ZEROES => Op::Zero {
            target: ex.target,
            offset: req.offset,
            len,
            how: Zeroing::Zero,
            fua,
        },
        CMD_BLOCK_STATUS => {
            if !conn.meta_context {
                refuse(pending, EINVAL, "no metadata context was negotiated");
                return Ok(());
            }
            // Counted as an operation against the volume's limits, and at most
            // MAX_BLOCK_STATUS running per connection.
            ex.runtime.admit(0).await;
            let permit = conn
                .block_status
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| "closing".to_string())?;
            let tag = conn.done.pending.lock().insert(pending) as u64;
            let (store, done, target) = (store.clone(), conn.done.clone(), ex.target);
            tokio::task::spawn_blocking(move || {
                let r = store.block_status(target, req.offset, len);
                done.push(Completion::Status(tag, r));
                drop(permit);
            });
            return Ok(());
        }
        _ => {
            refuse(pending, EINVAL, "unknown command");
            return Ok(());
        }
    };
    if len == 0 && req.command != CMD_FLUSH {
        // Zero-length requests succeed and touch nothing.
        let tag = conn.done.pending.lock().insert(pending) as u64;
        conn.done.push(Completion::Refused(tag, 0, ""));
        return Ok(());
    }
    let rt = &ex.runtime;
    rt.admit(if matches!(req.command, CMD_READ | CMD_WRITE) {
        len
    } else {
        0
    })
    .await;
    let prio = rt.limiter.priority();
    conn.node.gate.enter(prio).await;
    pending.gated = Some(prio);
    let tag = conn.done.pending.lock().insert(pending) as u64;
    match op {
        Op::Zero {
            target,
            offset,
            len,
            how: Zeroing::Allocate,
            fua,
        } if len > ALLOCATE_PART_BYTES => AllocateInParts::start(
            store.submitter(),
            conn.done.clone(),
            tag,
            target,
            offset,
            len,
            fua,
        ),
        op => store.submit(op, tag, conn.replier.clone()),
    }
    Ok(())
}

/// The largest part of an allocating WRITE_ZEROES the store is given at once.
const ALLOCATE_PART_BYTES: u64 = 8 << 20;

/// An allocating WRITE_ZEROES (NO_HOLE) larger than one store request, done
/// in parts one after another: each part is a write of zeros whose buffer is
/// memory, so a 4 GiB request costs one 8 MiB buffer at a time, not 4 GiB.
/// Answered once, after the last part or at the first error.
struct AllocateInParts {
    me: std::sync::Weak<AllocateInParts>,
    submitter: Submitter,
    done: Arc<Completions>,
    target: Target,
    fua: bool,
    /// The range still to zero: (offset, end).
    left: Mutex<(u64, u64)>,
}

impl AllocateInParts {
    #[allow(clippy::too_many_arguments)]
    fn start(
        submitter: Submitter,
        done: Arc<Completions>,
        tag: u64,
        target: Target,
        offset: u64,
        len: u64,
        fua: bool,
    ) {
        // Past the end of u64 is past the end of the export: the first part
        // fails with the store's range error.
        let end = offset.saturating_add(len);
        let job = Arc::new_cyclic(|me| AllocateInParts {
            me: me.clone(),
            submitter,
            done,
            target,
            fua,
            left: Mutex::new((offset, end)),
        });
        job.next(tag);
    }

    /// Submits the next part; false when none is left.
    fn next(&self, tag: u64) -> bool {
        let (offset, len) = {
            let mut left = self.left.lock();
            let (offset, end) = *left;
            if offset >= end {
                return false;
            }
            let len = (end - offset).min(ALLOCATE_PART_BYTES);
            left.0 = offset + len;
            (offset, len)
        };
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let op = Op::Zero {
            target: self.target,
            offset,
            len,
            how: Zeroing::Allocate,
            fua: self.fua,
        };
        self.submitter.submit(op, tag, me);
        true
    }
}

impl Reply for AllocateInParts {
    fn reply(&self, tag: u64, outcome: Outcome) {
        let failed = matches!(outcome, Outcome::Done(Err(_)) | Outcome::Read(_));
        if failed || !self.next(tag) {
            self.done.push(Completion::Store(tag, outcome));
        }
    }
}

/// Sends a batch of replies; fails if the client does not take them within
/// [`REPLY_TIMEOUT`], or within [`STALL_UNDER_PRESSURE`] while the node's
/// payload budget is under pressure.
async fn write_replies<W: AsyncWrite + Unpin>(
    conn: &Conn,
    wr: &mut W,
    b: &Batch,
) -> Result<(), String> {
    let started = Instant::now();
    let write = write_batch(wr, b);
    tokio::pin!(write);
    loop {
        tokio::select! {
            r = &mut write => return r.map_err(|e| format!("reply write failed ({e}): client gone")),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let waited = started.elapsed();
                if waited >= REPLY_TIMEOUT {
                    return Err(format!("client has not read its replies for {REPLY_TIMEOUT:?}"));
                }
                if waited >= STALL_UNDER_PRESSURE && conn.node.budget.under_pressure() {
                    return Err(format!(
                        "client has not read its replies for {waited:?} while the node's reply memory runs low"
                    ));
                }
            }
        }
    }
}

/// Per-batch scratch: reply headers, and which parts of the batch carry data.
struct Batch {
    /// Every reply header of the batch, back to back.
    headers: Vec<u8>,
    /// For each read payload (`reads[k]`), the offset in `headers` it follows.
    data_at: Vec<usize>,
    reads: Vec<ReadDone>,
    local: VecDeque<Completion>,
    /// Budgets the batch's requests held, given back once its replies are sent.
    release_units: u32,
    release_slots: u32,
}

impl Batch {
    /// The batch's bytes in order: the headers, each read's payload after
    /// the header that announces it.
    fn pieces(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let tail = self.data_at.last().copied().unwrap_or(0);
        (0..self.data_at.len())
            .flat_map(move |k| {
                let from = if k == 0 { 0 } else { self.data_at[k - 1] };
                [&self.headers[from..self.data_at[k]], self.reads[k].bytes()]
            })
            .chain(std::iter::once(&self.headers[tail..]))
            .filter(|p| !p.is_empty())
    }

    /// Moves `other`'s replies (and the budgets they hold) to the end of
    /// this batch.
    fn take(&mut self, other: &mut Batch) {
        let base = self.headers.len();
        self.headers.append(&mut other.headers);
        self.data_at
            .extend(other.data_at.drain(..).map(|d| d + base));
        self.reads.append(&mut other.reads);
        self.release_units += std::mem::take(&mut other.release_units);
        self.release_slots += std::mem::take(&mut other.release_slots);
    }

    /// Forgets the replies (not the budgets: see [`Conn::release`]).
    fn clear(&mut self) {
        self.headers.clear();
        self.data_at.clear();
        self.reads.clear();
    }

    /// Room for `n` replies.
    fn new(n: usize) -> Batch {
        Batch {
            headers: Vec::with_capacity(n * 128),
            data_at: Vec::with_capacity(n),
            reads: Vec::with_capacity(n),
            local: VecDeque::with_capacity(n),
            release_units: 0,
            release_slots: 0,
        }
    }
}

async fn writer<W: AsyncWrite + Unpin>(conn: Arc<Conn>, mut wr: W) {
    let mut b = Batch::new(MAX_INFLIGHT);
    let mut broken = false;
    loop {
        let idle = {
            let mut w = conn.wire.lock();
            std::mem::swap(&mut *conn.done.queue.lock(), &mut b.local);
            let idle = b.local.is_empty() && w.rest.is_empty() && w.staged.headers.is_empty();
            if !idle {
                // The end of a half-sent direct reply leaves first.
                if !w.rest.is_empty() {
                    b.headers.append(&mut w.rest);
                    b.release_units += std::mem::take(&mut w.rest_units);
                    b.release_slots += std::mem::take(&mut w.rest_slots);
                }
                // Replies staged but not flushed yet: the writer sends them.
                b.take(&mut w.staged);
                w.busy = true;
            } else if conn.reader_done.load(Ordering::SeqCst) && conn.done.pending.lock().is_empty()
            {
                // No direct reply is being sent either (they hold the wire),
                // so an empty table means every request is answered.
                w.closed = true;
                break;
            }
            idle
        };
        if idle {
            conn.done.ready.notified().await;
            continue;
        }
        {
            // One lock of the in-flight table for the whole batch.
            let mut pending = conn.done.pending.lock();
            while let Some(c) = b.local.pop_front() {
                encode(&conn, &mut pending, c, &mut b);
            }
        }
        // A direct send may have found the client gone.
        broken |= conn.broken.is_cancelled();
        if !broken {
            // A client that stops reading its replies must not hold the
            // connection (and a shutdown) forever.
            // When the node's payload budget runs low, much sooner: the
            // memory it holds is everyone's.
            match write_replies(&conn, &mut wr, &b).await {
                Ok(()) => {}
                Err(why) => {
                    tracing::warn!("{why}; dropping its replies");
                    broken = true;
                }
            }
            if broken {
                conn.broken.cancel();
            }
        }
        {
            let mut w = conn.wire.lock();
            w.busy = false;
            w.closed |= broken;
        }
        b.clear();
        conn.release(&mut b);
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// I/O vectors per `writev`: on the stack, so sending a batch allocates nothing.
const IOVECS: usize = 64;

/// Sends a batch: headers interleaved with the read payloads they announce, in
/// vectored writes of up to [`IOVECS`] pieces.
async fn write_batch<W: AsyncWrite + Unpin>(wr: &mut W, b: &Batch) -> std::io::Result<()> {
    let mut iov = [IoSlice::new(&[]); IOVECS];
    let mut n = 0;
    for p in b.pieces() {
        if n == IOVECS {
            write_all_vectored(wr, &mut iov[..n]).await?;
            n = 0;
        }
        iov[n] = IoSlice::new(p);
        n += 1;
    }
    write_all_vectored(wr, &mut iov[..n]).await?;
    wr.flush().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut rest: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Turns one completion into reply bytes (and a payload part), and does its
/// bookkeeping: metrics, counters, budgets, the priority gate.
fn encode(conn: &Conn, pending: &mut slab::Slab<Pending>, c: Completion, b: &mut Batch) {
    let tag = match &c {
        Completion::Store(t, _) | Completion::Status(t, _) | Completion::Refused(t, _, _) => *t,
    };
    let Some(p) = pending.try_remove(tag as usize) else {
        tracing::error!(tag, "completion for an unknown request");
        return;
    };
    b.release_slots += 1;
    b.release_units += p.units;
    let rt = &conn.export.runtime;
    if let Some(prio) = p.gated {
        conn.node.gate.exit(prio);
    }
    let m = &rt.metrics.op[op_index(p.command)];
    let (errno, msg): (u32, String) = match c {
        Completion::Refused(_, errno, msg) => (errno, msg.to_string()),
        Completion::Store(_, Outcome::Read(Ok(data))) => {
            if conn.structured {
                put_chunk_header(
                    &mut b.headers,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    p.handle,
                    8 + p.len,
                );
                b.headers.extend_from_slice(&p.offset.to_be_bytes());
            } else {
                put_simple_reply(&mut b.headers, 0, p.handle);
            }
            b.data_at.push(b.headers.len());
            b.reads.push(data);
            conn.counters.read_ops.fetch_add(1, Ordering::Relaxed);
            conn.counters
                .read_bytes
                .fetch_add(p.len as u64, Ordering::Relaxed);
            m.ops.inc();
            m.bytes.inc_by(p.len as u64);
            m.latency.observe(p.started.elapsed().as_secs_f64());
            return;
        }
        Completion::Store(_, Outcome::Read(Err(e)) | Outcome::Done(Err(e)))
        | Completion::Status(_, Err(e)) => {
            if matches!(e, StoreError::Integrity { .. }) {
                rt.metrics.checksum_errors.inc();
            }
            let integrity = matches!(e, StoreError::Integrity { .. });
            if let Some(suppressed) = conn.may_log_failure(integrity) {
                tracing::warn!(volume = %rt.name, op = crate::metrics::OPS[op_index(p.command)], offset = p.offset, len = p.len, error = %e, suppressed, "request failed");
            }
            let errno = match (&e, p.command) {
                // Past the end: ENOSPC for writes, EINVAL otherwise (the spec).
                (StoreError::OutOfRange { .. }, CMD_WRITE | CMD_WRITE_ZEROES) => ENOSPC,
                _ => nbd_errno(e.errno()),
            };
            (errno, e.to_string())
        }
        Completion::Store(_, Outcome::Done(Ok(()))) => (0, String::new()),
        Completion::Status(_, Ok(extents)) => {
            let req_one = p.flags & CMD_FLAG_REQ_ONE != 0;
            let n = if req_one {
                1
            } else {
                extents.len().min(1 << 16)
            };
            put_chunk_header(
                &mut b.headers,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                p.handle,
                4 + 8 * n as u32,
            );
            b.headers
                .extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for e in extents.iter().take(n) {
                let mut len = e.len_bytes.min(u32::MAX as u64 & !4095);
                if req_one {
                    len = len.min(p.len as u64);
                }
                let flags = if e.data { 0 } else { STATE_HOLE | STATE_ZERO };
                b.headers.extend_from_slice(&(len as u32).to_be_bytes());
                b.headers.extend_from_slice(&flags.to_be_bytes());
            }
            m.ops.inc();
            m.latency.observe(p.started.elapsed().as_secs_f64());
            return;
        }
    };
    if errno == 0 {
        match p.command {
            CMD_WRITE => {
                conn.counters.write_ops.fetch_add(1, Ordering::Relaxed);
                conn.counters
                    .write_bytes
                    .fetch_add(p.len as u64, Ordering::Relaxed);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                conn.counters.write_ops.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        m.ops.inc();
        m.bytes.inc_by(p.len as u64);
    } else {
        m.errors.inc();
    }
    m.latency.observe(p.started.elapsed().as_secs_f64());
    if errno != 0 && conn.structured && matches!(p.command, CMD_READ | CMD_BLOCK_STATUS) {
        put_error_chunk(&mut b.headers, p.handle, errno, &msg);
    } else if conn.structured && p.command == CMD_READ {
        // A READ never gets a simple reply once structured replies are on (a
        // zero-length read is the only successful one without data).
        put_chunk_header(
            &mut b.headers,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            p.handle,
            0,
        );
    } else {
        put_simple_reply(&mut b.headers, errno, p.handle);
    }
}
