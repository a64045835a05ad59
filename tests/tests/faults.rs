//! Injected disk faults in a running volume server (`BERTH_FAULTS`), seen by
//! a real NBD client (qemu-io): the error reaches the client as EIO, is
//! counted against the volume, a failed write is never visible, and the
//! server keeps serving every volume.

use berth_tests::server::{blocks_of, have, qemu_io, ServerProc};

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn volume_errors(srv: &ServerProc, name: &str) -> u64 {
    let stats = srv.ctl_json(&["stats"]);
    stats["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == name))
        .and_then(|x| x["errors"].as_u64())
        .unwrap_or_else(|| panic!("no stats for {name}: {stats}"))
}

#[test]
fn injected_disk_errors_reach_nbd_clients_as_eio_and_lose_nothing() {
    assert!(
        have("qemu-io"),
        "qemu-io is needed (apt-get install qemu-utils)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // The next three pool writes fail, and a read is slow.
    let srv = ServerProc::start_env(
        dir.path(),
        "512M",
        &[],
        &[("BERTH_FAULTS", "write:eio:3,read:delay=200ms:1")],
    );
    let a = srv.volume_export("a", "64M", "qa");
    let b = srv.volume_export("b", "64M", "qb");
    let (ok, out) = qemu_io(
        &s(&a, "unix_uri"),
        &[
            "write -P 0xaa 0 4k".into(),
            "write -P 0xaa 4k 4k".into(),
            "write -P 0xaa 1M 4k".into(),
        ],
    );
    assert!(!ok, "writes under injected EIO succeeded:\n{out}");
    assert_eq!(
        out.matches("Input/output error").count(),
        3,
        "each failed write is reported to the client:\n{out}"
    );
    assert_eq!(volume_errors(&srv, "a"), 3);
    // The faults are used up: the other volume, and this one, are served,
    // and the failed writes never became visible (the blocks read as zeros).
    let (ok, out) = qemu_io(
        &s(&b, "tcp_uri"),
        &["write -P 0xbb 0 1M".into(), "read -P 0xbb 0 1M".into()],
    );
    assert!(ok, "the other volume after the faults:\n{out}");
    let (ok, out) = qemu_io(
        &s(&a, "unix_uri"),
        &[
            "read -P 0 0 8k".into(),
            "read -P 0 1M 4k".into(),
            "write -P 0xac 0 8k".into(),
            "flush".into(),
            "read -P 0xac 0 8k".into(),
        ],
    );
    assert!(ok, "the faulted volume afterwards:\n{out}");
    assert_eq!(volume_errors(&srv, "a"), 3);
    assert_eq!(volume_errors(&srv, "b"), 0);
    let scrub = srv.ctl_json(&["scrub"]);
    assert_eq!(scrub["errors"].as_array().map(Vec::len), Some(0), "{scrub}");
}

#[test]
fn a_mistyped_fault_plan_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(berth_tests::server::binary("berth"))
        .args(["volume-server", "--data"])
        .arg(dir.path())
        .args(["--pool-size", "64M", "--nbd-listen", "none"])
        .args(["--metrics-listen", "none"])
        .env("BERTH_FAULTS", "write:eoi")
        .output()
        .expect("run berth");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a bad fault plan: {err}"
    );
    assert!(
        err.contains("BERTH_FAULTS") && err.contains("eoi"),
        "the reason names the variable and the bad part: {err}"
    );
}

/// A pool that fills up for real (no injection): qemu-io's writes fail with
/// ENOSPC, a snapshot or clone is refused up front with the reason, nothing
/// written before is lost, and once space is freed everything works again.
#[test]
fn a_full_pool_gives_enospc_refuses_snapshots_up_front_and_recovers() {
    assert!(
        have("qemu-io"),
        "qemu-io is needed (apt-get install qemu-utils)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // A 15 MiB pool: 3,840 data blocks; the volume is thin and promises
    // 64 MiB.
    let srv = ServerProc::start(dir.path(), "15M");
    let a = srv.volume_export("a", "64M", "qa");
    let uri = s(&a, "unix_uri");
    let (ok, out) = qemu_io(&uri, &["write -P 0xa1 0 8M".into(), "flush".into()]);
    assert!(ok, "the first 8 MiB fit:\n{out}");
    srv.ctl_json(&["snapshot", "create", "a", "s1"]);
    // Eight 1 MiB writes into the 7 MiB left: the last one cannot fit (a
    // request that does not fit allocates nothing, so it fails whole).
    let fill: Vec<String> = (8..16).map(|m| format!("write -P 0xa2 {m}M 1M")).collect();
    let (ok, out) = qemu_io(&uri, &fill);
    assert!(!ok, "a write past the pool's end succeeded:\n{out}");
    assert_eq!(
        out.matches("No space left on device").count(),
        1,
        "the client is told ENOSPC, for the last write only:\n{out}"
    );
    let stats = srv.ctl_json(&["stats"]);
    let free = stats["pool"]["total_bytes"].as_u64().unwrap_or(0)
        - stats["pool"]["used_bytes"].as_u64().unwrap_or(0);
    assert!(free < 19 * 4096, "the pool is at its reserve: {stats}");
    // Refused up front: a snapshot and a clone that later writes could not use.
    for args in [
        &["snapshot", "create", "a", "s2"][..],
        &["clone", "c1", "--from-snapshot", "s1"][..],
    ] {
        let (code, _) = srv.ctl(args);
        assert_eq!(code, 8, "{args:?} is RESOURCE_EXHAUSTED (exit 8)");
    }
    let snaps = srv.ctl_json(&["snapshot", "list"]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "{snaps}");
    // Nothing written before the pool filled is lost.
    let (ok, out) = qemu_io(&uri, &["read -P 0xa1 0 8M".into()]);
    assert!(ok, "the data written before:\n{out}");
    let (ok, out) = qemu_io(&uri, &["read -P 0xa2 8M 7M".into()]);
    assert!(ok, "the writes that fit:\n{out}");
    // Free space: drop the snapshot (its blocks are the volume's too, so
    // nothing comes back) and trim the region written last.
    srv.ctl_json(&["snapshot", "delete", "s1"]);
    let (ok, out) = qemu_io(&uri, &["discard 8M 8M".into(), "flush".into()]);
    assert!(ok, "trim:\n{out}");
    let (ok, out) = qemu_io(
        &uri,
        &[
            "write -P 0xa3 8M 4M".into(),
            "flush".into(),
            "read -P 0xa1 0 8M".into(),
            "read -P 0xa3 8M 4M".into(),
        ],
    );
    assert!(ok, "writes after space was freed:\n{out}");
    srv.ctl_json(&["snapshot", "create", "a", "s3"]);
    srv.ctl_json(&["clone", "c3", "--from-snapshot", "s3"]);
    let scrub = srv.ctl_json(&["scrub"]);
    assert_eq!(scrub["errors"].as_array().map(Vec::len), Some(0), "{scrub}");
}

/// Bit rot under a live volume, its snapshot and a clone of it, on a
/// running server: one bit flipped in the pool file under each of three
/// blocks (one all three read, one only the snapshot and the clone still
/// read, one the clone's own). Every read of a flipped block fails with EIO
/// on every export that reads it, every other read is served, and scrub
/// lists exactly the flipped pool blocks.
#[test]
fn flipped_bits_under_volumes_snapshots_and_clones_fail_reads_and_scrub_names_them() {
    assert!(
        have("qemu-io"),
        "qemu-io is needed (apt-get install qemu-utils)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(dir.path(), "64M");
    let a = srv.volume_export("a", "16M", "qa");
    let ua = s(&a, "unix_uri");
    let (ok, out) = qemu_io(
        &ua,
        &[
            "write -P 0x11 0 4k".into(),
            "write -P 0x12 4k 4k".into(),
            "write -P 0x13 1M 4k".into(),
            "write -P 0x14 2M 4k".into(),
            "flush".into(),
        ],
    );
    assert!(ok, "{out}");
    srv.ctl_json(&["snapshot", "create", "a", "s1"]);
    srv.ctl_json(&["clone", "c", "--from-snapshot", "s1"]);
    let uc = s(
        &srv.ctl_json(&["export", "grant", "--volume", "c", "--client", "qc"]),
        "unix_uri",
    );
    let us = s(
        &srv.ctl_json(&["export", "grant", "--snapshot", "s1", "--client", "qs"]),
        "unix_uri",
    );
    // After the snapshot: the volume's 4k block and the clone's 2M block
    // are their own; the old 4k block is now only the snapshot's (and the
    // clone's, through it).
    let (ok, out) = qemu_io(&ua, &["write -P 0x22 4k 4k".into(), "flush".into()]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&uc, &["write -P 0x33 2M 4k".into(), "flush".into()]);
    assert!(ok, "{out}");

    let pool_path = dir.path().join("pool.img");
    let pool = std::fs::read(&pool_path).expect("read pool");
    let mut flipped = Vec::new();
    for byte in [0x11u8, 0x12, 0x33] {
        let at = blocks_of(&pool, byte);
        assert_eq!(at.len(), 1, "one pool block holds 0x{byte:x}: {at:?}");
        flipped.push(at[0]);
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pool_path)
            .expect("open pool");
        for (i, &at) in flipped.iter().enumerate() {
            let off = at + 1000 + i as u64 * 7;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).expect("read byte");
            b[0] ^= 1 << (i + 2);
            f.write_all_at(&b, off).expect("flip a bit");
        }
        f.sync_all().expect("sync pool");
    }
    // (export, offset, pattern or None for "must fail with EIO").
    let cases: [(&str, &str, &str, Option<u8>); 11] = [
        ("volume", &ua, "0", None),
        ("volume", &ua, "4k", Some(0x22)),
        ("volume", &ua, "1M", Some(0x13)),
        ("volume", &ua, "2M", Some(0x14)),
        ("snapshot", &us, "0", None),
        ("snapshot", &us, "4k", None),
        ("snapshot", &us, "1M", Some(0x13)),
        ("clone", &uc, "0", None),
        ("clone", &uc, "4k", None),
        ("clone", &uc, "2M", None),
        ("clone", &uc, "1M", Some(0x13)),
    ];
    for (what, uri, at, want) in cases {
        let cmd = match want {
            Some(p) => format!("read -P 0x{p:x} {at} 4k"),
            None => format!("read {at} 4k"),
        };
        let (ok, out) = if what == "snapshot" {
            berth_tests::server::qemu_io_ro(uri, std::slice::from_ref(&cmd))
        } else {
            qemu_io(uri, std::slice::from_ref(&cmd))
        };
        match want {
            Some(_) => assert!(ok, "{what} {cmd}: an intact block is served:\n{out}"),
            None => assert!(
                !ok && out.contains("Input/output error"),
                "{what} {cmd}: a flipped block must fail loudly:\n{out}"
            ),
        }
    }
    let stats = srv.ctl_json(&["stats"]);
    assert!(
        stats["pool"]["checksum_errors"].as_u64().unwrap_or(0) >= 6,
        "every failed read counted: {stats}"
    );
    // Scrub names exactly the flipped blocks (exit 9: data loss).
    let (code, out) = srv.ctl(&["scrub"]);
    assert_eq!(code, 9, "scrub with bad blocks is DATA_LOSS: {out}");
    let scrub: serde_json::Value = serde_json::from_str(&out).expect("scrub json");
    let mut listed: Vec<u64> = scrub["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["pool_block"].as_u64().expect("pool_block"))
        .collect();
    listed.sort_unstable();
    listed.dedup();
    // Pool blocks count from the end of the pool file's 1 MiB header.
    let mut want: Vec<u64> = flipped.iter().map(|b| (b - (1 << 20)) / 4096).collect();
    want.sort_unstable();
    assert_eq!(listed, want, "exactly the flipped blocks: {scrub}");
    let owners = |file_offset: u64| -> Vec<String> {
        let block = (file_offset - (1 << 20)) / 4096;
        scrub["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .filter(|e| e["pool_block"] == block)
            .map(|e| e["owner"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    // The clone reads the first two through the snapshot, which is named.
    assert_eq!(owners(flipped[0]), ["volume a, snapshot s1"], "{scrub}");
    assert_eq!(owners(flipped[1]), ["snapshot s1"], "{scrub}");
    assert_eq!(owners(flipped[2]), ["volume c"], "{scrub}");
}
