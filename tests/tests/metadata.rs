//! The metadata service as a real process with three real volume servers on
//! loopback (separate data folders and ports), driven by berthctl, qemu-io
//! and a gRPC client: placement, topology, node failure, restart durability,
//! idempotency under concurrency, pagination, reconcile after crashes between
//! the catalog and the volume server, the tamper-evident audit log, and
//! `berth standalone` on one data folder.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use berth_tests::meta::{names, wait_for, Cluster, NodeSpec};
use berth_tests::server::{binary, have, qemu_io};
use berth_tests::standalone::Standalone;
use serde_json::Value;

fn three_nodes(root: &std::path::Path) -> Cluster {
    Cluster::start(
        root,
        &[
            NodeSpec {
                name: "n1",
                pool_size: "3G",
                labels: vec![("zone", "a")],
            },
            NodeSpec {
                name: "n2",
                pool_size: "2G",
                labels: vec![("zone", "a")],
            },
            NodeSpec {
                name: "n3",
                pool_size: "1G",
                labels: vec![("zone", "b")],
            },
        ],
    )
}

fn available(c: &Cluster) -> BTreeMap<String, u64> {
    c.meta
        .ctl_json(&["pools"])
        .as_array()
        .expect("pools")
        .iter()
        .filter(|p| p["node_state"] == "up")
        .map(|p| {
            (
                p["node"].as_str().unwrap_or_default().to_string(),
                p["available_bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn placement_spreads_by_capacity_and_honours_topology() {
    let root = tempfile::tempdir().expect("tempdir");
    let c = three_nodes(root.path());
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..18 {
        let before = available(&c);
        let max = *before.values().max().expect("pools");
        let v = c
            .meta
            .ctl_json(&["volume", "create", &format!("v{i}"), "--size", "256M"]);
        let node = v["node"].as_str().expect("node").to_string();
        // Each volume goes where the most room was left.
        assert_eq!(
            before[&node], max,
            "v{i} went to {node}; room before: {before:?}"
        );
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        3,
        "18 volumes spread over every node: {per_node:?}"
    );
    assert!(
        per_node["n1"] > per_node["n2"] && per_node["n2"] > per_node["n3"],
        "{per_node:?}"
    );

    // Topology: zone b has only n3; zone c has nothing and the error says why.
    let v = c.meta.ctl_json(&[
        "volume",
        "create",
        "zb",
        "--size",
        "64M",
        "--topology",
        "zone=b",
    ]);
    assert_eq!(v["node"], "n3");
    assert_eq!(v["topology"]["zone"], "b");
    let e = c.meta.ctl_err(
        8,
        &[
            "volume",
            "create",
            "zc",
            "--size",
            "64M",
            "--topology",
            "zone=c",
        ],
    );
    assert!(e.contains("n1: outside the requested topology"), "{e}");
    let e = c
        .meta
        .ctl_err(8, &["volume", "create", "huge", "--size", "100G"]);
    assert!(
        e.contains("no pool can hold 100 GiB (n1: ")
            && e.contains("n2: ")
            && e.contains(" available, ")
            && e.contains(" short"),
        "{e}"
    );
    // Bad parameters name the key and what is accepted.
    let e = c.meta.ctl_err(
        5,
        &[
            "volume",
            "create",
            "p",
            "--size",
            "1G",
            "--param",
            "speed=fast",
        ],
    );
    assert!(e.contains("\"speed\"") && e.contains("maxIops"), "{e}");

    // Snapshots and clones stay on their source's node (O(1) on one pool).
    let snap = c.meta.ctl_json(&["snapshot", "create", "zb", "zb-snap"]);
    assert_eq!(snap["node"], "n3");
    let clone = c
        .meta
        .ctl_json(&["clone", "zb-clone", "--from-snapshot", "zb-snap"]);
    assert_eq!(
        (clone["node"].as_str(), clone["source"].as_str()),
        (Some("n3"), Some("snapshot:zb-snap"))
    );
    let clone = c
        .meta
        .ctl_json(&["clone", "v0-clone", "--from-volume", "v0"]);
    let v0 = c.meta.ctl_json(&["volume", "get", "v0"]);
    assert_eq!(clone["node"], v0["node"]);
    // Capacity per segment adds up what zone a can still take.
    let cap = c.meta.ctl_json(&["capacity", "--topology", "zone=a"]);
    let room = available(&c);
    assert_eq!(
        cap["available_bytes"].as_u64(),
        Some(room["n1"] + room["n2"])
    );
}

#[test]
fn a_killed_volume_server_is_marked_down_avoided_and_back_after_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    let on_n1 = c
        .meta
        .ctl_json(&["volume", "create", "first", "--size", "128M"]);
    assert_eq!(on_n1["node"], "n1", "the emptiest pool first");

    c.node("n1").kill9();
    c.meta.wait_node("n1", "down");
    for i in 0..4 {
        let v = c.meta.ctl_json(&[
            "volume",
            "create",
            &format!("while-down-{i}"),
            "--size",
            "128M",
        ]);
        assert_ne!(v["node"], "n1", "a create went to the dead node");
    }
    // Calls that need n1 say it is down, by name (exit 7 = UNAVAILABLE).
    for args in [
        vec!["snapshot", "create", "first", "s"],
        vec!["volume", "export", "first"],
        vec!["volume", "expand", "first", "--size", "256M"],
        vec!["volume", "delete", "first"],
    ] {
        let e = c.meta.ctl_err(7, &args);
        assert!(e.contains("n1") && e.contains("down"), "{args:?}: {e}");
    }
    // The catalog still answers for it and says what is wrong.
    let v = c.meta.ctl_json(&["volume", "get", "first"]);
    assert_eq!(v["abnormal"], true);
    assert!(
        v["condition"]
            .as_str()
            .unwrap_or_default()
            .contains("n1 is down"),
        "{v}"
    );

    c.node("n1").restart();
    c.meta.wait_node("n1", "up");
    c.meta.ctl_json(&["snapshot", "create", "first", "s"]);
    let v = c
        .meta
        .ctl_json(&["volume", "expand", "first", "--size", "256M"]);
    assert_eq!(v["size_bytes"].as_u64(), Some(256 << 20));
    assert_eq!(v["abnormal"], false);
    // The node's own view agrees.
    let sv = c.node("n1").ctl_json(&["volume", "get", "first"]);
    assert_eq!(sv["size_bytes"].as_u64(), Some(256 << 20));
    // The log tells the story: n1 went down, then came back.
    let audit = c.meta.ctl_json(&["audit", "list"]);
    let n1: Vec<&str> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["target"] == "n1")
        .filter_map(|e| e["action"].as_str())
        .collect();
    let down = n1
        .iter()
        .position(|a| *a == "NodeDown")
        .expect("NodeDown recorded");
    assert!(
        n1[down..]
            .iter()
            .any(|a| *a == "NodeUp" || *a == "RegisterNode"),
        "{n1:?}"
    );
}

#[test]
fn the_catalog_survives_restarts_and_pages_are_stable_while_volumes_are_added() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = three_nodes(root.path());
    for i in 0..25 {
        c.meta.ctl_json(&[
            "volume",
            "create",
            &format!("vol-{i:02}"),
            "--size",
            "16M",
            "--tier",
            "premium",
        ]);
    }
    c.meta
        .ctl_json(&["snapshot", "create", "vol-03", "snap-03"]);
    let before = c.meta.ctl_json(&["volume", "list"]);
    c.meta.restart(None);
    let after = c.meta.ctl_json(&["volume", "list"]);
    assert_eq!(
        before, after,
        "the catalog changed across kill -9 and restart"
    );
    assert_eq!(
        names(&c.meta.ctl_json(&["snapshot", "list"]), "id"),
        ["snap-03"]
    );

    // Page through with a real gRPC client while other volumes are created
    // between pages: every volume that existed at the start is seen exactly once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let seen: Vec<String> = rt.block_on(async {
        use berth_proto::meta::v1 as pb;
        let ch = berth_proto::channel(&c.meta.endpoint, None)
            .await
            .expect("connect");
        let mut client = pb::metadata_service_client::MetadataServiceClient::new(ch);
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = client
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 7,
                    page_token: token,
                    node: String::new(),
                })
                .await
                .expect("list")
                .into_inner();
            assert!(page.volumes.len() <= 7);
            seen.extend(page.volumes.into_iter().map(|v| v.id));
            pages += 1;
            // Names before and after the cursor appear while we page.
            c.meta.ctl_json(&[
                "volume",
                "create",
                &format!("vol-{:02}x", pages * 4),
                "--size",
                "16M",
            ]);
            c.meta
                .ctl_json(&["volume", "create", &format!("aaa-{pages}"), "--size", "16M"]);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert!(pages >= 4, "25+ volumes in pages of 7");
        let bad = client
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 7,
                page_token: "zz-not-a-token".into(),
                node: String::new(),
            })
            .await
            .expect_err("bad token");
        assert_eq!(bad.code(), tonic::Code::Aborted);
        seen
    });
    for i in 0..25 {
        let id = format!("vol-{i:02}");
        assert_eq!(
            seen.iter().filter(|s| **s == id).count(),
            1,
            "{id} seen once in {seen:?}"
        );
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        seen.len(),
        "a volume was listed twice: {seen:?}"
    );
}

#[test]
fn a_hundred_concurrent_creates_of_one_name_make_one_volume() {
    let root = tempfile::tempdir().expect("tempdir");
    let c = three_nodes(root.path());
    let children: Vec<_> = (0..100)
        .map(|_| {
            Command::new(binary("berthctl"))
                .args(["--endpoint", &c.meta.endpoint, "-o", "json"])
                .args([
                    "volume", "create", "shared", "--size", "64M", "--tier", "premium",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn berthctl")
        })
        .collect();
    let results: Vec<Value> = children
        .into_iter()
        .map(|ch| {
            let out = ch.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("json")
        })
        .collect();
    for r in &results {
        assert_eq!(
            (&r["id"], &r["node"], &r["pool_id"], &r["created_unix_ms"]),
            (
                &results[0]["id"],
                &results[0]["node"],
                &results[0]["pool_id"],
                &results[0]["created_unix_ms"]
            )
        );
    }
    assert_eq!(
        names(&c.meta.ctl_json(&["volume", "list"]), "id"),
        ["shared"]
    );
    let mut c = c;
    let total: usize = ["n1", "n2", "n3"]
        .iter()
        .map(|n| c.server_volumes(n).len())
        .sum();
    assert_eq!(total, 1, "one volume on the volume servers");
    // An incompatible request for the same name is refused (exit 4).
    let e = c.meta.ctl_err(
        4,
        &[
            "volume", "create", "shared", "--size", "64M", "--tier", "standard",
        ],
    );
    assert!(e.contains("already exists"), "{e}");
    let creates = c.meta.ctl_json(&["audit", "list", "--volume", "shared"]);
    assert_eq!(
        creates.as_array().map(Vec::len),
        Some(101),
        "every call audited"
    );
}

/// Runs `op` against a metadata service set to crash at `point`, restarts it
/// and waits until catalog and volume servers agree.
/// Reconcile's own entries in the audit log.
fn reconcile_notes(c: &Cluster) -> usize {
    c.meta
        .ctl_json(&["audit", "list", "--actor", "berth-metadata"])
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["action"] == "Reconcile")
        .count()
}

/// `done` crash points have been reconciled so far: their notes are in the
/// audit log before this kills the service again (reconcile logs its note
/// once the repair is made, and a kill between the two would lose it).
fn crash_then_reconcile(c: &mut Cluster, point: &str, op: &[&str], done: usize) {
    wait_for(
        &format!("reconcile's {done} notes before {point}"),
        Duration::from_secs(20),
        || reconcile_notes(c) >= done,
    );
    c.meta.restart(Some(point));
    let o = c.meta.ctl(op);
    assert_ne!(o.code, 0, "{op:?} should have lost its server at {point}");
    assert!(
        c.meta.exited_within(Duration::from_secs(10)),
        "the service did not crash at {point}"
    );
    c.meta.restart(None);
}

#[test]
fn reconcile_leaves_no_orphans_after_crashes_between_the_catalog_and_the_volume_server() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = Cluster::start(
        root.path(),
        &[NodeSpec {
            name: "n1",
            pool_size: "2G",
            labels: vec![],
        }],
    );
    let server_vols = |c: &mut Cluster| c.server_volumes("n1");
    let catalog_vols = |c: &Cluster| names(&c.meta.ctl_json(&["volume", "list"]), "id");

    // Killed after the catalog recorded the intent, before the server call;
    // then after the server call, before the catalog recorded the outcome.
    let mut crashed = 0;
    for point in ["create-volume:after-catalog", "create-volume:after-server"] {
        crash_then_reconcile(
            &mut c,
            point,
            &["volume", "create", "half", "--size", "64M"],
            crashed,
        );
        crashed += 1;
        wait_for(
            &format!("reconcile after {point}"),
            Duration::from_secs(20),
            || catalog_vols(&c).is_empty() && server_vols(&mut c).is_empty(),
        );
        // The retry a CSI sidecar would make now succeeds, exactly once.
        c.meta
            .ctl_json(&["volume", "create", "half", "--size", "64M"]);
        assert_eq!(catalog_vols(&c), ["half"]);
        assert_eq!(server_vols(&mut c), ["half"]);
        c.meta.ctl_json(&["volume", "delete", "half"]);
    }

    // A delete cut short is finished, not forgotten.
    c.meta
        .ctl_json(&["volume", "create", "doomed", "--size", "64M"]);
    crash_then_reconcile(
        &mut c,
        "delete-volume:after-catalog",
        &["volume", "delete", "doomed"],
        crashed,
    );
    crashed += 1;
    wait_for("reconcile of a delete", Duration::from_secs(20), || {
        catalog_vols(&c).is_empty() && server_vols(&mut c).is_empty()
    });

    // Snapshots and attachments too.
    c.meta
        .ctl_json(&["volume", "create", "base", "--size", "64M"]);
    let empty = |v: Value| v.as_array().is_some_and(Vec::is_empty);
    for point in [
        "create-snapshot:after-catalog",
        "create-snapshot:after-server",
    ] {
        crash_then_reconcile(
            &mut c,
            point,
            &["snapshot", "create", "base", "half-snap"],
            crashed,
        );
        crashed += 1;
        wait_for(
            &format!("reconcile after {point}"),
            Duration::from_secs(20),
            || {
                empty(c.meta.ctl_json(&["snapshot", "list"]))
                    && empty(c.node("n1").ctl_json(&["snapshot", "list"]))
            },
        );
    }
    for point in [
        "publish-volume:after-catalog",
        "publish-volume:after-server",
    ] {
        crash_then_reconcile(&mut c, point, &["volume", "export", "base"], crashed);
        crashed += 1;
        wait_for(
            &format!("reconcile after {point}"),
            Duration::from_secs(20),
            || {
                empty(c.meta.ctl_json(&["attachments"]))
                    && empty(c.node("n1").ctl_json(&["export", "list"]))
            },
        );
    }
    // After the server-side crash points the server did hold the object, so
    // reconcile removed something real; the retries now work.
    c.meta
        .ctl_json(&["snapshot", "create", "base", "half-snap"]);
    c.meta.ctl_json(&["volume", "export", "base"]);
    assert_eq!(
        c.node("n1")
            .ctl_json(&["export", "list"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // What reconcile did is in the audit log: a note for each crash.
    assert_eq!(crashed, 7);
    wait_for("reconcile's notes", Duration::from_secs(20), || {
        reconcile_notes(&c) >= crashed
    });
    // Volumes made outside the catalog are left alone.
    c.node("n1")
        .ctl_json(&["volume", "create", "handmade", "--size", "16M"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(server_vols(&mut c).contains(&"handmade".to_string()));
}

#[test]
fn the_audit_chain_records_calls_and_connections_and_verify_names_tampering() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut c = Cluster::start(
        root.path(),
        &[NodeSpec {
            name: "n1",
            pool_size: "1G",
            labels: vec![],
        }],
    );
    c.meta.ctl_json(&[
        "volume", "create", "ledger", "--size", "64M", "--tier", "standard",
    ]);
    // The tier changes on the live volume without detaching it.
    // For people, `volume export` prints just the URI.
    let uri = c.meta.ctl_text(&["volume", "export", "ledger"]);
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    // Hold an NBD connection open across the change: it keeps working.
    let (addr, export) = uri
        .strip_prefix("nbd://")
        .and_then(|r| r.split_once('/'))
        .expect("nbd://host:port/export");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let m = rt.block_on(async {
        use berth_volume::nbd::client::Client;
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut nbd = Client::connect(s, export).await.expect("handshake");
        nbd.write(0, &[0x11; 4096], true)
            .await
            .expect("write before");
        let m = c
            .meta
            .ctl_json(&["volume", "modify", "ledger", "--tier", "premium"]);
        let sv = c.node("n1").ctl_json(&["volume", "get", "ledger"]);
        assert_eq!(
            (
                sv["tier"].as_str(),
                sv["iops_limit"].as_u64(),
                sv["connections"].as_u64()
            ),
            (Some("premium"), m["iops_limit"].as_u64(), Some(1)),
            "the server runs the new tier with the client still attached"
        );
        assert_eq!(
            nbd.read(0, 4096).await.expect("read after"),
            vec![0x11; 4096]
        );
        m
    });
    assert_eq!(
        (m["tier"].as_str(), m["priority"].as_u64()),
        (Some("premium"), Some(1))
    );
    assert_eq!(
        c.node("n1")
            .ctl_json(&["export", "list"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    if have("qemu-io") {
        let (ok, out) = qemu_io(
            &uri,
            &["write -P 0x5a 0 1M".into(), "read -P 0x5a 0 1M".into()],
        );
        assert!(ok, "{out}");
        // The node's connect and disconnect, with bytes, reach the chain.
        wait_for(
            "disconnect in the audit log",
            Duration::from_secs(10),
            || {
                let v = c
                    .meta
                    .ctl_json(&["audit", "list", "--volume", "ledger", "--actor", "node:n1"]);
                v.as_array().expect("a").iter().any(|e| {
                    e["action"] == "disconnect"
                        && e["write_bytes"].as_u64() == Some(1 << 20)
                        && e["read_bytes"].as_u64() == Some(1 << 20)
                })
            },
        );
    } else {
        eprintln!("qemu-io missing (apt-get install qemu-utils): connection events not checked");
    }
    let entries = c.meta.ctl_json(&["audit", "list"]);
    let entries = entries.as_array().expect("entries");
    for w in entries.windows(2) {
        assert_eq!(
            w[1]["prev_hash"], w[0]["hash"],
            "each entry carries the previous one's hash"
        );
    }
    let actors: Vec<&str> = entries.iter().filter_map(|e| e["actor"].as_str()).collect();
    assert!(
        actors.iter().any(|a| a.starts_with("berthctl:")),
        "{actors:?}"
    );
    let v = c.meta.ctl_json(&["audit", "verify"]);
    assert_eq!(v["intact"], true, "{v}");
    let head = v["head_seq"].as_u64().expect("head");
    assert!(head >= 4);

    // Tamper with entry 2 in the stored catalog while the service is stopped.
    c.meta.stop();
    {
        use berth_catalog::{CatalogStore, Table, Txn};
        let db = berth_catalog_rocksdb::RocksCatalog::open(&c.meta.dir.join("catalog"))
            .expect("open catalog");
        let key = berth_catalog::audit::key_of(2);
        let raw = db
            .get(Table::Audit, key.as_bytes())
            .expect("get")
            .expect("entry 2");
        let mut e: Value = serde_json::from_slice(&raw).expect("json");
        e["actor"] = Value::from("someone-else");
        db.commit(Txn::new().put(Table::Audit, key, serde_json::to_vec(&e).expect("json")))
            .expect("tamper");
    }
    c.meta.restart(None);
    let v = c.meta.ctl(&["audit", "verify"]);
    assert_eq!(v.code, 9, "verify must fail: {} {}", v.stdout, v.stderr);
    let j: Value = serde_json::from_str(&v.stdout).expect("json");
    assert_eq!(
        (j["intact"].as_bool(), j["first_bad_seq"].as_u64()),
        (Some(false), Some(2)),
        "{j}"
    );
    assert!(v.stderr.contains("entry 2 was altered"), "{}", v.stderr);

    // Removing an entry instead is named as a removal.
    c.meta.stop();
    {
        use berth_catalog::{CatalogStore, Table, Txn};
        let db = berth_catalog_rocksdb::RocksCatalog::open(&c.meta.dir.join("catalog"))
            .expect("open catalog");
        let k2 = berth_catalog::audit::key_of(2);
        let original = berth_catalog::audit::key_of(3);
        // Drop the altered entry 2 and entry 3 with it: the gap is found.
        db.commit(
            Txn::new()
                .delete(Table::Audit, k2)
                .delete(Table::Audit, original),
        )
        .expect("remove");
    }
    c.meta.restart(None);
    let v = c.meta.ctl(&["audit", "verify"]);
    assert_eq!(v.code, 9);
    assert!(
        v.stderr.contains("entries 2..3 were removed"),
        "{}",
        v.stderr
    );
}

#[test]
fn standalone_serves_a_data_folder_to_berthctl_and_survives_a_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path();
    let s = Standalone::start(dir, "1G");
    for key in ["metadata_socket", "control_socket", "nbd_socket", "nbd_tcp"] {
        assert!(
            s.ready[key].is_string(),
            "ready line lacks {key}: {}",
            s.ready
        );
    }
    // The node registered over the unix sockets, no flags needed (start
    // waited for it).
    s.ctl(&[
        "volume", "create", "db", "--size", "256M", "--tier", "premium",
    ]);
    let uri = s.ctl(&["volume", "export", "db"])["tcp_uri"]
        .as_str()
        .expect("uri")
        .to_string();
    if have("qemu-io") {
        let (ok, out) = qemu_io(&uri, &["write -P 0x42 0 1M".into(), "flush".into()]);
        assert!(ok, "{out}");
    }
    assert_eq!(s.stop().code(), Some(0), "clean shutdown");

    // Everything is there after a restart: catalog, attachment, data.
    let s = Standalone::start(dir, "1G");
    let v = s.ctl(&["volume", "get", "db"]);
    assert_eq!(
        (v["state"].as_str(), v["tier"].as_str()),
        (Some("ready"), Some("premium"))
    );
    let a = s.ctl(&["attachments", "--volume", "db"]);
    assert_eq!(a.as_array().map(Vec::len), Some(1));
    if have("qemu-io") {
        // The NBD port is new; the export name (and its token) is not.
        let uri = s.ctl(&["volume", "export", "db"])["tcp_uri"]
            .as_str()
            .expect("uri")
            .to_string();
        let (ok, out) = qemu_io(&uri, &["read -P 0x42 0 1M".into()]);
        assert!(ok, "{out}");
    }
    let verify = s.ctl(&["audit", "verify"]);
    assert_eq!(verify["intact"], true, "{verify}");
    assert_eq!(s.stop().code(), Some(0));
}
