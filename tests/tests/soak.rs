//! The soak: a `berth volume-server` process under a mixed load for
//! `BERTH_SOAK_SECS` (default 20, what CI runs): several volumes, two NBD
//! connections on each (one over the unix socket, one over TCP), random
//! writes (aligned and not), reads, flushes, FUA writes, trims and zeroing,
//! every read checked against a model of what was written; meanwhile
//! snapshots are taken, cloned, read back whole against the model as it was,
//! and deleted, and scratch volumes come and go. Pool faults are injected
//! meanwhile (`BERTH_SOAK_FAULTS`, a `BERTH_FAULTS` plan; by default 300
//! failed and 100 short pool writes and 300 reads held back 20 ms): a write
//! that fails must fail whole (the model keeps the old data, and every later
//! read is checked against it), and no other error is allowed. The server's
//! resident memory and open descriptors are reported at the start and the
//! end and must stay bounded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_tests::server::ServerProc;
use berth_volume::nbd::client::Client;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

const VOLS: usize = 4;
/// The faults a soak run injects unless `BERTH_SOAK_FAULTS` says otherwise.
const DEFAULT_FAULTS: &str = "write:eio:300,write:short=2048:100,read:delay=20ms:300";
/// How many pool writes the default plan fails.
const DEFAULT_WRITE_FAULTS: u64 = 400;
/// NBD_EIO, what an injected pool fault reaches the client as.
const EIO: u32 = 5;
const VOL_BYTES: u64 = 16 << 20;
/// Each connection owns half of its volume (so the model is exact).
const HALF: u64 = VOL_BYTES / 2;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Open descriptors, leaving out RocksDB's table and log files (it keeps
/// every SST open, and flushes and compactions change how many there are).
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                let t = target.to_string_lossy();
                !(t.contains("/meta/") && (t.ends_with(".sst") || t.ends_with(".log")))
            })
            .count()
    })
}

/// One volume: its model, and a lock writers share and a snapshot takes alone
/// (so a snapshot's content is exactly the model at that moment).
struct Vol {
    name: String,
    export: String,
    model: Mutex<Vec<u8>>,
    quiesce: tokio::sync::RwLock<()>,
}

async fn connect_unix(sock: &std::path::Path, export: &str) -> Client<tokio::net::UnixStream> {
    let s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    Client::connect(s, export).await.expect("handshake")
}

/// Whether a write landed. An injected fault (EIO) is counted, and nothing
/// of that write may have landed, which the reads that follow check; any
/// other error fails the soak, named by `what`.
fn landed(
    r: Result<(), berth_volume::nbd::client::ClientError>,
    failed: &AtomicU64,
    what: impl FnOnce() -> String,
) -> bool {
    match r {
        Ok(()) => true,
        Err(berth_volume::nbd::client::ClientError::Errno(EIO)) => {
            failed.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(e) => panic!("{}: {e}", what()),
    }
}

/// The load on one half of one volume through `c`, until `stop`; returns
/// operations done.
async fn load<S>(
    mut c: Client<S>,
    v: &Vol,
    half: u64,
    stop: &AtomicBool,
    seed: u64,
    failed: &AtomicU64,
) -> u64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let base = half * HALF;
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let _shared = v.quiesce.read().await;
        // Offsets and lengths within this connection's half; a quarter of
        // them unaligned.
        let aligned = rng.random_bool(0.75);
        let len = if aligned {
            rng.random_range(1..=16u64) * 4096
        } else {
            rng.random_range(1..=20_000u64)
        };
        let off = base + rng.random_range(0..HALF - len);
        let off = if aligned { off / 4096 * 4096 } else { off };
        let (o, l) = (off as usize, len as usize);
        match rng.random_range(0..100) {
            0..40 => {
                let data: Vec<u8> = (0..l).map(|i| (ops as usize + i * 7) as u8 | 1).collect();
                let r = c.write(off, &data, rng.random_bool(0.1)).await;
                if landed(r, failed, || format!("{}: write at {off}+{len}", v.name)) {
                    v.model.lock()[o..o + l].copy_from_slice(&data);
                }
            }
            40..85 => {
                let got = c.read(off, len as u32).await.expect("read");
                let want = v.model.lock()[o..o + l].to_vec();
                assert!(
                    got == want,
                    "{}: read at {off}+{len} differs from the model",
                    v.name
                );
            }
            85..92 => c.flush().await.expect("flush"),
            // Trims of whole blocks only: the spec leaves partly trimmed
            // blocks' contents to the server.
            92..96 if aligned => {
                c.trim(off, len as u32).await.expect("trim");
                v.model.lock()[o..o + l].fill(0);
            }
            // Partial blocks are read, modified and written: faults reach
            // them too.
            _ => {
                let r = c.write_zeroes(off, len as u32).await;
                if landed(r, failed, || {
                    format!("{}: write zeroes at {off}+{len}", v.name)
                }) {
                    v.model.lock()[o..o + l].fill(0);
                }
            }
        }
        ops += 1;
    }
    c.flush().await.expect("final flush");
    ops
}

/// One connection's thread: the first half of each volume is loaded over the
/// unix socket, the second over TCP.
fn worker(
    v: Arc<Vol>,
    half: u64,
    srv: (std::path::PathBuf, String),
    stop: Arc<AtomicBool>,
    seed: u64,
    failed: Arc<AtomicU64>,
) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async move {
        if half == 0 {
            let c = connect_unix(&srv.0, &v.export).await;
            load(c, &v, half, &stop, seed, &failed).await
        } else {
            let s = tokio::net::TcpStream::connect(&srv.1).await.expect("tcp");
            let c = Client::connect(s, &v.export).await.expect("handshake");
            load(c, &v, half, &stop, seed, &failed).await
        }
    })
}

#[test]
fn soak_many_volumes_and_connections_verified_against_a_model() {
    let secs: u64 = std::env::var("BERTH_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let faults = std::env::var("BERTH_SOAK_FAULTS").unwrap_or_else(|_| DEFAULT_FAULTS.into());
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start_env(dir.path(), "1G", &[], &[("BERTH_FAULTS", &faults)]);
    let failed = Arc::new(AtomicU64::new(0));
    let pid = srv.ready.pid;
    let vols: Vec<Arc<Vol>> = (0..VOLS)
        .map(|i| {
            let name = format!("soak{i}");
            let e = srv.volume_export(&name, &VOL_BYTES.to_string(), "soak");
            Arc::new(Vol {
                name,
                export: e["export_name"].as_str().expect("export name").to_string(),
                model: Mutex::new(vec![0; VOL_BYTES as usize]),
                quiesce: tokio::sync::RwLock::new(()),
            })
        })
        .collect();
    let (rss0, fds0) = (rss_kib(pid), fds(pid));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = (srv.ready.nbd_socket.clone(), srv.ready.nbd_tcp.clone());
    let workers: Vec<_> = vols
        .iter()
        .flat_map(|v| [(v.clone(), 0u64), (v.clone(), 1u64)])
        .enumerate()
        .map(|(k, (v, half))| {
            let (stop, addr, failed) = (stop.clone(), addr.clone(), failed.clone());
            std::thread::spawn(move || worker(v, half, addr, stop, k as u64 + 1, failed))
        })
        .collect();

    // Control load while the data load runs.
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
    // Each cycle: a snapshot, a clone read back whole, a scratch volume; 7
    // control calls.
    let mut cycles = 0u64;
    let mut rss_max = rss0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let v = &vols[rng.random_range(0..VOLS)];
        let snap = format!("{}-s{cycles}", v.name);
        let frozen = {
            let _alone = v.quiesce.blocking_write();
            srv.ctl_json(&["snapshot", "create", &v.name, &snap]);
            v.model.lock().clone()
        };
        let clone = format!("{}-c{cycles}", v.name);
        srv.ctl_json(&["clone", &clone, "--from-snapshot", &snap]);
        let e = srv.ctl_json(&["export", "grant", "--volume", &clone, "--client", "soak"]);
        let export = e["export_name"].as_str().expect("export").to_string();
        let whole = rt.block_on(async {
            let mut c = connect_unix(&srv.ready.nbd_socket, &export).await;
            let mut out = Vec::with_capacity(VOL_BYTES as usize);
            for at in (0..VOL_BYTES).step_by(1 << 20) {
                out.extend(c.read(at, 1 << 20).await.expect("clone read"));
            }
            let _ = c.disconnect().await;
            out
        });
        assert!(
            whole == frozen,
            "clone {clone} differs from the model at its snapshot"
        );
        srv.ctl_json(&["volume", "delete", &clone]);
        srv.ctl_json(&["snapshot", "delete", &snap]);
        // A scratch volume comes and goes.
        let s = format!("scratch{cycles}");
        srv.ctl_json(&["volume", "create", &s, "--size", "8M"]);
        srv.ctl_json(&["volume", "delete", &s]);
        cycles += 1;
        rss_max = rss_max.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let data_ops: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    // Connections closed: give the server a moment to drop them.
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, fds1) = (rss_kib(pid), fds(pid));
    let stats = srv.ctl_json(&["stats"]);
    let scrub = srv.ctl_json(&["scrub"]);
    let failed = failed.load(Ordering::Relaxed);
    eprintln!(
        "soak: {secs} s, faults {faults:?}: {failed} writes failed as injected, every one whole; {VOLS} volumes x 2 connections, {data_ops} data operations, {cycles} snapshots, {cycles} clones read back whole, {cycles} scratch volumes, {} control calls; RSS {rss0} KiB at the start, {rss_max} KiB at most, {rss1} KiB at the end; fds {fds0} -> {fds1}",
        cycles * 7
    );
    assert!(
        data_ops > secs * 100,
        "the load must have run: {data_ops} operations"
    );
    assert!(cycles > 0, "no snapshot and clone was checked");
    assert_eq!(stats["pool"]["checksum_errors"], 0, "{stats}");
    // The server counted exactly the failures the clients saw.
    let counted: u64 = stats["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["errors"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, failed, "{stats}");
    if faults == DEFAULT_FAULTS {
        // One request can meet several faults (one per run of contiguous
        // pool blocks it is written to), so at most 400 requests fail.
        assert!(
            failed > 0 && failed <= DEFAULT_WRITE_FAULTS,
            "{failed} writes failed"
        );
    }
    assert_eq!(scrub["errors"].as_array().map(Vec::len), Some(0), "{scrub}");
    assert!(fds1 <= fds0, "descriptors leaked: {fds0} -> {fds1}");
    // The caches in front of RocksDB (map entries, block cache, memtables)
    // are bounded by configuration, well under this.
    assert!(rss1 < 1 << 20, "resident memory grew to {rss1} KiB");
}
