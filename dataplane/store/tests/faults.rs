//! Injected pool faults (the fault engine of berth-io) against a real store:
//! errors, short transfers and slow completions on chosen operations. A write
//! that did not land is never acknowledged and changes nothing; a failed read
//! is an I/O error, not a checksum error; other volumes keep being served.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_io::fault::{Effect, Fault, FaultPlan};
use berth_io::OpKind;
use berth_store::{Store, StoreConfig, StoreError, Target, BLOCK_SIZE};

mod common;
use common::{block, find_in_pool, BS};

fn store(dir: &std::path::Path) -> (Store, StoreConfig, Arc<FaultPlan>) {
    let plan = FaultPlan::new();
    // Writes go the direct way here: a deferred write is answered before
    // its pool write (tests/deferred.rs has what its faults do).
    let cfg = StoreConfig {
        faults: Some(plan.clone()),
        defer_max_bytes: 0,
        ..StoreConfig::new(dir, 32 << 20)
    };
    (Store::create(&cfg).expect("create"), cfg, plan)
}

fn volume(s: &Store, name: &str) -> Target {
    s.volume_target(&s.create_volume(name, 4 << 20).expect("volume").name)
        .expect("target")
}

/// The pool file's byte range holding `data` (found by content).
fn pool_range(cfg: &StoreConfig, data: &[u8]) -> std::ops::Range<u64> {
    let at = find_in_pool(&cfg.pool_path(), data);
    at..at + BLOCK_SIZE
}

/// The store opened again on `cfg`, with no faults.
fn reopened(cfg: StoreConfig) -> Store {
    Store::open(&StoreConfig {
        faults: None,
        ..cfg
    })
    .expect("reopen")
}

fn io_errors(s: &Store) -> u64 {
    s.counters().io_errors.load(Ordering::Relaxed)
}

fn checksum_errors(s: &Store) -> u64 {
    s.counters().checksum_errors.load(Ordering::Relaxed)
}

#[test]
fn a_failed_write_is_never_acknowledged_changes_nothing_and_leaks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = store(dir.path());
    let v = volume(&s, "v");
    s.write(v, 0, &block("a"), false).expect("write");
    s.flush().expect("flush");
    let used = s.stats().used_blocks;
    for (fault, what) in [
        (Effect::Error(libc::EIO), "EIO"),
        (Effect::Error(libc::ENOSPC), "ENOSPC"),
        (Effect::Short(2048), "a short write"),
    ] {
        plan.arm(Fault::new(Some(OpKind::Write), fault).times(1));
        let before = io_errors(&s);
        match s.write(v, 0, &block("b"), false) {
            Err(StoreError::Io { .. }) => {}
            other => panic!("write under {what} answered {other:?}"),
        }
        assert_eq!(io_errors(&s), before + 1, "{what} is counted");
        assert_eq!(s.read(v, 0, BS).expect("read"), block("a"), "after {what}");
        s.flush().expect("flush");
        assert_eq!(
            s.stats().used_blocks,
            used,
            "{what}: its blocks are free again"
        );
    }
    assert_eq!(plan.injected(), 3);
    // The faults are used up: the same write now lands, and stays.
    s.write(v, 0, &block("c"), false).expect("write");
    s.flush().expect("flush");
    drop(s);
    let s = reopened(cfg);
    let v = s.volume_target("v").expect("v");
    assert_eq!(s.read(v, 0, BS).expect("read"), block("c"));
    assert_eq!(checksum_errors(&s), 0);
}

#[test]
fn a_failed_or_short_read_is_an_io_error_and_the_next_read_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _cfg, plan) = store(dir.path());
    let v = volume(&s, "v");
    let data: Vec<u8> = (0..4).flat_map(|i| block(&format!("r{i}"))).collect();
    s.write(v, 0, &data, false).expect("write");
    for fault in [Effect::Error(libc::EIO), Effect::Short(100)] {
        plan.arm(Fault::new(Some(OpKind::Read), fault).times(1));
        match s.read(v, 0, data.len()) {
            Err(StoreError::Io { .. }) => {}
            other => panic!("read under {fault:?} answered {other:?}"),
        }
        assert_eq!(s.read(v, 0, data.len()).expect("read"), data);
    }
    assert_eq!(io_errors(&s), 2);
    assert_eq!(
        checksum_errors(&s),
        0,
        "an I/O error is not a checksum error"
    );
}

#[test]
fn a_failed_flush_is_reported_and_the_next_one_makes_writes_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = store(dir.path());
    let v = volume(&s, "v");
    s.write(v, 0, &block("f"), false).expect("write");
    plan.arm(Fault::new(Some(OpKind::DataSync), Effect::Error(libc::EIO)).times(1));
    assert!(
        s.flush().is_err(),
        "a flush whose fdatasync failed succeeded"
    );
    s.flush().expect("the next flush");
    drop(s);
    let s = reopened(cfg);
    let v = s.volume_target("v").expect("v");
    assert_eq!(s.read(v, 0, BS).expect("read"), block("f"));
}

#[test]
fn faults_on_one_volumes_blocks_leave_other_volumes_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = store(dir.path());
    let (a, b) = (volume(&s, "a"), volume(&s, "b"));
    s.write(a, 0, &block("a0"), false).expect("write a");
    s.write(b, 0, &block("b0"), false).expect("write b");
    s.flush().expect("flush");
    plan.arm(Fault::new(None, Effect::Error(libc::EIO)).within(pool_range(&cfg, &block("a0"))));
    for i in 0..20u64 {
        assert!(s.read(a, 0, BS).is_err(), "a's bad block read");
        let data = block(&format!("b{i}"));
        s.write(b, i * BLOCK_SIZE, &data, i % 4 == 0)
            .expect("b write");
        assert_eq!(s.read(b, i * BLOCK_SIZE, BS).expect("b read"), data);
    }
    assert_eq!(plan.injected(), 20);
    plan.disarm_all();
    assert_eq!(s.read(a, 0, BS).expect("a after"), block("a0"));
}

#[test]
fn a_slow_completion_holds_up_only_its_own_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = store(dir.path());
    let s = Arc::new(s);
    let (a, b) = (volume(&s, "a"), volume(&s, "b"));
    s.write(a, 0, &block("slow"), false).expect("write a");
    s.flush().expect("flush");
    let delay = Duration::from_millis(800);
    plan.arm(
        Fault::new(Some(OpKind::Read), Effect::Delay(delay))
            .times(1)
            .within(pool_range(&cfg, &block("slow"))),
    );
    let slow_done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let reader = {
        let (s, done) = (s.clone(), slow_done.clone());
        std::thread::spawn(move || {
            let r = s.read(a, 0, BS);
            done.store(true, Ordering::SeqCst);
            (r, t0.elapsed())
        })
    };
    // Meanwhile the other volume is served as usual.
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..50u64 {
        let data = block(&format!("fast{i}"));
        s.write(b, i * BLOCK_SIZE, &data, false).expect("b write");
        assert_eq!(s.read(b, i * BLOCK_SIZE, BS).expect("b read"), data);
    }
    assert!(
        !slow_done.load(Ordering::SeqCst),
        "50 writes and reads of another volume waited for the slow read"
    );
    let (r, took) = reader.join().expect("reader");
    assert_eq!(r.expect("slow read"), block("slow"));
    assert!(took >= delay, "the delayed read came back after {took:?}");
    assert_eq!(plan.injected(), 1);
}
