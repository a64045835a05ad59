//! What a pod gets: a loop device over `berth attach`'s FUSE file, which the
//! volume server serves itself for a volume on its node (the attach process
//! mounts and hands `/dev/fuse` over `fuse.sock`). Real processes, a real
//! loop device with direct I/O, fio verifying what it wrote, kill -9 of
//! either side.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_nbd::handoff::{self, Answer, Hello};
use berth_tests::server::{binary, have, ServerProc};

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn can_run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (mount and losetup need it)".into());
    }
    for p in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(p).exists() {
            return Err(format!("{p} does not exist in this kernel"));
        }
    }
    for c in ["losetup", "fio"] {
        if !have(c) {
            return Err(format!(
                "{c} is not installed (scripts/deps.sh installs it)"
            ));
        }
    }
    Ok(())
}

macro_rules! require {
    () => {
        if let Err(why) = can_run() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// `berth attach` on a volume's unix URI, and the loop device over its file.
struct Pod {
    dir: PathBuf,
    attach: Child,
    pid: u32,
    dev: String,
}

impl Pod {
    fn attach(work: &Path, tag: &str, uri: &str, read_only: bool) -> Result<Pod, String> {
        let dir = work.join(tag);
        let pid_file = work.join(format!("{tag}.pid"));
        let log = std::fs::File::create(work.join(format!("{tag}.log"))).expect("log");
        let mut c = Command::new(binary("berth"));
        c.arg("attach").arg(&dir).arg("--pid-file").arg(&pid_file);
        if read_only {
            c.arg("--read-only");
        }
        let mut attach = c
            .env("BERTH_ATTACH_URI", uri)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("berth attach");
        let t = Instant::now();
        while !pid_file.exists() {
            if let Ok(Some(st)) = attach.try_wait() {
                let log =
                    std::fs::read_to_string(work.join(format!("{tag}.log"))).unwrap_or_default();
                return Err(format!("berth attach exited ({st}): {log}"));
            }
            assert!(t.elapsed() < Duration::from_secs(20), "attach came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut args = vec!["--direct-io=on", "--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        let out = Command::new("losetup")
            .args(&args)
            .arg(dir.join("disk"))
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Pod {
            dir,
            pid: attach.id(),
            attach,
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    fn log(&self) -> String {
        let tag = self.dir.file_name().unwrap_or_default().to_string_lossy();
        std::fs::read_to_string(self.dir.with_file_name(format!("{tag}.log"))).unwrap_or_default()
    }

    fn fio(&self, args: &[&str]) -> (bool, String) {
        fio(&self.dev, args)
    }
}

/// fio on `dev`; true when it (and its verification) passed.
fn fio(dev: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("fio")
        .args([
            "--name=pod",
            "--ioengine=io_uring",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No state file left in the working folder.
            "--verify_state_save=0",
        ])
        .arg(format!("--filename={dev}"))
        .args(args)
        .output()
        .expect("fio");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        // SAFETY: kill(2) takes no pointers; the pid is this test's child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let t = Instant::now();
        while self.attach.try_wait().ok().flatten().is_none()
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.attach.kill();
        let _ = self.attach.wait();
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether process `pid` has `/dev/fuse` open.
fn holds_fuse(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/fuse")))
        })
        .unwrap_or(false)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_volume_server_serves_a_local_attachment_and_a_kill_of_either_side_loses_nothing() {
    require!();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = ServerProc::start(&dir.path().join("data"), "1G");
    let e = srv.volume_export("pod", "256M", "node-1");
    let pod = Pod::attach(dir.path(), "pod", &s(&e, "unix_uri"), false).expect("attach");
    // The server holds the mount's descriptor: it answers the file itself.
    assert!(
        holds_fuse(srv.pid()),
        "the volume server serves the FUSE file"
    );
    let (ok, out) = pod.fio(&[
        "--rw=randwrite",
        "--bsrange=4k-1m",
        "--iodepth=16",
        "--size=128M",
        "--do_verify=1",
    ]);
    assert!(ok, "random writes of 4 KiB to 1 MiB, verified:\n{out}");

    // kill -9 of the volume server in the middle of writes: they wait for
    // the next server, which the attach process hands the mount to; the
    // kernel sends it what the dead one had read and not answered.
    let writer = {
        let dev = pod.dev.clone();
        std::thread::spawn(move || {
            fio(
                &dev,
                &[
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=32",
                    "--offset=128M",
                    "--size=64M",
                    // About 3 s of writes: the crash lands in the middle.
                    "--rate_iops=5000",
                    "--do_verify=1",
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !writer.is_finished(),
        "the writes are still going at the crash"
    );
    srv.kill9();
    std::thread::sleep(Duration::from_millis(300));
    srv.restart();
    let (ok, out) = writer.join().expect("writer");
    assert!(ok, "writes across the crash, verified after it:\n{out}");
    assert!(
        pod.log()
            .contains("volume server back: the mount is served again"),
        "{}",
        pod.log()
    );
    wait_for(
        "the new server holds the mount",
        Duration::from_secs(5),
        || holds_fuse(srv.pid()),
    );
    // What was written before the crash is still there.
    let (ok, out) = pod.fio(&[
        "--rw=randwrite",
        "--bsrange=4k-1m",
        "--size=128M",
        "--verify_only=1",
    ]);
    assert!(ok, "the first writes read back after the crash:\n{out}");
    // Sequential 1 MiB reads, which the kernel cuts in two FUSE reads that
    // the server merges back into one store read.
    let (ok, out) = pod.fio(&[
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--offset=192M",
        "--size=64M",
        "--do_verify=1",
    ]);
    assert!(ok, "1 MiB writes read back in order:\n{out}");

    // kill -9 of the attach process: the server lets go of the mount, and
    // I/O on the loop device fails instead of waiting forever.
    // SAFETY: kill(2) takes no pointers; the pid is this test's child.
    unsafe { libc::kill(pod.pid as i32, libc::SIGKILL) };
    wait_for("the server to let go", Duration::from_secs(10), || {
        !holds_fuse(srv.pid())
    });
    let read = Command::new("timeout")
        .args([
            "20",
            "dd",
            "bs=4k",
            "count=1",
            "iflag=direct",
            "of=/dev/null",
        ])
        .arg(format!("if={}", pod.dev))
        .output()
        .expect("dd");
    assert_ne!(read.status.code(), Some(124), "the read did not hang");
    assert!(!read.status.success(), "a read of an ended mount fails");
    let audit = srv.ctl_json(&["audit", "--target", "pod", "--limit", "0"]);
    let text = audit.to_string();
    assert!(
        text.contains("the attach process closed its connection"),
        "the disconnect is audited: {text}"
    );
}

#[test]
fn a_read_only_export_is_attached_read_only_and_refuses_writes() {
    require!();
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(&dir.path().join("data"), "1G");
    srv.volume_export("v", "64M", "node-1");
    srv.ctl_json(&["snapshot", "create", "v", "snap"]);
    let e = srv.ctl_json(&[
        "export",
        "grant",
        "--snapshot",
        "snap",
        "--client",
        "node-2",
    ]);
    let uri = s(&e, "unix_uri");
    let err = Pod::attach(dir.path(), "rw", &uri, false)
        .err()
        .expect("a read-write attach of a snapshot fails");
    assert!(err.contains("attach it with --read-only"), "{err}");
    let pod = Pod::attach(dir.path(), "ro", &uri, true).expect("read-only attach");
    assert!(holds_fuse(srv.pid()));
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1", "oflag=direct"])
        .arg(format!("of={}", pod.dir.join("disk").display()))
        .output()
        .expect("dd");
    assert!(!out.status.success(), "a write to a read-only file fails");
    let out = Command::new("dd")
        .args(["bs=64k", "count=4", "iflag=direct", "of=/dev/null"])
        .arg(format!("if={}", pod.dev))
        .output()
        .expect("dd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_revoked_grant_ends_a_session_polled_under_a_steady_load() {
    require!();
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(&dir.path().join("data"), "1G");
    let e = srv.volume_export("v", "64M", "node-1");
    let pod = Pod::attach(dir.path(), "pod", &s(&e, "unix_uri"), false).expect("attach");
    assert!(holds_fuse(srv.pid()));
    // Queue depth 1, without a pause: the session polls for each next request
    // (berth_store::Shallow) and must still see the revoke between two.
    let mut reader = Command::new("fio")
        .args(["--name=steady", "--ioengine=io_uring", "--direct=1"])
        .args(["--rw=randread", "--bs=4k", "--iodepth=1", "--time_based"])
        .args(["--runtime=30", "--output=/dev/null"])
        .arg(format!("--filename={}", pod.dev))
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        reader.try_wait().expect("fio").is_none(),
        "fio reads steadily until the revoke"
    );
    srv.ctl_json(&["export", "revoke", &s(&e, "export_name")]);
    wait_for(
        "the session to end on the revoke",
        Duration::from_secs(5),
        || !holds_fuse(srv.pid()),
    );
    // The attach process is refused the next handoff: I/O fails, fio ends.
    let t = Instant::now();
    let status = loop {
        if let Some(st) = reader.try_wait().expect("fio") {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "fio ends on I/O errors"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "fio saw its reads fail after the revoke");
    drop(pod);
}

/// Connects to `fuse.sock` and sends `hello` with `fd`; the server's answer.
fn hand_over(sock: &Path, hello: &Hello, fd: std::os::fd::BorrowedFd<'_>) -> Answer {
    use std::io::BufRead;
    let c = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    handoff::send_hello(c.as_raw_fd(), hello, fd).expect("send");
    let mut line = String::new();
    std::io::BufReader::new(&c)
        .read_line(&mut line)
        .expect("answer");
    Answer::parse(&line).expect("parse")
}

#[test]
fn handoffs_of_anything_but_a_granted_fuse_mount_are_refused() {
    require!();
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(&dir.path().join("data"), "512M");
    let e = srv.volume_export("v", "64M", "node-1");
    let uri = s(&e, "unix_uri");
    let export = berth_nbd::session::Uri::parse(&uri).expect("uri").export;
    let sock = dir.path().join("data").join(handoff::SOCKET);
    assert!(sock.exists(), "the server listens on {}", sock.display());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).expect("stat").permissions().mode() & 0o777,
        0o600,
        "the socket is private"
    );
    let granted = Hello {
        resume: false,
        export: export.clone(),
    };
    // Not /dev/fuse: a pipe.
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    match hand_over(&sock, &granted, std::os::fd::AsFd::as_fd(&r)) {
        Answer::Err(why) => assert!(why.contains("not /dev/fuse"), "{why}"),
        a => panic!("a pipe was taken: {a:?}"),
    }
    // /dev/fuse, but an export nobody granted.
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("/dev/fuse");
    let stranger = Hello {
        resume: false,
        export: "v@not-a-token".into(),
    };
    match hand_over(&sock, &stranger, std::os::fd::AsFd::as_fd(&fuse)) {
        Answer::Err(why) => assert!(why.contains("not granted"), "{why}"),
        a => panic!("an ungranted export was served: {a:?}"),
    }
    // Garbage, no descriptor.
    {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("read");
        assert!(answer.starts_with("ERR "), "{answer}");
    }
    // The server still serves a real attachment.
    let pod = Pod::attach(dir.path(), "ok", &uri, false).expect("attach");
    let (ok, out) = pod.fio(&["--rw=write", "--bs=64k", "--size=8M", "--do_verify=1"]);
    assert!(ok, "{out}");
}
