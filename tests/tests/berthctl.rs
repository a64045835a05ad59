//! berthctl as a person meets it (issue 15, section 6): sizes it must
//! refuse, deletes of what is not there, a closed pipe, long audit
//! listings, a socket this user may not open, its exit codes, sizes in
//! tables, and what an ALREADY_EXISTS names. Each runs the real `berth
//! standalone` and `berthctl` binaries on a temp data folder.

use std::path::Path;
use std::process::{Command, Output};

use berth_tests::server::binary;
use berth_tests::standalone::Standalone;
use serde_json::Value;

/// `berthctl --data DIR ARGS` (table output unless ARGS say otherwise).
fn run(s: &Standalone, args: &[&str]) -> Output {
    Command::new(binary("berthctl"))
        .arg("--data")
        .arg(&s.dir)
        .args(args)
        .output()
        .expect("run berthctl")
}

/// berthctl that must exit with `code`; returns (stdout, stderr).
fn expect(s: &Standalone, code: i32, args: &[&str]) -> (String, String) {
    let o = run(s, args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert_eq!(
        o.status.code(),
        Some(code),
        "berthctl {args:?}: {:?}\nstdout: {out}\nstderr: {err}",
        o.status
    );
    (out, err)
}

fn start(root: &Path) -> Standalone {
    Standalone::start(&root.join("data"), "4G")
}

#[test]
fn sizes_that_would_be_quietly_changed_are_refused_with_exit_5() {
    let root = tempfile::tempdir().expect("tempdir");
    let s = start(root.path());

    // --size 0 used to make a 1 GiB volume.
    let (_, err) = expect(&s, 5, &["volume", "create", "zero", "--size", "0"]);
    assert!(err.contains("--size 0"), "{err}");
    expect(&s, 3, &["volume", "get", "zero"]);

    s.ctl(&["volume", "create", "v", "--size", "256M"]);
    // Expanding to less used to succeed and leave the volume as it was.
    let (_, err) = expect(&s, 5, &["volume", "expand", "v", "--size", "128M"]);
    assert!(
        err.contains("128Mi") && err.contains("256Mi") && err.contains("never shrink"),
        "{err}"
    );
    assert_eq!(s.ctl(&["volume", "get", "v"])["size_bytes"], 256u64 << 20);
    // The same size is not a shrink (idempotent), and growing still works.
    s.ctl(&["volume", "expand", "v", "--size", "256M"]);
    let grown = s.ctl(&["volume", "expand", "v", "--size", "384M"]);
    assert_eq!(grown["size_bytes"], 384u64 << 20);
    expect(&s, 5, &["volume", "expand", "v", "--size", "0"]);

    // A clone smaller than its source used to get the source's size.
    let (_, err) = expect(
        &s,
        5,
        &["clone", "c1", "--from-volume", "v", "--size", "256M"],
    );
    assert!(err.contains("volume v") && err.contains("384Mi"), "{err}");
    expect(&s, 3, &["volume", "get", "c1"]);
    s.ctl(&["snapshot", "create", "v", "snap"]);
    let (_, err) = expect(
        &s,
        5,
        &["clone", "c2", "--from-snapshot", "snap", "--size", "128M"],
    );
    assert!(err.contains("snapshot snap"), "{err}");
    expect(&s, 3, &["volume", "get", "c2"]);
    expect(
        &s,
        5,
        &["clone", "c3", "--from-snapshot", "snap", "--size", "0"],
    );
    // The source's size, or more, still clones.
    let c = s.ctl(&["clone", "c4", "--from-snapshot", "snap", "--size", "512M"]);
    assert_eq!(c["size_bytes"], 512u64 << 20);
    let c = s.ctl(&["clone", "c5", "--from-volume", "v"]);
    assert_eq!(c["size_bytes"], 384u64 << 20);

    // The volume server's own commands refuse 0 too.
    expect(
        &s,
        5,
        &["server", "volume", "create", "local", "--size", "0"],
    );
}

#[test]
fn deleting_what_is_absent_succeeds_and_says_so() {
    let root = tempfile::tempdir().expect("tempdir");
    let s = start(root.path());

    let (out, _) = expect(&s, 0, &["volume", "delete", "ghost"]);
    assert_eq!(out.trim(), "volume ghost already absent");
    let (out, _) = expect(&s, 0, &["snapshot", "delete", "ghost"]);
    assert_eq!(out.trim(), "snapshot ghost already absent");
    let (out, _) = expect(&s, 0, &["volume", "unexport", "ghost"]);
    assert_eq!(out.trim(), "export of ghost already absent");
    // Scripts get the same in JSON.
    let (out, _) = expect(&s, 0, &["-o", "json", "volume", "delete", "ghost"]);
    let j: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["result"], "volume ghost already absent");

    // What exists is deleted and said to be.
    s.ctl(&["volume", "create", "v", "--size", "64M"]);
    s.ctl(&["snapshot", "create", "v", "snap"]);
    s.ctl(&["volume", "export", "v"]);
    let (out, _) = expect(&s, 0, &["volume", "unexport", "v", "--node", "elsewhere"]);
    assert_eq!(out.trim(), "export of v to node elsewhere already absent");
    let (out, _) = expect(&s, 0, &["volume", "unexport", "v"]);
    assert!(out.starts_with("unexported v;"), "{out}");
    let (out, _) = expect(&s, 0, &["volume", "unexport", "v"]);
    assert_eq!(out.trim(), "export of v already absent");
    let (out, _) = expect(&s, 0, &["snapshot", "delete", "snap"]);
    assert_eq!(out.trim(), "deleted snapshot snap");
    let (out, _) = expect(&s, 0, &["volume", "delete", "v"]);
    assert_eq!(out.trim(), "deleted volume v");
    let (out, _) = expect(&s, 0, &["volume", "delete", "v"]);
    assert_eq!(out.trim(), "volume v already absent");

    // The volume server's own deletes say the same.
    s.ctl(&["server", "volume", "create", "local", "--size", "64M"]);
    let (out, _) = expect(&s, 0, &["server", "volume", "delete", "local"]);
    assert_eq!(out.trim(), "deleted volume local");
    let (out, _) = expect(&s, 0, &["server", "volume", "delete", "local"]);
    assert_eq!(out.trim(), "volume local already absent");
    let (out, _) = expect(&s, 0, &["server", "snapshot", "delete", "ghost"]);
    assert_eq!(out.trim(), "snapshot ghost already absent");
}

#[test]
fn audit_list_pages_through_any_limit() {
    let root = tempfile::tempdir().expect("tempdir");
    let s = start(root.path());

    // More than the 4 MiB a gRPC reply may carry: ~520 entries of ~8 KiB.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let socket = s.socket("metadata_socket");
    let big = "x".repeat(4096);
    const APPENDED: u64 = 520;
    rt.block_on(async {
        use berth_proto::meta::v1 as pb;
        let ch = berth_proto::channel(&format!("unix://{}", socket.display()), None)
            .await
            .expect("connect");
        let mut c = pb::metadata_service_client::MetadataServiceClient::new(ch);
        for i in 0..APPENDED {
            c.append_audit(pb::AppendAuditRequest {
                action: format!("Bulk{i}"),
                volume: String::new(),
                target: big.clone(),
                detail: big.clone(),
            })
            .await
            .expect("append");
        }
    });

    // Every entry, in order, each once, across pages.
    let (out, err) = expect(&s, 0, &["-o", "json", "audit", "list", "--limit", "100000"]);
    let all: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    let seqs: Vec<u64> = all
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.len() as u64 >= APPENDED, "{} entries", seqs.len());
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    // 0 is every entry; a limit across a page boundary is exact; --after
    // goes on from an entry.
    let (out, _) = expect(&s, 0, &["-o", "json", "audit", "list", "--limit", "0"]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&out)
            .expect("json")
            .len(),
        seqs.len()
    );
    let (out, _) = expect(&s, 0, &["-o", "json", "audit", "list", "--limit", "300"]);
    let some: Vec<Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(some.len(), 300);
    assert_eq!(some[299]["seq"].as_u64(), Some(seqs[299]));
    let after = seqs[9].to_string();
    let (out, _) = expect(
        &s,
        0,
        &[
            "-o", "json", "audit", "list", "--after", &after, "--limit", "5",
        ],
    );
    let next: Vec<Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(next[0]["seq"].as_u64(), Some(seqs[10]));
}

#[test]
fn a_closed_stdout_ends_berthctl_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let root = tempfile::tempdir().expect("tempdir");
    let s = start(root.path());
    s.ctl(&["volume", "create", "v", "--size", "64M"]);
    let pki = root.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");

    // `berthctl audit list | head -1`, with the reader gone before berthctl
    // writes: no panic (exit 101), no message, killed by SIGPIPE like other
    // Unix tools.
    for args in [
        &["audit", "list"][..],
        &["-o", "json", "audit", "list"][..],
        &["volume", "list"][..],
        // Printed before any server is asked.
        &["tls", "generate", "--out", pki, "admin"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let o = Command::new(binary("berthctl"))
            .arg("--data")
            .arg(&s.dir)
            .args(args)
            .stdout(writer)
            .output()
            .expect("run berthctl");
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGPIPE),
            "berthctl {args:?}: {:?}, stderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn a_socket_this_user_may_not_open_is_not_reported_as_a_stopped_server() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).expect("mkdir");
    // A listening socket nobody but root may open: root passes every
    // permission check, so as root berthctl runs as nobody.
    let socket = dir.join("meta.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    for d in [root.path(), &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let ctl = |data: &Path| {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(binary("berthctl"));
        cmd.arg("--data").arg(data).args(["volume", "list"]);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            cmd.uid(65534).gid(65534);
        }
        cmd.output().unwrap_or_else(|e| {
            panic!("run berthctl (as nobody when root: the target dir must be readable): {e}")
        })
    };
    let o = ctl(&dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(10), "{err}");
    assert!(
        err.contains("permission denied") && err.contains(&socket.display().to_string()),
        "{err}"
    );
    assert!(!err.contains("is the server running"), "{err}");

    // Nothing listening is still "unavailable".
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let o = ctl(&empty);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert!(err.contains("is the server running"), "{err}");
}

#[test]
fn help_lists_every_exit_code() {
    let o = Command::new(binary("berthctl"))
        .arg("--help")
        .output()
        .expect("run berthctl");
    let help = String::from_utf8_lossy(&o.stdout);
    for code in 0..=10 {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "exit code {code} missing from --help:\n{help}"
        );
    }
    assert!(help.contains("permission denied"), "{help}");
}

#[test]
fn tables_show_sizes_as_people_write_them_and_json_keeps_bytes() {
    let root = tempfile::tempdir().expect("tempdir");
    let s = start(root.path());
    s.ctl(&["volume", "create", "db", "--size", "1.5G"]);
    s.ctl(&["volume", "create", "logs", "--size", "512M"]);

    let (out, _) = expect(&s, 0, &["volume", "list"]);
    let row = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("db")[1], "1.5Gi", "{out}");
    assert_eq!(row("logs")[1], "512Mi", "{out}");
    let (out, _) = expect(&s, 0, &["pools"]);
    assert!(out.contains("4Gi") && out.contains("2Gi"), "{out}");

    let v = s.ctl(&["volume", "get", "db"]);
    assert_eq!(v["size_bytes"], 1536u64 << 20);
    let pools = s.ctl(&["pools"]);
    assert_eq!(pools[0]["provisioned_bytes"], 2u64 << 30);
}

#[test]
fn already_exists_names_the_parameter_that_differs() {
    let root = tempfile::tempdir().expect("tempdir");
    let s = start(root.path());
    s.ctl(&[
        "volume", "create", "t", "--size", "64M", "--tier", "premium",
    ]);
    // The same request again is the same volume.
    s.ctl(&[
        "volume", "create", "t", "--size", "64M", "--tier", "premium",
    ]);

    let (_, err) = expect(
        &s,
        4,
        &[
            "volume", "create", "t", "--size", "64M", "--tier", "standard",
        ],
    );
    assert!(
        err.contains("parameter tier is \"premium\" on it, \"standard\" in this request"),
        "{err}"
    );
    let (_, err) = expect(
        &s,
        4,
        &[
            "volume",
            "create",
            "t",
            "--size",
            "64M",
            "--tier",
            "premium",
            "--param",
            "fsType=ext4",
        ],
    );
    assert!(
        err.contains("parameter fsType is unset on it, \"ext4\" in this request"),
        "{err}"
    );
}
