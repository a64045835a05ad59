//! The pool's I/O engine as a container gives it: no CAP_IPC_LOCK and an
//! 8 MiB RLIMIT_MEMLOCK (the kernel's default, which podman, containerd and
//! Docker pass on). The server registers what fits of its buffer arena with
//! io_uring, serves I/O either way, and says what it got in its metrics, not
//! only in a log line. Runs as root (dropping CAP_IPC_LOCK from the bounding
//! set takes CAP_SETPCAP). How much the ring itself takes from the limit
//! depends on the kernel (nothing from 5.12 to 6.13, its pages before and
//! since), so the limits below are checked as bounds, not exact figures.

use std::path::Path;

use berth_tests::server::{have, http_get, metric, qemu_io, ServerProc};

const MIB: f64 = (1 << 20) as f64;

/// A server run without CAP_IPC_LOCK under `memlock` bytes of RLIMIT_MEMLOCK
/// (none of that when `None`, as root normally runs); a qemu-io round trip
/// through it; its metrics text.
fn serve_and_scrape(dir: &Path, memlock: Option<u64>) -> String {
    let limit = memlock.map(|m| format!("--memlock={m}:{m}"));
    let wrapper: Vec<&str> = match &limit {
        Some(l) => vec![
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "prlimit",
            l,
            "--",
        ],
        None => Vec::new(),
    };
    let srv = ServerProc::start_under(&wrapper, dir, "256M", &[], &[]);
    let v = srv.volume_export("v", "64M", "q");
    let uri = v["unix_uri"].as_str().expect("uri");
    // 4 KiB and 4 MiB requests: the large ones do not fit a 7 MiB registered
    // prefix twice over and spill into the unregistered rest of the arena.
    let (ok, out) = qemu_io(
        uri,
        &[
            "write -P 0x5a 0 4k".into(),
            "write -P 0xa5 1M 4M".into(),
            "read -P 0x5a 0 4k".into(),
            "read -P 0xa5 1M 4M".into(),
        ],
    );
    assert!(ok, "round trip failed (memlock {memlock:?}): {out}");
    http_get(&srv.ready.metrics)
}

fn engine_and_registered(text: &str) -> (Option<f64>, Option<f64>, Option<f64>) {
    (
        metric(text, "berth_io_engine{engine=\"io_uring\"}"),
        metric(text, "berth_io_engine{engine=\"sync\"}"),
        metric(text, "berth_io_registered_buffer_bytes"),
    )
}

#[test]
fn under_a_containers_memlock_limit_the_server_registers_what_fits_and_says_so() {
    for tool in ["setpriv", "prlimit", "qemu-io"] {
        assert!(have(tool), "{tool} is needed (util-linux, qemu-utils)");
    }
    let tmp = tempfile::tempdir().expect("tempdir");

    // Root with CAP_IPC_LOCK: the whole arena is registered.
    let text = serve_and_scrape(&tmp.path().join("root"), None);
    let (uring, sync, registered) = engine_and_registered(&text);
    if uring.is_none() && sync == Some(1.0) {
        // The kernel or a seccomp profile refuses io_uring here: the fallback
        // is what the metric must show, and there is nothing to register.
        assert_eq!(registered, Some(0.0), "{text}");
        eprintln!("SKIP registration checks: io_uring is unavailable on this machine");
        return;
    }
    assert_eq!(uring, Some(1.0), "{text}");
    // What the store counts is exported beside it.
    for name in [
        "berth_io_polled_work",
        "berth_pool_gathered_reads",
        "berth_pool_deferred_writes",
        "berth_pool_deferred_bytes",
        "berth_pool_io_errors",
    ] {
        assert!(metric(&text, name).is_some(), "{name} in {text}");
    }
    // The reads the disk may hold (found by measuring; docs/pod-path.md):
    // a limit in force, and a count of the reads that waited for it.
    let limit = metric(&text, "berth_io_read_depth_limit").expect("read depth limit");
    assert!((4.0..=4096.0).contains(&limit), "read depth limit {limit}");
    assert!(metric(&text, "berth_io_reads_held").is_some(), "{text}");
    let whole = registered.expect("berth_io_registered_buffer_bytes");
    assert!(whole >= 16.0 * MIB, "whole arena registered: {whole}");

    // A container's default: 8 MiB, no CAP_IPC_LOCK. Part of the arena is
    // registered (the most whole MiB that fit beside the ring), never more
    // than the limit.
    let text = serve_and_scrape(&tmp.path().join("container"), Some(8 << 20));
    let (uring, _, registered) = engine_and_registered(&text);
    assert_eq!(uring, Some(1.0), "{text}");
    let part = registered.expect("registered bytes");
    assert!(
        (1.0 * MIB..=8.0 * MIB).contains(&part) && part < whole,
        "registered {part} of {whole} under an 8 MiB limit"
    );

    // 1 MiB: at most 1 MiB registered (none where the ring takes its share),
    // and io_uring serves either way.
    let text = serve_and_scrape(&tmp.path().join("one-mib"), Some(1 << 20));
    let (uring, _, registered) = engine_and_registered(&text);
    assert_eq!(uring, Some(1.0), "{text}");
    let small = registered.expect("registered bytes");
    assert!(small <= MIB, "registered {small} under a 1 MiB limit");

    // None at all: nothing is registered; where the kernel counts the ring
    // too, io_uring itself is refused and the engine falls back to the thread
    // pool. Either way the metrics say which, and I/O is served (above).
    let text = serve_and_scrape(&tmp.path().join("none"), Some(0));
    let (uring, sync, registered) = engine_and_registered(&text);
    assert_eq!(registered, Some(0.0), "{text}");
    assert!(
        matches!((uring, sync), (Some(1.0), None) | (None, Some(1.0))),
        "exactly one engine is reported: {text}"
    );
}

#[test]
fn a_read_depth_that_means_nothing_is_refused_with_what_it_takes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for bad in ["lots", "-3", "5000"] {
        let out = std::process::Command::new(berth_tests::server::binary("berth"))
            .args(["volume-server", "--data"])
            .arg(tmp.path())
            .args(["--pool-size", "64M", &format!("--read-depth={bad}")])
            .output()
            .expect("run berth");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {err}");
        assert!(
            err.contains("--read-depth") && err.contains("expected auto, off"),
            "{bad}: {err}"
        );
    }
}
