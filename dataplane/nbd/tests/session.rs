//! The resilient session against a model NBD server that behaves like a
//! crashing one: what it acknowledged is volatile until a FLUSH, and a crash
//! drops the volatile part and every connection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_nbd::proto::*;
use berth_nbd::session::{Cmd, Endpoint, Options, Session, Uri};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Disk {
    /// What a crash keeps.
    durable: Vec<u8>,
    /// What reads see.
    current: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Model {
    disk: Arc<Mutex<Disk>>,
    /// When non-zero, every mutation fails with this NBD error.
    fail_writes: Arc<AtomicU32>,
    flushes: Arc<AtomicU32>,
    connections: Arc<AtomicU32>,
    /// When set, GO is refused as for an unknown export (a revoked grant).
    refuse: Arc<std::sync::atomic::AtomicBool>,
}

impl Model {
    fn new(size: usize) -> Model {
        Model {
            disk: Arc::new(Mutex::new(Disk {
                durable: vec![0; size],
                current: vec![0; size],
            })),
            fail_writes: Arc::new(AtomicU32::new(0)),
            flushes: Arc::new(AtomicU32::new(0)),
            connections: Arc::new(AtomicU32::new(0)),
            refuse: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    fn grow(&self, size: usize) {
        let mut d = self.disk.lock();
        d.durable.resize(size, 0);
        d.current.resize(size, 0);
    }

    fn durable(&self, at: usize, len: usize) -> Vec<u8> {
        self.disk.lock().durable[at..at + len].to_vec()
    }
}

/// A running model server on a unix socket; [`Server::crash`] ends it the
/// way kill -9 would.
struct Server {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    fn start(model: &Model, path: &std::path::Path) -> Server {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind");
        let stop = CancellationToken::new();
        let (m, s) = (model.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut conns: Vec<tokio::task::JoinHandle<()>> = Vec::new();
            loop {
                tokio::select! {
                    _ = s.cancelled() => {
                        // Every connection ends before the crash returns.
                        for c in &conns {
                            c.abort();
                        }
                        for c in conns {
                            let _ = c.await;
                        }
                        return;
                    }
                    a = listener.accept() => {
                        let Ok((conn, _)) = a else { return };
                        conns.retain(|c| !c.is_finished());
                        let (m, s) = (m.clone(), s.clone());
                        conns.push(tokio::spawn(async move {
                            tokio::select! {
                                biased;
                                _ = s.cancelled() => {}
                                _ = serve(conn, m) => {}
                            }
                        }));
                    }
                }
            }
        });
        Server { stop, task }
    }

    /// Drops every connection and everything not flushed.
    async fn crash(self, model: &Model) {
        self.stop.cancel();
        let _ = self.task.await;
        let mut d = model.disk.lock();
        d.current = d.durable.clone();
    }
}

async fn serve(mut c: UnixStream, m: Model) -> std::io::Result<()> {
    m.connections.fetch_add(1, Ordering::Relaxed);
    c.write_u64(NBDMAGIC).await?;
    c.write_u64(IHAVEOPT).await?;
    c.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    let _client_flags = c.read_u32().await?;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await?;
        let h = parse_option_header(&h).map_err(std::io::Error::other)?;
        let mut data = vec![0u8; h.len as usize];
        c.read_exact(&mut data).await?;
        let mut out = Vec::new();
        if h.option == OPT_GO && m.refuse.load(Ordering::Relaxed) {
            put_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"no such export");
            c.write_all(&out).await?;
            continue;
        }
        if h.option == OPT_GO {
            let size = m.disk.lock().current.len() as u64;
            let flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
            put_option_reply(&mut out, OPT_GO, REP_INFO, &info_export(size, flags));
            put_option_reply(&mut out, OPT_GO, REP_ACK, &[]);
            c.write_all(&out).await?;
            break;
        }
        put_option_reply(&mut out, h.option, REP_ACK, &[]);
        c.write_all(&out).await?;
    }
    loop {
        let mut h = [0u8; REQUEST_BYTES];
        c.read_exact(&mut h).await?;
        let r = parse_request(&h).map_err(std::io::Error::other)?;
        let (at, len) = (r.offset as usize, r.len as usize);
        let mut out = Vec::new();
        let fail = m.fail_writes.load(Ordering::Relaxed);
        match r.command {
            CMD_READ => {
                let d = m.disk.lock().current[at..at + len].to_vec();
                put_chunk_header(
                    &mut out,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    r.handle,
                    8 + r.len,
                );
                out.extend_from_slice(&r.offset.to_be_bytes());
                out.extend_from_slice(&d);
            }
            CMD_WRITE => {
                let mut d = vec![0u8; len];
                c.read_exact(&mut d).await?;
                if fail == 0 {
                    m.disk.lock().current[at..at + len].copy_from_slice(&d);
                }
                put_simple_reply(&mut out, fail, r.handle);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if fail == 0 {
                    m.disk.lock().current[at..at + len].fill(0);
                }
                put_simple_reply(&mut out, fail, r.handle);
            }
            CMD_FLUSH => {
                m.flushes.fetch_add(1, Ordering::Relaxed);
                let mut d = m.disk.lock();
                d.durable = d.current.clone();
                put_simple_reply(&mut out, 0, r.handle);
            }
            CMD_DISC => return Ok(()),
            _ => put_simple_reply(&mut out, EINVAL, r.handle),
        }
        c.write_all(&out).await?;
    }
}

fn uri(path: &std::path::Path) -> Uri {
    Uri {
        endpoint: Endpoint::Unix(path.to_path_buf()),
        export: "disk".into(),
        tls: false,
    }
}

fn opts() -> Options {
    Options {
        reconnect_timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

async fn write(s: &Session, at: u64, byte: u8, len: usize) {
    s.call(Cmd::Write {
        offset: at,
        data: Bytes::from(vec![byte; len]),
    })
    .await
    .expect("write");
}

async fn read(s: &Session, at: u64, len: u32) -> Vec<u8> {
    try_read(s, at, len).await.expect("read")
}

async fn try_read(s: &Session, at: u64, len: u32) -> berth_nbd::session::Outcome {
    s.call(Cmd::Read { offset: at, len }).await
}

/// A model disk served on a fresh socket: the socket's folder (kept while
/// the test runs), the socket, the model and its server.
fn served() -> (tempfile::TempDir, std::path::PathBuf, Model, Server) {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("nbd.sock");
    let m = Model::new(SIZE);
    let srv = Server::start(&m, &sock);
    (dir, sock, m, srv)
}

const SIZE: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_trims_and_flushes_round_trip() {
    let (_dir, sock, m, _srv) = served();
    let s = Session::connect(uri(&sock), opts()).await.expect("connect");
    assert_eq!(s.size_bytes(), SIZE as u64);
    // Many requests in flight at once, each answered correctly.
    let mut calls = Vec::new();
    for i in 0..64u64 {
        let s = s.clone();
        calls.push(tokio::spawn(async move {
            write(&s, i * 4096, i as u8 + 1, 4096).await;
            assert_eq!(read(&s, i * 4096, 4096).await, vec![i as u8 + 1; 4096]);
        }));
    }
    for c in calls {
        c.await.expect("task");
    }
    s.call(Cmd::Flush).await.expect("flush");
    assert_eq!(m.durable(63 * 4096, 4096), vec![64; 4096]);
    s.call(Cmd::Trim {
        offset: 0,
        len: 8192,
    })
    .await
    .expect("trim");
    assert_eq!(read(&s, 0, 8192).await, vec![0; 8192]);
    s.close().await.expect("close flushes");
    assert_eq!(m.durable(0, 8192), vec![0; 8192]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_unflushed_writes_survive_a_server_crash() {
    let (_dir, sock, m, srv) = served();
    let s = Session::connect(uri(&sock), opts()).await.expect("connect");
    write(&s, 0, 0xa1, 4096).await;
    s.call(Cmd::Flush).await.expect("flush");
    // Acknowledged, not flushed: the crash loses them on the server...
    write(&s, 0, 0xb2, 4096).await;
    write(&s, 8192, 0xc3, 4096).await;
    write(&s, 0, 0xd4, 512).await; // overlapping: order matters
    srv.crash(&m).await;
    assert_eq!(m.disk.lock().current[0], 0xa1, "the model lost them");
    // ...a read while it is away waits for it...
    let pending = {
        let s = s.clone();
        tokio::spawn(async move { read(&s, 0, 4096).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a read completed with no server");
    let _srv = Server::start(&m, &sock);
    // ...and the session wrote them again, in order, before anything else.
    let got = pending.await.expect("task");
    let mut want = vec![0xd4; 512];
    want.extend_from_slice(&[0xb2; 4096 - 512]);
    assert_eq!(got, want);
    assert_eq!(read(&s, 8192, 4096).await, vec![0xc3; 4096]);
    assert_eq!(s.stats.reconnects.load(Ordering::Relaxed), 1);
    assert_eq!(s.stats.replayed.load(Ordering::Relaxed), 3);
    s.call(Cmd::Flush).await.expect("flush after the replay");
    assert_eq!(m.durable(0, 512), vec![0xd4; 512]);
    assert_eq!(m.durable(8192, 4096), vec![0xc3; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_retires_the_replay_log() {
    let (_dir, sock, m, srv) = served();
    let s = Session::connect(uri(&sock), opts()).await.expect("connect");
    write(&s, 0, 1, 4096).await;
    s.call(Cmd::Flush).await.expect("flush");
    srv.crash(&m).await;
    let _srv = Server::start(&m, &sock);
    assert_eq!(read(&s, 0, 4096).await, vec![1; 4096]);
    assert_eq!(
        s.stats.replayed.load(Ordering::Relaxed),
        0,
        "flushed writes are not replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_bounded_by_flushes_of_the_sessions_own() {
    let (_dir, sock, m, _srv) = served();
    let o = Options {
        replay_soft_limit_bytes: 64 << 10,
        ..opts()
    };
    let s = Session::connect(uri(&sock), o).await.expect("connect");
    for i in 0..64u64 {
        write(&s, i * 4096, 7, 4096).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.stats.auto_flushes.load(Ordering::Relaxed) >= 2);
    assert!(m.flushes.load(Ordering::Relaxed) >= 2);
    // What those flushes covered is durable without any flush of ours.
    assert_eq!(m.durable(0, 4096), vec![7; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trims_without_payload_are_bounded_too() {
    let (_dir, sock, _m, _srv) = served();
    let o = Options {
        replay_soft_limit_entries: 16,
        ..opts()
    };
    let s = Session::connect(uri(&sock), o).await.expect("connect");
    for i in 0..64u64 {
        s.call(Cmd::Trim {
            offset: i * 4096,
            len: 4096,
        })
        .await
        .expect("trim");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.stats.auto_flushes.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_fails_the_next_flush() {
    let (_dir, sock, m, srv) = served();
    let s = Session::connect(uri(&sock), opts()).await.expect("connect");
    write(&s, 0, 5, 4096).await;
    srv.crash(&m).await;
    m.fail_writes.store(ENOSPC, Ordering::Relaxed);
    let _srv = Server::start(&m, &sock);
    assert_eq!(read(&s, 0, 4096).await, vec![0; 4096], "the write is gone");
    assert_eq!(
        s.call(Cmd::Flush).await,
        Err(EIO),
        "the flush must not pretend"
    );
    m.fail_writes.store(0, Ordering::Relaxed);
    s.call(Cmd::Flush).await.expect("later flushes are fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_after_the_timeout_and_work_again_when_the_server_returns() {
    let (_dir, sock, m, srv) = served();
    let o = Options {
        reconnect_timeout: Duration::from_millis(400),
        ..opts()
    };
    let s = Session::connect(uri(&sock), o).await.expect("connect");
    srv.crash(&m).await;
    let _ = std::fs::remove_file(&sock);
    let t = std::time::Instant::now();
    assert_eq!(try_read(&s, 0, 512).await, Err(EIO));
    assert!(t.elapsed() >= Duration::from_millis(300), "failed too soon");
    assert_eq!(
        try_read(&s, 0, 512).await,
        Err(EIO),
        "fails at once while the server stays away"
    );
    let _srv = Server::start(&m, &sock);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_read(&s, 0, 512).await {
            Ok(d) => {
                assert_eq!(d, vec![0; 512]);
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("still failing with {e} after the server came back"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_export_is_seen_on_refresh() {
    let (_dir, sock, m, _srv) = served();
    let s = Session::connect(uri(&sock), opts()).await.expect("connect");
    m.grow(2 * SIZE);
    assert_eq!(
        s.size_bytes(),
        SIZE as u64,
        "nothing tells a connected client"
    );
    assert_eq!(s.refresh_size().await.expect("refresh"), 2 * SIZE as u64);
    assert_eq!(s.size_bytes(), 2 * SIZE as u64);
    write(&s, SIZE as u64 + 4096, 9, 4096).await;
    assert_eq!(read(&s, SIZE as u64 + 4096, 4096).await, vec![9; 4096]);
    assert_eq!(m.connections.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_server_is_an_error_at_once_not_a_retry_loop() {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("nbd.sock");
    assert!(Session::connect(uri(&sock), opts()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_the_export_fails_requests_at_once() {
    let (_dir, sock, m, srv) = served();
    let s = Session::connect(uri(&sock), opts()).await.expect("connect");
    srv.crash(&m).await;
    m.refuse.store(true, Ordering::Relaxed);
    let _srv = Server::start(&m, &sock);
    let t = std::time::Instant::now();
    assert_eq!(try_read(&s, 0, 512).await, Err(EIO));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a revoked grant is not waited out for the whole reconnect timeout ({:?})",
        t.elapsed()
    );
    let asked = m.connections.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        m.connections.load(Ordering::Relaxed),
        asked,
        "and it is not asked again every moment"
    );
}
