//! The volume server as a real process, driven by real clients: berthctl for
//! control, qemu-io over the unix socket and TCP, nbdfuse + a loop device +
//! ext4 for a real filesystem, and kill -9 during writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_tests::server::{have, http_get, qemu_io, qemu_io_ro, ServerProc};

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

#[test]
fn qemu_io_over_unix_and_tcp_with_parallel_aio() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(dir.path(), "512M");
    let e = srv.volume_export("qio", "64M", "qemu");
    for (i, uri) in [s(&e, "unix_uri"), s(&e, "tcp_uri")].iter().enumerate() {
        let p = |x: u32| format!("0x{:02x}", 0x10 * (i as u32 + 1) + x);
        let mut cmds = vec![
            format!("write -P {} 0 1M", p(1)),
            format!("read -P {} 0 1M", p(1)),
            // Unaligned, then zeroing and discard read back as zeros.
            format!("write -P {} 1000 3000", p(2)),
            format!("read -P {} 1000 3000", p(2)),
            format!("read -P {} 4000 61536", p(1)),
            "write -z 1M 1M".into(),
            "read -P 0 1M 1M".into(),
            "discard 512k 256k".into(),
            "read -P 0 512k 256k".into(),
            "flush".into(),
        ];
        // Sixteen requests in flight at once, then verified in parallel too.
        for k in 0..16u32 {
            cmds.push(format!("aio_write -P {} {}M 256k", p(3 + k), 8 + k));
        }
        cmds.push("aio_flush".into());
        for k in 0..16u32 {
            cmds.push(format!("aio_read -P {} {}M 256k", p(3 + k), 8 + k));
        }
        cmds.push("aio_flush".into());
        let (ok, out) = qemu_io(uri, &cmds);
        assert!(ok, "qemu-io against {uri}:\n{out}");
        assert_eq!(out.matches("wrote ").count(), 2 + 16 + 1, "{out}");
        // A second session sees what the first wrote.
        let (ok, out) = qemu_io(
            uri,
            &[
                format!("read -P {} 8M 256k", p(3)),
                format!("read -P {} 23M 256k", p(18)),
            ],
        );
        assert!(ok, "{out}");
    }
    // A pattern that is not there fails verification (the check can fail).
    let (ok, _) = qemu_io(&s(&e, "unix_uri"), &["read -P 0x77 8M 4k".into()]);
    assert!(!ok, "qemu-io must report a mismatch");
}

#[test]
fn two_clients_at_once_and_an_ungranted_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = ServerProc::start(dir.path(), "512M");
    let e = srv.volume_export("shared", "64M", "node-a");
    let b = srv.ctl_json(&[
        "export", "grant", "--volume", "shared", "--client", "node-b",
    ]);
    // Two qemu-io processes, one per grant and transport, writing disjoint
    // halves at the same time.
    let spawn = |uri: String, pat: &str, base: u32| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for k in 0..32u32 {
            c.arg("-c")
                .arg(format!("aio_write -P {pat} {}M 1M", base + k));
        }
        c.arg("-c").arg("aio_flush");
        c.arg(uri)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io")
    };
    let a = spawn(s(&e, "unix_uri"), "0xa1", 0);
    let bb = spawn(s(&b, "tcp_uri"), "0xb2", 32);
    for c in [a, bb] {
        let out = c.wait_with_output().expect("qemu-io");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, out) = qemu_io(
        &s(&e, "tcp_uri"),
        &["read -P 0xa1 0 32M".into(), "read -P 0xb2 32M 32M".into()],
    );
    assert!(ok, "{out}");
    // Both connections were live at once: the audit log shows two connects
    // before the first disconnect of these clients.
    let ev = srv.ctl_json(&["audit", "--target", "shared"]);
    let actions: Vec<String> = ev
        .as_array()
        .expect("events")
        .iter()
        .map(|e| s(e, "action"))
        .collect();
    assert!(
        actions.iter().filter(|a| *a == "connect").count() >= 3,
        "{actions:?}"
    );

    // Ungranted: a guessed token, the bare name, a revoked grant.
    let tcp = s(&e, "tcp_uri");
    let base = tcp.rsplit_once('@').expect("name@token").0.to_string();
    for uri in [
        format!("{base}@0123456789abcdef0123456789abcdef"),
        base.clone(),
        format!("{base}@"),
    ] {
        let (ok, out) = qemu_io(&uri, &["read 0 4k".into()]);
        assert!(!ok, "ungranted {uri} was served: {out}");
    }
    srv.ctl_json(&["export", "revoke", &s(&b, "export_name")]);
    let (ok, _) = qemu_io(&s(&b, "tcp_uri"), &["read 0 4k".into()]);
    assert!(!ok, "a revoked export must be refused");
    let ev = srv.ctl_json(&["audit", "--target", "shared"]);
    let refused = ev
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| s(e, "action") == "refused")
        .count();
    // The first refusal of this peer's window is audited as it happens; the
    // rest are summed into one entry (count=N), written at the latest at stop.
    assert!(refused >= 1, "refusals are audited: {ev}");
    assert!(srv.terminate().success());
    let log = std::fs::read_to_string(srv.dir.join("audit.log")).expect("audit log");
    let total: u64 = log
        .lines()
        .filter(|l| l.contains("\"action\":\"refused\""))
        .map(|l| match l.split_once("count=") {
            Some((_, rest)) => rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            None => 1,
        })
        .sum();
    assert!(total >= 3, "every refusal is counted: {log}");
}

#[test]
fn berthctl_reports_errors_with_exit_codes_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(dir.path(), "256M");
    let v = srv.ctl_json(&[
        "volume", "create", "db", "--size", "1G", "--tier", "premium",
    ]);
    assert_eq!(v["size_bytes"], 1u64 << 30);
    assert_eq!(v["tier"], "premium");
    assert_eq!(v["iops_limit"], 10_000 + 50);
    assert_eq!(srv.ctl(&["volume", "get", "nope"]).0, 3, "not found");
    assert_eq!(
        srv.ctl(&["volume", "create", "db", "--size", "2G"]).0,
        4,
        "already exists"
    );
    assert_eq!(
        srv.ctl(&["volume", "create", "x", "--size", "1G", "--tier", "gold"])
            .0,
        5,
        "invalid"
    );
    assert_eq!(
        srv.ctl(&["volume", "resize", "db", "--size", "1M"]).0,
        6,
        "shrink refused"
    );
    srv.ctl_json(&["snapshot", "create", "db", "db-s1"]);
    srv.ctl_json(&["clone", "db-c1", "--from-snapshot", "db-s1"]);
    let list = srv.ctl_json(&["volume", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let q = srv.ctl_json(&["qos", "db", "--iops", "500"]);
    assert_eq!(q["iops_limit"], 500);
    let scrub = srv.ctl_json(&["scrub"]);
    assert_eq!(scrub["errors"].as_array().map(Vec::len), Some(0));
    let health = srv.ctl_json(&["health"]);
    assert_eq!(health["serving"], true);
    // A server that is not there: exit 7 with a message saying what to do.
    let out = Command::new(berth_tests::server::binary("berthctl"))
        .args([
            "--endpoint",
            "unix:///nonexistent/control.sock",
            "server",
            "health",
        ])
        .output()
        .expect("berthctl");
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the server running"));
    // Metrics are served.
    let metrics = http_get(&srv.ready.metrics);
    assert!(metrics.contains("berth_pool_capacity_bytes"), "{metrics}");
}

// ---- a real filesystem: nbdfuse + loop device + ext4 --------------------------

/// An export attached as a block device: nbdfuse exposes it as a file, losetup
/// makes that a /dev/loopN. Everything is undone on drop, even after a failure.
struct Attached {
    fuse_dir: PathBuf,
    mnt: PathBuf,
    nbdfuse: Option<Child>,
    loopdev: Option<String>,
    mounted: bool,
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Attached {
    fn new(work: &Path, tag: &str, uri: &str) -> Attached {
        let fuse_dir = work.join(format!("fuse-{tag}"));
        let mnt = work.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&fuse_dir).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let pidfile = work.join(format!("nbdfuse-{tag}.pid"));
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse_dir)
            .arg(uri)
            .spawn()
            .expect("nbdfuse (apt-get install libnbd-bin fuse3)");
        let mut a = Attached {
            fuse_dir: fuse_dir.clone(),
            mnt,
            nbdfuse: Some(child),
            loopdev: None,
            mounted: false,
        };
        let t = Instant::now();
        while !pidfile.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nbdfuse did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let file = fuse_dir.join("nbd");
        a.loopdev = Some(run("losetup", &["-f", "--show", &file.to_string_lossy()]));
        a
    }

    fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap_or_default()
    }

    fn mount(&mut self) {
        run("mount", &[self.dev(), &self.mnt.to_string_lossy()]);
        self.mounted = true;
    }

    fn umount(&mut self) {
        if self.mounted {
            run("umount", &[&self.mnt.to_string_lossy()]);
            self.mounted = false;
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.nbdfuse.take() {
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn can_attach() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (losetup and mount need it)".into());
    }
    for p in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(p).exists() {
            return Err(format!("{p} does not exist in this kernel"));
        }
    }
    for c in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"] {
        if !have(c) {
            return Err(format!(
                "{c} is not installed (scripts/test.sh installs it)"
            ));
        }
    }
    Ok(())
}

fn write_files(dir: &Path, prefix: &str, seed: u64, n: usize) -> Vec<(String, String)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(1..3 << 20);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let name = format!("{prefix}-{i}.bin");
            std::fs::write(dir.join(&name), &data).expect("write file");
            let sum = sha256(&dir.join(&name));
            (name, sum)
        })
        .collect()
}

fn sha256(p: &Path) -> String {
    run("sha256sum", &[&p.to_string_lossy()])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn check_files(dir: &Path, files: &[(String, String)]) {
    for (name, sum) in files {
        assert_eq!(&sha256(&dir.join(name)), sum, "{name} differs");
    }
}

#[test]
fn ext4_on_nbdfuse_and_loop_snapshot_and_clone() {
    if let Err(why) = can_attach() {
        eprintln!("SKIPPED ext4_on_nbdfuse_and_loop_snapshot_and_clone: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let srv = ServerProc::start(&dir.path().join("data"), "1G");
    let e = srv.volume_export("fs", "256M", "node-1");

    let mut a = Attached::new(&work, "orig", &s(&e, "unix_uri"));
    run("mkfs.ext4", &["-q", a.dev()]);
    a.mount();
    let files = write_files(&a.mnt, "a", 1, 12);
    run("sync", &[]);
    check_files(&a.mnt, &files);
    a.umount();
    run("e2fsck", &["-fn", a.dev()]);
    drop(a);

    srv.ctl_json(&["snapshot", "create", "fs", "fs-snap"]);
    srv.ctl_json(&["clone", "fs-clone", "--from-snapshot", "fs-snap"]);
    let ce = srv.ctl_json(&[
        "export", "grant", "--volume", "fs-clone", "--client", "node-2",
    ]);
    // The snapshot itself is exportable read-only: its filesystem checks clean.
    let se = srv.ctl_json(&[
        "export",
        "grant",
        "--snapshot",
        "fs-snap",
        "--client",
        "node-3",
    ]);
    let (ok, out) = qemu_io(&s(&se, "tcp_uri"), &["write -P 1 0 4k".into()]);
    assert!(
        !ok && out.contains("Permission denied"),
        "a snapshot export is read-only: {out}"
    );
    let (ok, out) = qemu_io_ro(&s(&se, "tcp_uri"), &["read 0 64k".into()]);
    assert!(ok, "{out}");

    // Change the original after the snapshot: over TCP this time.
    let mut a = Attached::new(&work, "orig2", &s(&e, "tcp_uri"));
    a.mount();
    check_files(&a.mnt, &files);
    std::fs::remove_file(a.mnt.join("a-0.bin")).expect("rm");
    let later = write_files(&a.mnt, "b", 2, 3);
    std::fs::write(a.mnt.join("a-1.bin"), b"overwritten after the snapshot").expect("overwrite");
    run("sync", &[]);
    a.umount();
    run("e2fsck", &["-fn", a.dev()]);

    // The clone has exactly the files as of the snapshot.
    let mut c = Attached::new(&work, "clone", &s(&ce, "unix_uri"));
    run("e2fsck", &["-fn", c.dev()]);
    c.mount();
    check_files(&c.mnt, &files);
    for (name, _) in &later {
        assert!(
            !c.mnt.join(name).exists(),
            "{name} was written after the snapshot"
        );
    }
    // Writing to the clone leaves the original alone.
    std::fs::write(c.mnt.join("clone-only"), b"clone").expect("write");
    run("sync", &[]);
    c.umount();
    run("e2fsck", &["-fn", c.dev()]);
    drop(c);

    a.mount();
    assert!(!a.mnt.join("clone-only").exists());
    assert!(!a.mnt.join("a-0.bin").exists());
    assert_eq!(
        std::fs::read(a.mnt.join("a-1.bin")).expect("read"),
        b"overwritten after the snapshot"
    );
    check_files(&a.mnt, &later);
    check_files(&a.mnt, &files[2..]);
    a.umount();
    drop(a);
    // The snapshot still reads, read-only, after all of that.
    let (ok, out) = qemu_io_ro(&s(&se, "unix_uri"), &["read 0 64k".into()]);
    assert!(ok, "{out}");
}

// ---- kill -9 during writes ------------------------------------------------------

/// Copies a whole export to a local file with nbdcopy (libnbd-bin).
fn fetch(uri: &str, to: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(to);
    run("nbdcopy", &["--", uri, &to.to_string_lossy()]);
    std::fs::read(to).expect("read copy")
}

/// Four qemu-io processes at once (two over the unix socket, two over TCP) each
/// write a distinct pattern per step into their own 16 of 64 slots, with a
/// flush after every write, while the server is killed at a random moment. A
/// write whose successor printed "wrote" had its flush completed: it must
/// survive. Every slot must hold its last flushed write or a later one issued,
/// whole (never zeros once flushed, never a mix, never garbage), and the pool
/// must scrub clean with no checksum error counted.
///
/// `BERTH_NBD_CRASH_CYCLES` sets the cycles (default 6; the README names the
/// 1,000-cycle run).
#[test]
fn kill9_during_qemu_io_writes_keeps_every_flushed_pattern() {
    use rand::Rng;
    let cycles: usize = std::env::var("BERTH_NBD_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = ServerProc::start(&dir.path().join("data"), "512M");
    srv.volume_export("crash", "4M", "crasher");
    const SLOTS: u64 = 64;
    const WRITERS: u64 = 4;
    const PER: u64 = SLOTS / WRITERS;
    const SLOT: usize = 64 << 10;
    let pattern = |k: u64| (k % 250 + 1) as u8;
    // Writer w's step k goes to slot w * PER + k % PER.
    let slot_of = |w: u64, k: u64| (w * PER + k % PER) as usize;
    // Per slot: the step it holds at least (last flushed), and the steps issued
    // since (any of which it may hold instead).
    let mut floor: Vec<Option<u64>> = vec![None; SLOTS as usize];
    let mut issued: Vec<Vec<u64>> = vec![Vec::new(); SLOTS as usize];
    let mut step = [0u64; WRITERS as usize];
    let mut rng = rand::rng();
    let (mut total_flushed, mut total_acked) = (0, 0);
    for cycle in 0..cycles {
        // Grants are idempotent and survive restarts; the TCP port is new each time.
        let e = srv.ctl_json(&[
            "export", "grant", "--volume", "crash", "--client", "crasher",
        ]);
        // Long enough that the kill always lands mid-stream (a write and a flush
        // take ~0.3-0.6 ms here).
        let n = 1500u64;
        let mut children = Vec::new();
        for w in 0..WRITERS {
            let uri = if (w + cycle as u64).is_multiple_of(2) {
                s(&e, "unix_uri")
            } else {
                s(&e, "tcp_uri")
            };
            let start = step[w as usize];
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw"]);
            for k in start..start + n {
                let slot = slot_of(w, k);
                cmd.arg("-c")
                    .arg(format!("write -P {} {} 64k", pattern(k), slot * SLOT));
                cmd.arg("-c").arg("flush");
                issued[slot].push(k);
            }
            let child = cmd
                .arg(&uri)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-io");
            children.push((w, start, child));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        srv.kill9();
        let mut cycle_flushed = 0;
        for (w, start, child) in children {
            let out = child.wait_with_output().expect("qemu-io");
            let wrote = String::from_utf8_lossy(&out.stdout)
                .matches("wrote ")
                .count() as u64;
            // Write k's flush finished before write k+1 started.
            let flushed = wrote.saturating_sub(1);
            for k in start..start + flushed {
                let slot = slot_of(w, k);
                floor[slot] = Some(k);
                issued[slot].retain(|&j| j >= k);
            }
            cycle_flushed += flushed;
            total_acked += wrote;
            step[w as usize] = start + n;
        }
        total_flushed += cycle_flushed;
        srv.restart();
        let e = srv.ctl_json(&[
            "export", "grant", "--volume", "crash", "--client", "crasher",
        ]);
        let image = fetch(&s(&e, "unix_uri"), &dir.path().join("copy.img"));
        assert_eq!(image.len(), SLOTS as usize * SLOT);
        for (slot, data) in image.chunks(SLOT).enumerate() {
            let b = data[0];
            assert!(
                data.iter().all(|&x| x == b),
                "cycle {cycle}: slot {slot} is torn or mixed"
            );
            if b == 0 {
                assert!(
                    floor[slot].is_none(),
                    "cycle {cycle}: slot {slot} lost flushed step {:?}",
                    floor[slot]
                );
                continue;
            }
            let held = issued[slot].iter().copied().find(|&k| pattern(k) == b);
            let Some(k) = held else {
                panic!(
                    "cycle {cycle}: slot {slot} holds {b}, none of the steps {:?} (floor {:?})",
                    issued[slot], floor[slot]
                );
            };
            // What it holds is durable now: it is the new floor.
            floor[slot] = Some(k);
            issued[slot].retain(|&j| j >= k);
        }
        let stats = srv.ctl_json(&["stats"]);
        assert_eq!(
            stats["pool"]["checksum_errors"], 0,
            "cycle {cycle}: {stats}"
        );
        if cycle % 50 == 49 || cycle + 1 == cycles {
            let scrub = srv.ctl_json(&["scrub"]);
            assert_eq!(
                scrub["errors"].as_array().map(Vec::len),
                Some(0),
                "cycle {cycle}: {scrub}"
            );
        }
        eprintln!("cycle {cycle}: {WRITERS} writers, {cycle_flushed} writes flushed before kill -9; all {SLOTS} slots verified");
    }
    eprintln!(
        "NBD crash run: {cycles} kill -9 cycles, {total_acked} writes acknowledged, {total_flushed} flushed, 0 lost, 0 checksum errors"
    );
    assert!(
        total_flushed > 0,
        "the test must have flushed something to check"
    );
}
