//! Mutual TLS between the programs, and NBD's STARTTLS, with real binaries
//! and real clients: berthctl, the volume server's heartbeat, the metadata
//! service dialing volume servers, qemu-io and nbdinfo (GnuTLS).
//!
//! Certificates come from `berthctl tls generate`; a second, unrelated CA
//! plays the stranger.

use std::path::{Path, PathBuf};
use std::process::Command;

use berth_tests::meta::MetaProc;
use berth_tests::server::{binary, have, qemu_io, qemu_io_run, ServerProc};

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// `berthctl tls generate --out OUT CERTS...`.
fn generate(out: &Path, certs: &[&str]) {
    let o = Command::new(binary("berthctl"))
        .args(["tls", "generate", "--days", "2", "--out"])
        .arg(out)
        .args(certs)
        .output()
        .expect("run berthctl tls generate");
    assert!(
        o.status.success(),
        "berthctl tls generate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// berthctl with these arguments: (exit code, stdout, stderr).
fn berthctl(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(binary("berthctl"))
        .args(args)
        .output()
        .expect("run berthctl");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A metadata service on `pki/metadata` (its berthctl calls on
/// `pki/admin`) and a volume server n1 on `pki/volume` heartbeating to it,
/// up; each with its `extra` flags.
fn tls_cluster(
    root: &Path,
    pki: &Path,
    meta_extra: &[&str],
    node_extra: &[&str],
) -> (MetaProc, ServerProc) {
    let meta = MetaProc::start_tls(
        &root.join("meta"),
        &pki.join("metadata"),
        &pki.join("admin"),
        meta_extra,
    );
    let mut args: Vec<String> = [
        "--control-listen",
        "127.0.0.1:0",
        "--metadata",
        &meta.endpoint,
        "--node-name",
        "n1",
        "--tls-dir",
        &path(&pki.join("volume")),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(node_extra.iter().map(|s| s.to_string()));
    let node = ServerProc::start_with(&root.join("n1"), "256M", &args);
    meta.wait_node("n1", "up");
    (meta, node)
}

#[test]
fn programs_talk_over_mutual_tls_and_refuse_strangers() {
    let root = tempfile::tempdir().expect("tempdir");
    let pki = root.path().join("pki");
    let rogue = root.path().join("rogue");
    generate(
        &pki,
        &[
            "metadata=127.0.0.1,localhost",
            "volume=berth-volume-server,127.0.0.1",
            "admin",
        ],
    );
    generate(&rogue, &["admin"]);
    // The volume server heartbeats over TLS, and registers an https://
    // control endpoint that the metadata service dials with its certificate.
    let (meta, node) = tls_cluster(root.path(), &pki, &[], &[]);
    assert!(meta.endpoint.starts_with("https://"), "{}", meta.endpoint);
    let nodes = meta.ctl_json(&["nodes"]);
    assert!(
        nodes.to_string().contains("https://127.0.0.1:"),
        "the registered control endpoint is TLS: {nodes}"
    );
    // Through the metadata service to the volume server and back.
    meta.ctl_json(&["volume", "create", "db", "--size", "64M"]);
    meta.ctl_json(&["snapshot", "create", "db", "s1"]);
    assert_eq!(
        node.ctl_json(&["volume", "list"]).as_array().map(Vec::len),
        Some(1)
    );
    // The volume server's own TCP control API, with a client certificate.
    let ctl = format!("https://{}", node.ready.control_tcp);
    let admin = path(&pki.join("admin"));
    let (code, out, err) = berthctl(&[
        "--endpoint",
        &ctl,
        "--tls-dir",
        &admin,
        "-o",
        "json",
        "server",
        "volume",
        "list",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"db"), "{out}");

    // Strangers, each refused with the reason. An impostor
    // trusts the right CA but shows a certificate another CA signed: only
    // the server's check of client certificates stops it.
    let rogue_admin = path(&rogue.join("admin"));
    let impostor = impostor_dir(&pki, &rogue.join("admin"), &root.path().join("impostor"));
    let impostor = path(&impostor);
    let plain = meta.endpoint.replace("https", "http");
    for (what, endpoint, tls, expect) in [
        (
            "no certificate",
            meta.endpoint.as_str(),
            None,
            "give this program certificates",
        ),
        (
            "another CA's everything",
            meta.endpoint.as_str(),
            Some(rogue_admin.as_str()),
            "transport error|canceled",
        ),
        (
            "an impostor's certificate",
            meta.endpoint.as_str(),
            Some(impostor.as_str()),
            "transport error|canceled",
        ),
        (
            "an impostor's certificate (volume server)",
            ctl.as_str(),
            Some(impostor.as_str()),
            "transport error|canceled",
        ),
        (
            "plaintext to the TLS port",
            plain.as_str(),
            None,
            "transport error|canceled|protocol error",
        ),
        (
            "TLS client to an http:// endpoint",
            plain.as_str(),
            Some(admin.as_str()),
            "would be plaintext",
        ),
    ] {
        let mut args = vec!["--endpoint", endpoint];
        if let Some(t) = tls {
            args.extend(["--tls-dir", t]);
        }
        let (code, out, err) = berthctl(&[args.as_slice(), &["volume", "list"]].concat());
        // Refused at connect (7), or, under TLS 1.3 where the server checks
        // the client's certificate after the client's handshake is done, at
        // the first call (1).
        assert!(code == 7 || code == 1, "{what}: exit {code}: {out} {err}");
        assert!(expect.split('|').any(|e| err.contains(e)), "{what}: {err}");
        assert!(!out.contains("db"), "{what}: leaked {out}");
    }
    // A raw TLS client that trusts the CA but shows no certificate: the
    // handshake is refused before any gRPC byte.
    let o = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            meta.endpoint.trim_start_matches("https://"),
        ])
        .arg("-CAfile")
        .arg(pki.join("ca.crt"))
        .args(["-verify_return_error", "-quiet"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl (apt-get install openssl)");
    let text = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(
        text.contains("certificate required"),
        "a client without a certificate: {text}"
    );
    // The unix socket stays plaintext and needs no certificate.
    let sock = format!("unix://{}", meta.dir.join("meta.sock").display());
    let (code, out, err) = berthctl(&["--endpoint", &sock, "-o", "json", "volume", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"db\""), "{out}");
    // A folder with a missing key is refused at start, naming the file.
    let broken = root.path().join("broken");
    std::fs::create_dir_all(&broken).expect("mkdir");
    for f in ["tls.crt", "ca.crt"] {
        std::fs::copy(pki.join("admin").join(f), broken.join(f)).expect("copy");
    }
    let o = Command::new(binary("berth"))
        .args(["metadata", "--listen", "127.0.0.1:0", "--data"])
        .arg(root.path().join("m2"))
        .arg("--tls-dir")
        .arg(&broken)
        .output()
        .expect("run berth metadata");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tls.key"), "{err}");
}

/// Over TLS the certificate names the caller in both audit logs, before the
/// name it claims; and `--tls-allow` keeps each API to the certificates meant
/// to call it: the metadata service takes the volume servers' and the
/// admin's, a volume server only the metadata service's.
#[test]
fn certificates_name_callers_and_allow_lists_refuse_the_others() {
    let root = tempfile::tempdir().expect("tempdir");
    let pki = root.path().join("pki");
    generate(
        &pki,
        &[
            "metadata=127.0.0.1,localhost",
            "volume=berth-volume-server,127.0.0.1",
            "admin",
            "csi",
        ],
    );
    // Allowed: the volume server's heartbeat, the admin's call, and the
    // metadata service's call to the volume server that it makes.
    let (meta, node) = tls_cluster(
        root.path(),
        &pki,
        &["--tls-allow", "volume,admin"],
        &["--tls-allow", "metadata"],
    );
    meta.ctl_json(&["volume", "create", "db", "--size", "64M"]);

    // Who did it, in the metadata service's log: the admin's certificate,
    // then what berthctl claims (its user).
    let audit = meta.ctl_json(&["audit", "list", "--volume", "db"]);
    let actors: Vec<String> = audit
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| s(e, "actor"))
        .collect();
    assert!(
        actors.iter().any(|a| a.starts_with("[admin] berthctl:")),
        "{actors:?}"
    );
    // In the volume server's: the metadata service's certificate, acting
    // for the admin's.
    let ev = node.ctl_json(&["audit"]);
    let clients: Vec<String> = ev
        .as_array()
        .expect("events")
        .iter()
        .map(|e| s(e, "client"))
        .collect();
    assert!(
        clients
            .iter()
            .any(|c| c.starts_with("[metadata] berth-metadata:[admin] berthctl:")),
        "{clients:?}"
    );
    // A claim cannot pass for a certificate: the checked name comes first.
    let o = Command::new(binary("berthctl"))
        .args(["--endpoint", &meta.endpoint, "--tls-dir"])
        .arg(pki.join("admin"))
        .args(["snapshot", "create", "db", "s1"])
        .env("USER", "x [metadata] y")
        .output()
        .expect("run berthctl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let audit = meta.ctl_json(&["audit", "list", "--volume", "db"]);
    assert!(
        audit.as_array().expect("entries").iter().any(|e| {
            s(e, "action") == "CreateSnapshot" && s(e, "actor") == "[admin] berthctl:x [metadata] y"
        }),
        "{audit}"
    );

    // Refused: the CSI driver's certificate at a metadata service that
    // does not list it, and the admin's at the volume server, which only
    // takes the metadata service's. Both are certificates the CA signed.
    let ctl = format!("https://{}", node.ready.control_tcp);
    for (what, endpoint, cert, call) in [
        (
            "csi at metadata",
            meta.endpoint.as_str(),
            "csi",
            ["volume", "create", "x", "--size", "64M"].as_slice(),
        ),
        (
            "admin at the volume server",
            ctl.as_str(),
            "admin",
            ["server", "volume", "delete", "db"].as_slice(),
        ),
        (
            "csi at the volume server",
            ctl.as_str(),
            "csi",
            ["server", "volume", "list"].as_slice(),
        ),
    ] {
        let c = path(&pki.join(cert));
        let (code, out, err) =
            berthctl(&[&["--endpoint", endpoint, "--tls-dir", &c], call].concat());
        assert_eq!(code, 10, "{what}: exit {code}: {out} {err}");
        assert!(
            err.contains(&format!("certificate \"{cert}\" may not call this server")),
            "{what}: {err}"
        );
    }
    // Nothing the refused calls asked for happened.
    let vols = meta.ctl_json(&["volume", "list"]);
    let names: Vec<String> = vols
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| s(v, "id"))
        .collect();
    assert_eq!(names, ["db"], "{vols}");
    assert_eq!(
        node.ctl_json(&["volume", "list"]).as_array().map(Vec::len),
        Some(1),
        "db is still on the volume server"
    );
    // The unix socket is local: no certificate, no list.
    let (code, _, err) = berthctl(&[
        "--data",
        &path(&root.path().join("n1")),
        "server",
        "volume",
        "list",
    ]);
    assert_eq!(code, 0, "{err}");

    // Bad lists stop the server at start, with the reason.
    for (args, expect) in [
        (vec!["--tls-allow", "has space"], "not a certificate name"),
        (vec!["--tls-allow", "a*b"], "not a certificate name"),
        (vec!["--tls-allow", ","], "names no certificate"),
    ] {
        let o = Command::new(binary("berth"))
            .args(["metadata", "--listen", "127.0.0.1:0", "--data"])
            .arg(root.path().join("m2"))
            .arg("--tls-dir")
            .arg(pki.join("metadata"))
            .args(&args)
            .output()
            .expect("run berth metadata");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    let o = Command::new(binary("berth"))
        .args(["volume-server", "--pool-size", "64M", "--data"])
        .arg(root.path().join("n2"))
        .args(["--tls-allow", "metadata"])
        .output()
        .expect("run berth volume-server");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("needs certificates (--tls-dir)"),
        "{err}"
    );
}

/// A folder with the real CA and `from`'s certificate and key (signed by
/// another CA): it passes the client's own checks, and only the server's
/// check of client certificates refuses it.
fn impostor_dir(pki: &Path, from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::copy(pki.join("ca.crt"), to.join("ca.crt")).expect("copy");
    for f in ["tls.crt", "tls.key"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
    to.to_path_buf()
}

/// A qemu/libnbd certificate folder (ca-cert.pem, client-cert.pem,
/// client-key.pem) from one of `berthctl tls generate`'s.
fn gnutls_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).expect("mkdir");
    for (a, b) in [
        ("ca.crt", "ca-cert.pem"),
        ("tls.crt", "client-cert.pem"),
        ("tls.key", "client-key.pem"),
    ] {
        std::fs::copy(from.join(a), to.join(b)).expect("copy");
    }
    to.to_path_buf()
}

/// qemu-io over NBD with TLS (`tls-creds-x509`), on an --image-opts target.
fn qemu_io_tls(creds: &Path, host_port: &str, export: &str, cmds: &[&str]) -> (bool, String) {
    let (host, port) = host_port.rsplit_once(':').expect("host:port");
    let mut c = Command::new("qemu-io");
    c.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        creds.display()
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg("--image-opts").arg(format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0"
    ));
    qemu_io_run(c)
}

/// `nbdinfo --size` on the export's `nbds://` URI with the GnuTLS folder
/// `creds` (libnbd verifies the server and presents the client certificate).
fn nbdinfo_tls(creds: &Path, host_port: &str, export: &str) -> std::process::Output {
    Command::new("nbdinfo")
        .arg("--size")
        .arg(format!(
            "nbds://{host_port}/{export}?tls-certificates={}",
            creds.display()
        ))
        .output()
        .expect("run nbdinfo")
}

#[test]
fn nbd_starttls_with_qemu_io_and_nbdinfo() {
    for tool in ["qemu-io", "nbdinfo"] {
        assert!(have(tool), "{tool} is needed (qemu-utils, libnbd-bin)");
    }
    let root = tempfile::tempdir().expect("tempdir");
    let pki = root.path().join("pki");
    let rogue = root.path().join("rogue");
    generate(
        &pki,
        &["volume=berth-volume-server,127.0.0.1,localhost", "client"],
    );
    generate(&rogue, &["client"]);
    let srv = ServerProc::start_with(
        &root.path().join("n"),
        "256M",
        &["--tls-dir".into(), path(&pki.join("volume"))],
    );
    let x = srv.volume_export("v", "64M", "node-b");
    let uri = s(&x, "tcp_uri");
    let rest = uri.trim_start_matches("nbd://");
    let (host_port, export) = rest.split_once('/').expect("nbd://HOST:PORT/EXPORT");
    let creds = gnutls_dir(&pki.join("client"), &root.path().join("qemu"));

    let (ok, out) = qemu_io_tls(
        &creds,
        host_port,
        export,
        &["write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M"],
    );
    assert!(ok, "qemu-io over TLS:\n{out}");
    // nbdinfo (libnbd, GnuTLS) on the nbds:// URI, verifying the server.
    let o = nbdinfo_tls(&creds, host_port, export);
    assert!(
        o.status.success(),
        "nbdinfo over TLS: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "67108864");

    // Without TLS the server answers only "TLS required", and no data moves.
    let (ok, out) = qemu_io(&uri, &["read -P 0x5a 0 4k".into()]);
    assert!(!ok, "plaintext over TCP was served:\n{out}");
    assert!(out.to_lowercase().contains("tls"), "{out}");
    // The server refuses a client certificate another CA signed, and a
    // client that shows none (both trust the right CA, so only the server's
    // check stops them).
    let impostor = impostor_dir(&pki, &rogue.join("client"), &root.path().join("impostor"));
    let impostor = gnutls_dir(&impostor, &root.path().join("impostor-gnutls"));
    // (nbdinfo: qemu checks its own certificate against the CA and would
    // refuse to present this one at all.)
    let o = nbdinfo_tls(&impostor, host_port, export);
    assert!(
        !o.status.success(),
        "an impostor's certificate was served: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let nocert = root.path().join("nocert");
    std::fs::create_dir_all(&nocert).expect("mkdir");
    std::fs::copy(pki.join("ca.crt"), nocert.join("ca-cert.pem")).expect("copy");
    let (ok, out) = qemu_io_tls(&nocert, host_port, export, &["read -P 0x5a 0 4k"]);
    assert!(!ok, "a client without a certificate was served:\n{out}");
    // The unix socket is local and stays plaintext.
    let (ok, out) = qemu_io(&s(&x, "unix_uri"), &["read -P 0x5a 0 1M".into()]);
    assert!(ok, "unix socket:\n{out}");
    // Berth's own client, `berth attach` (what the node plugin runs for a
    // volume on another node): STARTTLS with the node's certificate.
    let attached = attach_over_tls(root.path(), &uri, &pki.join("client"));
    // The audit log tells encrypted connections apart.
    let ev = srv.ctl_json(&["audit", "--target", "v"]);
    let connects: Vec<&serde_json::Value> = ev
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["action"] == "connect")
        .collect();
    let tls = connects
        .iter()
        .filter(|e| e["detail"].as_str().unwrap_or_default().ends_with(", tls"))
        .count();
    let expected = 2 + usize::from(attached);
    assert_eq!(
        tls, expected,
        "qemu-io's, nbdinfo's (and berth attach's): {ev}"
    );
    assert_eq!(connects.len(), expected + 1, "and the unix one: {ev}");
}

/// `berth attach` on the TCP URI with certificates: the export appears as
/// DIR/disk holding what qemu-io wrote; without certificates the server
/// refuses it. False (and a SKIP line) where the kernel has no FUSE.
fn attach_over_tls(root: &Path, uri: &str, client: &Path) -> bool {
    if let Err(why) = berth_tests::csi::node_support() {
        eprintln!("SKIP berth attach over TLS: {why}");
        return false;
    }
    let dir = root.join("attached");
    let run = |tls: Option<&Path>| {
        let mut c = Command::new(binary("berth"));
        c.arg("attach")
            .arg(&dir)
            .args(["--reconnect-timeout", "2"])
            .env("BERTH_ATTACH_URI", uri)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(t) = tls {
            c.env("BERTH_TLS_DIR", t);
        }
        c.spawn().expect("spawn berth attach")
    };
    // Without certificates: refused at the handshake, and it says why.
    let o = run(None).wait_with_output().expect("berth attach");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("STARTTLS"), "{err}");
    let mut child = run(Some(client));
    let disk = dir.join("disk");
    berth_tests::meta::wait_for(
        "the attached disk",
        std::time::Duration::from_secs(10),
        || std::fs::metadata(&disk).is_ok_and(|m| m.len() == 64 << 20),
    );
    let mut head = vec![0u8; 1 << 20];
    {
        use std::io::Read;
        std::fs::File::open(&disk)
            .and_then(|mut f| f.read_exact(&mut head))
            .expect("read the attached disk");
    }
    assert!(head.iter().all(|&b| b == 0x5a), "the data qemu-io wrote");
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&dir)
        .status()
        .expect("fusermount3");
    assert!(st.success(), "unmount");
    let st = child.wait().expect("wait");
    assert!(st.success(), "berth attach exits cleanly after the unmount");
    true
}

/// STARTTLS's rules on the wire, with Berth's own NBD client functions:
/// before TLS every option but STARTTLS and ABORT gets ERR_TLS_REQD (LIST and
/// GO included: no export name crosses in the clear), STARTTLS with data is
/// invalid, EXPORT_NAME closes the connection; after TLS the options are
/// served and a second STARTTLS is invalid. With --nbd-tls-optional a
/// plaintext client is served too.
#[test]
fn starttls_rules_on_the_wire() {
    use berth_volume::nbd::client::{greet, option, send_option, ClientError};
    use berth_volume::nbd::proto::*;
    use tokio::io::AsyncReadExt;
    let root = tempfile::tempdir().expect("tempdir");
    let pki = root.path().join("pki");
    generate(&pki, &["volume=berth-volume-server,127.0.0.1", "client"]);
    let srv = ServerProc::start_with(
        &root.path().join("n"),
        "256M",
        &["--tls-dir".into(), path(&pki.join("volume"))],
    );
    let x = srv.volume_export("v", "64M", "node-b");
    let export = s(&x, "export_name");
    let addr = srv.ready.nbd_tcp.clone();
    let refused_with = |r: Result<Vec<(u32, Vec<u8>)>, ClientError>| match r {
        Err(ClientError::Refused { reply, .. }) => reply,
        other => panic!("not refused: {other:?}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut c = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
        greet(&mut c).await.expect("greeting");
        let mut go = (export.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        for (opt, data) in [
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (OPT_LIST, Vec::new()),
            (OPT_GO, go.clone()),
            (OPT_INFO, go.clone()),
        ] {
            assert_eq!(
                refused_with(option(&mut c, opt, &data).await),
                REP_ERR_TLS_REQD,
                "option {opt} before STARTTLS"
            );
        }
        assert_eq!(
            refused_with(option(&mut c, OPT_STARTTLS, b"x").await),
            REP_ERR_INVALID,
            "STARTTLS with data"
        );
        // EXPORT_NAME has no refusal but closing.
        send_option(&mut c, OPT_EXPORT_NAME, export.as_bytes())
            .await
            .expect("send");
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.expect("read"), 0, "closed");

        // The same connection upgraded: options are served, STARTTLS again is invalid.
        let mut c = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
        greet(&mut c).await.expect("greeting");
        option(&mut c, OPT_STARTTLS, &[])
            .await
            .expect("STARTTLS acknowledged");
        let cfg = berth_proto::TlsDir::load(pki.join("client"))
            .expect("client certificates")
            .rustls_client()
            .expect("client config");
        let name = rustls_pki_types::ServerName::try_from("berth-volume-server").expect("name");
        let mut t = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, c)
            .await
            .expect("TLS handshake");
        option(&mut t, OPT_STRUCTURED_REPLY, &[])
            .await
            .expect("served after TLS");
        assert_eq!(
            refused_with(option(&mut t, OPT_STARTTLS, &[]).await),
            REP_ERR_INVALID,
            "STARTTLS twice"
        );
        let infos = option(&mut t, OPT_INFO, &go).await.expect("INFO after TLS");
        assert!(infos.iter().any(|(r, _)| *r == REP_INFO), "{infos:?}");
    });
    drop(srv);

    // Optional: plaintext and TLS clients are both served.
    let srv = ServerProc::start_with(
        &root.path().join("o"),
        "256M",
        &[
            "--tls-dir".into(),
            path(&pki.join("volume")),
            "--nbd-tls-optional".into(),
        ],
    );
    let x = srv.volume_export("v", "64M", "node-b");
    let uri = s(&x, "tcp_uri");
    let (ok, out) = qemu_io(
        &uri,
        &["write -P 0x61 0 64k".into(), "read -P 0x61 0 64k".into()],
    );
    assert!(ok, "plaintext with TLS optional:\n{out}");
    let creds = gnutls_dir(&pki.join("client"), &root.path().join("qemu"));
    let rest = uri.trim_start_matches("nbd://");
    let (host_port, export) = rest.split_once('/').expect("nbd://HOST:PORT/EXPORT");
    let (ok, out) = qemu_io_tls(&creds, host_port, export, &["read -P 0x61 0 64k"]);
    assert!(ok, "TLS with TLS optional:\n{out}");
}
