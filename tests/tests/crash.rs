//! The crash harness: a worker process writes stamped blocks under concurrent
//! load with flushes, is killed with SIGKILL at a random moment, and the store is
//! reopened and every block checked:
//!
//! - never a checksum error or any read error;
//! - never garbage, a torn block, or a block stamped for another LBA;
//! - every block holds its last flushed (or FUA) content or a later write that
//!   was issued; zeros only where nothing was flushed or a trim was issued;
//! - what one recovery shows stays: it is the floor for the next cycle.
//!
//! `BERTH_CRASH_CYCLES` sets the number of cycles (default 200; the README names
//! the 1,000-cycle run).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_store::{Store, StoreConfig, BLOCK_SIZE};
use berth_tests::{decode, Seen, BLOCK};
use rand::{Rng, SeedableRng};

const THREADS: u64 = 8;
const PER: u64 = 32;

#[derive(Debug, Default)]
struct Block {
    /// Generations issued for this LBA: true for a trim.
    issued: BTreeMap<u64, bool>,
    acked: Option<u64>,
    /// What a recovery must at least show: None = may be never written.
    floor: Option<u64>,
}

#[derive(Debug, Default)]
struct Ledger {
    blocks: Vec<Block>,
    flush_starts: BTreeMap<u64, Vec<Option<u64>>>,
    lines: u64,
}

impl Ledger {
    fn apply(&mut self, line: &str) {
        self.lines += 1;
        let f: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        match f.first().copied() {
            Some(k @ ("W" | "Z" | "A" | "AF")) => {
                let (lba, cnt, gen) = (n(1), n(2), n(3));
                for b in &mut self.blocks[lba as usize..(lba + cnt) as usize] {
                    match k {
                        "W" | "Z" => {
                            b.issued.insert(gen, k == "Z");
                        }
                        _ => {
                            b.acked = b.acked.max(Some(gen));
                            if k == "AF" {
                                b.floor = b.floor.max(Some(gen));
                            }
                        }
                    }
                }
            }
            Some("FB") => {
                let snap = self.blocks.iter().map(|b| b.acked).collect();
                self.flush_starts.insert(n(1), snap);
            }
            Some("FE") => {
                if let Some(snap) = self.flush_starts.remove(&n(1)) {
                    for (b, a) in self.blocks.iter_mut().zip(snap) {
                        b.floor = b.floor.max(a);
                    }
                }
            }
            _ => {}
        }
    }

    /// Checks one recovered block; returns the new floor.
    fn check(&self, lba: usize, data: &[u8]) -> Result<Option<u64>, String> {
        let b = &self.blocks[lba];
        let ok_gen =
            |g: u64, zero: bool| b.issued.get(&g) == Some(&zero) && b.floor.is_none_or(|f| g >= f);
        match decode(data).map_err(|e| format!("lba {lba}: {e}"))? {
            Seen::Zero => {
                if b.floor.is_none() {
                    return Ok(None);
                }
                // A trim at or after the floor explains zeros.
                match b.issued.iter().find(|&(&g, &z)| z && ok_gen(g, true)) {
                    Some((&g, _)) => Ok(Some(g)),
                    None => Err(format!(
                        "lba {lba}: reads zeros, but generation {:?} was flushed",
                        b.floor
                    )),
                }
            }
            Seen::Stamp { lba: l, gen } => {
                if l != lba as u64 {
                    return Err(format!(
                        "lba {lba}: holds the block of lba {l} (misdirected)"
                    ));
                }
                if !ok_gen(gen, false) {
                    return Err(format!(
                        "lba {lba}: generation {gen} is older than the flushed {:?} or was never written",
                        b.floor
                    ));
                }
                Ok(Some(gen))
            }
        }
    }
}

#[test]
fn kill_9_under_write_load_loses_no_flushed_write() {
    let cycles: u64 = std::env::var("BERTH_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("store");
    let worker = env!("CARGO_BIN_EXE_berth-crash-worker");
    let ledger = Arc::new(Mutex::new(Ledger {
        blocks: (0..THREADS * PER).map(|_| Block::default()).collect(),
        ..Ledger::default()
    }));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut gen_base = 1u64;
    let (mut total_lines, mut blocks_with_data) = (0u64, 0usize);
    for cycle in 0..cycles {
        let mut child = Command::new(worker)
            .args(["--data", data.to_str().expect("utf-8 path")])
            .args([
                "--gen-base",
                &gen_base.to_string(),
                "--seed",
                &cycle.to_string(),
            ])
            .args([
                "--threads",
                &THREADS.to_string(),
                "--blocks-per-writer",
                &PER.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn worker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let l = ledger.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = tx.send(());
                }
                l.lock().expect("ledger").apply(&line);
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("cycle {cycle}: worker never became ready");
            });
        std::thread::sleep(Duration::from_millis(rng.random_range(5..120)));
        // SIGKILL: no destructor, no flush, no goodbye.
        child.kill().expect("kill -9");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "worker exited by itself: {status}");
        reader.join().expect("reader");
        gen_base += 10_000_000;

        let store = Store::open(&StoreConfig::new(&data, 0))
            .unwrap_or_else(|e| panic!("cycle {cycle}: reopen after kill -9 failed: {e}"));
        let t = store.volume_target("crash").expect("volume survives");
        let all = store
            .read(t, 0, (THREADS * PER * BLOCK_SIZE) as usize)
            .unwrap_or_else(|e| panic!("cycle {cycle}: read after crash failed: {e}"));
        let mut l = ledger.lock().expect("ledger");
        blocks_with_data = 0;
        for (lba, block) in all.chunks(BLOCK).enumerate() {
            let floor = l
                .check(lba, block)
                .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
            blocks_with_data += usize::from(floor.is_some());
            l.blocks[lba].floor = floor;
            l.blocks[lba].acked = floor;
        }
        total_lines = l.lines;
        let scrub = store.scrub().expect("scrub");
        assert!(
            scrub.errors.is_empty(),
            "cycle {cycle}: scrub found {:?}",
            scrub.errors
        );
        drop(store);
    }
    eprintln!(
        "crash harness: {cycles} kill -9 cycles, {total_lines} logged operations, {blocks_with_data} of {} blocks holding data at the end, 0 lost flushed writes, 0 checksum errors",
        THREADS * PER
    );
    assert!(
        total_lines > cycles * 10,
        "the workers did too little work to test anything"
    );
}
