//! Random sequences of writes, zeroing, trims, snapshots, clones, deletes,
//! resizes and reads against a plain in-memory model, on a real pool file with
//! real RocksDB and the real I/O engine. Every read is compared; space accounting
//! is checked as objects come and go, and again after a reopen.

use std::collections::BTreeMap;

use berth_store::{Store, StoreConfig, Target, Zeroing, BLOCK_SIZE, MAX_REQUEST_BYTES};
use proptest::prelude::*;

const BS: usize = BLOCK_SIZE as usize;
const VOL_BLOCKS: u64 = 24;

#[derive(Debug, Clone)]
enum Step {
    Write {
        vol: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    WriteZeroes {
        vol: usize,
        offset: u64,
        len: u64,
    },
    Trim {
        vol: usize,
        offset: u64,
        len: u64,
    },
    Read {
        obj: usize,
        offset: u64,
        len: usize,
    },
    Snapshot {
        vol: usize,
    },
    Clone {
        snap: usize,
        grow_blocks: u64,
    },
    DeleteVolume {
        vol: usize,
    },
    DeleteSnapshot {
        snap: usize,
    },
    Resize {
        vol: usize,
        grow: u64,
    },
    Flush,
}

fn step() -> impl Strategy<Value = Step> {
    let span = VOL_BLOCKS * BLOCK_SIZE;
    prop_oneof![
        6 => (0..8usize, 0..span, 1..3 * BS, any::<u8>()).prop_map(|(vol, offset, len, seed)| Step::Write { vol, offset, len, seed }),
        // Block-aligned writes: the fast path, and contiguous runs.
        4 => (0..8usize, 0..VOL_BLOCKS, 1..6usize, any::<u8>()).prop_map(|(vol, b, n, seed)| Step::Write { vol, offset: b * BLOCK_SIZE, len: n * BS, seed }),
        1 => (0..8usize, 0..span, 1..4 * BLOCK_SIZE).prop_map(|(vol, offset, len)| Step::WriteZeroes { vol, offset, len }),
        1 => (0..8usize, 0..span, 1..6 * BLOCK_SIZE).prop_map(|(vol, offset, len)| Step::Trim { vol, offset, len }),
        5 => (0..16usize, 0..span, 1..3 * BS).prop_map(|(obj, offset, len)| Step::Read { obj, offset, len }),
        2 => (0..8usize).prop_map(|vol| Step::Snapshot { vol }),
        2 => (0..8usize, 0..3u64).prop_map(|(snap, grow_blocks)| Step::Clone { snap, grow_blocks }),
        1 => (0..8usize).prop_map(|vol| Step::DeleteVolume { vol }),
        1 => (0..8usize).prop_map(|snap| Step::DeleteSnapshot { snap }),
        1 => (0..8usize, 0..3 * BLOCK_SIZE).prop_map(|(vol, grow)| Step::Resize { vol, grow }),
        1 => Just(Step::Flush),
    ]
}

#[derive(Debug, Clone)]
struct ModelSnap {
    name: String,
    data: Vec<u8>,
    tree: u32,
    /// Trees cloned from it that still exist; a deleted snapshot with clones
    /// stays (hidden) and still holds its blocks.
    clones: u32,
    hidden: bool,
}

/// Mirrors the store's sharing rules: a volume writes to a tree; a tree lives
/// while its volume or any of its snapshots does; a clone's tree pins the
/// snapshot it came from.
#[derive(Debug, Default)]
struct Model {
    /// name -> (contents, tree)
    volumes: BTreeMap<String, (Vec<u8>, u32)>,
    snaps: BTreeMap<u32, ModelSnap>,
    /// tree -> the snapshot it was cloned from
    parents: BTreeMap<u32, Option<u32>>,
    counter: u32,
    /// Blocks ever zeroed with `Zeroing::Allocate` (they hold space while
    /// reading as zeros): added to the bound on blocks in use.
    provisioned: u64,
}

impl Model {
    fn nth_volume(&self, i: usize) -> Option<String> {
        let n = self.volumes.len();
        (n > 0)
            .then(|| self.volumes.keys().nth(i % n).cloned())
            .flatten()
    }

    fn nth_snap(&self, i: usize) -> Option<u32> {
        let ids: Vec<u32> = self
            .snaps
            .iter()
            .filter(|(_, s)| !s.hidden)
            .map(|(&k, _)| k)
            .collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    fn new_tree(&mut self, parent: Option<u32>) -> u32 {
        self.counter += 1;
        self.parents.insert(self.counter, parent);
        self.counter
    }

    /// Blocks holding a non-zero byte, summed over every reader: an upper bound
    /// on pool blocks in use when nothing leaks.
    fn nonzero_blocks(&self) -> u64 {
        let count = |d: &Vec<u8>| d.chunks(BS).filter(|c| c.iter().any(|&x| x != 0)).count() as u64;
        self.volumes.values().map(|(d, _)| count(d)).sum::<u64>()
            + self.snaps.values().map(|s| count(&s.data)).sum::<u64>()
            + self.provisioned
    }

    /// Drops a tree no one uses any more, releasing the snapshot it was cloned
    /// from (and so on up the chain).
    fn settle(&mut self, tree: u32) {
        let used = self.volumes.values().any(|(_, t)| *t == tree)
            || self.snaps.values().any(|s| s.tree == tree);
        if used {
            return;
        }
        if let Some(Some(p)) = self.parents.remove(&tree) {
            let s = self.snaps.get_mut(&p).expect("parent snapshot");
            s.clones -= 1;
            if s.clones == 0 && s.hidden {
                let s = self.snaps.remove(&p).expect("parent snapshot");
                self.settle(s.tree);
            }
        }
    }
}

fn fill(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(((offset as usize + i) / 7) as u8) | 1)
        .collect()
}

fn check_space(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    store.sync().expect("sync");
    let st = store.stats();
    let owned: u64 = store
        .list_volumes()
        .iter()
        .map(|v| v.allocated_bytes / BLOCK_SIZE)
        .sum();
    prop_assert!(
        owned <= st.used_blocks,
        "volumes own {} blocks, the pool uses {}",
        owned,
        st.used_blocks
    );
    prop_assert!(
        st.used_blocks <= model.nonzero_blocks(),
        "pool uses {} blocks, but readers see only {} non-zero blocks",
        st.used_blocks,
        model.nonzero_blocks()
    );
    Ok(())
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        arena_bytes: 4 << 20,
        ..StoreConfig::new(dir.path(), 16 << 20)
    };
    let mut store = Store::create(&cfg).expect("create store");
    let mut m = Model::default();
    for i in 0..2 {
        let name = format!("v{i}");
        store
            .create_volume(&name, VOL_BLOCKS * BLOCK_SIZE)
            .expect("create");
        let tree = m.new_tree(None);
        m.volumes
            .insert(name, (vec![0; (VOL_BLOCKS * BLOCK_SIZE) as usize], tree));
    }
    for step in steps {
        match step {
            Step::Write {
                vol,
                offset,
                len,
                seed,
            } => {
                let Some(v) = m.nth_volume(vol) else { continue };
                let t = store.volume_target(&v).expect("target");
                let data = &mut m.volumes.get_mut(&v).expect("model").0;
                let res = store.write(t, offset, &fill(seed, offset, len), seed % 5 == 0);
                if offset as usize + len > data.len() {
                    prop_assert!(res.is_err(), "write past the end succeeded");
                } else {
                    res.expect("write");
                    data[offset as usize..offset as usize + len]
                        .copy_from_slice(&fill(seed, offset, len));
                }
            }
            Step::WriteZeroes { vol, offset, len } | Step::Trim { vol, offset, len } => {
                let trim = matches!(step, Step::Trim { .. });
                let Some(v) = m.nth_volume(vol) else { continue };
                let t = store.volume_target(&v).expect("target");
                let vol_len = m.volumes[&v].0.len() as u64;
                let how = if offset % 3 == 0 && len <= MAX_REQUEST_BYTES {
                    Zeroing::Allocate
                } else {
                    Zeroing::Zero
                };
                if !trim && how == Zeroing::Allocate && offset + len <= vol_len {
                    m.provisioned += (offset + len).div_ceil(BLOCK_SIZE) - offset / BLOCK_SIZE;
                }
                let data = &mut m.volumes.get_mut(&v).expect("model").0;
                let res = if trim {
                    store.trim(t, offset, len)
                } else {
                    // Every third zeroing keeps its range allocated (NBD's
                    // NO_HOLE): it must read back the same.
                    store.write_zeroes(t, offset, len, how, false)
                };
                if offset + len > data.len() as u64 {
                    prop_assert!(res.is_err(), "zeroing past the end succeeded");
                    continue;
                }
                res.expect("zero");
                let (lo, hi) = if trim {
                    // Trim frees whole blocks inside the range.
                    (
                        offset.next_multiple_of(BLOCK_SIZE),
                        (offset + len) / BLOCK_SIZE * BLOCK_SIZE,
                    )
                } else {
                    (offset, offset + len)
                };
                if hi > lo {
                    data[lo as usize..hi as usize].fill(0);
                }
            }
            Step::Read { obj, offset, len } => {
                let nv = m.volumes.len();
                let (t, data) = if obj % 2 == 0 || m.nth_snap(obj).is_none() {
                    let Some(v) = m.nth_volume(obj / 2) else {
                        continue;
                    };
                    let _ = nv;
                    (
                        store.volume_target(&v).expect("target"),
                        m.volumes[&v].0.clone(),
                    )
                } else {
                    let s = &m.snaps[&m.nth_snap(obj).expect("some snapshot")];
                    (
                        store.snapshot_target(&s.name).expect("target"),
                        s.data.clone(),
                    )
                };
                let res = store.read(t, offset, len);
                if offset as usize + len > data.len() {
                    prop_assert!(res.is_err());
                } else {
                    let got = res.expect("read");
                    prop_assert!(
                        got == data[offset as usize..offset as usize + len],
                        "read of {:?} at {} len {} differs",
                        t,
                        offset,
                        len
                    );
                }
            }
            Step::Snapshot { vol } => {
                let Some(v) = m.nth_volume(vol) else { continue };
                m.counter += 1;
                let name = format!("s{}", m.counter);
                store.create_snapshot(&v, &name).expect("snapshot");
                // Idempotent: the same request again returns the same snapshot.
                store.create_snapshot(&v, &name).expect("snapshot again");
                let (data, tree) = m.volumes[&v].clone();
                m.snaps.insert(
                    m.counter,
                    ModelSnap {
                        name,
                        data,
                        tree,
                        clones: 0,
                        hidden: false,
                    },
                );
            }
            Step::Clone { snap, grow_blocks } => {
                let Some(s) = m.nth_snap(snap) else { continue };
                let tree = m.new_tree(Some(s));
                let name = format!("c{tree}");
                let mut data = m.snaps[&s].data.clone();
                let size = data.len() as u64 + grow_blocks * BLOCK_SIZE;
                store
                    .clone_snapshot(&m.snaps[&s].name, &name, Some(size))
                    .expect("clone");
                data.resize(size as usize, 0);
                m.snaps.get_mut(&s).expect("model").clones += 1;
                m.volumes.insert(name, (data, tree));
            }
            Step::DeleteVolume { vol } => {
                if m.volumes.len() <= 1 {
                    continue;
                }
                let Some(v) = m.nth_volume(vol) else { continue };
                store.delete_volume(&v).expect("delete volume");
                prop_assert!(store.volume(&v).is_err());
                let (_, tree) = m.volumes.remove(&v).expect("model");
                m.settle(tree);
                check_space(&store, &m)?;
            }
            Step::DeleteSnapshot { snap } => {
                let Some(id) = m.nth_snap(snap) else { continue };
                store
                    .delete_snapshot(&m.snaps[&id].name)
                    .expect("delete snapshot");
                prop_assert!(store.snapshot(&m.snaps[&id].name).is_err());
                if m.snaps[&id].clones > 0 {
                    m.snaps.get_mut(&id).expect("model").hidden = true;
                } else {
                    let s = m.snaps.remove(&id).expect("model");
                    m.settle(s.tree);
                }
                check_space(&store, &m)?;
            }
            Step::Resize { vol, grow } => {
                let Some(v) = m.nth_volume(vol) else { continue };
                let data = &mut m.volumes.get_mut(&v).expect("model").0;
                let size = data.len() as u64 + grow;
                store.resize_volume(&v, size).expect("grow");
                data.resize(size as usize, 0);
                prop_assert!(store.resize_volume(&v, 1).is_err(), "shrink accepted");
            }
            Step::Flush => store.flush().expect("flush"),
        }
    }
    check_space(&store, &m)?;

    // Everything survives a clean reopen, and the space each volume owns, kept
    // as commits land, equals what the open rebuilds from the maps.
    let owned = |s: &Store| {
        let mut v: Vec<(String, u64)> = s
            .list_volumes()
            .into_iter()
            .map(|v| (v.name, v.allocated_bytes))
            .collect();
        v.sort();
        v
    };
    let before = owned(&store);
    drop(store);
    store = Store::open(&cfg).expect("reopen");
    prop_assert_eq!(owned(&store), before, "allocated bytes after reopen");
    for (name, (data, _)) in &m.volumes {
        let t = store.volume_target(name).expect("volume after reopen");
        prop_assert!(
            store.read(t, 0, data.len()).expect("read") == *data,
            "volume {} after reopen",
            name
        );
    }
    for s in m.snaps.values().filter(|s| !s.hidden) {
        let t = store
            .snapshot_target(&s.name)
            .expect("snapshot after reopen");
        prop_assert!(
            store.read(t, 0, s.data.len()).expect("read") == s.data,
            "snapshot {} after reopen",
            s.name
        );
    }
    check_space(&store, &m)?;

    // Deleting everything, in any order, gives every block back.
    for s in store.list_snapshots() {
        store.delete_snapshot(&s.name).expect("delete snapshot");
    }
    for v in store.list_volumes() {
        store.delete_volume(&v.name).expect("delete volume");
    }
    store.sync().expect("sync");
    let st = store.stats();
    prop_assert_eq!(st.used_blocks, 0, "blocks leaked: {:?}", st);
    prop_assert_eq!(st.pending_free_blocks, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..60)) {
        run(steps)?;
    }
}

#[test]
fn read_of_unwritten_space_is_zeros_and_out_of_range_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&StoreConfig::new(dir.path(), 16 << 20)).expect("create");
    let v = store.create_volume("v", 1 << 30).expect("create volume");
    let t = Target::Volume(v.id);
    assert_eq!(
        store.read(t, (1 << 30) - 8192, 8192).expect("read"),
        vec![0; 8192]
    );
    assert!(store.read(t, (1 << 30) - 4096, 8192).is_err());
    assert!(store.read(t, 0, 0).is_err(), "zero-length read");
    assert!(store.write(t, u64::MAX - 10, b"x", false).is_err());
    assert_eq!(store.stats().used_blocks, 0, "thin: nothing allocated");
}
