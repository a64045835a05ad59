//! The volume server in-process: NBD semantics over both listeners, grants,
//! refusals, malformed input, QoS, revoke, shutdown and restart.

#![allow(clippy::unwrap_used)]

mod common;

use berth_proto::volume::v1 as pb;
use berth_volume::nbd::client::{self, Client, ClientError};
use berth_volume::nbd::proto::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_trims_zeroes_and_block_status_over_unix_and_tcp() {
    let mut f = start().await;
    f.volume("vol", 64 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "vol", "node-a").await;
    assert!(e.export_name.starts_with("vol@") && e.export_name.len() == 4 + 32);
    assert!(e.unix_uri.starts_with("nbd+unix:///vol@"), "{}", e.unix_uri);
    assert!(e.tcp_uri.starts_with("nbd://127.0.0.1:"), "{}", e.tcp_uri);

    let mut a = f.unix(&e.export_name).await;
    let mut b = f.tcp(&e.export_name).await;
    assert_eq!(a.size_bytes, 64 * MIB);
    assert_eq!(a.flags & TF_READ_ONLY, 0);
    assert_ne!(a.flags & TF_CAN_MULTI_CONN, 0);

    // Unwritten space is one hole that reads as zeros.
    assert_eq!(
        a.block_status(0, 64 << 20).await.unwrap(),
        vec![(64 << 20, STATE_HOLE | STATE_ZERO)]
    );
    let p = pattern(7, 1 << 20);
    a.write(4 * MIB, &p, false).await.unwrap();
    a.flush().await.unwrap();
    // Written on one connection, visible on the other (multi-conn).
    assert_eq!(b.read(4 * MIB, 1 << 20).await.unwrap(), p);
    // Unaligned read-modify-write.
    b.write(4 * MIB + 100, b"hello", true).await.unwrap();
    let r = a.read(4 * MIB, 4096).await.unwrap();
    assert_eq!(&r[100..105], b"hello");
    assert_eq!(&r[..100], &p[..100]);
    assert_eq!(
        a.block_status(0, 64 << 20).await.unwrap(),
        vec![
            (4 << 20, STATE_HOLE | STATE_ZERO),
            (1 << 20, 0),
            (59 << 20, STATE_HOLE | STATE_ZERO)
        ]
    );
    // REQ_ONE: exactly one extent, not longer than asked.
    let h = a
        .send(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4 * MIB, 8192, &[])
        .await
        .unwrap();
    let r = a.recv().await.unwrap();
    assert_eq!(
        (r.handle, r.error, r.extents.clone()),
        (h, 0, vec![(8192, 0)])
    );

    a.trim(4 * MIB, 1 << 19).await.unwrap();
    a.write_zeroes(4 * MIB + (1 << 19), 4096).await.unwrap();
    let r = b.read(4 * MIB, 1 << 20).await.unwrap();
    assert!(r[..(1 << 19) + 4096].iter().all(|&x| x == 0));
    assert_eq!(&r[(1 << 19) + 4096..], &p[(1 << 19) + 4096..]);

    // Past the end: ENOSPC for writes and zeroing, EINVAL for reads and trims.
    assert!(matches!(
        a.write(64 * MIB - 10, &[1; 20], false).await,
        Err(ClientError::Errno(ENOSPC))
    ));
    assert!(matches!(
        a.write_zeroes(64 * MIB, 4096).await,
        Err(ClientError::Errno(ENOSPC))
    ));
    assert!(matches!(
        a.read(64 * MIB, 4096).await,
        Err(ClientError::Errno(EINVAL))
    ));
    assert!(matches!(
        a.trim(64 * MIB, 4096).await,
        Err(ClientError::Errno(EINVAL))
    ));
    // Unknown command and a flag not valid for the command: EINVAL, connection lives.
    a.send(5, 0, 0, 4096, &[]).await.unwrap();
    assert_eq!(a.recv().await.unwrap().error, EINVAL);
    a.send(CMD_READ, CMD_FLAG_NO_HOLE, 0, 4096, &[])
        .await
        .unwrap();
    assert_eq!(a.recv().await.unwrap().error, EINVAL);
    // Zero-length requests succeed; a READ still gets a structured reply.
    a.send(CMD_READ, 0, 0, 0, &[]).await.unwrap();
    let r = a.recv().await.unwrap();
    assert!(r.structured && r.error == 0 && r.data.is_empty(), "{r:?}");

    // Many requests in flight, answered (possibly out of order) by handle.
    let mut sent = std::collections::HashMap::new();
    for i in 0..64u64 {
        let d = pattern(i as u8, 8192);
        let h = a.send(CMD_WRITE, 0, i * 8192, 8192, &d).await.unwrap();
        sent.insert(h, ());
    }
    for _ in 0..64 {
        let r = a.recv().await.unwrap();
        assert_eq!(r.error, 0);
        assert!(sent.remove(&r.handle).is_some());
    }
    let mut want = std::collections::HashMap::new();
    for i in 0..64u64 {
        let h = a.send(CMD_READ, 0, i * 8192, 8192, &[]).await.unwrap();
        want.insert(h, pattern(i as u8, 8192));
    }
    for _ in 0..64 {
        let r = a.recv().await.unwrap();
        assert_eq!(Some(&r.data), want.get(&r.handle));
        want.remove(&r.handle);
    }
    // Hundreds of small reads at once: reply batches larger than one writev's
    // worth of I/O vectors are sent in pieces, in order, nothing lost.
    let mut want = std::collections::HashMap::new();
    for i in 0..300u64 {
        let h = a.send(CMD_READ, 0, i * 512, 512, &[]).await.unwrap();
        want.insert(h, i);
    }
    let all = pattern_blocks(64, 8192);
    for _ in 0..300 {
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), a.recv())
            .await
            .expect("every reply arrives")
            .unwrap();
        let i = want.remove(&r.handle).expect("a reply per request") as usize;
        assert_eq!(r.data, all[i * 512..(i + 1) * 512]);
    }
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();

    // Metrics show the traffic per volume.
    let m = http_get(f.bound().metrics.unwrap(), "/metrics").await;
    assert!(
        m.contains("berth_volume_requests_total{op=\"write\",volume=\"vol\"}"),
        "{m}"
    );
    let gauge = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no gauge {name}: {m}"))
    };
    let cap = gauge("berth_pool_capacity_bytes");
    assert_eq!(cap, 256 << 20, "the pool holds the size asked for");
    // The reads above found the blocks the writes had mapped in the cache.
    let (entries, capacity) = (
        gauge("berth_map_cache_entries"),
        gauge("berth_map_cache_capacity_entries"),
    );
    assert!(
        entries > 0 && entries <= capacity,
        "{entries} of {capacity}"
    );
    assert!(gauge("berth_map_cache_hits") > 0, "{m}");
    f.stop().await;
}

/// Replies that back up in the socket arrive whole, once each and in frame.
/// Small replies are sent by the store's I/O thread itself while the wire is
/// free; a client that sends many requests before reading any replies fills
/// the socket, so sends are cut short and the writer task finishes them, with
/// replies of three kinds interleaved: 64 KiB reads, 4 KiB writes, and 256
/// KiB reads (which only the writer sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_back_up_in_the_socket_arrive_whole_over_unix_and_tcp() {
    let mut f = start().await;
    f.volume("v", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "v", "n").await;
    let data = pattern_blocks(16 * MIB / CHUNK, CHUNK as usize);
    let mut w = f.unix(&e.export_name).await;
    for (i, part) in data.chunks(MIB as usize).enumerate() {
        w.write(i as u64 * MIB, part, false).await.unwrap();
    }
    w.disconnect().await.unwrap();
    let node = f.node().clone();
    for tcp in [false, true] {
        if tcp {
            backed_up_replies(f.tcp(&e.export_name).await, &data).await;
        } else {
            backed_up_replies(f.unix(&e.export_name).await, &data).await;
        }
        // Every reply's payload budget came back, a half-sent one's too.
        let t = std::time::Instant::now();
        while node.budget.held_bytes() > 0 && t.elapsed() < std::time::Duration::from_secs(5) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(node.budget.held_bytes(), 0, "tcp: {tcp}");
    }
    f.stop().await;
}

const CHUNK: u64 = 64 << 10;

async fn backed_up_replies<S>(mut c: Client<S>, data: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut want = std::collections::HashMap::new();
    for k in 0..300u64 {
        // Scattered offsets, each request within the volume.
        let at = (k * 37 % 256) * CHUNK;
        let (h, w) = match k % 10 {
            // A rewrite of what is there: the reads stay predictable.
            3 | 7 => {
                let at = at + 4096 * (k % 16);
                let d = &data[at as usize..at as usize + 4096];
                (c.send(CMD_WRITE, 0, at, 4096, d).await, None)
            }
            5 => {
                let at = at.min(16 * MIB - 4 * CHUNK);
                let len = 4 * CHUNK as u32;
                (
                    c.send(CMD_READ, 0, at, len, &[]).await,
                    Some((at, 4 * CHUNK)),
                )
            }
            _ => (
                c.send(CMD_READ, 0, at, CHUNK as u32, &[]).await,
                Some((at, CHUNK)),
            ),
        };
        want.insert(h.unwrap(), w);
    }
    // Let the replies pile up against the unread socket.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..want.len() {
        let r = c.recv().await.unwrap();
        assert_eq!(r.error, 0, "handle {}", r.handle);
        let Some(w) = want.remove(&r.handle) else {
            panic!("a reply for handle {} not asked for, or twice", r.handle)
        };
        match w {
            None => assert!(r.data.is_empty()),
            Some((at, len)) => assert!(
                r.data == data[at as usize..(at + len) as usize],
                "handle {}: {} bytes at {at} differ",
                r.handle,
                r.data.len()
            ),
        }
    }
    assert!(want.is_empty());
    // Still in frame: a plain call works.
    assert_eq!(
        c.read(CHUNK, 4096).await.unwrap(),
        data[CHUNK as usize..][..4096]
    );
    c.disconnect().await.unwrap();
}

/// What the 64 writes of 8 KiB above left in the first 512 KiB.
fn pattern_blocks(n: u64, each: usize) -> Vec<u8> {
    (0..n).flat_map(|i| pattern(i as u8, each)).collect()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_export_read_only_and_clones_are_independent() {
    let mut f = start().await;
    f.volume("src", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "src", "n").await;
    let mut c = f.unix(&e.export_name).await;
    c.write(0, &pattern(1, 65536), true).await.unwrap();
    f.api
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: "src".into(),
            name: "s1".into(),
        })
        .await
        .unwrap();
    c.write(0, &pattern(2, 65536), true).await.unwrap();
    let se = f.grant(pb::TargetKind::Snapshot, "s1", "n").await;
    assert!(se.read_only);
    let mut s = f.tcp(&se.export_name).await;
    assert_ne!(s.flags & TF_READ_ONLY, 0);
    assert_eq!(s.read(0, 65536).await.unwrap(), pattern(1, 65536));
    assert!(matches!(
        s.write(0, &[1; 512], false).await,
        Err(ClientError::Errno(EPERM))
    ));
    assert!(matches!(
        s.trim(0, 4096).await,
        Err(ClientError::Errno(EPERM))
    ));
    // Clone from the snapshot and from the live volume.
    use pb::clone_volume_request::Source;
    for (name, src, want) in [
        ("c1", Source::Snapshot("s1".into()), 1),
        ("c2", Source::Volume("src".into()), 2),
    ] {
        f.api
            .clone_volume(pb::CloneVolumeRequest {
                name: name.into(),
                source: Some(src),
                size_bytes: 0,
                tier: "premium".into(),
                overrides: None,
            })
            .await
            .unwrap();
        let ce = f.grant(pb::TargetKind::Volume, name, "n").await;
        let mut cc = f.unix(&ce.export_name).await;
        assert_eq!(cc.read(0, 65536).await.unwrap(), pattern(want, 65536));
        cc.write(0, &pattern(9, 4096), false).await.unwrap();
    }
    assert_eq!(c.read(0, 65536).await.unwrap(), pattern(2, 65536));
    // A volume in use cannot be deleted; revoke closes the connection.
    let err = f
        .api
        .delete_volume(pb::DeleteVolumeRequest { name: "src".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let r = f
        .api
        .revoke_export(pb::RevokeExportRequest {
            export_name: e.export_name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.closed_connections, 1);
    let gone = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(0, 4096))
        .await
        .unwrap();
    assert!(gone.is_err(), "a revoked connection must be closed");
    // The old export name no longer works.
    let s = tokio::net::UnixStream::connect(&f.bound().nbd_socket)
        .await
        .unwrap();
    assert!(matches!(
        Client::connect(s, &e.export_name).await,
        Err(ClientError::Refused {
            reply: REP_ERR_UNKNOWN,
            ..
        })
    ));
    f.api
        .delete_volume(pb::DeleteVolumeRequest { name: "src".into() })
        .await
        .unwrap();
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ungranted_clients_are_refused_and_audited() {
    let mut f = start().await;
    f.volume("secret", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "secret", "node-a").await;
    let addr = f.bound().nbd_tcp.unwrap();
    let sock = || async move { tokio::net::TcpStream::connect(addr).await.unwrap() };
    // No token, a wrong token, a right token under another name.
    for bad in [
        "secret".to_string(),
        "secret@00000000000000000000000000000000".into(),
        e.export_name.replace("secret@", "other@"),
    ] {
        let r = Client::connect(sock().await, &bad).await;
        assert!(
            matches!(
                r,
                Err(ClientError::Refused {
                    reply: REP_ERR_UNKNOWN,
                    ..
                })
            ),
            "{bad}: {r:?}"
        );
    }
    // EXPORT_NAME with a bad name: the connection is closed (the only refusal it has).
    let mut s = sock().await;
    client::greet(&mut s).await.unwrap();
    client::send_option(&mut s, OPT_EXPORT_NAME, b"secret@nope")
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(s.read_exact(&mut buf).await.is_err());
    // A grant bound to another peer address: ERR_POLICY over TCP.
    let bound = f
        .api
        .grant_export(pb::GrantExportRequest {
            kind: pb::TargetKind::Volume as i32,
            name: "secret".into(),
            client: "node-b".into(),
            read_only: true,
            peer_address: "10.9.9.9".into(),
            generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = Client::connect(sock().await, &bound.export_name).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Refused {
                reply: REP_ERR_POLICY,
                ..
            })
        ),
        "{r:?}"
    );
    // LIST: refused over TCP (names are secrets), answered on the unix socket.
    let mut s = sock().await;
    client::greet(&mut s).await.unwrap();
    assert!(matches!(
        client::option(&mut s, OPT_LIST, &[]).await,
        Err(ClientError::Refused {
            reply: REP_ERR_POLICY,
            ..
        })
    ));
    let mut u = tokio::net::UnixStream::connect(&f.bound().nbd_socket)
        .await
        .unwrap();
    client::greet(&mut u).await.unwrap();
    let list = client::option(&mut u, OPT_LIST, &[]).await.unwrap();
    assert_eq!(list.len(), 2);
    // The right name works.
    f.tcp(&e.export_name).await.disconnect().await.unwrap();
    // The connection's audit event is written on the connection's own thread
    // before it serves any request, but the client may be gone by then: wait
    // for it rather than race it.
    let t = std::time::Instant::now();
    let ev = loop {
        let ev = f
            .api
            .list_audit_events(pb::ListAuditEventsRequest {
                target: "secret".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let connected = ev
            .iter()
            .any(|e| e.action == "connect" && e.client == "node-a");
        if connected || t.elapsed() > std::time::Duration::from_secs(10) {
            break ev;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // This peer's first refusal is audited as it happens; the others of its
    // 10 s window are summed into one entry, written at the latest at stop.
    let refused = ev.iter().filter(|e| e.action == "refused").count();
    assert!(refused >= 1, "refusals audited: {ev:?}");
    assert!(ev
        .iter()
        .any(|e| e.action == "connect" && e.client == "node-a"));
    assert!(ev.iter().any(|e| e.action == "GrantExport"));
    f.stop().await;
    let (entries, total) = refusals_in_audit_log(f.dir.path());
    assert!(entries <= 4, "{entries} entries");
    assert!(total >= 5, "every refusal is counted: {total}");
}

/// Raw byte sequences a hostile or broken client might send.
fn malformed_inputs() -> Vec<(&'static str, Vec<u8>, bool)> {
    let opt = |o: u32, len: u32, data: &[u8]| {
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        b
    };
    vec![
        (
            "unknown client flags",
            0xffff_ffffu32.to_be_bytes().to_vec(),
            true,
        ),
        (
            "bad option magic",
            {
                let mut b = opt(OPT_GO, 0, &[]);
                b[4] ^= 0xff;
                b
            },
            true,
        ),
        ("4 GiB option", opt(OPT_GO, u32::MAX, &[]), true),
        (
            "GO with name longer than the option",
            opt(OPT_GO, 6, &[0, 0, 0, 200, 0, 0]),
            false,
        ),
        (
            "meta context query past the end",
            opt(
                OPT_SET_META_CONTEXT,
                12,
                &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0],
            ),
            false,
        ),
        ("unknown option", opt(77, 3, b"abc"), false),
        ("LIST with data", opt(OPT_LIST, 2, b"xx"), false),
        ("truncated option", opt(OPT_GO, 100, b"short"), true),
        ("truncated greeting reply", vec![0, 0], true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_or_a_closed_connection_and_the_server_keeps_serving() {
    let mut f = start().await;
    f.volume("v", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "v", "n").await;
    let mut good = f.tcp(&e.export_name).await;
    good.write(0, &pattern(3, 8192), false).await.unwrap();
    let addr = f.bound().nbd_tcp.unwrap();

    for (what, bytes, closes) in malformed_inputs() {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if closes {
            let _ = s.shutdown().await;
        }
        let mut buf = Vec::new();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            if closes {
                s.read_to_end(&mut buf).await.map(|_| ())
            } else {
                // An option error reply, and the connection stays open.
                let mut h = [0u8; 20];
                s.read_exact(&mut h).await?;
                let reply = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
                assert!(reply & (1 << 31) != 0, "{what}: reply {reply:#x}");
                Ok(())
            }
        })
        .await;
        assert!(r.is_ok(), "{what}: server did not answer or close");
    }

    // After GO: bad request magic, an oversized write, a vanished client.
    let transmission = |mutate: fn(&mut Vec<u8>)| {
        let name = e.export_name.clone();
        async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let c = Client::connect(s, &name).await.unwrap();
            let mut s = c.into_inner();
            let mut req = encode_request(&Request {
                flags: 0,
                command: CMD_WRITE,
                handle: 1,
                offset: 0,
                len: 4096,
            })
            .to_vec();
            mutate(&mut req);
            s.write_all(&req).await.unwrap();
            // Half-close: a client that vanished mid-frame.
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
                .await
                .expect("connection closed")
                .ok();
        }
    };
    transmission(|r| r[0] = 0).await; // bad magic
    transmission(|r| r[24..28].copy_from_slice(&u32::MAX.to_be_bytes())).await; // 4 GiB write
    transmission(|r| r.truncate(10)).await; // truncated header, then gone
    transmission(|r| r.extend_from_slice(&[1; 100])).await; // payload cut short, then gone

    // A read in the store when the next frame is bad: it is answered, then
    // the connection closes (that answer, sent by the store's own thread,
    // may be the last thing the connection waits for). Several times: the
    // two can finish in either order.
    for _ in 0..20 {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut s = Client::connect(s, &e.export_name)
            .await
            .unwrap()
            .into_inner();
        let mut bytes = encode_request(&Request {
            flags: 0,
            command: CMD_READ,
            handle: 7,
            offset: 0,
            len: 4096,
        })
        .to_vec();
        let mut bad = bytes.clone();
        bad[0] = 0;
        bytes.extend_from_slice(&bad);
        s.write_all(&bytes).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("the connection closes once the read is answered")
            .unwrap();
        // One structured chunk: its header, the offset, the data.
        assert_eq!(rest.len(), 20 + 8 + 4096);
        assert_eq!(&rest[28..], &pattern(3, 8192)[..4096]);
    }

    // The long-lived good connection never noticed.
    assert_eq!(good.read(0, 8192).await.unwrap(), pattern(3, 8192));
    good.disconnect().await.unwrap();
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_limits_hold_the_rate_and_change_live() {
    let mut f = start().await;
    f.volume("q", 16 * MIB).await;
    f.api
        .set_qos(pb::SetQosRequest {
            volume: "q".into(),
            tier: "standard".into(),
            overrides: Some(pb::QosOverrides {
                iops_limit: Some(100),
                bytes_per_second_limit: Some(0),
                burst_seconds: Some(0.1),
            }),
            clear_overrides: false,
        })
        .await
        .unwrap();
    let e = f.grant(pb::TargetKind::Volume, "q", "n").await;
    let mut c = f.unix(&e.export_name).await;
    let t = std::time::Instant::now();
    for i in 0..60 {
        c.read(i * 4096, 4096).await.unwrap();
    }
    // 10 from the burst, 50 at 100/s: at least ~0.5 s (a lower bound only).
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let v = f
        .api
        .set_qos(pb::SetQosRequest {
            volume: "q".into(),
            tier: "extreme".into(),
            overrides: None,
            clear_overrides: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.qos.as_ref().unwrap().iops_limit, 0);
    let stats = f.api.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    let q = stats.volume_stats.iter().find(|s| s.name == "q").unwrap();
    assert!(q.throttled_micros > 300_000, "{q:?}");
    assert_eq!(q.read_ops, 60);
    let bad = f
        .api
        .set_qos(pb::SetQosRequest {
            volume: "q".into(),
            tier: "platinum".into(),
            overrides: None,
            clear_overrides: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("standard, premium, extreme"),
        "{}",
        bad.message()
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_errors_carry_the_right_codes_and_calls_are_idempotent() {
    let mut f = start().await;
    let v = f.volume("a", 16 * MIB).await;
    assert_eq!(f.volume("a", 16 * MIB).await.size_bytes, v.size_bytes);
    let api = &mut f.api;
    let create = |name: &str, size: u64, tier: &str| pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        tier: tier.into(),
        overrides: None,
    };
    let code = |r: Result<tonic::Response<pb::Volume>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(api.create_volume(create("a", 32 * MIB, "extreme")).await),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(api.create_volume(create("a", 16 * MIB, "premium")).await),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(api.create_volume(create("", 16 * MIB, "")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(api.create_volume(create("../x", 16 * MIB, "")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(api.create_volume(create("b", 0, "")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(api.create_volume(create("b", 1 << 30, "gold")).await),
        tonic::Code::InvalidArgument
    );
    // Thin: a 1 PiB volume on a 256 MiB pool is fine; past 2^60 bytes is not.
    api.create_volume(create("huge", 1 << 50, ""))
        .await
        .unwrap();
    assert_eq!(
        code(api.create_volume(create("huger", 1 << 61, "")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.get_volume(pb::GetVolumeRequest {
                name: "nope".into()
            })
            .await
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            api.resize_volume(pb::ResizeVolumeRequest {
                name: "a".into(),
                size_bytes: MIB
            })
            .await
        ),
        tonic::Code::FailedPrecondition
    );
    let grown = api
        .resize_volume(pb::ResizeVolumeRequest {
            name: "a".into(),
            size_bytes: 32 * MIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.size_bytes, 32 * MIB);
    let snap = |v: &str, n: &str| pb::CreateSnapshotRequest {
        volume: v.into(),
        name: n.into(),
    };
    api.create_snapshot(snap("a", "s")).await.unwrap();
    api.create_snapshot(snap("a", "s")).await.unwrap();
    f.volume("other", MIB).await;
    let api = &mut f.api;
    assert_eq!(
        api.create_snapshot(snap("other", "s"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        api.create_snapshot(snap("nope", "s2"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    let grant = |kind: i32, name: &str| pb::GrantExportRequest {
        kind,
        name: name.into(),
        client: "c".into(),
        read_only: false,
        peer_address: String::new(),
        generation: 0,
    };
    assert_eq!(
        api.grant_export(grant(0, "a")).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        api.grant_export(grant(1, "nope")).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let g1 = api.grant_export(grant(1, "a")).await.unwrap().into_inner();
    let g2 = api.grant_export(grant(1, "a")).await.unwrap().into_inner();
    assert_eq!(
        g1.export_name, g2.export_name,
        "grants are idempotent per (target, client)"
    );
    assert_eq!(
        api.revoke_export(pb::RevokeExportRequest {
            export_name: "a@nope".into()
        })
        .await
        .unwrap_err()
        .code(),
        tonic::Code::NotFound
    );
    // Deleting twice is fine (CSI semantics).
    api.delete_snapshot(pb::DeleteSnapshotRequest { name: "s".into() })
        .await
        .unwrap();
    api.delete_snapshot(pb::DeleteSnapshotRequest { name: "s".into() })
        .await
        .unwrap();
    api.delete_volume(pb::DeleteVolumeRequest { name: "a".into() })
        .await
        .unwrap();
    api.delete_volume(pb::DeleteVolumeRequest { name: "a".into() })
        .await
        .unwrap();
    let exports = api
        .list_exports(pb::ListExportsRequest {})
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert!(
        exports.is_empty(),
        "a deleted volume's grants go with it: {exports:?}"
    );
    let h = api.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert!(h.serving);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_a_restart_serves_the_same_data_grants_and_limits() {
    let mut f = start().await;
    f.volume("d", 16 * MIB).await;
    f.api
        .set_qos(pb::SetQosRequest {
            volume: "d".into(),
            tier: "premium".into(),
            overrides: Some(pb::QosOverrides {
                iops_limit: Some(12345),
                ..Default::default()
            }),
            clear_overrides: false,
        })
        .await
        .unwrap();
    let e = f.grant(pb::TargetKind::Volume, "d", "n").await;
    let mut c = f.unix(&e.export_name).await;
    // Writes in flight when shutdown starts are answered, then the connection closes.
    let mut handles = Vec::new();
    for i in 0..32u64 {
        handles.push(
            c.send(CMD_WRITE, 0, i * 4096, 4096, &pattern(i as u8, 4096))
                .await
                .unwrap(),
        );
    }
    let server = f.server.take().unwrap();
    let stop = tokio::spawn(server.shutdown());
    // Each gets an answer: done, or ESHUTDOWN if the server had not read it yet.
    let mut done = std::collections::HashSet::new();
    let mut answered = 0;
    while let Ok(r) = c.recv().await {
        assert!(r.error == 0 || r.error == ESHUTDOWN, "{r:?}");
        if r.error == 0 {
            done.insert(r.handle);
        }
        answered += 1;
    }
    assert_eq!(
        answered, 32,
        "every request sent before shutdown is answered"
    );
    stop.await.unwrap().unwrap();

    let dir = std::mem::replace(&mut f.dir, tempfile::tempdir().unwrap());
    let mut f2 = start_in(dir).await;
    let mut c = f2.unix(&e.export_name).await;
    for (i, h) in handles.iter().enumerate() {
        let r = c.read(i as u64 * 4096, 4096).await.unwrap();
        if done.contains(h) {
            assert_eq!(r, pattern(i as u8, 4096), "acknowledged write {i} lost");
        }
    }
    let v = f2
        .api
        .get_volume(pb::GetVolumeRequest { name: "d".into() })
        .await
        .unwrap()
        .into_inner();
    let q = v.qos.unwrap();
    assert_eq!((q.tier.as_str(), q.iops_limit), ("premium", 12345));
    let ev = f2
        .api
        .list_audit_events(pb::ListAuditEventsRequest {
            target: "d".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let disc = ev
        .iter()
        .find(|e| e.action == "disconnect")
        .expect("disconnect audited");
    assert_eq!(
        (disc.write_ops, disc.write_bytes),
        (done.len() as u64, done.len() as u64 * 4096)
    );
    assert_eq!(disc.result, "server shutting down");
    f2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_is_eio_on_the_wire_a_metric_and_a_scrub_finding() {
    let mut f = start().await;
    f.volume("rot", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "rot", "n").await;
    let mut c = f.tcp(&e.export_name).await;
    let mark: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    c.write(8 * 4096, &mark, true).await.unwrap();
    c.write(9 * 4096, &pattern(4, 4096), true).await.unwrap();
    // Find the block in the pool file by its content and flip one bit.
    let pool_path = f.dir.path().join("pool.img");
    let pool = std::fs::read(&pool_path).unwrap();
    let at = pool
        .chunks(4096)
        .position(|b| b == mark.as_slice())
        .expect("block in pool") as u64
        * 4096;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pool_path)
            .unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at + 77).unwrap();
        file.write_all_at(&[b[0] ^ 0x04], at + 77).unwrap();
        file.sync_all().unwrap();
    }
    // Structured replies: an error chunk, never the wrong bytes.
    assert!(matches!(
        c.read(8 * 4096, 4096).await,
        Err(ClientError::Errno(EIO))
    ));
    assert!(matches!(
        c.read(7 * 4096, 3 * 4096).await,
        Err(ClientError::Errno(EIO))
    ));
    assert_eq!(c.read(9 * 4096, 4096).await.unwrap(), pattern(4, 4096));
    let m = http_get(f.bound().metrics.unwrap(), "/metrics").await;
    assert!(
        m.contains("berth_volume_checksum_errors_total{volume=\"rot\"} 2"),
        "{m}"
    );
    let scrub = f.api.scrub(pb::ScrubRequest {}).await.unwrap().into_inner();
    assert_eq!(scrub.errors.len(), 1, "{scrub:?}");
    assert_eq!(
        (scrub.errors[0].owner.as_str(), scrub.errors[0].offset),
        ("volume rot", 8 * 4096)
    );
    // Rewriting the block heals it.
    c.write(8 * 4096, &mark, true).await.unwrap();
    assert_eq!(c.read(8 * 4096, 4096).await.unwrap(), mark);
    c.disconnect().await.unwrap();
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_cannot_outlive_a_revoke_or_reach_a_new_volume_of_the_same_name() {
    use berth_volume::node::{Caller, Peer};
    let mut f = start().await;
    f.volume("re", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "re", "n").await;
    // Revoked between a client's handshake and its first request: refused.
    let node = f.server.as_ref().unwrap().node.clone();
    let resolved = node.resolve(&e.export_name, &Peer::Unix).unwrap();
    node.revoke(&Caller::default(), &e.export_name).unwrap();
    assert!(node.register_conn(&resolved, Peer::Unix).is_none());
    // (These hold the store, and with it the pool's lock, open.)
    drop((resolved, node));

    // A grant left behind by a delete that crashed before the server state was
    // saved (simulated by writing it back) must not reach a new "re".
    let e = f.grant(pb::TargetKind::Volume, "re", "n").await;
    f.stop().await;
    let state_path = f.dir.path().join("server-state.json");
    let saved = std::fs::read(&state_path).unwrap();
    let dir = std::mem::replace(&mut f.dir, tempfile::tempdir().unwrap());
    let mut f2 = start_in(dir).await;
    f2.api
        .delete_volume(pb::DeleteVolumeRequest { name: "re".into() })
        .await
        .unwrap();
    f2.stop().await;
    std::fs::write(&state_path, &saved).unwrap();
    let dir = std::mem::replace(&mut f2.dir, tempfile::tempdir().unwrap());
    let mut f3 = start_in(dir).await;
    f3.volume("re", 16 * MIB).await;
    let s = tokio::net::UnixStream::connect(&f3.bound().nbd_socket)
        .await
        .unwrap();
    assert!(matches!(
        Client::connect(s, &e.export_name).await,
        Err(ClientError::Refused {
            reply: REP_ERR_UNKNOWN,
            ..
        })
    ));
    f3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_guessing_export_names_is_cut_off() {
    let mut f = start().await;
    let mut s = tokio::net::TcpStream::connect(f.bound().nbd_tcp.unwrap())
        .await
        .unwrap();
    client::greet(&mut s).await.unwrap();
    let mut refused = 0;
    for i in 0..10 {
        let name = format!("guess@{i:032}");
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        match client::option(&mut s, OPT_GO, &d).await {
            Err(ClientError::Refused { .. }) => refused += 1,
            Err(_) => break,
            Ok(_) => panic!("a guessed name was served"),
        }
    }
    assert_eq!(refused, 3, "the fourth refusal closes the connection");
    f.stop().await;
}

/// Offsets and lengths at the edges of u64 and of the export, for every
/// command: each gets an error reply (never a hang, never a crash), and the
/// server goes on serving. A READ at 2^64 - 4096 once panicked the store's I/O
/// thread with an add overflow and hung every volume of the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_the_edges_of_u64_and_of_the_export_get_errors_and_the_server_keeps_serving() {
    let mut f = start().await;
    let size = 16 * MIB;
    f.volume("edge", size).await;
    f.volume("other", size).await;
    let e = f.grant(pb::TargetKind::Volume, "edge", "n").await;
    let o = f.grant(pb::TargetKind::Volume, "other", "n").await;
    let mut other = f.unix(&o.export_name).await;
    other.write(0, &pattern(9, 4096), false).await.unwrap();
    let mut c = f.tcp(&e.export_name).await;
    let offsets = [
        size - 4096,
        size - 1,
        size,
        size + 1,
        1 << 60,
        1 << 63,
        u64::MAX - (32 << 20),
        u64::MAX - 4096,
        u64::MAX - 4095,
        u64::MAX - 1,
        u64::MAX,
    ];
    let lens = [1u32, 4095, 4096, 4097, 1 << 20, 32 << 20, u32::MAX];
    let mut refused = 0;
    for cmd in [
        CMD_READ,
        CMD_WRITE,
        CMD_TRIM,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
    ] {
        for &offset in &offsets {
            for &len in &lens {
                if cmd == CMD_WRITE && len > 32 << 20 {
                    continue; // a payload that large closes the connection (spec)
                }
                let fits = offset
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= size);
                let payload = if cmd == CMD_WRITE {
                    vec![0x5a; len as usize]
                } else {
                    Vec::new()
                };
                let h = c.send(cmd, 0, offset, len, &payload).await.unwrap();
                let r = tokio::time::timeout(std::time::Duration::from_secs(1), c.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("command {cmd} at {offset:#x}+{len}: no reply within 1 s")
                    })
                    .unwrap();
                assert_eq!(r.handle, h);
                if fits {
                    assert_eq!(r.error, 0, "command {cmd} at {offset:#x}+{len}");
                } else {
                    assert_ne!(
                        r.error, 0,
                        "command {cmd} at {offset:#x}+{len} past the end"
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 300, "{refused} refusals");
    // Both volumes still serve, on this connection and on another.
    c.write(0, &pattern(1, 8192), true).await.unwrap();
    assert_eq!(c.read(0, 8192).await.unwrap(), pattern(1, 8192));
    assert_eq!(other.read(0, 4096).await.unwrap(), pattern(9, 4096));
    c.disconnect().await.unwrap();
    other.disconnect().await.unwrap();
    f.stop().await;
}

/// Connections that never finish the handshake are capped per peer address
/// and in total, so they cannot take every descriptor: past the caps the
/// server closes new ones at once, good clients on the unix socket and the
/// control API are served meanwhile, and the refusals reach the audit log as
/// one entry and one summary with the count, not one entry each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_are_capped_and_good_clients_still_get_in() {
    use berth_volume::nbd::limits::ConnLimits;
    let dir = tempfile::tempdir().unwrap();
    let mut f = start_with(dir, |c| {
        c.nbd_connection_limits = Some(ConnLimits {
            handshakes_per_peer: 8,
            handshakes: 12,
            connections: 64,
        })
    })
    .await;
    f.volume("v", 16 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "v", "n").await;
    let addr = f.bound().nbd_tcp.unwrap();
    // 200 idle connections from 127.0.0.1: 8 stay in the handshake, the rest
    // are closed at once.
    let mut idle = Vec::new();
    let mut closed = 0;
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        let r = tokio::time::timeout(std::time::Duration::from_secs(2), s.read_exact(&mut g)).await;
        match r {
            Ok(Ok(_)) => idle.push(s),
            Ok(Err(_)) => closed += 1,
            Err(_) => panic!("neither a greeting nor a close within 2 s"),
        }
    }
    assert_eq!(idle.len(), 8, "per-peer handshake cap");
    assert_eq!(closed, 192);
    assert_eq!(f.node().admission.counts(), (8, 8));
    // Good clients: the unix socket (not this peer's cap), and the control API.
    let mut good = f.unix(&e.export_name).await;
    good.write(0, &pattern(2, 4096), true).await.unwrap();
    assert_eq!(good.read(0, 4096).await.unwrap(), pattern(2, 4096));
    f.api
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .expect("control API");
    // Once the idle ones go, TCP clients get in again.
    drop(idle);
    let mut tcp = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if f.node().admission.counts().0 == 0 {
            tcp = Some(f.tcp(&e.export_name).await);
            break;
        }
    }
    let mut tcp = tcp.expect("the handshakes ended");
    assert_eq!(tcp.read(0, 4096).await.unwrap(), pattern(2, 4096));
    tcp.disconnect().await.unwrap();
    good.disconnect().await.unwrap();
    let metrics = http_get(f.bound().metrics.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("berth_nbd_connections_refused_total 192"),
        "{metrics}"
    );
    f.stop().await;
    // One entry for the first refusal, one summary with the rest (written at
    // the latest at shutdown).
    let (entries, total) = refusals_in_audit_log(f.dir.path());
    assert!(entries <= 4, "{entries} audit entries for 192 refusals");
    assert_eq!(total, 192);
}

/// (audit entries about refusals, refusals they account for): an entry
/// without a count is one refusal, a summary says how many it stands for.
fn refusals_in_audit_log(dir: &std::path::Path) -> (usize, u64) {
    let log = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let mut entries = 0;
    let mut total = 0;
    for l in log.lines().filter(|l| l.contains("\"action\":\"refused\"")) {
        entries += 1;
        total += match l.split_once("count=") {
            Some((_, rest)) => rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
            None => 1,
        };
    }
    (entries, total)
}

/// Thousands of refused lookups (a client guessing export names) cost the
/// audit log two entries per peer and window, and the count is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_lookups_are_summed_in_the_audit_log() {
    let mut f = start().await;
    let addr = f.bound().nbd_tcp.unwrap();
    let mut refused = 0u32;
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        client::greet(&mut s).await.unwrap();
        let name = format!("guess@{i:032}");
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        if let Err(ClientError::Refused { .. }) = client::option(&mut s, OPT_GO, &d).await {
            refused += 1;
        }
    }
    assert_eq!(refused, 300);
    f.stop().await;
    // Two entries per 10 s window of this peer (the first refusal, then a
    // summary with the count): a slow machine may need a second window.
    let (entries, total) = refusals_in_audit_log(f.dir.path());
    assert!(entries <= 4, "{entries} audit entries for 300 refusals");
    assert_eq!(total, 300);
}

/// Clients that send reads and never read the replies hold at most the
/// node's payload budget in all (a quarter of it each); once it runs low,
/// the stalled ones are cut off within seconds, and a good client, waiting
/// meanwhile, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_replies_hold_bounded_memory() {
    use berth_volume::nbd::limits::STALL_UNDER_PRESSURE;
    let budget = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let mut f = start_with(dir, |c| c.nbd_buffer_bytes = budget).await;
    f.volume("v", 64 * MIB).await;
    let e = f.grant(pb::TargetKind::Volume, "v", "n").await;
    // Unix sockets: their buffers are small, so the replies back up at once.
    let mut bad = Vec::new();
    for _ in 0..6 {
        let c = f.unix(&e.export_name).await;
        let mut s = c.into_inner();
        let mut reqs = Vec::new();
        for k in 0..64u64 {
            reqs.extend_from_slice(&encode_request(&Request {
                flags: 0,
                command: CMD_READ,
                handle: k,
                offset: (k % 64) * MIB,
                len: MIB as u32,
            }));
        }
        // The server stops reading requests once the connection's share is
        // held: the rest stay in the socket.
        tokio::spawn(async move {
            let _ = s.write_all(&reqs).await;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(s);
        });
        bad.push(());
    }
    let node = f.node().clone();
    let watch = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..200 {
            most = most.max(node.budget.held_bytes());
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        most
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut good = f.unix(&e.export_name).await;
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(
        STALL_UNDER_PRESSURE + std::time::Duration::from_secs(5),
        good.read(0, 4096),
    )
    .await
    .expect("a good client is served once the stalled ones are cut off");
    assert_eq!(r.unwrap(), vec![0; 4096]);
    println!("good client's read waited {:?}", t.elapsed());
    let most = watch.await.unwrap();
    assert!(most <= budget, "{most} bytes held, budget {budget}");
    assert!(most >= budget / 2, "the bad clients did fill it: {most}");
    good.disconnect().await.unwrap();
    f.stop().await;
}
