//! Replicated volumes end to end: three real volume servers and the metadata
//! service on loopback, the volume attached with `berthctl volume attach`
//! (the nexus runs there, as it runs in the CSI node plugin's attach
//! process), written by four writers through the attached file while a
//! replica's volume server is killed with -9; then every copy that stayed
//! in sync is read back from its own volume server and compared with what
//! was acknowledged, and with each other. Also: the volume servers' fence
//! (a grant older than the volume's generation cannot read or write), and
//! a paused nexus that another nexus replaced.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_nbd::proto::ESHUTDOWN;
use berth_nbd::session::{Cmd, Options, Session, Uri};
use berth_tests::meta::{Cluster, NodeSpec};
use berth_tests::server::{binary, blocks_of, qemu_io, ServerProc};
use bytes::Bytes;
use serde_json::Value;

/// FUSE is what `volume attach` serves the volume through.
fn fuse_missing() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: no /dev/fuse: this kernel cannot serve the attached file");
        return true;
    }
    false
}

fn three_nodes(root: &Path) -> Cluster {
    nodes_of(root, "512M")
}

fn nodes_of(root: &Path, pool_size: &'static str) -> Cluster {
    let spec = |name| NodeSpec {
        name,
        pool_size,
        labels: vec![],
    };
    Cluster::start(root, &[spec("n1"), spec("n2"), spec("n3")])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn session_opts() -> Options {
    Options {
        reconnect_timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

/// `berthctl volume attach NAME DIR --node NODE`, running until told to stop.
struct Attached {
    child: Child,
    dir: PathBuf,
}

impl Attached {
    fn start(c: &Cluster, volume: &str, dir: &Path, node: &str) -> Attached {
        std::fs::create_dir_all(dir).expect("mount point");
        let child = Command::new(binary("berthctl"))
            .args(["--endpoint", &c.meta.endpoint])
            .args(&c.meta.ctl_args)
            .args(["volume", "attach", volume])
            .arg(dir)
            .args(["--node", node])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("berthctl volume attach");
        let mut a = Attached {
            child,
            dir: dir.to_path_buf(),
        };
        let file = a.file();
        let end = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
            if let Ok(Some(st)) = a.child.try_wait() {
                panic!("berthctl volume attach exited early: {st}");
            }
            assert!(Instant::now() < end, "{} never appeared", file.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// The attached file, open for reading and writing.
    fn open(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.file())
            .expect("open the attached file")
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child; no memory is shared.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGINT: it flushes, unmounts, unpublishes and exits 0.
    fn detach(mut self) {
        self.signal(libc::SIGINT);
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "berthctl volume attach ended with {st}");
    }
}

impl Drop for Attached {
    /// Killed (a failed test, or a deposed nexus): its mount is cleared.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

const BLOCK: usize = 16 << 10;
const WRITERS: u64 = 4;

/// What block `b` holds after its `seq`-th write (0: never written).
fn content(b: u64, seq: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0; BLOCK];
    }
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&b.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ ((i as u64) << 40)).to_le_bytes());
    }
    v
}

/// Four writers, each over its own quarter of `blocks`: random blocks, an
/// fsync every 16 writes. Returns each block's last acknowledged sequence
/// number (0: not written by this load; otherwise above `base`) and the
/// longest time one write took.
fn write_load(file: &Path, blocks: u64, base: u64, stop: &AtomicBool) -> (Vec<u64>, Duration) {
    let per = blocks / WRITERS;
    let results: Vec<(Vec<(u64, u64)>, Duration)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..WRITERS)
            .map(|w| {
                s.spawn(move || {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(file)
                        .expect("open the attached file");
                    let mut last = vec![0u64; per as usize];
                    let mut seq = base + w + 1;
                    let mut worst = Duration::ZERO;
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ w;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = x % per;
                        let b = w * per + i;
                        seq += WRITERS;
                        let t = Instant::now();
                        f.write_all_at(&content(b, seq), b * BLOCK as u64)
                            .expect("a write through the nexus failed");
                        n += 1;
                        if n.is_multiple_of(16) {
                            f.sync_data().expect("fsync through the nexus failed");
                        }
                        worst = worst.max(t.elapsed());
                        last[i as usize] = seq;
                    }
                    f.sync_data().expect("the last fsync failed");
                    let blocks: Vec<(u64, u64)> = last
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (w * per + i as u64, *s))
                        .collect();
                    (blocks, worst)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("writer")).collect()
    });
    let mut last = vec![0u64; blocks as usize];
    let mut worst = Duration::ZERO;
    for (bs, w) in results {
        worst = worst.max(w);
        for (b, s) in bs {
            last[b as usize] = s;
        }
    }
    (last, worst)
}

/// Reads the whole volume `name` from one node's volume server, through a
/// grant at `generation` (the volume must be detached: it fences the nexus).
/// A grant of `volume` on one volume server at `generation`: its unix URI.
fn grant_at(srv: &ServerProc, volume: &str, client: &str, generation: u64) -> String {
    srv.ctl_json(&[
        "export",
        "grant",
        "--volume",
        volume,
        "--client",
        client,
        "--generation",
        &generation.to_string(),
    ])["unix_uri"]
        .as_str()
        .expect("unix uri")
        .to_string()
}

fn read_copy(c: &mut Cluster, node: &str, name: &str, generation: u64, size: u64) -> Vec<u8> {
    let uri = grant_at(c.node(node), name, "replication-test", generation);
    rt().block_on(async {
        let s = Session::connect(Uri::parse(&uri).expect("uri"), session_opts())
            .await
            .expect("connect to a copy");
        let mut all = Vec::with_capacity(size as usize);
        let chunk = 1u32 << 20;
        let mut at = 0;
        while at < size {
            let d = s
                .call(Cmd::Read {
                    offset: at,
                    len: chunk,
                })
                .await
                .unwrap_or_else(|e| panic!("read {node}'s copy at {at}: NBD error {e}"));
            all.extend_from_slice(&d);
            at += u64::from(chunk);
        }
        let _ = s.close().await;
        all
    })
}

fn replica_states(v: &Value) -> Vec<(String, String)> {
    v["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The rebuild's audit entry: the bytes it copied and whether that was the
/// whole volume.
fn rebuilt_bytes(c: &Cluster, volume: &str, node: &str, nth: usize) -> u64 {
    let entries: Vec<Value> = audit_actions(c, volume)
        .into_iter()
        .filter(|e| e["action"] == "FinishRebuild" && e["result"] == "ok" && e["target"] == node)
        .collect();
    let e = entries
        .get(nth)
        .unwrap_or_else(|| panic!("no rebuild #{nth} of {node} in the audit log: {entries:?}"));
    let detail = e["detail"].as_str().expect("detail");
    // "... in sync again after copying D of T bytes"
    detail
        .split("after copying ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {detail:?}"))
}

/// Polls `volume get` until every replica is in sync; returns the volume.
fn wait_in_sync(c: &Cluster, volume: &str, within: Duration) -> Value {
    let end = Instant::now() + within;
    loop {
        let v = c.meta.ctl_json(&["volume", "get", volume]);
        if replica_states(&v).iter().all(|(_, s)| s == "in-sync") {
            return v;
        }
        assert!(Instant::now() < end, "not in sync after {within:?}: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_replica_killed_under_four_writers_is_rebuilt_by_delta_and_loses_nothing() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    const SIZE: u64 = 64 << 20;
    // The writers keep to the first quarter: a delta rebuild copies at most
    // that, a full one would copy the whole volume.
    const HOT: u64 = SIZE / 4;
    let cycles: u64 = std::env::var("BERTH_REPL_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let v = c.meta.ctl_json(&[
        "volume",
        "create",
        "db",
        "--size",
        "64M",
        "--param",
        "replicas=3",
    ]);
    let mut nodes: Vec<String> = replica_states(&v).into_iter().map(|(n, _)| n).collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["n1", "n2", "n3"],
        "three copies on three nodes: {v}"
    );
    assert!(
        replica_states(&v).iter().all(|(_, s)| s == "in-sync"),
        "{v}"
    );
    for n in ["n1", "n2", "n3"] {
        assert!(
            c.server_volumes(n).contains(&"db".to_string()),
            "no copy on {n}"
        );
    }
    // Too many copies for the nodes there are: refused, naming why.
    let e = c.meta.ctl_err(
        8,
        &[
            "volume",
            "create",
            "x",
            "--size",
            "1M",
            "--param",
            "replicas=3",
            "--param",
            "replicaSpread=zone",
        ],
    );
    assert!(e.contains("3 copies need 3 nodes in distinct"), "{e}");

    let a = Attached::start(&c, "db", &root.path().join("mnt"), "n1");
    let blocks = HOT / BLOCK as u64;
    let mut last = vec![0u64; blocks as usize];
    let mut rebuilds = std::collections::HashMap::<String, usize>::new();
    let (mut total_written, mut total_rebuilt, mut total_changed) = (0usize, 0u64, 0u64);
    let mut worst_all = Duration::ZERO;
    for cycle in 0..cycles {
        let g0 = c.meta.ctl_json(&["volume", "get", "db"])["generation"]
            .as_u64()
            .expect("generation");
        // A random replica goes, the nexus's own node's included.
        let victim = ["n1", "n2", "n3"][((std::process::id() as u64 + cycle) % 3) as usize];
        let stop = AtomicBool::new(false);
        let mut after_kill = Value::Null;
        let (this, worst) = std::thread::scope(|s| {
            let load = s.spawn(|| write_load(&a.file(), blocks, (cycle + 1) << 40, &stop));
            std::thread::sleep(Duration::from_millis(1500));
            c.node(victim).kill9();
            // The writes go on without it...
            std::thread::sleep(Duration::from_millis(2500));
            after_kill = c.meta.ctl_json(&["volume", "get", "db"]);
            // ...it comes back, and is rebuilt while they still go on.
            c.node(victim).restart();
            wait_in_sync(&c, "db", Duration::from_secs(120));
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            load.join().expect("writers")
        });
        // The catalog moved on without it while it was away.
        for (n, st) in replica_states(&after_kill) {
            let want = if n == victim { "faulted" } else { "in-sync" };
            assert_eq!(st, want, "{n} after the kill: {after_kill}");
        }
        assert!(
            after_kill["generation"].as_u64() > Some(g0),
            "the generation did not move: {after_kill}"
        );
        assert_eq!(after_kill["abnormal"], true, "{after_kill}");
        assert!(
            after_kill["condition"]
                .as_str()
                .unwrap_or_default()
                .contains("degraded"),
            "{after_kill}"
        );
        let written = this.iter().filter(|s| **s > 0).count();
        assert!(written > 100, "the writers barely wrote ({written} blocks)");
        // A delta: at most the blocks written this cycle (the changed set
        // and the ranges pending at the kill are all among them).
        let nth = rebuilds.entry(victim.to_string()).or_default();
        let rebuilt = rebuilt_bytes(&c, "db", victim, *nth);
        *nth += 1;
        let changed = written as u64 * BLOCK as u64;
        assert!(
            rebuilt > 0 && rebuilt <= changed,
            "cycle {cycle}: rebuilt {rebuilt} bytes of {victim}'s copy, {changed} bytes were written"
        );
        eprintln!(
            "cycle {cycle}: killed {victim}'s volume server under 4 writers: {written} blocks \
             written, longest write {worst:?}, rebuilt {rebuilt} bytes by delta"
        );
        for (b, seq) in this.iter().enumerate() {
            if *seq > 0 {
                last[b] = *seq;
            }
        }
        total_written += written;
        total_rebuilt += rebuilt;
        total_changed += changed;
        worst_all = worst_all.max(worst);
    }
    eprintln!(
        "{cycles} cycles: {total_written} blocks written, 0 lost, {total_rebuilt} bytes rebuilt \
         for {total_changed} bytes changed, longest write {worst_all:?}"
    );
    let audit = c.meta.ctl_json(&["audit", "list", "--volume", "db"]);
    assert!(
        audit
            .as_array()
            .expect("audit")
            .iter()
            .any(|e| e["action"] == "ReportReplicaFault" && e["result"] == "ok"),
        "no fault report in the audit log"
    );

    // Everything acknowledged reads back through the nexus...
    let f = std::fs::File::open(a.file()).expect("open");
    let mut buf = vec![0u8; BLOCK];
    for (b, seq) in last.iter().enumerate() {
        f.read_exact_at(&mut buf, (b * BLOCK) as u64).expect("read");
        assert!(
            buf == content(b as u64, *seq),
            "block {b} (seq {seq}) through the nexus"
        );
    }
    drop(f);
    a.detach();
    // ...and from every copy, each on its own server, block by block (each
    // read verifies the block's checksum there), and each server's scrub
    // finds nothing wrong.
    let g = wait_in_sync(&c, "db", Duration::from_secs(10))["generation"]
        .as_u64()
        .expect("generation");
    let mut copies = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let data = read_copy(&mut c, n, "db", g, SIZE);
        for (b, seq) in last.iter().enumerate() {
            let got = &data[b * BLOCK..(b + 1) * BLOCK];
            assert!(
                got == content(b as u64, *seq),
                "block {b} (seq {seq}) on {n}'s copy"
            );
        }
        assert!(
            data[HOT as usize..].iter().all(|&x| x == 0),
            "{n}'s copy has data where nothing was written"
        );
        let scrub = c.node(n).ctl_json(&["scrub"]);
        assert_eq!(
            scrub["errors"].as_array().map(Vec::len),
            Some(0),
            "{n}: {scrub}"
        );
        copies.push(data);
    }
    assert!(
        copies[0] == copies[1] && copies[1] == copies[2],
        "the copies differ"
    );

    // A snapshot is taken on every copy at one point, and a clone of it is
    // replicated on the same copies, each holding every acknowledged write.
    c.meta.ctl_json(&["snapshot", "create", "db", "db-snap"]);
    let (data, nodes) = clone_copies(&mut c, "db-snap", SIZE);
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert!(
        data == copies[0],
        "the clone differs from the volume it was snapshotted from"
    );
    // Clones straight from a replicated volume are refused with the reason.
    let e = c.meta.ctl_err(6, &["clone", "x", "--from-volume", "db"]);
    assert!(e.contains("snapshot it and clone the snapshot"), "{e}");
    c.meta.ctl_json(&["volume", "delete", "clone-db-snap"]);
    c.meta.ctl_json(&["snapshot", "delete", "db-snap"]);
    c.meta.ctl_json(&["volume", "delete", "db"]);
    for n in ["n1", "n2", "n3"] {
        assert!(
            !c.server_volumes(n).contains(&"db".to_string()),
            "a copy stayed on {n}"
        );
    }
}

#[test]
fn a_grant_older_than_the_volume_fence_can_neither_read_nor_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = ServerProc::start(dir.path(), "256M");
    srv.ctl_json(&["volume", "create", "v", "--size", "16M"]);
    let grant = |srv: &ServerProc, client: &str, g: u64| grant_at(srv, "v", client, g);
    let old = grant(&srv, "nexus-a", 2);
    rt().block_on(async {
        let a = Session::connect(Uri::parse(&old).expect("uri"), session_opts())
            .await
            .expect("connect");
        let w = |b: u8| Cmd::Write {
            offset: 0,
            data: Bytes::from(vec![b; 4096]),
        };
        a.call(w(0xaa)).await.expect("write at the fence");
        // A newer nexus is granted: the fence rises, and the old one's next
        // request is refused on its open connection.
        let new = grant(&srv, "nexus-b", 3);
        assert_eq!(a.call(w(0xab)).await, Err(ESHUTDOWN));
        assert_eq!(
            a.call(Cmd::Read {
                offset: 0,
                len: 4096
            })
            .await,
            Err(ESHUTDOWN)
        );
        let b = Session::connect(Uri::parse(&new).expect("uri"), session_opts())
            .await
            .expect("connect the new nexus");
        b.call(w(0xbb)).await.expect("the new nexus writes");
        b.close().await.expect("flush");
    });
    // Connecting through the old grant is refused; so is a grant without a
    // generation (a plain client) and a grant below the fence.
    let (ok, out) = qemu_io(&old, &["read 0 4096".to_string()]);
    assert!(!ok && out.contains("fenced"), "{out}");
    let plain = grant(&srv, "plain", 0);
    let (ok, out) = qemu_io(&plain, &["read 0 4096".to_string()]);
    assert!(!ok && out.contains("fenced"), "{out}");
    let (code, msg) = srv.ctl_fails(&[
        "export",
        "grant",
        "--volume",
        "v",
        "--client",
        "late",
        "--generation",
        "1",
    ]);
    assert_eq!(code, 6, "failed precondition: {msg}");
    assert!(msg.contains("older than its fence"), "{msg}");
    // The fence is durable: after a restart the old grant stays fenced and
    // the new one reads what it wrote.
    srv.restart();
    let (ok, out) = qemu_io(&old, &["read 0 4096".to_string()]);
    assert!(!ok && out.contains("fenced"), "{out}");
    let newest = grant(&srv, "nexus-c", 3);
    let (ok, out) = qemu_io(&newest, &["read -P 0xbb 0 4096".to_string()]);
    assert!(ok, "{out}");
}

/// Writes 4 KiB of `byte` at offset 0 and fsyncs.
fn write_synced(file: &Path, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open");
    f.write_all_at(&[byte; 4096], 0).expect("write");
    f.sync_data().expect("fsync");
}

#[test]
fn a_paused_nexus_replaced_by_another_cannot_write_when_it_resumes() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let c = three_nodes(root.path());
    c.meta.ctl_json(&[
        "volume",
        "create",
        "app",
        "--size",
        "16M",
        "--param",
        "replicas=2",
    ]);
    let old = Attached::start(&c, "app", &root.path().join("old"), "n1");
    write_synced(&old.file(), 0x11);
    // The old nexus's node stops answering (SIGSTOP); the orchestrator
    // detaches the volume there and attaches it on another node.
    old.signal(libc::SIGSTOP);
    c.meta
        .ctl_json(&["volume", "unexport", "app", "--node", "n1"]);
    let new = Attached::start(&c, "app", &root.path().join("new"), "n2");
    write_synced(&new.file(), 0x22);
    // The old one resumes and writes: refused, and the data is the new one's.
    old.signal(libc::SIGCONT);
    let f = old.open();
    let stale = f.write_all_at(&[0x33; 4096], 0).and_then(|_| f.sync_data());
    assert!(stale.is_err(), "the deposed nexus's write was acknowledged");
    drop(f);
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(new.file())
        .expect("open")
        .read_exact_at(&mut buf, 0)
        .expect("read");
    assert!(
        buf.iter().all(|b| *b == 0x22),
        "the data is not the new nexus's"
    );
    new.detach();
    drop(old);
}

fn audit_actions(c: &Cluster, volume: &str) -> Vec<Value> {
    c.meta
        .ctl_json(&["audit", "list", "--volume", volume])
        .as_array()
        .expect("audit")
        .clone()
}

#[test]
fn a_flipped_bit_in_one_copy_is_read_from_another_and_repaired() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = nodes_of(root.path(), "64M");
    let v = c.meta.ctl_json(&[
        "volume",
        "create",
        "heal",
        "--size",
        "8M",
        "--param",
        "replicas=2",
    ]);
    // Attached on the first copy's node: reads go to that copy first.
    let states = replica_states(&v);
    let (local, other) = (states[0].0.clone(), states[1].0.clone());
    let a = Attached::start(&c, "heal", &root.path().join("mnt"), &local);
    {
        let f = a.open();
        f.write_all_at(&[0x5a; 4096], 1 << 20).expect("write");
        f.write_all_at(&[0x6b; 4096], 2 << 20).expect("write");
        f.sync_data().expect("fsync");
    }
    // Bit rot under the local copy's block.
    let pool_path = root.path().join(&local).join("pool.img");
    let pool = std::fs::read(&pool_path).expect("read pool");
    let at = blocks_of(&pool, 0x5a);
    assert_eq!(at.len(), 1, "one pool block holds 0x5a: {at:?}");
    drop(pool);
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pool_path)
            .expect("open pool");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at[0] + 777).expect("read byte");
        b[0] ^= 0x10;
        f.write_all_at(&b, at[0] + 777).expect("flip a bit");
        f.sync_all().expect("sync pool");
    }
    // The read returns the right bytes: the other copy's.
    let mut buf = vec![0u8; 4096];
    let f = std::fs::File::open(a.file()).expect("open");
    f.read_exact_at(&mut buf, 1 << 20)
        .expect("a read of a flipped block");
    assert!(
        buf.iter().all(|b| *b == 0x5a),
        "wrong bytes for the flipped block"
    );
    drop(f);
    // The local copy counted the checksum error, and the nexus rewrote the
    // block there and said so in the audit log.
    let errors = c.node(&local).ctl_json(&["stats"])["pool"]["checksum_errors"]
        .as_u64()
        .unwrap_or(0);
    assert!(errors >= 1, "the checksum error was not counted on {local}");
    let end = Instant::now() + Duration::from_secs(10);
    let repaired = loop {
        let r = audit_actions(&c, "heal")
            .into_iter()
            .find(|e| e["action"] == "ReplicaRepaired");
        if let Some(r) = r {
            break r;
        }
        assert!(
            Instant::now() < end,
            "no ReplicaRepaired entry in the audit log"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(repaired["target"], local.as_str(), "{repaired}");
    assert!(
        repaired["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&other),
        "{repaired}"
    );
    // No copy was marked out for it.
    let v = c.meta.ctl_json(&["volume", "get", "heal"]);
    assert!(
        replica_states(&v).iter().all(|(_, s)| s == "in-sync"),
        "{v}"
    );
    a.detach();
    // The local copy itself reads right again, on its own server.
    let g = v["generation"].as_u64().expect("generation");
    let data = read_copy(&mut c, &local, "heal", g, 8 << 20);
    assert!(data[1 << 20..(1 << 20) + 4096].iter().all(|b| *b == 0x5a));
    assert!(data[2 << 20..(2 << 20) + 4096].iter().all(|b| *b == 0x6b));
    let (code, out) = c.node(&local).ctl(&["scrub"]);
    assert_eq!(code, 0, "the repaired copy scrubs clean: {out}");
}

#[test]
fn a_hung_replica_is_reported_out_and_writes_go_on() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = nodes_of(root.path(), "128M");
    c.meta.ctl_json(&[
        "volume",
        "create",
        "hang",
        "--size",
        "16M",
        "--param",
        "replicas=3",
    ]);
    let a = Attached::start(&c, "hang", &root.path().join("mnt"), "n1");
    let pid = c.node("n3").ready.pid as i32;
    let stop = AtomicBool::new(false);
    let (last, worst) = std::thread::scope(|s| {
        let load = s.spawn(|| write_load(&a.file(), (16 << 20) / BLOCK as u64, 0, &stop));
        std::thread::sleep(Duration::from_millis(1000));
        // SAFETY: a signal to a child of this test; no memory is shared.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(5000));
        stop.store(true, Ordering::Relaxed);
        load.join().expect("writers")
    });
    eprintln!("paused n3's volume server under 4 writers: longest write {worst:?}");
    let v = c.meta.ctl_json(&["volume", "get", "hang"]);
    for (n, s) in replica_states(&v) {
        assert_eq!(s, if n == "n3" { "faulted" } else { "in-sync" }, "{v}");
    }
    // It wakes up: still out, and never read.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let f = std::fs::File::open(a.file()).expect("open");
    let mut buf = vec![0u8; BLOCK];
    for (b, seq) in last.iter().enumerate() {
        f.read_exact_at(&mut buf, (b * BLOCK) as u64).expect("read");
        assert!(buf == content(b as u64, *seq), "block {b} (seq {seq})");
    }
    drop(f);
    a.detach();
}

/// The metadata service dies inside a fault report (before its catalog
/// write, or after it and before the nexus hears the answer): the nexus
/// holds the write that needs the report, asks again when the service is
/// back, and gets one answer; the set moved on exactly once. A publish that
/// died after moving the generation on is cleaned up by reconcile.
#[test]
fn crashes_of_the_metadata_service_in_fault_handling_converge() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = nodes_of(root.path(), "128M");
    for (i, point) in [
        "replica-fault:before-catalog",
        "replica-fault:after-catalog",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("crash-{i}");
        let (local, victim, _) = two_copies(&c, &name, "8M");
        let a = Attached::start(&c, &name, &root.path().join(format!("mnt-{i}")), &local);
        let g0 = c.meta.ctl_json(&["volume", "get", &name])["generation"]
            .as_u64()
            .expect("generation");
        let f = a.open();
        f.write_all_at(&[0x01; 4096], 0).expect("write");
        f.sync_data().expect("fsync");
        drop(f);
        c.meta.restart(Some(point));
        eprintln!("{point}: armed; killing {victim}");
        c.node(&victim).kill9();
        // The write that needs the report, from another process: this one
        // forks the service again while it is held, and a fork waits for a
        // thread of its parent that is inside a FUSE request.
        let mut held = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-t",
                "none",
                "-c",
                "write -P 0x02 4096 4096",
                "-c",
                "flush",
            ])
            .arg(a.file())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io");
        assert!(
            c.meta.exited_within(Duration::from_secs(15)),
            "the service did not crash at {point}"
        );
        eprintln!("{point}: the service crashed");
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            held.try_wait().expect("qemu-io").is_none(),
            "{point}: the write was acknowledged without a durable fault report"
        );
        c.meta.restart(None);
        eprintln!("{point}: the service is back");
        let end = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = held.try_wait().expect("qemu-io") {
                break st;
            }
            assert!(
                Instant::now() < end,
                "{point}: the held write never finished"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(st.success(), "{point}: the held write failed");
        let mut buf = vec![0u8; 8192];
        std::fs::File::open(a.file())
            .expect("open")
            .read_exact_at(&mut buf, 0)
            .expect("read");
        assert!(buf[..4096].iter().all(|b| *b == 1) && buf[4096..].iter().all(|b| *b == 2));
        let v = c.meta.ctl_json(&["volume", "get", &name]);
        assert_eq!(
            v["generation"].as_u64(),
            Some(g0 + 1),
            "{point}: moved on once: {v}"
        );
        for (n, s) in replica_states(&v) {
            assert_eq!(
                s,
                if n == victim { "faulted" } else { "in-sync" },
                "{point}: {v}"
            );
        }
        a.detach();
        c.node(&victim).restart();
        c.meta.wait_node(&victim, "up");
    }

    // Crashes while a rebuild finishes: the nexus asks again (the same step
    // gets the same answer), the copy ends in sync exactly once, with
    // everything it missed.
    for (i, point) in ["rebuild:before-catalog", "rebuild:after-catalog"]
        .iter()
        .enumerate()
    {
        let name = format!("rb-{i}");
        let (local, victim, _) = two_copies(&c, &name, "8M");
        let a = Attached::start(&c, &name, &root.path().join(format!("mnt-rb-{i}")), &local);
        write_synced(&a.file(), 0x01);
        c.node(&victim).kill9();
        // Missed by the victim: the fault is reported first.
        let f = a.open();
        f.write_all_at(&[0x02; 4096], 1 << 20).expect("write");
        f.sync_data().expect("fsync");
        drop(f);
        c.meta.restart(Some(point));
        c.node(&victim).restart();
        assert!(
            c.meta.exited_within(Duration::from_secs(30)),
            "the service did not crash at {point}"
        );
        c.meta.restart(None);
        let v = wait_in_sync(&c, &name, Duration::from_secs(60));
        let finished = audit_actions(&c, &name)
            .into_iter()
            .filter(|e| e["action"] == "FinishRebuild" && e["result"] == "ok")
            .count();
        assert_eq!(finished, 1, "{point}: in sync once: {v}");
        a.detach();
        let g = v["generation"].as_u64().expect("generation");
        let ours = read_copy(&mut c, &local, &name, g, 8 << 20);
        let theirs = read_copy(&mut c, &victim, &name, g, 8 << 20);
        assert!(ours == theirs, "{point}: the copies differ");
        assert!(ours[(1 << 20)..(1 << 20) + 4096].iter().all(|b| *b == 2));
        assert!(ours[..4096].iter().all(|b| *b == 1));
    }

    // A publish that dies after moving the generation on, before granting.
    c.meta.ctl_json(&[
        "volume",
        "create",
        "pub",
        "--size",
        "8M",
        "--param",
        "replicas=2",
    ]);
    c.meta.restart(Some("publish-volume:after-generation"));
    let o = c.meta.ctl(&["volume", "export", "pub", "--node", "n1"]);
    assert_ne!(o.code, 0);
    assert!(
        c.meta.exited_within(Duration::from_secs(10)),
        "no crash at publish"
    );
    c.meta.restart(None);
    let end = Instant::now() + Duration::from_secs(20);
    while !c
        .meta
        .ctl_json(&["attachments", "--volume", "pub"])
        .as_array()
        .expect("attachments")
        .is_empty()
    {
        assert!(
            Instant::now() < end,
            "reconcile left the half-made attachment"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = Attached::start(&c, "pub", &root.path().join("mnt-pub"), "n1");
    a.open()
        .write_all_at(&[7; 4096], 0)
        .expect("write after the crash");
    a.detach();
}

/// The CSI path as the sidecars and kubelet drive it, against a plugin for
/// node n1 (`berth csi` as its own process): a replicated volume created
/// from StorageClass parameters, published, staged (ext4 on a loop device
/// over `berth attach`'s FUSE file, with the nexus inside) and mounted;
/// files written and fsynced while the other copy's volume server is killed;
/// ControllerGetVolume reports the volume abnormal; then unmounted,
/// detached and deleted.
#[test]
fn a_replicated_volume_through_the_csi_services_rides_through_a_lost_copy() {
    use berth_proto::csi::v1 as csi;
    use berth_tests::csi::{mount_cap, node_support, params, AccessModeKind, Cleanup, Csi};
    if let Err(why) = node_support() {
        eprintln!("SKIP: {why}");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup {
        root: root.path().to_path_buf(),
    };
    let mut c = nodes_of(root.path(), "256M");
    let sock = root.path().join("csi.sock");
    let mut plugin = Command::new(binary("berth"))
        .args(["csi", "--mode", "all", "--endpoint"])
        .arg(&sock)
        .args([
            "--metadata",
            &c.meta.endpoint,
            "--node-id",
            "n1",
            "--state-dir",
        ])
        .arg(root.path().join("csi-state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("berth csi");
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < end, "the CSI socket never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let staging = root.path().join("staging");
    let target = root.path().join("target");
    let cap = mount_cap("ext4", AccessModeKind::SingleNodeWriter);
    let rt = rt();
    let mut csi = rt.block_on(Csi::connect(&sock));
    let created = rt
        .block_on(csi.controller.create_volume(csi::CreateVolumeRequest {
            name: "pg".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: params(&[("replicas", "2"), ("tier", "premium")]),
            ..Default::default()
        }))
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let v = c.meta.ctl_json(&["volume", "get", "pg"]);
    let copies: Vec<String> = replica_states(&v).into_iter().map(|(n, _)| n).collect();
    assert_eq!(copies.len(), 2, "{v}");
    let publish_context = rt.block_on(csi.publish("pg", "n1", &cap));
    assert!(
        publish_context.contains_key("replicas"),
        "{publish_context:?}"
    );
    rt.block_on(csi.node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: "pg".into(),
        publish_context: publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: created.volume_context.clone(),
        ..Default::default()
    }))
    .expect("NodeStageVolume");
    rt.block_on(csi.node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: "pg".into(),
        publish_context,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: created.volume_context.clone(),
        ..Default::default()
    }))
    .expect("NodePublishVolume");
    let write = |name: &str, seed: u8| {
        use std::io::Write;
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i as u8) ^ seed).collect();
        let mut f = std::fs::File::create(target.join(name)).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync through the nexus");
        data
    };
    let first = write("before", 0x31);
    // The copy that is not on this node goes (n1's own may hold the other).
    let victim = copies
        .iter()
        .find(|n| n.as_str() != "n1")
        .expect("a copy elsewhere")
        .clone();
    c.node(&victim).kill9();
    let second = write("after", 0x47);
    assert!(std::fs::read(target.join("before")).expect("read") == first);
    assert!(std::fs::read(target.join("after")).expect("read") == second);
    let status = rt
        .block_on(
            csi.controller
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: "pg".into(),
                }),
        )
        .expect("ControllerGetVolume")
        .into_inner()
        .status
        .expect("status")
        .volume_condition
        .expect("condition");
    assert!(status.abnormal, "a degraded volume is abnormal: {status:?}");
    assert!(status.message.contains("degraded"), "{status:?}");
    // The node's view says so too, and still measures the filesystem.
    let stats = rt
        .block_on(
            csi.node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: "pg".into(),
                    volume_path: target.display().to_string(),
                    ..Default::default()
                }),
        )
        .expect("NodeGetVolumeStats")
        .into_inner();
    let cond = stats.volume_condition.expect("condition");
    assert!(
        cond.abnormal && cond.message.contains("degraded"),
        "{cond:?}"
    );
    assert!(
        !stats.usage.is_empty(),
        "a degraded volume still has its usage measured"
    );
    rt.block_on(
        csi.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: "pg".into(),
                target_path: target.display().to_string(),
            }),
    )
    .expect("NodeUnpublishVolume");
    rt.block_on(csi.node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "pg".into(),
        staging_target_path: staging.display().to_string(),
    }))
    .expect("NodeUnstageVolume");
    rt.block_on(csi.controller.controller_unpublish_volume(
        csi::ControllerUnpublishVolumeRequest {
            volume_id: "pg".into(),
            node_id: "n1".into(),
            ..Default::default()
        },
    ))
    .expect("ControllerUnpublishVolume");
    // Every copy's node must be up to delete the volume.
    c.node(&victim).restart();
    c.meta.wait_node(&victim, "up");
    rt.block_on(csi.controller.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "pg".into(),
        ..Default::default()
    }))
    .expect("DeleteVolume");
    for n in ["n1", "n2", "n3"] {
        assert!(
            !c.server_volumes(n).contains(&"pg".to_string()),
            "a copy stayed on {n}"
        );
    }
    let _ = plugin.kill();
    let _ = plugin.wait();
}

/// A request of the old nexus that passed the fence check just before a
/// newer grant raised the fence lands before that grant returns, so the new
/// nexus (which starts after) always writes last. The old request is held
/// in flight by the fault plan: its pool write completes 800 ms late.
#[test]
fn a_grant_that_raises_the_fence_waits_for_the_requests_it_fences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start_env(
        dir.path(),
        "256M",
        &[],
        // The first data write (past the pool's 1 MiB header) is held. Not
        // deferred: a deferred write is answered before its pool write, so
        // the pool could not hold it in flight.
        &[
            ("BERTH_FAULTS", "write:delay=800ms:1@1048576-268435456"),
            ("BERTH_DEFER_MAX", "0"),
        ],
    );
    srv.ctl_json(&["volume", "create", "v", "--size", "16M"]);
    let grant = |client: &str, g: u64| grant_at(&srv, "v", client, g);
    let old = grant("nexus-a", 2);
    rt().block_on(async {
        let a = Session::connect(Uri::parse(&old).expect("uri"), session_opts())
            .await
            .expect("connect");
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        a.submit(
            Cmd::Write {
                offset: 0,
                data: Bytes::from(vec![0xaa; 4096]),
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        // Past the fence check and held in the pool.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(rx.try_recv().is_err(), "the old write was not held");
        let t = Instant::now();
        let new = grant("nexus-b", 3);
        let waited = t.elapsed();
        assert!(
            matches!(rx.try_recv(), Ok(Ok(_))),
            "the grant returned ({waited:?}) before the request it fenced had landed"
        );
        let b = Session::connect(Uri::parse(&new).expect("uri"), session_opts())
            .await
            .expect("connect the new nexus");
        b.call(Cmd::Write {
            offset: 0,
            data: Bytes::from(vec![0xbb; 4096]),
        })
        .await
        .expect("the new nexus writes");
        let got = b
            .call(Cmd::Read {
                offset: 0,
                len: 4096,
            })
            .await
            .expect("read");
        assert!(
            got.iter().all(|x| *x == 0xbb),
            "the old nexus's write landed last"
        );
        b.close().await.expect("flush");
    });
}

/// A volume with two copies on three nodes: (its first copy's node, its
/// second's, the node without a copy).
fn two_copies(c: &Cluster, name: &str, size: &str) -> (String, String, String) {
    let v = c.meta.ctl_json(&[
        "volume",
        "create",
        name,
        "--size",
        size,
        "--param",
        "replicas=2",
    ]);
    let states = replica_states(&v);
    let (first, second) = (states[0].0.clone(), states[1].0.clone());
    let third = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != first && *n != second)
        .expect("a third node")
        .to_string();
    (first, second, third)
}

/// Whether every 16 KiB block of `data` is zeros or what the writers write
/// to that block (some version of it): a torn or misplaced block is not.
fn well_formed(data: &[u8]) -> bool {
    data.chunks(BLOCK).enumerate().all(|(b, blk)| {
        blk.iter().all(|x| *x == 0) || {
            let seq = u64::from_le_bytes(blk[8..16].try_into().expect("8 bytes"));
            blk == content(b as u64, seq).as_slice()
        }
    })
}

/// A replicated clone of `snap`, read back from each of its copies; the
/// copies must be identical. Returns the data and the copies' nodes.
fn clone_copies(c: &mut Cluster, snap: &str, size: u64) -> (Vec<u8>, Vec<String>) {
    let name = format!("clone-{snap}");
    let v = c.meta.ctl_json(&["clone", &name, "--from-snapshot", snap]);
    let nodes: Vec<String> = replica_states(&v).into_iter().map(|(n, _)| n).collect();
    let g = v["generation"].as_u64().expect("generation");
    let mut first: Option<Vec<u8>> = None;
    for n in &nodes {
        let d = read_copy(c, n, &name, g, size);
        match &first {
            Some(f) => assert!(*f == d, "the copies of {name} differ ({n})"),
            None => first = Some(d),
        }
    }
    (first.expect("a copy"), nodes)
}

#[test]
fn snapshots_of_a_replicated_volume_are_one_point_on_every_copy() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    const SIZE: u64 = 32 << 20;
    c.meta.ctl_json(&[
        "volume",
        "create",
        "sv",
        "--size",
        "32M",
        "--param",
        "replicas=3",
    ]);
    let a = Attached::start(&c, "sv", &root.path().join("mnt"), "n1");
    let marker = |byte: u8| {
        // Acknowledged (and flushed) before the snapshot is asked for.
        let f = a.open();
        f.write_all_at(&[byte; 4096], SIZE - 4096).expect("write");
        f.sync_data().expect("fsync");
    };
    let blocks = (SIZE - (1 << 20)) / BLOCK as u64;
    let stop = AtomicBool::new(false);
    let mut snaps = Vec::new();
    std::thread::scope(|s| {
        let load = s.spawn(|| write_load(&a.file(), blocks, 0, &stop));
        std::thread::sleep(Duration::from_millis(700));
        // In sync, under four writers: the nexus pauses for it.
        marker(0xa1);
        let t = Instant::now();
        let sn = c.meta.ctl_json(&["snapshot", "create", "sv", "s-live"]);
        eprintln!("snapshot of three copies under load: {:?}", t.elapsed());
        snaps.push(("s-live", 0xa1, sn));
        // Degraded: on the two copies in sync.
        c.node("n3").kill9();
        let end = Instant::now() + Duration::from_secs(20);
        while !replica_states(&c.meta.ctl_json(&["volume", "get", "sv"]))
            .iter()
            .any(|(n, st)| n == "n3" && st == "faulted")
        {
            assert!(Instant::now() < end, "n3 never marked out");
            std::thread::sleep(Duration::from_millis(100));
        }
        marker(0xa2);
        snaps.push((
            "s-degraded",
            0xa2,
            c.meta.ctl_json(&["snapshot", "create", "sv", "s-degraded"]),
        ));
        stop.store(true, Ordering::Relaxed);
        load.join().expect("writers");
    });
    // Rebuilding (slowed: its first writes to the pool take 3 s):
    // on the copies in sync, not the one catching up. (The marker goes
    // first: a flush through the nexus would wait for the slowed copy.)
    marker(0xa3);
    c.node("n3")
        .restart_env(&[("BERTH_FAULTS", "write:delay=3000ms:4@1048576-536870912")]);
    let end = Instant::now() + Duration::from_secs(30);
    while !replica_states(&c.meta.ctl_json(&["volume", "get", "sv"]))
        .iter()
        .any(|(n, st)| n == "n3" && st == "rebuilding")
    {
        assert!(Instant::now() < end, "n3 never started rebuilding");
        std::thread::sleep(Duration::from_millis(50));
    }
    snaps.push((
        "s-rebuilding",
        0xa3,
        c.meta
            .ctl_json(&["snapshot", "create", "sv", "s-rebuilding"]),
    ));
    let v = c.meta.ctl_json(&["volume", "get", "sv"]);
    eprintln!("after the snapshot while rebuilding: {}", v["replicas"]);
    wait_in_sync(&c, "sv", Duration::from_secs(60));
    a.detach();

    for (snap, byte, rec) in &snaps {
        let (data, nodes) = clone_copies(&mut c, snap, SIZE);
        let want: &[&str] = if *snap == "s-live" {
            &["n1", "n2", "n3"]
        } else {
            &["n1", "n2"]
        };
        let mut sorted = nodes.clone();
        sorted.sort();
        assert_eq!(sorted, want, "{snap}: {rec}");
        assert!(
            data[(SIZE - 4096) as usize..].iter().all(|x| x == byte),
            "{snap} lacks a write acknowledged before it"
        );
        assert!(
            well_formed(&data[..(SIZE - (1 << 20)) as usize]),
            "{snap} holds a torn block"
        );
    }
    // Asking a clone for other copies than its snapshot's is refused.
    let e = c.meta.ctl_err(
        6,
        &[
            "clone",
            "x",
            "--from-snapshot",
            "s-degraded",
            "--param",
            "replicas=3",
        ],
    );
    assert!(e.contains("a clone has its snapshot's copies (2"), "{e}");
    for (snap, _, _) in &snaps {
        c.meta
            .ctl_json(&["volume", "delete", &format!("clone-{snap}")]);
        c.meta.ctl_json(&["snapshot", "delete", snap]);
    }
    c.meta.ctl_json(&["volume", "delete", "sv"]);
    for n in ["n1", "n2", "n3"] {
        let left = c.node(n).ctl_json(&["snapshot", "list"]);
        assert_eq!(left.as_array().map(Vec::len), Some(0), "{n}: {left}");
    }
}

#[test]
fn a_drained_node_s_copies_move_elsewhere_and_are_rebuilt_in_full() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    const SIZE: u64 = 16 << 20;
    let (local, leaving, third) = two_copies(&c, "dv", "16M");
    // An unreplicated volume on the node cannot move.
    c.meta.ctl_json(&[
        "volume",
        "create",
        "single",
        "--size",
        "1M",
        "--topology",
        &format!("topology.berth.dev/node={leaving}"),
    ]);
    let a = Attached::start(&c, "dv", &root.path().join("mnt"), &local);
    let f = a.open();
    let mut want = vec![0u8; SIZE as usize];
    for (i, chunk) in want.chunks_mut(1 << 20).enumerate().step_by(3) {
        chunk.fill(i as u8 + 1);
        f.write_all_at(chunk, (i as u64) << 20).expect("write");
    }
    f.sync_data().expect("fsync");

    let moved = c.meta.ctl_json(&["drain", &leaving]);
    let rows = moved.as_array().expect("rows");
    let row = |vol: &str| {
        rows.iter()
            .find(|r| r["volume"] == vol)
            .unwrap_or_else(|| panic!("{vol} not in {moved}"))
            .clone()
    };
    assert_eq!(row("dv")["to_node"], third.as_str(), "{moved}");
    assert!(
        row("single")["outcome"]
            .as_str()
            .unwrap_or_default()
            .contains("not replicated"),
        "{moved}"
    );
    let nodes = c.meta.ctl_json(&["nodes"]);
    assert!(
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .any(|n| n["name"] == leaving.as_str() && n["cordoned"] == true),
        "{nodes}"
    );
    // Written while the new copy is rebuilt: it has it too.
    f.write_all_at(&[0xee; 4096], SIZE - 4096).expect("write");
    f.sync_data().expect("fsync");
    want[(SIZE - 4096) as usize..].fill(0xee);
    drop(f);
    let v = wait_in_sync(&c, "dv", Duration::from_secs(60));
    let mut now: Vec<String> = replica_states(&v).into_iter().map(|(n, _)| n).collect();
    now.sort();
    let mut expect = vec![local.clone(), third.clone()];
    expect.sort();
    assert_eq!(now, expect, "the retired copy is dropped: {v}");
    assert!(
        !c.server_volumes(&leaving).contains(&"dv".to_string()),
        "the retired copy stayed on {leaving}"
    );
    // A full copy: the whole volume.
    let rebuilt = rebuilt_bytes(&c, "dv", &third, 0);
    assert_eq!(rebuilt, SIZE, "a new copy is copied in full");
    // Nothing new lands on the drained node.
    let v2 = c.meta.ctl_json(&[
        "volume",
        "create",
        "after",
        "--size",
        "1M",
        "--param",
        "replicas=2",
    ]);
    assert!(
        replica_states(&v2).iter().all(|(n, _)| *n != leaving),
        "{v2}"
    );
    a.detach();
    let g = v["generation"].as_u64().expect("generation");
    for n in [&local, &third] {
        let data = read_copy(&mut c, n, "dv", g, SIZE);
        assert!(data == want, "{n}'s copy differs from what was written");
    }

    // A node lost for good, with nowhere left to put its copy (the other
    // node is drained, the last holds the other copy): said so.
    c.node(&third).kill9();
    c.meta.wait_node(&third, "down");
    let moved = c.meta.ctl_json(&["drain", &third]);
    let why = moved
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["volume"] == "dv")
        .and_then(|r| r["outcome"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("no node for a new copy of dv")
            && why.contains("no other node takes new volumes"),
        "{moved}"
    );
}

#[test]
fn a_node_down_past_the_grace_period_has_its_copies_replaced() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let spec = |name| NodeSpec {
        name,
        pool_size: "256M",
        labels: vec![],
    };
    let mut c = Cluster::start_with(
        root.path(),
        &[spec("n1"), spec("n2"), spec("n3")],
        &["--replica-grace-seconds", "2"],
    );
    const SIZE: u64 = 8 << 20;
    let (local, lost, third) = two_copies(&c, "gv", "8M");
    let a = Attached::start(&c, "gv", &root.path().join("mnt"), &local);
    write_synced(&a.file(), 0x5a);
    c.node(&lost).kill9();
    // Noticed by the nexus at its next write.
    let f = a.open();
    f.write_all_at(&[0x6b; 4096], SIZE - 4096).expect("write");
    f.sync_data().expect("fsync");
    drop(f);
    // Past the grace period the copy is replaced on the third node and
    // rebuilt there, with no one asking.
    let end = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let v = c.meta.ctl_json(&["volume", "get", "gv"]);
        let st = replica_states(&v);
        if st.contains(&(third.clone(), "in-sync".to_string())) {
            break v;
        }
        assert!(Instant::now() < end, "never replaced: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        replica_states(&v).contains(&(lost.clone(), "stale".to_string())),
        "the lost copy is retired: {v}"
    );
    // The lost node comes back: its retired copy is deleted.
    c.node(&lost).restart();
    c.meta.wait_node(&lost, "up");
    let end = Instant::now() + Duration::from_secs(30);
    while c.server_volumes(&lost).contains(&"gv".to_string()) {
        assert!(Instant::now() < end, "the retired copy stayed on {lost}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = wait_in_sync(&c, "gv", Duration::from_secs(10));
    let mut nodes: Vec<String> = replica_states(&v).into_iter().map(|(n, _)| n).collect();
    nodes.sort();
    let mut want = vec![local.clone(), third.clone()];
    want.sort();
    assert_eq!(nodes, want, "{v}");
    a.detach();
    let g = v["generation"].as_u64().expect("generation");
    let ours = read_copy(&mut c, &local, "gv", g, SIZE);
    let theirs = read_copy(&mut c, &third, "gv", g, SIZE);
    assert!(ours == theirs, "the copies differ");
    assert!(ours[..4096].iter().all(|b| *b == 0x5a));
    assert!(ours[(SIZE - 4096) as usize..].iter().all(|b| *b == 0x6b));
}

/// A replica's `rebuild_done_bytes` and `rebuild_total_bytes` in `volume get`.
fn rebuild_progress(c: &Cluster, volume: &str, node: &str) -> (String, u64, u64) {
    let v = c.meta.ctl_json(&["volume", "get", volume]);
    let r = v["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no replica on {node}: {v}"))
        .clone();
    (
        r["state"].as_str().unwrap_or_default().to_string(),
        r["rebuild_done_bytes"].as_u64().unwrap_or(0),
        r["rebuild_total_bytes"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_rebuild_interrupted_by_a_restart_resumes_where_it_stopped() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    const SIZE: u64 = 64 << 20;
    let (local, victim, _) = two_copies(&c, "rv", "64M");
    let a = Attached::start(&c, "rv", &root.path().join("mnt"), &local);
    let f = a.open();
    let mut want = vec![0u8; SIZE as usize];
    for (i, chunk) in want.chunks_mut(1 << 20).enumerate() {
        chunk.fill(i as u8 + 1);
        f.write_all_at(chunk, (i as u64) << 20).expect("fill");
    }
    f.sync_data().expect("fsync");
    c.node(&victim).kill9();
    f.write_all_at(&[0xd1; 4096], 0).expect("write");
    f.sync_data().expect("fsync");
    want[..4096].fill(0xd1);
    // The copy in sync forgets what changed: the rebuild copies everything,
    // slowly (each pool write on the victim takes 150 ms).
    c.node(&local).ctl_json(&["volume", "stop-tracking", "rv"]);
    c.node(&victim)
        .restart_env(&[("BERTH_FAULTS", "write:delay=150ms:100000@1048576-536870912")]);
    let end = Instant::now() + Duration::from_secs(60);
    let (first_total, copied) = loop {
        let (st, done, total) = rebuild_progress(&c, "rv", &victim);
        if st == "rebuilding" && done >= 16 << 20 {
            break (total, done);
        }
        assert!(
            Instant::now() < end,
            "the first rebuild never got far: {st} {done}/{total}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(first_total, SIZE, "the first rebuild is a full copy");
    // Its server restarts mid-copy (this time at full speed); meanwhile,
    // once it is out of the set, a block below where it stopped is written
    // (only the survivors' record of changes since then has it).
    c.node(&victim).kill9();
    let end = Instant::now() + Duration::from_secs(20);
    while rebuild_progress(&c, "rv", &victim).0 != "faulted" {
        assert!(
            Instant::now() < end,
            "the interrupted rebuild's replica was never marked out"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    f.write_all_at(&[0xd2; 4096], 4096).expect("write");
    f.sync_data().expect("fsync");
    want[4096..8192].fill(0xd2);
    c.node(&victim).restart();
    let v = wait_in_sync(&c, "rv", Duration::from_secs(60));
    drop(f);
    // The second rebuild copied what was left, plus what changed below
    // where the first stopped: not the whole volume again.
    let second = rebuilt_bytes(&c, "rv", &victim, 0);
    eprintln!(
        "first rebuild: {copied} of {first_total} bytes when interrupted; the resumed one copied {second}"
    );
    assert!(
        second <= SIZE - copied + (2 << 20),
        "the rebuild started over: {second} bytes after {copied} were copied"
    );
    a.detach();
    let g = v["generation"].as_u64().expect("generation");
    for n in [&local, &victim] {
        let data = read_copy(&mut c, n, "rv", g, SIZE);
        assert!(data == want, "{n}'s copy differs from what was written");
    }
}

#[test]
fn a_volume_nobody_attaches_is_rebuilt_by_volume_rebuild_wait() {
    if fuse_missing() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    const SIZE: u64 = 8 << 20;
    let (local, leaving, third) = two_copies(&c, "idle", "8M");
    let a = Attached::start(&c, "idle", &root.path().join("mnt"), &local);
    let f = a.open();
    let want: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 ^ 0x3c).collect();
    f.write_all_at(&want, 0).expect("write");
    f.sync_data().expect("fsync");
    drop(f);
    a.detach();
    // Its copy moves while nobody attaches it: the new copy waits, empty.
    c.meta.ctl_json(&["drain", &leaving]);
    let (st, _, _) = rebuild_progress(&c, "idle", &third);
    assert_eq!(st, "faulted", "the new copy waits for a nexus");
    let e = c.meta.ctl_err(6, &["volume", "rebuild", "idle"]);
    assert!(e.contains("is not attached"), "{e}");
    // --wait attaches it here meanwhile, and detaches once it is in sync.
    let v = c.meta.ctl_json(&[
        "volume",
        "rebuild",
        "idle",
        "--wait",
        "--node",
        &local,
        "--timeout",
        "60",
    ]);
    assert!(
        v["replicas"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("{third} in-sync")),
        "{v}"
    );
    let att = c.meta.ctl_json(&["attachments", "--volume", "idle"]);
    assert_eq!(
        att.as_array().map(Vec::len),
        Some(0),
        "left attached: {att}"
    );
    let v = wait_in_sync(&c, "idle", Duration::from_secs(10));
    let g = v["generation"].as_u64().expect("generation");
    for n in [&local, &third] {
        let data = read_copy(&mut c, n, "idle", g, SIZE);
        assert!(data == want, "{n}'s copy differs from what was written");
    }
}
