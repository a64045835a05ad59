//! The nexus over in-memory replicas whose failures the tests choose: which
//! requests fail, hang or are refused, and when the membership answers. The
//! same nexus over real volume servers (killed, paused, corrupted) is in the
//! workspace's end-to-end tests (`tests/tests/replication.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_nbd::nexus::{FaultError, Leg, LegState, Membership, Nexus, NexusOptions, Range};
use berth_nbd::proto::*;
use berth_nbd::session::{Cmd, Done, Outcome};
use berth_nbd::target::{call, BlockTarget, BoxFuture};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

const SIZE: u64 = 1 << 20;

/// A replica in memory. Every request completes on a task of its own, never
/// inside `submit`, as a session's do.
struct Mem {
    data: Mutex<Vec<u8>>,
    fail_writes: AtomicBool,
    /// Reads of these ranges fail once each (as a checksum error would).
    bad_reads: Mutex<Vec<Range>>,
    hang: AtomicBool,
    fenced: AtomicBool,
    /// Mutations wait while this is false.
    writes_open: watch::Sender<bool>,
    writes_seen: AtomicU64,
    reads_seen: AtomicU64,
}

impl Mem {
    fn new() -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            fail_writes: AtomicBool::new(false),
            bad_reads: Mutex::new(Vec::new()),
            hang: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            writes_open: watch::channel(true).0,
            writes_seen: AtomicU64::new(0),
            reads_seen: AtomicU64::new(0),
        })
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock()[offset as usize..offset as usize + len].to_vec()
    }

    fn apply(&self, cmd: &Cmd) -> Outcome {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(ESHUTDOWN);
        }
        let mut d = self.data.lock();
        match cmd {
            Cmd::Read { offset, len } => {
                self.reads_seen.fetch_add(1, Ordering::SeqCst);
                let r = Range {
                    offset: *offset,
                    len: u64::from(*len),
                };
                let mut bad = self.bad_reads.lock();
                if let Some(i) = bad
                    .iter()
                    .position(|b| b.offset < r.offset + r.len && r.offset < b.offset + b.len)
                {
                    bad.remove(i);
                    return Err(EIO);
                }
                if offset + u64::from(*len) > SIZE {
                    return Err(EINVAL);
                }
                Ok(d[*offset as usize..(*offset + u64::from(*len)) as usize].to_vec())
            }
            Cmd::Write { offset, data } => {
                self.writes_seen.fetch_add(1, Ordering::SeqCst);
                if self.fail_writes.load(Ordering::SeqCst) {
                    return Err(EIO);
                }
                if offset + data.len() as u64 > SIZE {
                    return Err(ENOSPC);
                }
                d[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                Ok(Vec::new())
            }
            Cmd::Flush => {
                if self.fail_writes.load(Ordering::SeqCst) {
                    return Err(EIO);
                }
                Ok(Vec::new())
            }
            Cmd::Trim { offset, len } | Cmd::WriteZeroes { offset, len } => {
                self.writes_seen.fetch_add(1, Ordering::SeqCst);
                if self.fail_writes.load(Ordering::SeqCst) {
                    return Err(EIO);
                }
                d[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
                Ok(Vec::new())
            }
        }
    }
}

struct MemTarget(Arc<Mem>);

impl BlockTarget for MemTarget {
    fn size_bytes(&self) -> u64 {
        SIZE
    }
    fn flags(&self) -> u16 {
        TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
    }
    fn submit(&self, cmd: Cmd, done: Done) {
        let m = self.0.clone();
        tokio::spawn(async move {
            if m.hang.load(Ordering::SeqCst) {
                // Never answers: the request is kept, as a paused server's.
                std::mem::forget(done);
                return;
            }
            if !matches!(cmd, Cmd::Read { .. } | Cmd::Flush) {
                let mut open = m.writes_open.subscribe();
                let _ = open.wait_for(|o| *o).await;
            }
            done(m.apply(&cmd));
        });
    }
    fn refresh_size(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async { Ok(SIZE) })
    }
    fn close(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The membership: records each report; answers as told.
#[derive(Default)]
struct Catalog {
    reports: Mutex<Vec<(String, u64, Vec<Range>)>>,
    /// Reports answered Unavailable before one is accepted.
    unavailable: AtomicU64,
    refuse: AtomicBool,
    /// Reports wait while this is false.
    open: Mutex<Option<watch::Sender<bool>>>,
    repaired: Mutex<Vec<(String, Range, String)>>,
}

impl Catalog {
    fn gated() -> Arc<Catalog> {
        let c = Catalog::default();
        *c.open.lock() = Some(watch::channel(false).0);
        Arc::new(c)
    }
    fn release(&self) {
        if let Some(tx) = &*self.open.lock() {
            tx.send_replace(true);
        }
    }
}

/// The catalog as the nexus holds it.
struct Cat(Arc<Catalog>);

impl Membership for Cat {
    fn fault(
        &self,
        leg: &str,
        generation: u64,
        pending: Vec<Range>,
    ) -> BoxFuture<'static, Result<u64, FaultError>> {
        let me = self.0.clone();
        let leg = leg.to_string();
        Box::pin(async move {
            let gate = me.open.lock().as_ref().map(|t| t.subscribe());
            if let Some(mut g) = gate {
                let _ = g.wait_for(|o| *o).await;
            }
            if me.refuse.load(Ordering::SeqCst) {
                return Err(FaultError::Deposed(format!(
                    "generation {generation} is not current"
                )));
            }
            if me
                .unavailable
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(FaultError::Unavailable("no leader".into()));
            }
            me.reports.lock().push((leg, generation, pending));
            Ok(generation + 1)
        })
    }

    fn repaired(&self, leg: &str, range: Range, from: &str) {
        self.0
            .repaired
            .lock()
            .push((leg.to_string(), range, from.to_string()));
    }
}

fn opts() -> NexusOptions {
    NexusOptions {
        leg_timeout: Duration::from_millis(200),
        report_retry: Duration::from_millis(5),
        hold_timeout: Duration::from_secs(30),
    }
}

fn nexus(mems: &[Arc<Mem>], catalog: &Arc<Catalog>) -> Nexus {
    nexus_with(mems, catalog, opts())
}

/// A nexus at generation 7 over `mems` (leg i is `node-i`).
fn nexus_with(mems: &[Arc<Mem>], catalog: &Arc<Catalog>, o: NexusOptions) -> Nexus {
    let legs = mems
        .iter()
        .enumerate()
        .map(|(i, m)| Leg {
            name: format!("node-{i}"),
            target: Arc::new(MemTarget(m.clone())),
        })
        .collect();
    Nexus::new(legs, 7, Arc::new(Cat(catalog.clone())), o).expect("nexus")
}

fn write(offset: u64, byte: u8, len: usize) -> Cmd {
    Cmd::Write {
        offset,
        data: Bytes::from(vec![byte; len]),
    }
}

fn range(offset: u64, len: u64) -> Range {
    Range { offset, len }
}

/// Submits `cmd` and returns a receiver of its outcome.
fn start(n: &Nexus, cmd: Cmd) -> tokio::sync::oneshot::Receiver<Outcome> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    n.submit(
        cmd,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx
}

/// Lets the runtime run every ready task a few times over.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn writes_reach_every_replica_and_reads_come_from_the_first() {
    let mems = [Mem::new(), Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    call(&n, write(4096, 0xab, 8192))
        .await
        .expect("acknowledged");
    call(
        &n,
        Cmd::WriteZeroes {
            offset: 8192,
            len: 4096,
        },
    )
    .await
    .expect("acknowledged");
    call(&n, Cmd::Flush).await.expect("acknowledged");
    let mut want = vec![0xab; 4096];
    want.extend(vec![0; 4096]);
    for m in &mems {
        assert_eq!(m.bytes(4096, 8192), want);
    }
    let got = call(
        &n,
        Cmd::Read {
            offset: 4096,
            len: 8192,
        },
    )
    .await
    .expect("acknowledged");
    assert_eq!(got, want);
    assert_eq!(mems[0].reads_seen.load(Ordering::SeqCst), 1);
    assert_eq!(mems[1].reads_seen.load(Ordering::SeqCst), 0);
    assert!(cat.reports.lock().is_empty());
    assert_eq!(n.generation(), 7);
}

#[tokio::test]
async fn a_failed_leg_is_reported_out_before_the_write_is_acknowledged() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Catalog::gated();
    let n = nexus(&mems, &cat);
    // Acknowledged by the second leg and flushed: not pending for it.
    call(&n, write(0, 1, 4096)).await.expect("acknowledged");
    call(&n, Cmd::Flush).await.expect("acknowledged");
    // Acknowledged and not flushed: pending (a killed server may lose it).
    call(&n, write(65536, 2, 4096)).await.expect("acknowledged");
    mems[1].fail_writes.store(true, Ordering::SeqCst);
    let mut w = start(&n, write(8192, 3, 4096));
    settle().await;
    assert!(
        w.try_recv().is_err(),
        "acknowledged before the catalog marked the failed replica out"
    );
    // A write meanwhile skips the leaving leg, and waits for the same report.
    let mut w2 = start(&n, write(12288, 4, 4096));
    settle().await;
    assert!(w2.try_recv().is_err());
    assert_eq!(n.legs()[1].1, LegState::Leaving);
    cat.release();
    w.await.expect("answered").expect("acknowledged");
    w2.await.expect("answered").expect("acknowledged");
    let reports = cat.reports.lock().clone();
    // The report, then the same report again with the write that skipped
    // the leg while the first was on its way (the other copies may have
    // applied it before they started recording changes).
    assert_eq!(
        reports,
        vec![
            (
                "node-1".to_string(),
                7,
                vec![range(8192, 4096), range(65536, 4096)]
            ),
            ("node-1".to_string(), 7, vec![range(12288, 4096)]),
        ]
    );
    assert_eq!(n.generation(), 8);
    assert_eq!(n.legs()[1].1, LegState::Out);
    // The set goes on without it.
    let before = mems[1].writes_seen.load(Ordering::SeqCst);
    call(&n, write(16384, 5, 4096)).await.expect("acknowledged");
    call(&n, Cmd::Flush).await.expect("acknowledged");
    assert_eq!(mems[1].writes_seen.load(Ordering::SeqCst), before);
    assert_eq!(mems[0].bytes(8192, 4096), vec![3; 4096]);
    assert_eq!(mems[0].bytes(16384, 4096), vec![5; 4096]);
    assert_eq!(n.stats().faults.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn reports_are_retried_while_the_catalog_is_unavailable() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    cat.unavailable.store(3, Ordering::SeqCst);
    let n = nexus(&mems, &cat);
    mems[0].fail_writes.store(true, Ordering::SeqCst);
    call(&n, write(0, 9, 4096)).await.expect("acknowledged");
    assert_eq!(cat.unavailable.load(Ordering::SeqCst), 0);
    assert_eq!(cat.reports.lock().len(), 1);
    assert_eq!(mems[1].bytes(0, 4096), vec![9; 4096]);
    // Reads now come from the remaining leg.
    let got = call(
        &n,
        Cmd::Read {
            offset: 0,
            len: 4096,
        },
    )
    .await
    .expect("acknowledged");
    assert_eq!(got, vec![9; 4096]);
}

#[tokio::test]
async fn the_last_leg_is_never_reported_out() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    for m in &mems {
        m.fail_writes.store(true, Ordering::SeqCst);
    }
    assert_eq!(call(&n, write(0, 1, 4096)).await, Err(EIO));
    assert!(cat.reports.lock().is_empty());
    assert!(n.legs().iter().all(|(_, s)| *s == LegState::Active));
    // Back: the set writes again with both.
    for m in &mems {
        m.fail_writes.store(false, Ordering::SeqCst);
    }
    call(&n, write(0, 2, 4096)).await.expect("acknowledged");
    assert_eq!(mems[1].bytes(0, 4096), vec![2; 4096]);
}

#[tokio::test]
async fn request_errors_pass_through_and_fault_nobody() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    assert_eq!(call(&n, write(SIZE - 512, 1, 4096)).await, Err(ENOSPC));
    assert_eq!(
        call(
            &n,
            Cmd::Read {
                offset: SIZE,
                len: 512
            }
        )
        .await,
        Err(EINVAL)
    );
    assert!(cat.reports.lock().is_empty());
    assert!(n.legs().iter().all(|(_, s)| *s == LegState::Active));
}

#[tokio::test]
async fn a_leg_that_stops_answering_is_reported_after_the_timeout() {
    let mems = [Mem::new(), Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    mems[2].hang.store(true, Ordering::SeqCst);
    let t = std::time::Instant::now();
    call(&n, write(0, 7, 4096)).await.expect("acknowledged");
    let waited = t.elapsed();
    assert!(
        waited >= opts().leg_timeout,
        "acknowledged before the hung leg was out ({waited:?})"
    );
    let reports = cat.reports.lock().clone();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].0, "node-2");
    assert_eq!(reports[0].2, vec![range(0, 4096)]);
    assert_eq!(n.legs()[2].1, LegState::Out);
    // Two faults in a row carry the generation the first produced.
    mems[1].fail_writes.store(true, Ordering::SeqCst);
    call(&n, write(4096, 8, 4096)).await.expect("acknowledged");
    let reports = cat.reports.lock().clone();
    assert_eq!(reports[1].0, "node-1");
    assert_eq!(reports[1].1, 8);
    assert_eq!(n.generation(), 9);
}

#[tokio::test]
async fn a_fenced_nexus_stops_serving() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    mems[0].fenced.store(true, Ordering::SeqCst);
    assert_eq!(call(&n, write(0, 1, 4096)).await, Err(EIO));
    assert!(n.deposed().is_some());
    assert_eq!(
        call(
            &n,
            Cmd::Read {
                offset: 0,
                len: 4096
            }
        )
        .await,
        Err(EIO)
    );
    assert!(
        cat.reports.lock().is_empty(),
        "a deposed nexus reported a fault"
    );

    // A refused report deposes it too, and the write it held fails.
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    cat.refuse.store(true, Ordering::SeqCst);
    let n = nexus(&mems, &cat);
    mems[1].fail_writes.store(true, Ordering::SeqCst);
    assert_eq!(call(&n, write(0, 1, 4096)).await, Err(EIO));
    assert!(n.deposed().is_some());
}

#[tokio::test]
async fn a_failed_read_is_served_by_another_replica_and_repaired() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    call(&n, write(0, 0x5a, 16384)).await.expect("acknowledged");
    // The first replica's copy of one block went bad.
    mems[0].data.lock()[4096..8192].fill(0xff);
    mems[0].bad_reads.lock().push(range(4096, 4096));
    let got = call(
        &n,
        Cmd::Read {
            offset: 0,
            len: 16384,
        },
    )
    .await
    .expect("acknowledged");
    assert_eq!(got, vec![0x5a; 16384]);
    let stats = n.stats();
    for _ in 0..200 {
        if stats.repairs.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stats.repairs.load(Ordering::SeqCst), 1);
    assert_eq!(stats.read_retries.load(Ordering::SeqCst), 1);
    assert_eq!(mems[0].bytes(0, 16384), vec![0x5a; 16384]);
    assert!(
        cat.reports.lock().is_empty(),
        "a repaired replica was reported out"
    );
    // The whole read was rewritten (the bad block is inside it), from the
    // replica that served it, and the catalog heard of it.
    assert_eq!(
        cat.repaired.lock().clone(),
        vec![("node-0".to_string(), range(0, 16384), "node-1".to_string())]
    );
}

/// Holds the second replica's writes, sends a write of `new` over `old` at
/// `offset` (it lands on the first replica only), then fails the first
/// replica's next read of it: the read is served by the second replica,
/// with the old data, and a repair starts that must wait for the write.
async fn repair_behind_a_write(
    n: &Nexus,
    mems: &[Arc<Mem>],
    offset: u64,
    old: u8,
    new: u8,
) -> tokio::sync::oneshot::Receiver<Outcome> {
    call(n, write(offset, old, 4096))
        .await
        .expect("acknowledged");
    mems[1].writes_open.send_replace(false);
    let w = start(n, write(offset, new, 4096));
    settle().await;
    assert_eq!(mems[0].bytes(offset, 4096), vec![new; 4096]);
    assert_eq!(mems[1].bytes(offset, 4096), vec![old; 4096]);
    mems[0].bad_reads.lock().push(range(offset, 4096));
    let got = call(n, Cmd::Read { offset, len: 4096 })
        .await
        .expect("acknowledged");
    assert_eq!(
        got,
        vec![old; 4096],
        "the read came from the second replica"
    );
    settle().await;
    w
}

async fn repairs_reach(n: &Nexus, want: u64) {
    for _ in 0..400 {
        if n.stats().repairs.load(Ordering::SeqCst) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("repairs never reached {want}");
}

#[tokio::test]
async fn a_repair_never_overwrites_a_newer_write() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Arc::new(Catalog::default());
    let n = nexus(&mems, &cat);
    // The repair waits for the write in flight, then copies what it wrote.
    let w = repair_behind_a_write(&n, &mems, 0, 0xaa, 0xbb).await;
    assert_eq!(
        n.stats().repairs.load(Ordering::SeqCst),
        0,
        "repaired around a write in flight"
    );
    mems[1].writes_open.send_replace(true);
    w.await.expect("answered").expect("acknowledged");
    repairs_reach(&n, 1).await;
    assert_eq!(mems[0].bytes(0, 4096), vec![0xbb; 4096]);
    assert_eq!(mems[1].bytes(0, 4096), vec![0xbb; 4096]);

    // A write to the range while the repair is under way waits for it.
    let w = repair_behind_a_write(&n, &mems, 8192, 0x11, 0x22).await;
    let mut w3 = start(&n, write(8192, 0x33, 4096));
    settle().await;
    assert!(
        w3.try_recv().is_err(),
        "a write overlapping a repair was not held"
    );
    mems[1].writes_open.send_replace(true);
    w.await.expect("answered").expect("acknowledged");
    w3.await.expect("answered").expect("acknowledged");
    repairs_reach(&n, 2).await;
    assert_eq!(mems[0].bytes(8192, 4096), vec![0x33; 4096]);
    assert_eq!(mems[1].bytes(8192, 4096), vec![0x33; 4096]);
    assert!(cat.reports.lock().is_empty());
}

#[tokio::test]
async fn a_write_held_for_a_report_that_never_comes_fails_and_the_leg_stays_out() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Catalog::gated();
    let n = nexus_with(
        &mems,
        &cat,
        NexusOptions {
            hold_timeout: Duration::from_millis(100),
            ..opts()
        },
    );
    mems[1].fail_writes.store(true, Ordering::SeqCst);
    assert_eq!(call(&n, write(0, 1, 4096)).await, Err(EIO));
    assert_eq!(n.legs()[1].1, LegState::Leaving);
    // Still not acknowledged without the report; once it comes, writes go on.
    assert_eq!(call(&n, write(4096, 2, 4096)).await, Err(EIO));
    cat.release();
    call(&n, write(8192, 3, 4096)).await.expect("acknowledged");
    assert_eq!(n.legs()[1].1, LegState::Out);
}

#[tokio::test]
async fn a_joining_leg_is_written_not_read_and_its_copy_never_puts_back_older_data() {
    let (m0, m1) = (Mem::new(), Mem::new());
    let cat = Catalog::gated();
    cat.release();
    let n = nexus(std::slice::from_ref(&m0), &cat);
    call(&n, write(0, 1, 65536)).await.expect("acknowledged");
    n.join("node-1", Arc::new(MemTarget(m1.clone())))
        .expect("join");
    assert_eq!(
        n.legs().iter().map(|l| l.1.clone()).collect::<Vec<_>>(),
        vec![LegState::Active, LegState::Rebuilding]
    );
    assert!(n.join("node-1", Arc::new(MemTarget(m1.clone()))).is_err());
    // Written, not read.
    call(&n, write(131072, 2, 4096))
        .await
        .expect("acknowledged");
    assert_eq!(m1.bytes(131072, 4096), vec![2; 4096]);
    call(
        &n,
        Cmd::Read {
            offset: 0,
            len: 4096,
        },
    )
    .await
    .expect("read");
    assert_eq!(m1.reads_seen.load(Ordering::SeqCst), 0);

    // A client write to the range is in flight (the in-sync leg holds it)
    // when the copy of the range starts: the copy waits for it and reads
    // the range after it, so the joining leg never ends up with the data
    // the write replaced.
    m0.writes_open.send_replace(false);
    let mut w = start(&n, write(4096, 9, 4096));
    settle().await;
    assert_eq!(
        m1.bytes(4096, 4096),
        vec![9; 4096],
        "the joining leg has it"
    );
    let n2 = n.clone();
    let mut copy = tokio::spawn(async move { n2.copy("node-1", range(0, 65536)).await });
    settle().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut copy)
            .await
            .is_err(),
        "the copy did not wait for the write in flight to its range"
    );
    // A new write to the range waits for the copy.
    let mut w2 = start(&n, write(8192, 7, 4096));
    m0.writes_open.send_replace(true);
    w.try_recv().ok();
    copy.await.expect("copy task").expect("copied");
    w2.try_recv().ok();
    settle().await;
    call(&n, Cmd::Flush).await.expect("flushed");
    assert_eq!(m1.bytes(0, 65536), m0.bytes(0, 65536));
    assert_eq!(m1.bytes(4096, 4096), vec![9; 4096]);
    assert_eq!(m1.bytes(8192, 4096), vec![7; 4096]);
    // Zeros are copied as write-zeroes; the bytes match either way.
    n.copy("node-1", range(65536, 65536)).await.expect("copied");
    assert_eq!(m1.bytes(0, 262144), m0.bytes(0, 262144));
    assert_eq!(
        n.stats().rebuilt_bytes.load(Ordering::SeqCst),
        131072,
        "bytes copied"
    );
    n.flush_leg("node-1").await.expect("flushed");
    n.promote("node-1").expect("promote");
    assert_eq!(n.legs()[1].1, LegState::Active);

    // A joining leg that fails a write leaves like any other.
    let m2 = Mem::new();
    let n = nexus(std::slice::from_ref(&m0), &cat);
    n.join("node-1", Arc::new(MemTarget(m2.clone())))
        .expect("join");
    m2.fail_writes.store(true, Ordering::SeqCst);
    call(&n, write(0, 3, 4096)).await.expect("acknowledged");
    assert_eq!(n.legs()[1].1, LegState::Out);
    assert!(n.copy("node-1", range(0, 4096)).await.is_err());
    let reports = cat.reports.lock().clone();
    assert_eq!(reports.last().map(|r| r.0.as_str()), Some("node-1"));
    // And a replacement of that leg may join again.
    n.join("node-1", Arc::new(MemTarget(m1.clone())))
        .expect("join again");
}

#[tokio::test]
async fn a_quiesced_nexus_parks_new_writes_after_the_ones_in_flight_land() {
    let mems = [Mem::new(), Mem::new()];
    let cat = Catalog::gated();
    cat.release();
    let n = nexus(&mems, &cat);
    // A write in flight (held by the second replica) when the pause starts.
    mems[1].writes_open.send_replace(false);
    let mut w = start(&n, write(0, 1, 4096));
    settle().await;
    let n2 = n.clone();
    let mut q = tokio::spawn(async move { n2.quiesce().await });
    settle().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut q)
            .await
            .is_err(),
        "the pause did not wait for the write in flight"
    );
    mems[1].writes_open.send_replace(true);
    let guard = q.await.expect("task").expect("quiesced");
    w.try_recv()
        .expect("the write in flight was answered before the pause")
        .expect("acknowledged");
    // Both replicas hold the same data now, and a new write waits.
    assert_eq!(mems[0].bytes(0, 4096), mems[1].bytes(0, 4096));
    let mut w2 = start(&n, write(0, 2, 4096));
    let mut f = start(&n, Cmd::Flush);
    settle().await;
    assert!(w2.try_recv().is_err() && f.try_recv().is_err());
    assert_eq!(mems[0].bytes(0, 4096), vec![1; 4096]);
    // Reads go on.
    let got = call(
        &n,
        Cmd::Read {
            offset: 0,
            len: 4096,
        },
    )
    .await
    .expect("read");
    assert_eq!(got, vec![1; 4096]);
    drop(guard);
    w2.await.expect("answered").expect("acknowledged");
    f.await.expect("answered").expect("flushed");
    assert_eq!(mems[1].bytes(0, 4096), vec![2; 4096]);
}
