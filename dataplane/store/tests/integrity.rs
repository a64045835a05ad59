//! Corruption, full pools, concurrency and bad input against a real store.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use berth_store::{Store, StoreConfig, StoreError, Target, Zeroing, BLOCK_SIZE};

mod common;
use common::{block, find_in_pool, BS};

fn flip_bit(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open pool");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).expect("write");
    f.sync_all().expect("sync");
}

#[test]
fn flipped_bits_fail_reads_loudly_and_scrub_names_exactly_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::new(dir.path(), 16 << 20);
    let store = Store::create(&cfg).expect("create");
    let v = store
        .volume_target(&store.create_volume("db", 1 << 20).expect("volume").name)
        .expect("t");
    for i in 0..8u64 {
        store
            .write(v, i * BLOCK_SIZE, &block(&format!("live{i}")), false)
            .expect("write");
    }
    store.create_snapshot("db", "snap").expect("snapshot");
    // Overwrite block 2 after the snapshot: the old version now belongs to it.
    store
        .write(v, 2 * BLOCK_SIZE, &block("new2"), false)
        .expect("write");
    store.clone_snapshot("snap", "clone", None).expect("clone");
    store.flush().expect("flush");
    assert!(store.scrub().expect("scrub").errors.is_empty());

    // Corrupt block 5 (shared by volume, snapshot and clone) and the snapshot's
    // old block 2.
    let pool = cfg.pool_path();
    flip_bit(&pool, find_in_pool(&pool, &block("live5")) + 100);
    flip_bit(&pool, find_in_pool(&pool, &block("live2")) + 4000);

    let snap = store.snapshot_target("snap").expect("snap");
    let clone = store.volume_target("clone").expect("clone");
    for t in [v, snap, clone] {
        match store.read(t, 5 * BLOCK_SIZE, BS) {
            Err(StoreError::Integrity { offset, .. }) => assert_eq!(offset, 5 * BLOCK_SIZE),
            other => panic!("corrupt block read as {other:?}"),
        }
        // A read spanning good and bad blocks fails as a whole, never returns bytes.
        assert!(store.read(t, 4 * BLOCK_SIZE, 2 * BS).is_err());
        assert_eq!(
            store.read(t, 6 * BLOCK_SIZE, BS).expect("good block"),
            block("live6")
        );
    }
    assert!(matches!(
        store.read(snap, 2 * BLOCK_SIZE, 10),
        Err(StoreError::Integrity { .. })
    ));
    assert_eq!(
        store
            .read(v, 2 * BLOCK_SIZE, BS)
            .expect("volume's new block 2"),
        block("new2")
    );
    assert!(
        store
            .counters()
            .checksum_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );

    let report = store.scrub().expect("scrub");
    assert_eq!(report.errors.len(), 2, "{report:?}");
    let mut offsets: Vec<u64> = report.errors.iter().map(|e| e.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, vec![2 * BLOCK_SIZE, 5 * BLOCK_SIZE]);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.owner.contains("snapshot snap")),
        "{report:?}"
    );
    assert_eq!(report.blocks_checked, 9);

    // Rewriting the corrupt block heals the volume.
    store
        .write(v, 5 * BLOCK_SIZE, &block("fixed5"), false)
        .expect("write");
    assert_eq!(
        store.read(v, 5 * BLOCK_SIZE, BS).expect("read"),
        block("fixed5")
    );
}

#[test]
fn scrub_reading_runs_of_blocks_names_exactly_the_flipped_ones() {
    // Scrub reads adjacent pool blocks together (up to 256 per read) and in
    // batches: corruption at the edges of runs and batches must be pinned to
    // the very block, and nothing else reported.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::new(dir.path(), 32 << 20);
    let store = Store::create(&cfg).expect("create");
    let v = store
        .volume_target(&store.create_volume("v", 8 << 20).expect("volume").name)
        .expect("t");
    let n = 600u64;
    let data: Vec<u8> = (0..n).flat_map(|i| block(&format!("b{i}"))).collect();
    store.write(v, 0, &data, false).expect("write");
    // A few scattered overwrites after a snapshot: runs that are not adjacent.
    store.create_snapshot("v", "s").expect("snapshot");
    for i in [3u64, 300, 599] {
        store
            .write(v, i * BLOCK_SIZE, &block(&format!("new{i}")), false)
            .expect("write");
    }
    store.flush().expect("flush");
    let clean = store.scrub().expect("scrub");
    assert!(clean.errors.is_empty(), "{clean:?}");
    assert_eq!(clean.blocks_checked, n + 3);
    let pool = cfg.pool_path();
    let flipped = [0u64, 255, 256, 257, 511, 598];
    for &i in &flipped {
        flip_bit(&pool, find_in_pool(&pool, &block(&format!("b{i}"))) + 17);
    }
    flip_bit(&pool, find_in_pool(&pool, &block("new300")) + 4095);
    // The old version of block 3, which only the snapshot still reads.
    flip_bit(&pool, find_in_pool(&pool, &block("b3")));
    let report = store.scrub().expect("scrub");
    assert_eq!(report.blocks_checked, n + 3);
    let mut got: Vec<(u64, &str)> = report
        .errors
        .iter()
        .map(|e| (e.offset / BLOCK_SIZE, e.owner.as_str()))
        .collect();
    got.sort_unstable();
    // Blocks written before the snapshot are read by both; the one written
    // after it by the volume alone; the replaced one by the snapshot alone.
    let mut want: Vec<(u64, &str)> = flipped
        .iter()
        .map(|&i| (i, "volume v, snapshot s"))
        .collect();
    want.push((300, "volume v"));
    want.push((3, "snapshot s"));
    want.sort_unstable();
    assert_eq!(got, want, "{report:?}");
}

#[test]
fn a_full_pool_refuses_writes_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A 1 MiB pool: 256 data blocks (the header area is on top).
    let store = Store::create(&StoreConfig::new(dir.path(), 1 << 20)).expect("create");
    let total = store.stats().total_blocks;
    assert_eq!(total, 256);
    let a = store
        .volume_target(&store.create_volume("a", 8 << 20).expect("a").name)
        .expect("t");
    let b = store
        .volume_target(&store.create_volume("b", 8 << 20).expect("b").name)
        .expect("t");
    for i in 0..200u64 {
        store
            .write(a, i * BLOCK_SIZE, &block(&format!("a{i}")), false)
            .expect("fill a");
    }
    let mut written = 0;
    let err = loop {
        match store.write(
            b,
            written * BLOCK_SIZE,
            &block(&format!("b{written}")),
            false,
        ) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(written, 56);
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    // Overwriting needs fresh space too (redirect-on-write): refused, old data kept.
    assert!(store.write(a, 0, &block("over"), false).is_err());
    for i in [0u64, 100, 199] {
        assert_eq!(
            store.read(a, i * BLOCK_SIZE, BS).expect("read"),
            block(&format!("a{i}"))
        );
    }
    // A snapshot or clone that every later write would fail after is
    // refused up front, with ENOSPC and the reason.
    assert_eq!(store.reserve_blocks(), 16);
    let e = store
        .create_snapshot("a", "s-full")
        .expect_err("snapshot of a full pool");
    assert!(
        matches!(
            e,
            StoreError::NoRoom {
                what: "snapshot",
                free_blocks: 0,
                reserve_blocks: 16
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno(), libc::ENOSPC);
    assert!(e.to_string().contains("free space first"), "{e}");
    assert!(store.list_snapshots().is_empty(), "nothing half-made");
    // Trimming frees space; writes work again.
    store.trim(a, 0, 100 * BLOCK_SIZE).expect("trim");
    store.flush().expect("flush");
    store
        .create_snapshot("a", "s-room")
        .expect("a snapshot once there is room");
    store
        .clone_snapshot("s-room", "a-clone", None)
        .expect("and a clone");
    store.delete_volume("a-clone").expect("delete clone");
    store.delete_snapshot("s-room").expect("delete snapshot");
    for i in 0..50u64 {
        store
            .write(
                b,
                (written + i) * BLOCK_SIZE,
                &block(&format!("b{}", written + i)),
                false,
            )
            .expect("write after trim");
    }
    assert_eq!(
        store.read(b, 3 * BLOCK_SIZE, BS).expect("read"),
        block("b3")
    );
    store.delete_volume("a").expect("delete");
    store.sync().expect("sync");
    assert_eq!(store.stats().used_blocks, 106);
}

#[test]
fn concurrent_overlapping_writes_never_mix_within_a_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::create(&StoreConfig::new(dir.path(), 64 << 20)).expect("create"));
    let t = store
        .volume_target(&store.create_volume("v", 64 * BLOCK_SIZE).expect("v").name)
        .expect("t");
    let threads: Vec<_> = (0..4u8)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for round in 0..50u64 {
                    // Whole, overlapping 3-block writes of one byte value.
                    let start = (round * 7 + u64::from(w)) % 60;
                    store
                        .write(t, start * BLOCK_SIZE, &vec![w + 1; 3 * BS], false)
                        .expect("write");
                    // Sub-block writes into distinct quarters of block 63.
                    let off = 63 * BLOCK_SIZE + u64::from(w) * 1024;
                    store
                        .write(t, off, &vec![0x10 + w; 1024], round % 10 == 0)
                        .expect("partial");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("writer");
    }
    let all = store.read(t, 0, 64 * BS).expect("read");
    for (i, b) in all.chunks(BS).take(63).enumerate() {
        assert!(b.iter().all(|&x| x == b[0]), "block {i} mixes writes");
    }
    // No quarter was lost to a racing read-modify-write.
    for w in 0..4u8 {
        let q = &all[63 * BS + usize::from(w) * 1024..][..1024];
        assert!(q.iter().all(|&x| x == 0x10 + w), "quarter {w} lost");
    }
}

#[test]
fn bad_names_sizes_and_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&StoreConfig::new(dir.path(), 16 << 20)).expect("create");
    for name in ["", "a/b", "..", "x\ny", &"n".repeat(300)] {
        assert!(
            matches!(
                store.create_volume(name, 4096),
                Err(StoreError::InvalidArgument(_))
            ),
            "{name:?}"
        );
    }
    assert!(matches!(
        store.create_volume("v", 0),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.create_volume("v", u64::MAX),
        Err(StoreError::InvalidArgument(_))
    ));
    store.create_volume("v", 1 << 20).expect("create");
    store
        .create_volume("v", 1 << 20)
        .expect("same request again is idempotent");
    assert!(matches!(
        store.create_volume("v", 2 << 20),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.resize_volume("v", 4096),
        Err(StoreError::ShrinkRefused { .. })
    ));
    assert!(matches!(
        store.delete_volume("nope"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.create_snapshot("nope", "s"),
        Err(StoreError::NotFound { .. })
    ));
    store.create_snapshot("v", "s").expect("snapshot");
    store.create_volume("w", 1 << 20).expect("w");
    assert!(matches!(
        store.create_snapshot("w", "s"),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.clone_snapshot("s", "c", Some(4096)),
        Err(StoreError::InvalidArgument(_))
    ));
    let snap = store.snapshot_target("s").expect("snap");
    assert!(matches!(
        store.write(snap, 0, b"x", false),
        Err(StoreError::ReadOnly { .. })
    ));
    let t = store.volume_target("v").expect("v");
    let e = store
        .write(t, (1 << 20) - 1, b"xy", false)
        .expect_err("past the end");
    assert!(e.to_string().contains("outside volume \"v\""), "{e}");
    assert!(store.write(t, 0, &[], false).is_err(), "zero-length write");
    store.resize_volume("v", 2 << 20).expect("grow online");
    store
        .write(t, (1 << 20) - 1, b"xy", false)
        .expect("write across the old end");
    assert_eq!(store.read(t, (1 << 20) - 1, 2).expect("read"), b"xy");
}

#[test]
fn a_second_opener_a_foreign_pool_and_missing_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        lock_wait: std::time::Duration::from_millis(100),
        ..StoreConfig::new(dir.path().join("one"), 16 << 20)
    };
    let store = Store::create(&cfg).expect("create");
    match Store::open(&cfg) {
        Err(StoreError::PoolLocked { .. }) => {}
        other => panic!("second opener got {other:?}"),
    }
    assert!(Store::create(&cfg).is_err(), "formatting over a live store");
    drop(store);

    let other = StoreConfig::new(dir.path().join("two"), 16 << 20);
    drop(Store::create(&other).expect("create two"));
    // Metadata of one with the pool of the other.
    let swapped = StoreConfig {
        pool_path: Some(other.pool_path()),
        ..cfg.clone()
    };
    let before = std::fs::read(other.pool_path()).expect("read");
    match Store::open(&swapped) {
        Err(StoreError::BadPool { reason, .. }) => {
            assert!(reason.contains("not the pool"), "{reason}")
        }
        other => panic!("foreign pool got {other:?}"),
    }
    assert_eq!(
        std::fs::read(other.pool_path()).expect("read"),
        before,
        "nothing written"
    );

    std::fs::remove_file(cfg.pool_path()).expect("rm");
    assert!(matches!(
        Store::open(&cfg),
        Err(StoreError::PoolFile { .. })
    ));
    assert!(matches!(
        Store::open(&StoreConfig::new(dir.path().join("none"), 0)),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn snapshots_and_clones_are_metadata_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&StoreConfig::new(dir.path(), 64 << 20)).expect("create");
    // A 64 GiB thin volume with a few blocks: snapshot and clone copy nothing.
    let t = store
        .volume_target(&store.create_volume("big", 64 << 30).expect("v").name)
        .expect("t");
    for i in 0..16u64 {
        store
            .write(t, i << 30, &block(&format!("g{i}")), false)
            .expect("write");
    }
    let used = store.stats().used_blocks;
    store.create_snapshot("big", "s").expect("snapshot");
    let c = store.clone_snapshot("s", "c", None).expect("clone");
    assert_eq!(store.stats().used_blocks, used);
    // A 4 KiB write after the snapshot costs exactly one block.
    store.write(t, 0, &block("after"), false).expect("write");
    assert_eq!(store.stats().used_blocks, used + 1);
    let ct = Target::Volume(c.id);
    assert_eq!(store.read(ct, 0, BS).expect("clone read"), block("g0"));
    store
        .write(ct, 5 << 30, &block("clone5"), false)
        .expect("clone write");
    assert_eq!(
        store.read(t, 5 << 30, BS).expect("volume untouched"),
        block("g5")
    );
    assert_eq!(store.stats().used_blocks, used + 2);
}

#[test]
fn allocated_bytes_count_a_volumes_own_blocks_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::new(dir.path(), 64 << 20);
    let store = Store::create(&cfg).expect("create");
    let alloc = |s: &Store, v: &str| s.volume(v).expect("volume").allocated_bytes / BLOCK_SIZE;
    let t = store
        .volume_target(&store.create_volume("v", 1 << 30).expect("v").name)
        .expect("t");
    assert_eq!(alloc(&store, "v"), 0, "thin: a new volume owns nothing");
    for i in 0..8u64 {
        store
            .write(t, i * BLOCK_SIZE * 3, &block(&format!("a{i}")), false)
            .expect("write");
    }
    // Overwriting in place of an unshared block frees the old one.
    store.write(t, 0, &block("again"), false).expect("write");
    assert_eq!(alloc(&store, "v"), 8);
    // Zeros own no block.
    store
        .write(t, 3 * BLOCK_SIZE, &[0u8; BS], false)
        .expect("zeros");
    assert_eq!(alloc(&store, "v"), 7);
    store.create_snapshot("v", "s").expect("snapshot");
    assert_eq!(alloc(&store, "v"), 7, "a snapshot copies nothing");
    // After a snapshot an overwrite keeps the old block for the snapshot.
    store
        .write(t, 6 * BLOCK_SIZE, &block("b"), false)
        .expect("write");
    assert_eq!(alloc(&store, "v"), 8);
    let c = store.clone_snapshot("s", "c", None).expect("clone");
    assert_eq!(alloc(&store, "c"), 0, "a clone shares its source's blocks");
    store
        .write(Target::Volume(c.id), 0, &block("c"), false)
        .expect("clone write");
    store
        .write(Target::Volume(c.id), 1 << 20, &block("c2"), false)
        .expect("clone write");
    assert_eq!(alloc(&store, "c"), 2);
    store.sync().expect("sync");
    drop(store);
    // The counts kept as writes land equal the ones rebuilt from the maps.
    let store = Store::open(&cfg).expect("reopen");
    assert_eq!(alloc(&store, "v"), 8);
    assert_eq!(alloc(&store, "c"), 2);
    // Trimming unshared blocks gives them back; the snapshot keeps its own.
    store.delete_volume("c").expect("delete clone");
    store.delete_snapshot("s").expect("delete snapshot");
    // Collected in the background; `settle` waits for it.
    store.settle();
    assert_eq!(alloc(&store, "v"), 7, "the snapshot's old block is freed");
    let t = store.volume_target("v").expect("t");
    store.trim(t, 0, 1 << 30).expect("trim");
    store.sync().expect("sync");
    assert_eq!(alloc(&store, "v"), 0);
    assert_eq!(store.stats().used_blocks, 0);
}

#[test]
fn the_fallback_engine_serves_the_same_store() {
    use berth_store::EngineChoice;
    let dir = tempfile::tempdir().expect("tempdir");
    let sync_cfg = StoreConfig {
        engine: EngineChoice::Sync,
        ..StoreConfig::new(dir.path(), 16 << 20)
    };
    let store = Store::create(&sync_cfg).expect("create on the thread-pool engine");
    assert_eq!(store.engine_name(), "sync");
    let t = store
        .volume_target(&store.create_volume("v", 1 << 20).expect("v").name)
        .expect("t");
    for i in 0..16u64 {
        store
            .write(
                t,
                i * BLOCK_SIZE + 100,
                &block(&format!("s{i}"))[..1000],
                i % 4 == 0,
            )
            .expect("write");
    }
    store.create_snapshot("v", "snap").expect("snapshot");
    store.write(t, 0, &block("after"), false).expect("write");
    store.flush().expect("flush");
    drop(store);

    // Reopened on io_uring: the same bytes.
    let uring_cfg = StoreConfig {
        engine: EngineChoice::Uring,
        ..StoreConfig::new(dir.path(), 0)
    };
    let store = Store::open(&uring_cfg).expect("reopen");
    assert_eq!(store.engine_name(), "io_uring");
    let t = store.volume_target("v").expect("v");
    let snap = store.snapshot_target("snap").expect("snap");
    assert_eq!(store.read(t, 0, BS).expect("read"), block("after"));
    for i in 0..16u64 {
        let want = &block(&format!("s{i}"))[..1000];
        assert_eq!(
            store.read(snap, i * BLOCK_SIZE + 100, 1000).expect("read"),
            want
        );
    }
    assert!(store.scrub().expect("scrub").errors.is_empty());
}

#[test]
fn block_status_reports_data_and_holes_through_snapshots_and_clones() {
    use berth_store::Extent;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&StoreConfig::new(dir.path(), 64 << 20)).expect("create");
    store.create_volume("v", 1 << 20).expect("volume");
    let v = store.volume_target("v").expect("target");
    let hole = |len: u64| Extent {
        len_bytes: len,
        data: false,
    };
    let data = |len: u64| Extent {
        len_bytes: len,
        data: true,
    };
    assert_eq!(
        store.block_status(v, 0, 1 << 20).expect("status"),
        vec![hole(1 << 20)]
    );
    store.write(v, 4 * 4096, &block("a"), false).expect("write");
    store.write(v, 5 * 4096, &block("b"), false).expect("write");
    store
        .write_zeroes(v, 6 * 4096, 4096, Zeroing::Zero, false)
        .expect("zero");
    store
        .write(v, 7 * 4096, &vec![0; 4096], false)
        .expect("write zeros");
    // Zeroed blocks and all-zero writes hold no space: holes.
    assert_eq!(
        store.block_status(v, 0, 1 << 20).expect("status"),
        vec![hole(4 * 4096), data(2 * 4096), hole((1 << 20) - 6 * 4096)]
    );
    // Unaligned requests are clipped to what was asked.
    assert_eq!(
        store.block_status(v, 4 * 4096 + 100, 200).expect("status"),
        vec![data(200)]
    );
    store.create_snapshot("v", "s").expect("snapshot");
    store.trim(v, 4 * 4096, 4096).expect("trim");
    let s = store.snapshot_target("s").expect("target");
    // The snapshot still sees both blocks; the volume sees the trim.
    assert_eq!(
        store.block_status(s, 0, 8 * 4096).expect("status"),
        vec![hole(4 * 4096), data(2 * 4096), hole(2 * 4096)]
    );
    assert_eq!(
        store.block_status(v, 0, 8 * 4096).expect("status"),
        vec![hole(5 * 4096), data(4096), hole(2 * 4096)]
    );
    // A clone falls through to the snapshot until it writes.
    store
        .clone_snapshot("s", "c", Some(2 << 20))
        .expect("clone");
    let c = store.volume_target("c").expect("target");
    store.write(c, 0, &block("c"), false).expect("write");
    assert_eq!(
        store.block_status(c, 0, 2 << 20).expect("status"),
        vec![
            data(4096),
            hole(3 * 4096),
            data(2 * 4096),
            hole((2 << 20) - 6 * 4096)
        ]
    );
    // Out of range and zero-length are errors.
    assert!(matches!(
        store.block_status(v, 1 << 20, 4096),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.block_status(v, 0, 0),
        Err(StoreError::OutOfRange { .. })
    ));
}

/// NBD's WRITE_ZEROES with NO_HOLE: the range reads as zeros and stays
/// allocated, over data, over holes and unaligned; without it, zeroing frees.
#[test]
fn zeroing_that_allocates_keeps_its_range_allocated() {
    use berth_store::Extent;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&StoreConfig::new(dir.path(), 64 << 20)).expect("create");
    store.create_volume("v", 1 << 20).expect("volume");
    let v = store.volume_target("v").expect("target");
    store.write(v, 0, &block("a"), false).expect("write");
    let used = store.stats().used_blocks;
    store
        .write_zeroes(v, 0, 4 * 4096, Zeroing::Allocate, false)
        .expect("allocate zeros");
    store
        .write_zeroes(v, 8 * 4096 + 100, 4096, Zeroing::Allocate, true)
        .expect("unaligned");
    assert_eq!(
        store.read(v, 0, 12 * 4096).expect("read"),
        vec![0; 12 * 4096]
    );
    let status = store.block_status(v, 0, 12 * 4096).expect("status");
    let ext = |blocks: u64, data: bool| Extent {
        len_bytes: blocks * 4096,
        data,
    };
    assert_eq!(
        status,
        vec![ext(4, true), ext(4, false), ext(2, true), ext(2, false)],
        "the allocated ranges are data, the rest holes"
    );
    // The first block's data was replaced (not kept beside): 4 + 2 blocks.
    store.sync().expect("sync");
    assert_eq!(store.stats().used_blocks, used - 1 + 6);
    // Plain zeroing of the same range gives the space back.
    store
        .write_zeroes(v, 0, 12 * 4096, Zeroing::Zero, false)
        .expect("zero");
    store.sync().expect("sync");
    assert_eq!(store.stats().used_blocks, used - 1);
    // Like a write, at most 32 MiB at a time (the NBD server splits).
    store.create_volume("big", 1 << 30).expect("volume");
    let big = store.volume_target("big").expect("target");
    let e = store
        .write_zeroes(big, 0, 64 << 20, Zeroing::Allocate, false)
        .expect_err("64 MiB");
    assert!(matches!(e, StoreError::InvalidArgument(_)), "{e}");
}

#[test]
fn block_status_answers_in_bounded_steps_that_add_up() {
    use berth_store::BLOCK_STATUS_MAX_BLOCKS;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&StoreConfig::new(dir.path(), 128 << 20)).expect("create");
    // 1 TiB thin volume: data in every other MiB of the first 40 MiB.
    store.create_volume("big", 1 << 40).expect("volume");
    let v = store.volume_target("big").expect("target");
    let chunk = vec![0x5au8; 1 << 20];
    for mib in (0..40u64).step_by(2) {
        store.write(v, mib << 20, &chunk, false).expect("write");
    }
    let mapped_blocks = 20 * 256;
    assert!(mapped_blocks > BLOCK_STATUS_MAX_BLOCKS);
    let first = store.block_status(v, 0, 1 << 40).expect("status");
    let covered: u64 = first.iter().map(|e| e.len_bytes).sum();
    assert!(
        covered < 40 << 20,
        "one call stops after a bounded number of mapped blocks"
    );
    // Walking the whole terabyte from where each answer ends.
    let (mut at, mut data, mut calls) = (0u64, 0u64, 0);
    while at < 1 << 40 {
        let ext = store.block_status(v, at, (1 << 40) - at).expect("status");
        assert!(!ext.is_empty());
        for e in &ext {
            if e.data {
                assert_eq!((at >> 20) % 2, 0, "data only in even MiBs (at {at})");
                data += e.len_bytes;
            }
            at += e.len_bytes;
        }
        calls += 1;
    }
    assert_eq!(data, 20 << 20);
    assert!(calls <= 4, "{calls} calls");
}
