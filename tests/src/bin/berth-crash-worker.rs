//! Crash-harness worker: opens (or creates) a store, then writes stamped blocks
//! from several threads with flushes and FUA writes until it is killed, telling
//! its parent on stdout what it issued, what was acknowledged and what was
//! flushed:
//!
//! ```text
//! READY
//! W <lba> <n> <gen>      about to write n blocks from lba with generation gen
//! Z <lba> <n> <gen>      about to trim them (they read as zeros afterwards)
//! A <lba> <n> <gen>      acknowledged
//! AF <lba> <n> <gen>     acknowledged, FUA (durable)
//! FB <id> / FE <id>      flush begun / ended: everything acknowledged before FB
//!                        is durable at FE
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use berth_store::{Store, StoreConfig, BLOCK_SIZE};
use berth_tests::{stamp, BLOCK};
use out::Out;
use rand::{Rng, SeedableRng};

mod out {
    /// Serialized, unbuffered line output: a line is in the pipe before the next
    /// step starts.
    use std::io::Write;

    pub struct Out(std::sync::Mutex<std::io::Stdout>);
    impl Out {
        pub fn new() -> Self {
            Out(std::sync::Mutex::new(std::io::stdout()))
        }
        pub fn line(&self, s: std::fmt::Arguments<'_>) {
            let mut o = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let _ = o.write_fmt(s);
            let _ = o.write_all(b"\n");
            let _ = o.flush();
        }
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(name: &str, default: u64) -> u64 {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let Some(data) = arg("--data") else {
        eprintln!("usage: berth-crash-worker --data DIR [--gen-base N] [--seed N] [--threads N] [--blocks-per-writer N]");
        std::process::exit(2);
    };
    let gen_base = num("--gen-base", 1);
    let seed = num("--seed", 1);
    let threads = num("--threads", 8);
    let per = num("--blocks-per-writer", 32);
    let cfg = StoreConfig {
        arena_bytes: 8 << 20,
        ..StoreConfig::new(&data, 64 << 20)
    };
    let store = match Store::open_or_create(&cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("open: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = store.create_volume("crash", threads * per * BLOCK_SIZE) {
        eprintln!("volume: {e}");
        std::process::exit(1);
    }
    let t = store.volume_target("crash").expect("volume exists");
    let out = Arc::new(Out::new());
    let gen = Arc::new(AtomicU64::new(gen_base));
    out.line(format_args!("READY"));
    let mut handles = Vec::new();
    for w in 0..threads {
        let (store, out, gen) = (store.clone(), out.clone(), gen.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + w);
            let mut buf = vec![0u8; 4 * BLOCK];
            loop {
                let lba = w * per + rng.random_range(0..per);
                let n = rng.random_range(1..=4u64).min(w * per + per - lba);
                let g = gen.fetch_add(1, Ordering::Relaxed);
                if rng.random_range(0..20) == 0 {
                    out.line(format_args!("Z {lba} {n} {g}"));
                    store
                        .trim(t, lba * BLOCK_SIZE, n * BLOCK_SIZE)
                        .expect("trim");
                    out.line(format_args!("A {lba} {n} {g}"));
                    continue;
                }
                for k in 0..n {
                    stamp(
                        lba + k,
                        g,
                        &mut buf[k as usize * BLOCK..(k as usize + 1) * BLOCK],
                    );
                }
                let fua = rng.random_range(0..10) == 0;
                out.line(format_args!("W {lba} {n} {g}"));
                store
                    .write(t, lba * BLOCK_SIZE, &buf[..n as usize * BLOCK], fua)
                    .expect("write");
                out.line(format_args!(
                    "{} {lba} {n} {g}",
                    if fua { "AF" } else { "A" }
                ));
            }
        }));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for id in 0.. {
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(1..10)));
        out.line(format_args!("FB {id}"));
        store.flush().expect("flush");
        out.line(format_args!("FE {id}"));
    }
    drop(handles);
}
