//! Deferred writes against a real store: a small write is answered once its
//! data is in the metadata commit, and the pool is written afterwards. Reads
//! of a block not yet in the pool wait for it, other volumes do not; a flush
//! leaves the data in the pool and the records gone; a pool write that fails
//! keeps its record, and the next open writes it; so does the open after a
//! kill -9 of a process whose writes never reached the pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_io::fault::{Effect, Fault, FaultPlan};
use berth_io::OpKind;
use berth_store::{Store, StoreConfig, Target, BLOCK_SIZE};

mod common;
use common::{block, BS};

fn faulty(dir: &std::path::Path) -> (Store, StoreConfig, Arc<FaultPlan>) {
    let plan = FaultPlan::new();
    let cfg = StoreConfig {
        faults: Some(plan.clone()),
        ..StoreConfig::new(dir, 32 << 20)
    };
    (Store::create(&cfg).expect("create"), cfg, plan)
}

fn volume(s: &Store, name: &str) -> Target {
    s.volume_target(&s.create_volume(name, 4 << 20).expect("volume").name)
        .expect("target")
}

fn deferred_writes(s: &Store) -> u64 {
    s.counters().deferred_writes.load(Ordering::Relaxed)
}

/// Waits until the store has seen a pool write fail (a deferred write's,
/// after it was answered).
fn wait_for_a_failed_pool_write(s: &Store) {
    let t0 = Instant::now();
    while s.counters().io_errors.load(Ordering::Relaxed) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no pool write failed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the pool file holds `data` in some block.
fn in_pool(cfg: &StoreConfig, data: &[u8]) -> bool {
    let pool = std::fs::read(cfg.pool_path()).expect("read pool");
    pool.chunks(BS).any(|c| c == data)
}

#[test]
fn a_deferred_write_is_answered_before_its_pool_write_and_reads_wait_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = faulty(dir.path());
    let (v, w) = (volume(&s, "v"), volume(&s, "w"));
    s.write(v, 0, &block("old"), false).expect("write");
    s.flush().expect("flush");
    assert_eq!(deferred_writes(&s), 1);
    assert!(
        in_pool(&cfg, &block("old")),
        "a flush leaves the data in the pool"
    );
    assert_eq!(s.stats().deferred_blocks, 0, "and its record gone");

    let delay = Duration::from_millis(600);
    plan.arm(Fault::new(Some(OpKind::Write), Effect::Delay(delay)).times(1));
    let t0 = Instant::now();
    s.write(v, 0, &block("new"), false).expect("write");
    assert!(
        t0.elapsed() < delay,
        "the write waited for its pool write ({:?})",
        t0.elapsed()
    );
    assert_eq!(deferred_writes(&s), 2);
    // Another volume is served while that pool write is outstanding.
    s.write(w, 0, &block("w"), false).expect("write w");
    assert_eq!(s.read(w, 0, BS).expect("read w"), block("w"));
    assert!(
        t0.elapsed() < delay,
        "another volume waited for the pool write"
    );
    // A read of the block waits until its data is in the pool.
    assert_eq!(s.read(v, 0, BS).expect("read"), block("new"));
    assert!(
        t0.elapsed() >= delay,
        "the read of a block not yet in the pool did not wait for it"
    );
    s.flush().expect("flush");
    assert!(in_pool(&cfg, &block("new")));
    assert_eq!(s.stats().deferred_blocks, 0);
    assert_eq!(plan.injected(), 1);
}

#[test]
fn a_flush_waits_for_the_pool_writes_of_the_writes_it_covers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = faulty(dir.path());
    let v = volume(&s, "v");
    let delay = Duration::from_millis(400);
    plan.arm(Fault::new(Some(OpKind::Write), Effect::Delay(delay)).times(1));
    let t0 = Instant::now();
    s.write(v, 0, &block("f"), false).expect("write");
    s.flush().expect("flush");
    assert!(
        t0.elapsed() >= delay,
        "the flush did not wait for the pool write"
    );
    assert!(in_pool(&cfg, &block("f")));
    assert_eq!(s.stats().deferred_blocks, 0);
}

#[test]
fn overwrites_of_a_block_whose_pool_write_is_outstanding_free_every_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _cfg, plan) = faulty(dir.path());
    let v = volume(&s, "v");
    // Every pool write is slow, so most overwrites free a block whose own
    // write is still in flight (it is freed when that write ends).
    plan.arm(Fault::new(Some(OpKind::Write), Effect::Delay(Duration::from_millis(5))).times(1000));
    let s = Arc::new(s);
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    s.write(v, 0, &block(&format!("{t}-{i}")), false)
                        .expect("write");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    s.write(v, BLOCK_SIZE, &block("last"), false)
        .expect("write");
    s.flush().expect("flush");
    let first = s.read(v, 0, BS).expect("read");
    assert!(
        (0..4).any(|t| first == block(&format!("{t}-49"))),
        "block 0 holds one writer's last write"
    );
    assert_eq!(s.read(v, BLOCK_SIZE, BS).expect("read"), block("last"));
    let st = s.stats();
    assert_eq!(
        st.used_blocks, 2,
        "every overwritten copy was freed: {st:?}"
    );
    assert_eq!(st.deferred_blocks, 0, "{st:?}");
    assert_eq!(deferred_writes(&s), 201);
}

#[test]
fn a_deferred_write_whose_pool_write_failed_is_written_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, cfg, plan) = faulty(dir.path());
    let v = volume(&s, "v");
    s.write(v, BLOCK_SIZE, &block("neighbour"), false)
        .expect("write");
    // Its pool write is done once the flush is.
    s.flush().expect("flush");
    plan.arm(Fault::new(Some(OpKind::Write), Effect::Error(libc::EIO)).times(1));
    // Answered: the data is in the commit, whatever the pool does next.
    s.write(v, 0, &block("kept"), false).expect("write");
    wait_for_a_failed_pool_write(&s);
    // Until it is written, a read finds the pool's copy wrong and takes the
    // record's: no error, no stale data.
    assert_eq!(s.read(v, 0, BS).expect("read"), block("kept"));
    // And so does a read of a larger range.
    let both: Vec<u8> = [block("kept"), block("neighbour")].concat();
    assert_eq!(s.read(v, 0, 2 * BS).expect("read"), both);
    assert_eq!(
        s.counters().checksum_errors.load(Ordering::Relaxed),
        0,
        "a block read from its record is no checksum error"
    );
    assert_eq!(s.read(v, BLOCK_SIZE, BS).expect("read"), block("neighbour"));
    s.flush().expect("flush");
    assert_eq!(s.stats().deferred_blocks, 1, "the record stays");
    assert!(!in_pool(&cfg, &block("kept")));
    drop(s);
    let s = Store::open(&StoreConfig {
        faults: None,
        ..cfg.clone()
    })
    .expect("reopen");
    assert_eq!(s.counters().deferred_replayed.load(Ordering::Relaxed), 1);
    assert!(in_pool(&cfg, &block("kept")));
    let v = s.volume_target("v").expect("v");
    assert_eq!(s.read(v, 0, BS).expect("read"), block("kept"));
    let report = s.scrub().expect("scrub");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(s.stats().deferred_blocks, 0);
}

#[test]
fn a_partial_write_over_a_block_whose_pool_write_failed_keeps_its_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _cfg, plan) = faulty(dir.path());
    let v = volume(&s, "v");
    plan.arm(Fault::new(Some(OpKind::Write), Effect::Error(libc::EIO)).times(1));
    s.write(v, 0, &block("old"), false).expect("write");
    wait_for_a_failed_pool_write(&s);
    // The edge read of this write finds the old block's record.
    s.write(v, 100, b"edge", false).expect("partial write");
    let mut want = block("old");
    want[100..104].copy_from_slice(b"edge");
    assert_eq!(s.read(v, 0, BS).expect("read"), want);
    s.flush().expect("flush");
    assert_eq!(s.read(v, 0, BS).expect("read"), want);
    assert_eq!(s.counters().checksum_errors.load(Ordering::Relaxed), 0);
    // The failed block was freed by the overwrite, and its record with it.
    assert_eq!(s.stats().deferred_blocks, 0);
    assert_eq!(s.stats().used_blocks, 1);
}

/// How many blocks the killed child writes.
const CHILD_BLOCKS: u64 = 64;

/// Run by `acknowledged_deferred_writes_survive_a_kill_9` in a child process
/// (ignored otherwise): writes whose pool writes all fail, says so, waits to
/// be killed.
#[test]
#[ignore = "the child of acknowledged_deferred_writes_survive_a_kill_9"]
fn child_writes_and_waits_to_be_killed() {
    let dir = std::env::var_os("BERTH_DEFER_CHILD").expect("run by the parent test");
    let plan = FaultPlan::new();
    plan.arm(Fault::new(Some(OpKind::Write), Effect::Error(libc::EIO)).times(1 << 20));
    let cfg = StoreConfig {
        faults: Some(plan),
        ..StoreConfig::new(&dir, 32 << 20)
    };
    let s = Store::open(&cfg).expect("open");
    let v = s.volume_target("v").expect("v");
    for i in 0..CHILD_BLOCKS {
        s.write(v, i * BLOCK_SIZE, &block(&format!("k{i}")), false)
            .expect("write");
    }
    println!("WRITTEN");
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn acknowledged_deferred_writes_survive_a_kill_9() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::new(dir.path(), 32 << 20);
    {
        let s = Store::create(&cfg).expect("create");
        s.create_volume("v", 4 << 20).expect("volume");
    }
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "child_writes_and_waits_to_be_killed",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BERTH_DEFER_CHILD", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut written = false;
    for line in out.lines() {
        if line.expect("line").contains("WRITTEN") {
            written = true;
            break;
        }
    }
    // SIGKILL: no destructor, no flush.
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    assert!(written, "the child did not write ({status})");
    for i in 0..CHILD_BLOCKS {
        assert!(
            !in_pool(&cfg, &block(&format!("k{i}"))),
            "block {i} reached the pool before the kill"
        );
    }
    let s = Store::open(&cfg).expect("reopen");
    assert_eq!(
        s.counters().deferred_replayed.load(Ordering::Relaxed),
        CHILD_BLOCKS
    );
    let v = s.volume_target("v").expect("v");
    for i in 0..CHILD_BLOCKS {
        assert_eq!(
            s.read(v, i * BLOCK_SIZE, BS).expect("read"),
            block(&format!("k{i}")),
            "block {i}"
        );
    }
    assert!(s.scrub().expect("scrub").errors.is_empty());
}
