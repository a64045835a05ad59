//! Change tracking (the delta rebuild's list of what a replica missed): only
//! blocks changed while tracking are listed, across writes, zeroing, trims
//! and a reopen; stopping forgets them; a deleted volume leaves nothing.

use berth_store::{Changes, Store, StoreConfig, Zeroing, BLOCK_SIZE};

fn changes(point: u64, round: u64, ranges: Vec<(u64, u64)>) -> Option<Changes> {
    Some(Changes {
        point,
        round,
        ranges,
    })
}

const BS: u64 = BLOCK_SIZE;

#[test]
fn lists_exactly_the_blocks_changed_while_tracking_and_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::new(dir.path(), 64 << 20);
    {
        let s = Store::create(&cfg).expect("create");
        s.create_volume("v", 16 << 20).expect("v");
        s.create_volume("other", 16 << 20).expect("other");
        let v = s.volume_target("v").expect("v");
        // Before tracking: not listed, and listing says "not tracking".
        s.write(v, 0, &vec![1u8; 8 * BS as usize], false)
            .expect("w");
        assert_eq!(s.changed_ranges("v", 0, 100).expect("list"), None);
        assert_eq!(s.tracking("v").expect("tracking"), None);

        assert_eq!(s.track_changes("v", 7).expect("track"), (7, 1));
        // Tracking again keeps the first point and starts a new round.
        assert_eq!(s.track_changes("v", 9).expect("track"), (7, 2));
        s.write(v, 2 * BS, &vec![2u8; 2 * BS as usize], false)
            .expect("w");
        s.write(v, 10 * BS, &vec![3u8; BS as usize], false)
            .expect("w");
        // Adjacent to the first write: merged into one range.
        s.write(v, 4 * BS, &vec![4u8; BS as usize], false)
            .expect("w");
        // A trim of written blocks, and zeroing of never-written ones.
        s.trim(v, 6 * BS, BS).expect("trim");
        s.write_zeroes(v, 100 * BS, 3 * BS, Zeroing::Zero, false)
            .expect("zero");
        // Another volume's writes are not this one's.
        let o = s.volume_target("other").expect("other");
        s.write(o, 20 * BS, &vec![5u8; BS as usize], false)
            .expect("w");

        assert_eq!(
            s.changed_ranges("v", 0, 100).expect("list"),
            changes(7, 2, vec![(2 * BS, 3 * BS), (6 * BS, BS), (10 * BS, BS)]),
            "blocks 2-4, the trimmed 6 and 10; zeroing blocks that held nothing changes nothing"
        );
        // A new round: only what changes from now on is listed since it,
        // and a block changed again moves to it.
        assert_eq!(s.track_changes("v", 7).expect("track"), (7, 3));
        assert_eq!(
            s.changed_ranges("v", 3, 100).expect("list"),
            changes(7, 3, Vec::new())
        );
        s.write(v, 3 * BS, &vec![7u8; BS as usize], false)
            .expect("w");
        s.write(v, 50 * BS, &vec![7u8; BS as usize], false)
            .expect("w");
        assert_eq!(
            s.changed_ranges("v", 3, 100).expect("list"),
            changes(7, 3, vec![(3 * BS, BS), (50 * BS, BS)])
        );
        assert_eq!(
            s.changed_ranges("v", 0, 100).expect("list"),
            changes(
                7,
                3,
                vec![(2 * BS, 3 * BS), (6 * BS, BS), (10 * BS, BS), (50 * BS, BS)]
            ),
        );
        // Too many ranges for the caller: None (it copies everything).
        assert_eq!(s.changed_ranges("v", 0, 2).expect("list"), None);
        assert_eq!(s.changed_ranges("other", 0, 100).expect("list"), None);
    }
    // The set is as durable as the writes it lists.
    let s = Store::open(&cfg).expect("reopen");
    let c = s
        .changed_ranges("v", 0, 100)
        .expect("list")
        .expect("tracking");
    assert_eq!((c.point, c.round, c.ranges.len()), (7, 3, 4));
    let c = s
        .changed_ranges("v", 3, 100)
        .expect("list")
        .expect("tracking");
    assert_eq!(
        c.ranges,
        vec![(3 * BS, BS), (50 * BS, BS)],
        "rounds survive"
    );
    s.stop_tracking("v").expect("stop");
    assert_eq!(s.changed_ranges("v", 0, 100).expect("list"), None);
    // Tracking anew starts empty.
    s.track_changes("v", 12).expect("track");
    assert_eq!(
        s.changed_ranges("v", 0, 100).expect("list"),
        changes(12, 1, Vec::new())
    );
    let v = s.volume_target("v").expect("v");
    s.write(v, 0, &vec![6u8; BS as usize], false).expect("w");
    assert_eq!(
        s.changed_ranges("v", 0, 100).expect("list"),
        changes(12, 1, vec![(0, BS)])
    );
    // A deleted volume's record goes with it: a new volume of the same name
    // does not inherit it.
    s.delete_volume("v").expect("delete");
    s.create_volume("v", 16 << 20).expect("again");
    assert_eq!(s.changed_ranges("v", 0, 100).expect("list"), None);
    drop(s);
    let s = Store::open(&cfg).expect("reopen");
    assert_eq!(s.tracking("v").expect("tracking"), None);
}
