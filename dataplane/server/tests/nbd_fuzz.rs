//! Fuzzing the NBD parsers (proptest over raw bytes) and a live server (random
//! byte streams after the greeting and after GO, some starting from valid
//! frames whose offsets and lengths sit at the edges of u64 and of the export).
//! Parsers must never panic and must round-trip what they accept; for every
//! input the server must answer or close within a second, and still serve a
//! well-behaved client on another connection. The tests build with overflow
//! checks (the dev profile), so an unchecked sum of offset and length is a
//! panic, and a panic on the store's threads ends the test process.
//!
//! `BERTH_FUZZ_CASES` sets the number of cases (default 2,000 per parser and
//! 300 live connections); each test prints how many inputs it ran.

#![allow(clippy::unwrap_used)]

mod common;

use berth_proto::volume::v1 as pb;
use berth_volume::nbd::proto::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cases(default: u32) -> u32 {
    std::env::var("BERTH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn parsers_never_panic_and_round_trip() {
    let n = cases(2000);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(n)
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..600), |b| {
            let _ = parse_info_request(&b);
            let _ = parse_meta_context_request(&b);
            if let Ok(r) = parse_info_request(&b) {
                // What parses re-encodes to the same bytes.
                let mut e = (r.name.len() as u32).to_be_bytes().to_vec();
                e.extend_from_slice(r.name.as_bytes());
                e.extend_from_slice(&(r.requests.len() as u16).to_be_bytes());
                for q in &r.requests {
                    e.extend_from_slice(&q.to_be_bytes());
                }
                prop_assert_eq!(e, b.clone());
            }
            if b.len() >= 16 {
                let h: [u8; 16] = b[..16].try_into().unwrap();
                let _ = parse_option_header(&h);
            }
            if b.len() >= REQUEST_BYTES {
                let h: [u8; REQUEST_BYTES] = b[..REQUEST_BYTES].try_into().unwrap();
                if let Ok(r) = parse_request(&h) {
                    prop_assert_eq!(encode_request(&r), h);
                }
            }
            Ok(())
        })
        .unwrap();
    // Valid requests with random fields always parse back.
    runner
        .run(
            &(
                any::<u16>(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
            ),
            |(flags, command, handle, offset, len)| {
                let r = Request {
                    flags,
                    command,
                    handle,
                    offset,
                    len,
                };
                prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
                Ok(())
            },
        )
        .unwrap();
    println!("fuzz: {} parser inputs and {n} request round trips ran", n);
}

#[derive(Debug, Clone)]
enum Phase {
    Handshake,
    Transmission,
}

/// The size of the fuzzed export.
const EXPORT_BYTES: u64 = 16 << 20;

/// Offsets where arithmetic goes wrong: around 0, the export's end, 2^63 and
/// 2^64, and anywhere.
fn offsets() -> impl Strategy<Value = u64> {
    let near =
        |at: u64| (0u64..(2 << 20)).prop_map(move |d| at.wrapping_add(d).wrapping_sub(1 << 20));
    prop_oneof![
        Just(0u64),
        0u64..(1 << 24),
        near(EXPORT_BYTES),
        near(1 << 63),
        (0u64..(64 << 20)).prop_map(|d| u64::MAX - d),
        any::<u64>(),
    ]
}

/// Lengths around the block size, the 32 MiB request limit and u32::MAX.
fn lengths() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..70_000,
        (0u32..8).prop_map(|d| 4096 - 4 + d),
        (0u32..8).prop_map(|d| (32 << 20) - 4 + d),
        (0u32..(1 << 20)).prop_map(|d| u32::MAX - d),
        any::<u32>(),
    ]
}

fn live_input() -> impl Strategy<Value = (Phase, Vec<u8>)> {
    let junk = proptest::collection::vec(any::<u8>(), 0..300);
    // Mostly valid-looking frames with random fields, so the fuzzer gets past magics.
    let option = (
        any::<u32>(),
        0u32..64,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(o, l, d)| {
            let mut b = 1u32.to_be_bytes().to_vec();
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&(o % 12).to_be_bytes());
            b.extend_from_slice(&l.to_be_bytes());
            b.extend_from_slice(&d);
            b
        });
    let request = (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        offsets(),
        lengths(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(flags, command, handle, offset, len, tail)| {
            let mut b = encode_request(&Request {
                flags: flags & 0x1f,
                command,
                handle,
                offset,
                len: if command == CMD_WRITE {
                    len % 8192
                } else {
                    len
                },
            })
            .to_vec();
            b.extend_from_slice(&tail);
            b
        });
    prop_oneof![
        junk.clone().prop_map(|j| (Phase::Handshake, j)),
        option.prop_map(|o| (Phase::Handshake, o)),
        junk.prop_map(|j| (Phase::Transmission, j)),
        proptest::collection::vec(request, 1..6).prop_map(|rs| (Phase::Transmission, rs.concat())),
    ]
}

#[test]
fn a_live_server_survives_random_input() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut f = rt.block_on(async {
        let mut f = common::start().await;
        f.volume("fz", EXPORT_BYTES).await;
        f
    });
    let export = rt
        .block_on(f.grant(pb::TargetKind::Volume, "fz", "fuzzer"))
        .export_name;
    let addr = f.bound().nbd_tcp.unwrap();
    // A well-behaved client of another volume, on its own connection,
    // checked after every input.
    let good = rt.block_on(async {
        f.volume("good", 1 << 20).await;
        let e = f.grant(pb::TargetKind::Volume, "good", "fuzzer").await;
        let mut good = f.unix(&e.export_name).await;
        good.write(0, &[0x5c; 4096], true).await.unwrap();
        tokio::sync::Mutex::new(good)
    });
    let n = cases(300);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(n)
    });
    let ran = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&live_input(), |(phase, bytes)| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(async {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                match phase {
                    Phase::Handshake => {
                        let mut g = [0u8; 18];
                        s.read_exact(&mut g).await.unwrap();
                    }
                    Phase::Transmission => {
                        let c = berth_volume::nbd::client::Client::connect(s, &export)
                            .await
                            .unwrap();
                        s = c.into_inner();
                    }
                }
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
                // The server answers what it can and closes; it must not hang.
                // (A read of up to 32 MiB per request is the most it may owe.)
                let mut sink = Vec::new();
                let r = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    s.read_to_end(&mut sink),
                )
                .await;
                assert!(
                    r.is_ok(),
                    "server neither answered nor closed within 1 s after {bytes:02x?}"
                );
                let mut good = good.lock().await;
                let served =
                    tokio::time::timeout(std::time::Duration::from_secs(1), good.read(0, 4096))
                        .await;
                assert!(
                    matches!(&served, Ok(Ok(d)) if d[..] == [0x5c; 4096][..]),
                    "a good client was not served within 1 s after {bytes:02x?}: {served:?}"
                );
            });
            Ok(())
        })
        .unwrap();
    // Still serving, and the data written by fuzz writes did not escape the volume.
    rt.block_on(async {
        let mut c = f.tcp(&export).await;
        c.write(0, &[0xab; 4096], true).await.unwrap();
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0xab; 4096]);
        c.disconnect().await.unwrap();
        f.stop().await;
    });
    println!(
        "fuzz: {} live connections with random input",
        ran.into_inner()
    );
}
