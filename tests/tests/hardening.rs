//! What one client, one local user or one stuck disk may do to a node, on the
//! real `berth` binary: a panic on the data path ends the process (no zombie
//! that answers health checks), SIGTERM ends it within the drain time whatever
//! hangs, data folders and files are their owner's alone, and no gRPC API
//! listens on TCP without certificates unless asked for by name.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::server::{binary, have, qemu_io, ServerProc};

/// A volume server with `BERTH_FAULTS=plan` and a 16 MiB volume exported to
/// qemu-io: the server and the export's unix URI.
fn faulted(dir: &Path, extra: &[String], plan: &str) -> (ServerProc, String) {
    assert!(
        have("qemu-io"),
        "qemu-io is needed (apt-get install qemu-utils)"
    );
    let srv = ServerProc::start_env(dir, "256M", extra, &[("BERTH_FAULTS", plan)]);
    let v = srv.volume_export("v", "16M", "q");
    let uri = v["unix_uri"].as_str().expect("uri").to_string();
    (srv, uri)
}

/// Starts a server program and reads its "ready" line.
fn spawn_ready(cmd: &mut Command) -> (std::process::Child, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn berth");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("ready line");
    (child, line)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// A panic on the store's I/O thread (injected: the next pool read panics)
/// aborts the whole process at once: the client's connection closes instead
/// of hanging, and nothing is left answering health checks.
#[test]
fn a_panic_on_the_io_thread_aborts_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut srv, uri) = faulted(dir.path(), &[], "read:panic:1");
    // The write needs no read; the read then panics the I/O thread.
    let started = Instant::now();
    let (ok, out) = qemu_io(
        &uri,
        &["write -P 0x11 0 4k".into(), "read -P 0x11 0 4k".into()],
    );
    assert!(!ok, "the read cannot succeed:\n{out}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the client was left hanging for {:?}",
        started.elapsed()
    );
    let st = srv
        .wait_exit(Duration::from_secs(5))
        .expect("the server is still running after a panic on its I/O thread");
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}");
}

/// SIGTERM ends the process within --drain-seconds plus 5 s even when a
/// request can never finish (a read the disk holds for two minutes).
#[test]
fn sigterm_ends_the_process_within_the_drain_time_whatever_hangs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut srv, uri) = faulted(
        dir.path(),
        &["--drain-seconds".into(), "1".into()],
        "read:delay=120000ms",
    );
    // A client whose read the disk holds.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = qemu_io(&uri, &["write -P 0x22 0 4k".into(), "read 0 4k".into()]);
        let _ = tx.send(());
    });
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let st = srv
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(12))
        .expect("SIGTERM did not end the process within 12 s");
    assert!(
        t.elapsed() <= Duration::from_secs(8),
        "it took {:?}",
        t.elapsed()
    );
    assert!(
        !st.success(),
        "a shutdown that gave up is not clean: {st:?}"
    );
    // The client learns it: its connection is gone.
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the client was left hanging");
}

/// Folders 0700 and files 0600, whatever the umask; and an older install's
/// 0755 folder and 0644 pool and state are tightened at start, with a warning.
#[test]
fn data_folders_and_files_are_private_and_loose_ones_are_tightened() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let mut srv = ServerProc::start(&data, "64M");
    srv.volume_export("v", "16M", "q");
    srv.kill9();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("meta")), 0o700);
    for f in ["pool.img", "server-state.json", "audit.log"] {
        assert_eq!(mode(&data.join(f)) & 0o077, 0, "{f}");
    }
    // As an older version left them.
    for (p, m) in [
        (data.clone(), 0o755),
        (data.join("meta"), 0o755),
        (data.join("pool.img"), 0o644),
        (data.join("server-state.json"), 0o644),
        (data.join("audit.log"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).expect("chmod");
    }
    let srv = ServerProc::start(&data, "64M");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("meta")), 0o700);
    for f in ["pool.img", "server-state.json", "audit.log"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    drop(srv);

    // The same for the metadata service's catalog, and standalone's folder.
    let meta = root.path().join("meta");
    let out = Command::new(binary("berth"))
        .args(["metadata", "--data"])
        .arg(&meta)
        .env("BERTH_META_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run berth metadata");
    assert!(!out.status.success(), "it must refuse plain TCP");
    let (mut child, line) = spawn_ready(
        Command::new(binary("berth"))
            .args(["metadata", "--data"])
            .arg(&meta),
    );
    assert!(line.contains("\"tcp\":null"), "no TCP by default: {line}");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode(&meta), 0o700);
    assert_eq!(mode(&meta.join("catalog")), 0o700);
    assert_eq!(mode(&meta.join("meta.sock")), 0o600);
}

/// Without certificates, a gRPC API on TCP is refused with the reason and the
/// flag that would allow it; with that flag it starts (and says so loudly).
#[test]
fn plain_tcp_grpc_needs_to_be_asked_for_by_name() {
    let root = tempfile::tempdir().expect("tempdir");
    for (what, args) in [
        (
            "metadata",
            vec!["metadata", "--listen", "127.0.0.1:0", "--data"],
        ),
        (
            "volume server",
            vec![
                "volume-server",
                "--pool-size",
                "64M",
                "--nbd-listen",
                "none",
                "--metrics-listen",
                "none",
                "--control-listen",
                "127.0.0.1:0",
                "--data",
            ],
        ),
        (
            "standalone",
            vec![
                "standalone",
                "--pool-size",
                "64M",
                "--nbd-listen",
                "none",
                "--metrics-listen",
                "none",
                "--listen",
                "127.0.0.1:0",
                "--data",
            ],
        ),
    ] {
        let out = Command::new(binary("berth"))
            .args(&args)
            .arg(root.path().join(what.replace(' ', "-")))
            .output()
            .expect("run berth");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} started on plain TCP");
        assert!(
            err.contains("--tls-dir") && err.contains("--insecure-plaintext-tcp"),
            "{what}: the reason names both ways out: {err}"
        );
    }
    // Asked for by name: it runs, and warns.
    let (child, line) = spawn_ready(
        Command::new(binary("berth"))
            .args(["metadata", "--listen", "127.0.0.1:0"])
            .arg("--insecure-plaintext-tcp")
            .arg("--data")
            .arg(root.path().join("m2"))
            .stderr(std::process::Stdio::piped()),
    );
    assert!(line.contains("\"tcp\":\"127.0.0.1:"), "{line}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WITHOUT AUTHENTICATION"), "{err}");
}
