//! Control work on one volume holds up no other: a volume's garbage is
//! collected in the background in bounded steps, off the catalog lock, and a
//! snapshot freezes only its own volume. Each test holds the store at a named
//! point ([`Pauses`]) and shows that other volumes' I/O goes on meanwhile:
//! with the old design (collection and the snapshot's sync under the one
//! catalog lock) it could not.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use berth_store::{Pauses, Store, StoreConfig};

/// Long enough for a loaded CI machine; only a stall (a held lock) reaches it.
const PATIENCE: Duration = Duration::from_secs(20);

fn store(dir: &std::path::Path, pauses: &Arc<Pauses>) -> Arc<Store> {
    let cfg = StoreConfig {
        pauses: Some(pauses.clone()),
        ..StoreConfig::new(dir, 64 << 20)
    };
    Arc::new(Store::create(&cfg).expect("create"))
}

/// Runs `f` on another thread; its result, or a panic if it took longer than
/// [`PATIENCE`] (it was held up by something it must not wait for).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{what} was held up for {PATIENCE:?}"))
}

fn fill(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

#[test]
fn a_collection_in_progress_holds_up_no_other_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pauses = Arc::new(Pauses::default());
    let s = store(dir.path(), &pauses);
    s.create_volume("a", 1 << 20).expect("a");
    s.create_volume("b", 16 << 20).expect("b");
    let (a, b) = (
        s.volume_target("a").expect("a"),
        s.volume_target("b").expect("b"),
    );
    s.write(a, 0, &fill(1, 4096), false).expect("write a");
    // 4,096 mapped blocks: a walk of four steps.
    for m in 0..16u64 {
        s.write(b, m << 20, &fill(2, 1 << 20), false)
            .expect("write b");
    }
    s.sync().expect("sync");
    let before = s.stats().used_blocks;
    pauses.hold("gc-step");
    // The delete returns with the collection not even started.
    let s2 = s.clone();
    within("delete_volume", move || s2.delete_volume("b")).expect("delete");
    assert!(
        pauses.wait_reached("gc-step", 1, PATIENCE),
        "the walk began"
    );
    // Held mid-walk: the other volume reads and writes, durably; control
    // work goes on; the name is free again.
    let s2 = s.clone();
    within("I/O on another volume", move || {
        s2.write(a, 4096, &fill(3, 8192), true)?;
        s2.flush()?;
        s2.read(a, 0, 12288)
    })
    .map(|d| assert_eq!(d, [fill(1, 4096), fill(3, 8192)].concat()))
    .expect("read a");
    let s2 = s.clone();
    within("control work", move || {
        s2.create_snapshot("a", "a-snap")?;
        s2.create_volume("b", 1 << 20)
    })
    .expect("control");
    // A's two new blocks; nothing of B collected yet.
    assert_eq!(s.stats().used_blocks, before + 2, "nothing collected yet");
    pauses.release("gc-step");
    let s2 = s.clone();
    within("the collection", move || s2.settle());
    s.sync().expect("sync");
    assert_eq!(
        s.stats().used_blocks,
        before + 2 - 4096,
        "every block of the deleted volume is free"
    );
    assert!(
        pauses.wait_reached("gc-step", 4, PATIENCE),
        "in bounded steps"
    );
}

#[test]
fn a_snapshot_freezes_only_its_own_volume_and_holds_every_write_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pauses = Arc::new(Pauses::default());
    let s = store(dir.path(), &pauses);
    s.create_volume("a", 1 << 20).expect("a");
    s.create_volume("b", 1 << 20).expect("b");
    let (a, b) = (
        s.volume_target("a").expect("a"),
        s.volume_target("b").expect("b"),
    );
    s.write(b, 0, &fill(4, 4096), false)
        .expect("acknowledged before");
    pauses.hold("snapshot-frozen");
    let s2 = s.clone();
    let snap = std::thread::spawn(move || s2.create_snapshot("b", "b-snap"));
    assert!(pauses.wait_reached("snapshot-frozen", 1, PATIENCE));
    // B is frozen: a write to it waits for the snapshot.
    let (tx, rx) = mpsc::channel();
    let s2 = s.clone();
    std::thread::spawn(move || {
        let _ = tx.send(s2.write(b, 0, &fill(5, 4096), false));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write to the frozen volume went ahead of its snapshot"
    );
    // A is not frozen.
    let s2 = s.clone();
    within("a write to another volume", move || {
        s2.write(a, 0, &fill(6, 4096), true)
    })
    .expect("write a");
    pauses.release("snapshot-frozen");
    snap.join().expect("snapshot thread").expect("snapshot");
    rx.recv_timeout(PATIENCE)
        .expect("the waiting write went after the snapshot")
        .expect("write b");
    let t = s.snapshot_target("b-snap").expect("snap");
    assert_eq!(s.read(t, 0, 4096).expect("read snap"), fill(4, 4096));
    assert_eq!(s.read(b, 0, 4096).expect("read b"), fill(5, 4096));
    assert_eq!(s.read(a, 0, 4096).expect("read a"), fill(6, 4096));
    assert_eq!(s.list_snapshots().len(), 1);
}
