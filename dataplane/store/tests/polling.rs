//! The I/O thread polls under shallow and deep loads and sleeps when idle
//! (see `io_loop`'s module documentation). One test in its own process, so the
//! only `berth-io` thread is the store's under test.

use std::sync::atomic::Ordering;
use std::time::Duration;

use berth_store::{Store, StoreConfig, BLOCK_SIZE};

/// CPU time (user + system, in clock ticks of 10 ms) of this process's
/// threads named `name`.
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").expect("tasks") {
        let dir = t.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("comm end") + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        total += f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    }
    total
}

/// Writes and reads back 4 KiB blocks, one at a time in each of `clients`
/// threads (queue depth `clients`); the store's `polled_work` counter
/// afterwards.
fn load(poll: Duration, clients: u64) -> (tempfile::TempDir, Store, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = StoreConfig::new(dir.path(), 64 << 20);
    cfg.poll = poll;
    let store = Store::create(&cfg).expect("store");
    let info = store.create_volume("v", 16 << 20).expect("volume");
    let v = store.volume_target(&info.name).expect("target");
    std::thread::scope(|s| {
        for c in 0..clients {
            let store = &store;
            s.spawn(move || {
                for i in (c..400).step_by(clients as usize) {
                    let data = vec![(i % 251) as u8 + 1; BLOCK_SIZE as usize];
                    let offset = i * BLOCK_SIZE;
                    store.write(v, offset, &data, false).expect("write");
                    assert_eq!(store.read(v, offset, data.len()).expect("read"), data);
                }
            });
        }
    });
    let polled = store.counters().polled_work.load(Ordering::Relaxed);
    (dir, store, polled)
}

#[test]
fn shallow_and_deep_loads_are_polled_and_an_idle_store_sleeps() {
    let (_dir, store, polled) = load(Duration::ZERO, 1);
    assert_eq!(polled, 0, "a zero window never polls");
    drop(store);

    let (_dir, store, polled) = load(berth_store::DEFAULT_POLL, 8);
    assert!(
        polled > 0,
        "800 requests from 8 threads at once: the loop should have found some while polling"
    );
    drop(store);

    let (_dir, store, polled) = load(berth_store::DEFAULT_POLL, 1);
    assert!(
        polled > 0,
        "800 requests one at a time: the loop should have found some while polling"
    );
    // Past the window the thread sleeps: over a second of idleness it may
    // run for the committer's and the WAL's occasional work, nothing like a
    // poll (which would take the whole second).
    std::thread::sleep(Duration::from_millis(50));
    let before = thread_ticks("berth-io");
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_ticks("berth-io") - before;
    assert!(
        used <= 10,
        "the idle I/O thread used {used} ticks (10 ms each) in a second"
    );
    // And it still answers at once when work comes back.
    let info = store.volume_target("v").expect("target");
    assert_eq!(
        store.read(info, 0, 4096).expect("read after idle")[0],
        1,
        "the first block holds the first write"
    );
}
