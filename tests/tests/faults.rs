//! Injected disk faults in a running volume server (`BERTH_FAULTS`), seen by
//! a real NBD client (qemu-io): the error reaches the client as EIO, is
//! counted against the volume, a failed write is never visible, and the
//! server keeps serving every volume.

use berth_tests::server::{have, qemu_io, ServerProc};

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
