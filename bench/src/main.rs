//! `berth-bench engine`: the block store alone (no network), 4 KiB random read and
//! write at a fixed queue depth on a pool file, beside fio's io_uring engine with
//! O_DIRECT on a plain file on the same disk, in the same run.
//!
//! The Berth volume is filled first (reads of thin, unwritten space would never
//! touch the disk), a snapshot is taken, and checksums are on, so the write run
//! pays for copy-on-write of shared blocks and every read verifies its CRC.

mod features;
mod meta;
mod nbd;
mod plot;
mod suite;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_store::{Op, Outcome, Reply, Store, StoreConfig, Submitter, Target, BLOCK_SIZE};
use clap::{Parser, Subcommand};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "berth-bench", about = "Berth's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The engine alone beside fio on the same disk.
    Engine(EngineArgs),
    /// A Berth volume over NBD beside qemu-nbd, both driven by fio's nbd engine.
    Nbd(nbd::NbdArgs),
    /// The metadata service's control path: creates, snapshots, deletes per second.
    Meta(meta::MetaArgs),
    /// The whole comparison: Berth over NBD (unix socket and TCP) beside the
    /// raw disk, qemu-nbd and nbdkit, every workload, repeated; a table,
    /// JSON and SVG plots.
    Run(suite::SuiteArgs),
    /// Berth's own features: copy-on-write cost, snapshot/clone creation
    /// time by volume size, tier limits and priority, checksums, CSI rates.
    Features(features::FeatureArgs),
}

#[derive(clap::Args, Debug)]
struct EngineArgs {
    /// Scratch directory on the disk to measure (removed afterwards).
    #[arg(long, default_value = "/var/tmp/berth-bench")]
    dir: PathBuf,
    /// Volume and fio file size.
    #[arg(long, default_value_t = 1 << 30)]
    size_bytes: u64,
    #[arg(long, default_value_t = 32)]
    queue_depth: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of each side; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Debug, Serialize, Clone)]
struct Measure {
    target: String,
    workload: String,
    iops: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Keeps `depth` requests in flight: each completion, on the store's I/O
/// thread, submits the next one (no extra thread, no polling).
struct Driver {
    sub: Submitter,
    target: Target,
    blocks: u64,
    write: bool,
    stop: AtomicBool,
    done: AtomicU64,
    errors: AtomicU64,
    inflight: AtomicU64,
    rng: Mutex<rand::rngs::SmallRng>,
    started: Mutex<Vec<Instant>>,
    lat_ns: Mutex<Vec<u64>>,
    payload: Vec<u8>,
    /// The reply handed with every request: a `Pump` pointing back here (the
    /// cycle is broken when the run ends).
    pump: Mutex<Option<Arc<dyn Reply>>>,
}

impl Driver {
    fn issue(&self, slot: u64) {
        let Some(pump) = self.pump.lock().clone() else {
            return;
        };
        let offset = self.rng.lock().random_range(0..self.blocks) * BLOCK_SIZE;
        self.started.lock()[slot as usize] = Instant::now();
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let op = if self.write {
            let (mut buf, at) = self.sub.write_buffer(offset, BLOCK_SIZE as usize);
            buf.as_mut_slice()[at..at + BLOCK_SIZE as usize].copy_from_slice(&self.payload);
            Op::Write {
                target: self.target,
                offset,
                len: BLOCK_SIZE as usize,
                buf,
                fua: false,
            }
        } else {
            Op::Read {
                target: self.target,
                offset,
                len: BLOCK_SIZE as usize,
            }
        };
        self.sub.submit(op, slot, pump);
    }
}

struct Pump(Arc<Driver>);

impl Reply for Pump {
    fn reply(&self, tag: u64, outcome: Outcome) {
        finish(&self.0, tag, outcome);
    }
}

fn finish(d: &Driver, tag: u64, outcome: Outcome) {
    if !matches!(outcome, Outcome::Read(Ok(_)) | Outcome::Done(Ok(()))) {
        d.errors.fetch_add(1, Ordering::Relaxed);
    }
    let t0 = d.started.lock()[tag as usize];
    d.lat_ns.lock().push(t0.elapsed().as_nanos() as u64);
    d.done.fetch_add(1, Ordering::Relaxed);
    // Reissue before counting this one out, so `inflight` reaches zero only
    // when the run has really drained.
    if !d.stop.load(Ordering::SeqCst) {
        d.issue(tag);
    }
    d.inflight.fetch_sub(1, Ordering::SeqCst);
}

fn run_berth(
    store: &Store,
    target: Target,
    blocks: u64,
    write: bool,
    depth: u32,
    secs: u64,
) -> Measure {
    let d = Arc::new(Driver {
        sub: store.submitter(),
        target,
        blocks,
        write,
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        inflight: AtomicU64::new(0),
        rng: Mutex::new(rand::rngs::SmallRng::seed_from_u64(42)),
        started: Mutex::new(vec![Instant::now(); depth as usize]),
        lat_ns: Mutex::new(Vec::with_capacity(1 << 20)),
        payload: (0..BLOCK_SIZE).map(|i| (i % 251) as u8 + 1).collect(),
        pump: Mutex::new(None),
    });
    *d.pump.lock() = Some(Arc::new(Pump(d.clone())));
    let start = Instant::now();
    for slot in 0..u64::from(depth) {
        d.issue(slot);
    }
    std::thread::sleep(Duration::from_secs(secs));
    d.stop.store(true, Ordering::SeqCst);
    let elapsed = start.elapsed().as_secs_f64();
    let n = d.done.load(Ordering::Relaxed);
    while d.inflight.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    *d.pump.lock() = None;
    assert_eq!(
        d.errors.load(Ordering::Relaxed),
        0,
        "I/O errors during the benchmark"
    );
    let mut lat = std::mem::take(&mut *d.lat_ns.lock());
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Measure {
        target: "berth engine".into(),
        workload: format!("4k rand{} qd{depth}", if write { "write" } else { "read" }),
        iops: n as f64 / elapsed,
        mb_per_s: n as f64 * BLOCK_SIZE as f64 / elapsed / 1e6,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

/// fio on `file`, `size` bytes from byte `offset`.
fn run_fio(
    file: &Path,
    offset: u64,
    size: u64,
    write: bool,
    depth: u32,
    secs: u64,
) -> Result<Measure, String> {
    let rw = if write { "randwrite" } else { "randread" };
    let out = Command::new("fio")
        .args([
            "--name=raw",
            "--ioengine=io_uring",
            "--direct=1",
            "--bs=4k",
            "--numjobs=1",
            "--time_based",
            "--output-format=json",
            "--randrepeat=0",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={secs}"))
        .output()
        .map_err(|e| format!("cannot run fio: {e} (apt-get install fio)"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let f = fio_report(&out.stdout, write)?;
    Ok(Measure {
        target: "fio io_uring O_DIRECT file".into(),
        workload: format!("4k {rw} qd{depth}"),
        iops: f.iops,
        mb_per_s: f.mb_per_s,
        p50_us: f.p50_us,
        p99_us: f.p99_us,
    })
}

/// One side (reads or writes) of a fio JSON report.
#[derive(Debug, Clone, Copy, Default)]
struct FioReport {
    iops: f64,
    mb_per_s: f64,
    /// Completion latency percentiles.
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// The slowest completion.
    max_us: f64,
    ios: u64,
}

fn fio_json(stdout: &[u8]) -> Result<serde_json::Value, String> {
    let text = String::from_utf8_lossy(stdout);
    let json = text.find('{').map_or("", |i| &text[i..]);
    serde_json::from_str(json).map_err(|e| format!("fio output: {e}: {text}"))
}

fn fio_side(side: &serde_json::Value) -> FioReport {
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    FioReport {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mb_per_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
        max_us: side["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1000.0,
        ios: side["total_ios"].as_u64().unwrap_or(0),
    }
}

/// Parses fio's `--output-format=json` (it may print notes before the document).
fn fio_report(stdout: &[u8], write: bool) -> Result<FioReport, String> {
    let v = fio_json(stdout)?;
    Ok(fio_side(
        &v["jobs"][0][if write { "write" } else { "read" }],
    ))
}

/// Reads and writes together (a mixed workload): rates summed, latencies
/// of the side that did more I/O.
fn fio_summary(stdout: &[u8]) -> Result<FioReport, String> {
    let v = fio_json(stdout)?;
    let (r, w) = (
        fio_side(&v["jobs"][0]["read"]),
        fio_side(&v["jobs"][0]["write"]),
    );
    let lat = if r.ios >= w.ios { r } else { w };
    Ok(FioReport {
        iops: r.iops + w.iops,
        mb_per_s: r.mb_per_s + w.mb_per_s,
        ios: r.ios + w.ios,
        ..lat
    })
}

/// The run with the median IOPS.
fn median<T>(mut runs: Vec<T>, iops: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| iops(a).total_cmp(&iops(b)));
    runs.swap_remove(runs.len() / 2)
}

fn engine(a: EngineArgs) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let blocks = a.size_bytes / BLOCK_SIZE;
    // Pool with room for the volume, its snapshot's copy-on-write and slack.
    let cfg = StoreConfig::new(a.dir.join("store"), a.size_bytes * 3 + (64 << 20));
    let store = Store::create(&cfg).map_err(|e| e.to_string())?;
    eprintln!(
        "engine: {}; filling {} MiB...",
        store.engine_name(),
        a.size_bytes >> 20
    );
    let t = store
        .volume_target(
            &store
                .create_volume("bench", a.size_bytes)
                .map_err(|e| e.to_string())?
                .name,
        )
        .map_err(|e| e.to_string())?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let chunk = 1 << 20;
    let mut data = vec![0u8; chunk];
    for off in (0..a.size_bytes).step_by(chunk) {
        rng.fill(&mut data[..]);
        store
            .write(t, off, &data, false)
            .map_err(|e| e.to_string())?;
    }
    store.flush().map_err(|e| e.to_string())?;
    store
        .create_snapshot("bench", "bench-snap")
        .map_err(|e| e.to_string())?;

    // The raw-disk baseline reads the very blocks the volume's data occupies
    // (the fill allocated them contiguously after the pool's 1 MiB header), so
    // both see the same disk and the same host caching; it writes into a file
    // fio lays out itself.
    let fio_file = a.dir.join("fio.img");
    let pool_file = cfg.pool_path();
    let mut results = Vec::new();
    for write in [false, true] {
        eprintln!(
            "measuring 4k rand{} qd{} ...",
            if write { "write" } else { "read" },
            a.queue_depth
        );
        // Alternate the order over the repeats: the host's caches warm up as a
        // run goes, and that must not favour either side.
        let mut bs = Vec::new();
        let mut fs = Vec::new();
        for rep in 0..a.repeat {
            for berth_first in [rep % 2 == 0, rep % 2 == 1] {
                let m = if berth_first {
                    run_berth(&store, t, blocks, write, a.queue_depth, a.seconds)
                } else if write {
                    run_fio(&fio_file, 0, a.size_bytes, true, a.queue_depth, a.seconds)?
                } else {
                    run_fio(
                        &pool_file,
                        1 << 20,
                        a.size_bytes,
                        false,
                        a.queue_depth,
                        a.seconds,
                    )?
                };
                eprintln!(
                    "  {:<28} {:>9.0} IOPS  p99 {:>7.1} us",
                    m.target, m.iops, m.p99_us
                );
                if berth_first {
                    bs.push(m)
                } else {
                    fs.push(m)
                }
            }
        }
        results.push((median(bs, |m| m.iops), median(fs, |m| m.iops)));
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&a.dir);

    println!(
        "{:<32} {:<20} {:>10} {:>9} {:>9} {:>9}",
        "target", "workload", "IOPS", "MB/s", "p50 us", "p99 us"
    );
    let mut json = Vec::new();
    for (b, f) in &results {
        for m in [b, f] {
            println!(
                "{:<32} {:<20} {:>10.0} {:>9.1} {:>9.1} {:>9.1}",
                m.target, m.workload, m.iops, m.mb_per_s, m.p50_us, m.p99_us
            );
        }
        let ratio = b.iops / f.iops.max(1.0);
        println!(
            "{:<32} {:<20} {:>9.0}%",
            "berth / fio",
            b.workload,
            ratio * 100.0
        );
        json.push(serde_json::json!({ "berth": b, "fio": f, "ratio": ratio }));
    }
    let doc = serde_json::json!({
        "kind": "engine",
        "size_bytes": a.size_bytes,
        "queue_depth": a.queue_depth,
        "seconds": a.seconds,
        "snapshot_taken": true,
        "checksums": true,
        "results": json,
    });
    write_result(&a.out, "engine", &doc)
}

/// Writes a result document as `DIR/<kind>-<unix time>.json`.
fn write_result(dir: &Path, kind: &str, doc: &serde_json::Value) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{kind}-{stamp}.json"));
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Engine(a) => engine(a),
        Cmd::Nbd(a) => nbd::run(a),
        Cmd::Meta(a) => meta::run(a),
        Cmd::Run(a) => suite::run(a),
        Cmd::Features(a) => features::run(a),
    };
    if let Err(e) = r {
        eprintln!("berth-bench: {e}");
        std::process::exit(1);
    }
}
