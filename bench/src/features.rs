//! `berth-bench features`: what Berth's own features cost, measured on a
//! real volume server (and, for the CSI rates, a real `berth standalone`):
//!
//! - **copy-on-write**: 4 KiB random writes and reads at QD32 on a filled
//!   volume, on the same volume right after a snapshot (the first write to
//!   each block moves its mapping to history), and on a fresh clone of it
//!   (reads fall through to the source, writes allocate the clone's own
//!   blocks). Every Berth read verifies its block's CRC32 (it cannot be turned
//!   off), so these figures include it; what verification costs alone is
//!   measured as scrub throughput and crc32fast's speed on this CPU.
//! - **creation time**: CreateSnapshot and CloneVolume on a 1 GiB volume and
//!   on a 64 GiB one, both with data written, timed at the volume server's
//!   gRPC API; the 64 GiB / 1 GiB ratio of the medians must stay near 1.
//! - **tiers**: each tier's achieved IOPS (4 KiB random reads, QD32) and
//!   throughput (1 MiB writes, QD8) beside the limit the server says it
//!   applies; fio's ramp time skips the first second, when a full token
//!   bucket lets a burst through by design.
//! - **priority**: an extreme-tier volume's QD1 read latency alone, while a
//!   standard-tier volume (priority 2, limits lifted) floods the pool, and
//!   while another extreme volume (same priority) floods it, to show what the
//!   pool gate buys.
//! - **isolation**: volume A's 4 KiB QD1 random reads alone, and while
//!   another volume B (2 GiB and 16 GiB, every block written) is snapshotted,
//!   its snapshot deleted and B itself deleted: A's p99 and slowest read,
//!   the three calls' times, and how long until B's space is free again
//!   (garbage collection runs in the background, in bounded steps).
//! - **CSI**: CreateVolume, CreateSnapshot, DeleteSnapshot and DeleteVolume
//!   through `berth standalone`'s CSI socket, rates and latency.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::csi::v1 as csi;
use berth_proto::volume::v1 as vpb;
use berth_proto::volume::v1::volume_service_client::VolumeServiceClient;
use parking_lot::Mutex;
use serde::Serialize;
use tonic::transport::Channel;

use crate::meta::{phase, print_phases, start, Phase};
use crate::nbd::{sibling, Proc};
use crate::plot;
use crate::suite::{fio, fio_command, nbd_target, w, Run, Target, Workload};

#[derive(clap::Args, Debug, Clone)]
pub struct FeatureArgs {
    /// Scratch directory on the disk to measure (removed afterwards).
    #[arg(long, default_value = "/var/tmp/berth-bench-features")]
    pub dir: PathBuf,
    /// Size of the measured volumes.
    #[arg(long, default_value_t = 1 << 30)]
    pub size_bytes: u64,
    /// The large volume of the creation-time comparison.
    #[arg(long, default_value_t = 64 << 30)]
    pub big_bytes: u64,
    /// Seconds per fio measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Timed snapshot and clone creations per volume size.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// CSI calls per phase (at concurrency 1 and 8).
    #[arg(long, default_value_t = 100)]
    pub csi_calls: usize,
    /// A smoke run: small volumes, 1 s, one repeat.
    #[arg(long)]
    pub quick: bool,
    /// Only the isolation section (A's reads while B's control work runs),
    /// for comparing servers quickly.
    #[arg(long)]
    pub isolation_only: bool,
    /// Where the run's folder (JSON and plots) is written.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

impl FeatureArgs {
    /// The settings `run` uses for its own feature section.
    pub fn for_run(dir: &Path, seconds: u64, repeat: u32, quick: bool, out: &Path) -> Self {
        FeatureArgs {
            dir: dir.join("features"),
            size_bytes: 1 << 30,
            big_bytes: 64 << 30,
            seconds,
            repeat,
            samples: 20,
            csi_calls: 100,
            quick,
            isolation_only: false,
            out: out.to_path_buf(),
        }
    }

    fn apply_quick(&mut self) {
        if self.quick {
            self.size_bytes = 64 << 20;
            self.big_bytes = 4 << 30;
            self.seconds = 1;
            self.repeat = 1;
            self.samples = 3;
            self.csi_calls = 5;
        }
    }
}

/// One workload on one kind of volume.
#[derive(Debug, Clone, Serialize)]
pub struct CowRow {
    pub volume: &'static str,
    pub workload: &'static str,
    pub median: Run,
    pub runs: Vec<Run>,
    /// Median IOPS over the plain volume's.
    pub vs_plain: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CreationRow {
    pub what: &'static str,
    pub volume_bytes: u64,
    /// Bytes written to the volume before timing.
    pub written_bytes: u64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TierRow {
    pub tier: String,
    pub volume_bytes: u64,
    pub iops_limit: u64,
    pub iops: f64,
    pub bytes_per_second_limit: u64,
    pub bytes_per_second: f64,
    /// Achieved / limit (None: unlimited).
    pub iops_ratio: Option<f64>,
    pub bytes_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PriorityRow {
    pub condition: &'static str,
    /// The extreme volume's QD1 4 KiB random reads.
    pub p50_us: f64,
    pub p99_us: f64,
    pub iops: f64,
    /// The flooding volume's IOPS meanwhile (0: no flood).
    pub flood_iops: f64,
}

/// Volume A's QD1 reads while volume B's control work runs.
#[derive(Debug, Clone, Serialize)]
pub struct IsolationRow {
    pub condition: String,
    /// B's size, every block written (0: no B).
    pub b_bytes: u64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// CreateSnapshot, DeleteSnapshot and DeleteVolume of B, at the API.
    pub snapshot_ms: f64,
    pub delete_snapshot_ms: f64,
    pub delete_volume_ms: f64,
    /// From DeleteVolume until the pool's used bytes were back to what they
    /// were before B (None: not within the measurement).
    pub reclaim_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Checksums {
    /// Every data read verifies its blocks' CRC32; this is not optional.
    pub verified_on_every_read: bool,
    pub scrub_blocks: u64,
    pub scrub_seconds: f64,
    pub scrub_mb_per_s: f64,
    pub scrub_errors: usize,
    /// crc32fast on one core of this machine.
    pub crc32_gb_per_s: f64,
    /// CPU time of one 4 KiB block's CRC, in nanoseconds.
    pub crc32_ns_per_block: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub met: Option<bool>,
    pub value: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub cow: Vec<CowRow>,
    pub creation: Vec<CreationRow>,
    pub tiers: Vec<TierRow>,
    pub priority: Vec<PriorityRow>,
    pub isolation: Vec<IsolationRow>,
    pub checksums: Checksums,
    pub csi: Vec<Phase>,
    pub checks: Vec<Check>,
}

/// A volume server of the harness, with a gRPC client on its control socket.
struct Server {
    proc: Proc,
    rt: tokio::runtime::Runtime,
    c: VolumeServiceClient<Channel>,
}

impl Server {
    fn start(dir: &Path, pool_bytes: u64) -> Result<Server, String> {
        let data = dir.join("vs");
        let (proc, _) = start(
            Command::new(sibling("berth")?)
                .args(["volume-server", "--data"])
                .arg(&data)
                .args(["--pool-size", &pool_bytes.to_string()])
                .args(["--nbd-listen", "none", "--metrics-listen", "none"]),
            "berth volume-server",
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let sock = format!("unix://{}", data.join("control.sock").display());
        let c = rt
            .block_on(berth_proto::channel(&sock, None))
            .map(VolumeServiceClient::new)
            .map_err(|e| format!("{sock}: {e}"))?;
        Ok(Server { proc, rt, c })
    }

    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: FnOnce(VolumeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt
            .block_on(f(self.c.clone()))
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{what}: {}", s.message()))
    }

    fn create(
        &self,
        name: &str,
        size: u64,
        tier: &str,
        overrides: Option<vpb::QosOverrides>,
    ) -> Result<vpb::Volume, String> {
        let req = vpb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            tier: tier.into(),
            overrides,
        };
        self.call("create volume", |mut c| async move {
            c.create_volume(req).await
        })
    }

    fn snapshot(&self, volume: &str, name: &str) -> Result<(), String> {
        let req = vpb::CreateSnapshotRequest {
            volume: volume.into(),
            name: name.into(),
        };
        self.call("create snapshot", |mut c| async move {
            c.create_snapshot(req).await
        })
        .map(drop)
    }

    fn clone_of(&self, snapshot: &str, name: &str) -> Result<(), String> {
        let req = vpb::CloneVolumeRequest {
            name: name.into(),
            source: Some(vpb::clone_volume_request::Source::Snapshot(snapshot.into())),
            tier: "extreme".into(),
            ..Default::default()
        };
        self.call("clone", |mut c| async move { c.clone_volume(req).await })
            .map(drop)
    }

    fn delete_volume(&self, name: &str) -> Result<(), String> {
        let req = vpb::DeleteVolumeRequest { name: name.into() };
        self.call("delete volume", |mut c| async move {
            c.delete_volume(req).await
        })
        .map(drop)
    }

    fn delete_snapshot(&self, name: &str) -> Result<(), String> {
        let req = vpb::DeleteSnapshotRequest { name: name.into() };
        self.call("delete snapshot", |mut c| async move {
            c.delete_snapshot(req).await
        })
        .map(drop)
    }

    /// fio's view of a volume: a grant, then its unix URI.
    fn target(&self, volume: &str) -> Result<Target, String> {
        let req = vpb::GrantExportRequest {
            kind: vpb::TargetKind::Volume as i32,
            name: volume.into(),
            client: "berth-bench".into(),
            ..Default::default()
        };
        let e = self.call("grant", |mut c| async move { c.grant_export(req).await })?;
        Ok(nbd_target("berth-unix", &e.unix_uri, self.proc.pid()))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn median_run(runs: &[Run]) -> Run {
    let mut s = runs.to_vec();
    s.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    s[s.len() / 2]
}

fn measure(t: &Target, size: u64, wl: &Workload, secs: u64) -> Result<Run, String> {
    crate::suite::measure(t, size, wl, secs, 1)
}

const COW_WORKLOADS: [Workload; 2] = [
    w("4k-randwrite-qd32", "randwrite", "4k", 32),
    w("4k-randread-qd32", "randread", "4k", 32),
];

/// Plain, snapshotted and cloned: each repeat takes a fresh snapshot and a
/// fresh clone, so every run pays the first-write cost it is meant to show.
fn cow(s: &Server, a: &FeatureArgs) -> Result<Vec<CowRow>, String> {
    let size = a.size_bytes;
    let plain = s.target("feat")?;
    let mut runs: [[Vec<Run>; 2]; 3] = Default::default();
    for r in 0..a.repeat {
        for (k, wl) in COW_WORKLOADS.iter().enumerate() {
            runs[0][k].push(measure(&plain, size, wl, a.seconds)?);
        }
        let snap = format!("feat-snap-{r}");
        s.snapshot("feat", &snap)?;
        for (k, wl) in COW_WORKLOADS.iter().enumerate() {
            runs[1][k].push(measure(&plain, size, wl, a.seconds)?);
        }
        let clone = format!("feat-clone-{r}");
        s.clone_of(&snap, &clone)?;
        let ct = s.target(&clone)?;
        // Reads first: they fall through to the source until written.
        for (k, wl) in COW_WORKLOADS.iter().enumerate().rev() {
            runs[2][k].push(measure(&ct, size, wl, a.seconds)?);
        }
        s.delete_volume(&clone)?;
        s.delete_snapshot(&snap)?;
    }
    let mut out = Vec::new();
    let names = ["plain", "after a snapshot", "fresh clone"];
    for (v, per_wl) in names.iter().zip(&runs) {
        for (k, wl) in COW_WORKLOADS.iter().enumerate() {
            let median = median_run(&per_wl[k]);
            let base = median_run(&runs[0][k]).iops;
            out.push(CowRow {
                volume: v,
                workload: wl.name,
                median,
                runs: per_wl[k].clone(),
                vs_plain: median.iops / base.max(1e-9),
            });
        }
    }
    Ok(out)
}

/// Writes 1 MiB of every 16 MiB of the first `size` bytes; returns the bytes written.
fn sparse_fill(t: &Target, size: u64) -> Result<u64, String> {
    fio(t, size, &w("sparse-fill", "write:15m", "1m", 8), 0, 1)?;
    Ok(size / 16)
}

fn creation(s: &Server, a: &FeatureArgs) -> Result<Vec<CreationRow>, String> {
    // The small volume is `feat` (filled); the big one gets the same number
    // of bytes per GiB... of which a sixteenth is written: more mappings than
    // the small one in all, and 64 times the address space.
    s.create("big", a.big_bytes, "extreme", None)?;
    let big_written = sparse_fill(&s.target("big")?, a.big_bytes)?;
    let vols = [
        ("feat", a.size_bytes, a.size_bytes),
        ("big", a.big_bytes, big_written),
    ];
    let mut snap_t: [Vec<f64>; 2] = Default::default();
    let mut clone_t: [Vec<f64>; 2] = Default::default();
    for i in 0..a.samples {
        for (k, (v, _, _)) in vols.iter().enumerate() {
            let snap = format!("{v}-t{i}");
            let t = Instant::now();
            s.snapshot(v, &snap)?;
            snap_t[k].push(ms(t.elapsed()));
            let clone = format!("{v}-c{i}");
            let t = Instant::now();
            s.clone_of(&snap, &clone)?;
            clone_t[k].push(ms(t.elapsed()));
            s.delete_volume(&clone)?;
            s.delete_snapshot(&snap)?;
        }
    }
    let mut out = Vec::new();
    for (what, times) in [("snapshot", &mut snap_t), ("clone", &mut clone_t)] {
        for (k, (_, bytes, written)) in vols.iter().enumerate() {
            times[k].sort_by(f64::total_cmp);
            out.push(CreationRow {
                what,
                volume_bytes: *bytes,
                written_bytes: *written,
                samples: times[k].len(),
                p50_ms: quantile(&times[k], 0.5),
                p99_ms: quantile(&times[k], 0.99),
                max_ms: quantile(&times[k], 1.0),
            });
        }
    }
    s.delete_volume("big")?;
    Ok(out)
}

/// With a ramp: a full bucket after idle lets `burst_seconds` through by design.
fn ramped(mut t: Target) -> Target {
    t.fio_args.push("--ramp_time=1".into());
    t
}

fn tiers(s: &Server, a: &FeatureArgs) -> Result<Vec<TierRow>, String> {
    let size = a.size_bytes;
    let cases: [(&str, &str, Option<vpb::QosOverrides>); 4] = [
        ("standard", "standard", None),
        ("premium", "premium", None),
        (
            "premium (maxIops 5000, 50 MB/s)",
            "premium",
            Some(vpb::QosOverrides {
                iops_limit: Some(5_000),
                bytes_per_second_limit: Some(50_000_000),
                burst_seconds: None,
            }),
        ),
        ("extreme", "extreme", None),
    ];
    let mut out = Vec::new();
    for (i, (label, tier, o)) in cases.into_iter().enumerate() {
        let name = format!("tier-{i}");
        let v = s.create(&name, size, tier, o)?;
        let q = v.qos.unwrap_or_default();
        let t = ramped(s.target(&name)?);
        let mut bw = Vec::new();
        let mut iops = Vec::new();
        for _ in 0..a.repeat {
            bw.push(measure(
                &t,
                size,
                &w("1m-write-qd8", "write", "1m", 8),
                a.seconds,
            )?);
            iops.push(measure(
                &t,
                size,
                &w("4k-randread-qd32", "randread", "4k", 32),
                a.seconds,
            )?);
        }
        let (bw, iops) = (median_run(&bw), median_run(&iops));
        let ratio = |got: f64, limit: u64| (limit > 0).then(|| got / limit as f64);
        out.push(TierRow {
            tier: label.into(),
            volume_bytes: size,
            iops_limit: q.iops_limit,
            iops: iops.iops,
            bytes_per_second_limit: q.bytes_per_second_limit,
            bytes_per_second: bw.mb_per_s * 1e6,
            iops_ratio: ratio(iops.iops, q.iops_limit),
            bytes_ratio: ratio(bw.mb_per_s * 1e6, q.bytes_per_second_limit),
        });
        s.delete_volume(&name)?;
    }
    Ok(out)
}

/// fio in the background on `t` for `secs`: the flood, 2 connections x QD32.
fn flood(t: &Target, size: u64, secs: u64) -> Result<std::process::Child, String> {
    fio_command(t, size, &w("flood", "randwrite", "4k", 32), secs, 2)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run fio: {e}"))
}

fn priority(s: &Server, a: &FeatureArgs) -> Result<Vec<PriorityRow>, String> {
    let size = a.size_bytes;
    let unlimited = vpb::QosOverrides {
        iops_limit: Some(0),
        bytes_per_second_limit: Some(0),
        burst_seconds: None,
    };
    s.create("low", size, "standard", Some(unlimited))?;
    s.create("peer", size, "extreme", None)?;
    let hi = s.target("feat")?;
    let probe = w("4k-randread-qd1", "randread", "4k", 1);
    let mut out = Vec::new();
    for (condition, flooder) in [
        ("alone", None),
        ("standard tier (limits lifted) flooding", Some("low")),
        ("another extreme volume flooding", Some("peer")),
    ] {
        let mut runs = Vec::new();
        let mut flood_iops = Vec::new();
        for _ in 0..a.repeat {
            let child = match flooder {
                Some(v) => Some(flood(&s.target(v)?, size, a.seconds + 2)?),
                None => None,
            };
            if child.is_some() {
                std::thread::sleep(Duration::from_millis(700));
            }
            let m = measure(&hi, size, &probe, a.seconds);
            if let Some(c) = child {
                let o = c.wait_with_output().map_err(|e| e.to_string())?;
                if !o.status.success() {
                    return Err(format!(
                        "flood fio failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
                flood_iops.push(crate::fio_summary(&o.stdout)?.iops);
            }
            runs.push(m?);
        }
        let m = median_run(&runs);
        flood_iops.sort_by(f64::total_cmp);
        out.push(PriorityRow {
            condition,
            p50_us: m.p50_us,
            p99_us: m.p99_us,
            iops: m.iops,
            flood_iops: flood_iops.get(flood_iops.len() / 2).copied().unwrap_or(0.0),
        });
    }
    s.delete_volume("low")?;
    s.delete_volume("peer")?;
    Ok(out)
}

fn used_bytes(s: &Server) -> Result<u64, String> {
    s.call("stats", |mut c| async move {
        c.stats(vpb::StatsRequest {}).await
    })
    .map(|r| r.used_bytes)
}

/// B's sizes: the 2 GiB and 16 GiB (64 MiB and 256 MiB in a quick run).
fn isolation_sizes(a: &FeatureArgs) -> [u64; 2] {
    if a.quick {
        [64 << 20, 256 << 20]
    } else {
        [2 << 30, 16 << 30]
    }
}

/// A's probe alone, then once per size of B while B is snapshotted, the
/// snapshot deleted and B deleted (see the module doc).
fn isolation(s: &Server, a: &FeatureArgs) -> Result<Vec<IsolationRow>, String> {
    let size = a.size_bytes;
    let probe = w("4k-randread-qd1", "randread", "4k", 1);
    let hi = s.target("feat")?;
    // Long enough for the largest B's collection to finish inside it.
    let window = if a.quick { 3 } else { a.seconds.max(5) + 10 };
    let probe_run = |secs: u64| -> Result<std::process::Child, String> {
        fio_command(&hi, size, &probe, secs, 1)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run fio: {e}"))
    };
    let finish = |c: std::process::Child| -> Result<crate::FioReport, String> {
        let o = c.wait_with_output().map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!(
                "probe fio failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        crate::fio_summary(&o.stdout)
    };
    let mut out = Vec::new();
    let alone = finish(probe_run(window)?)?;
    out.push(IsolationRow {
        condition: "alone".into(),
        b_bytes: 0,
        iops: alone.iops,
        p50_us: alone.p50_us,
        p99_us: alone.p99_us,
        max_us: alone.max_us,
        snapshot_ms: 0.0,
        delete_snapshot_ms: 0.0,
        delete_volume_ms: 0.0,
        reclaim_s: None,
    });
    for b in isolation_sizes(a) {
        let before = used_bytes(s)?;
        s.create("iso-b", b, "extreme", None)?;
        eprintln!("features: isolation: filling B ({} MiB)", b >> 20);
        fio(&s.target("iso-b")?, b, &w("fill", "write", "1m", 8), 0, 1)?;
        let probe = probe_run(window)?;
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        s.snapshot("iso-b", "iso-b-snap")?;
        let snapshot_ms = ms(t.elapsed());
        let t = Instant::now();
        s.delete_snapshot("iso-b-snap")?;
        let delete_snapshot_ms = ms(t.elapsed());
        let t = Instant::now();
        s.delete_volume("iso-b")?;
        let delete_volume_ms = ms(t.elapsed());
        let deleted = Instant::now();
        let mut reclaim_s = None;
        while deleted.elapsed() < Duration::from_secs(window) {
            if used_bytes(s)? <= before {
                reclaim_s = Some(deleted.elapsed().as_secs_f64());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = finish(probe)?;
        out.push(IsolationRow {
            condition: format!("B of {} MiB snapshotted, snapshot and B deleted", b >> 20),
            b_bytes: b,
            iops: r.iops,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
            max_us: r.max_us,
            snapshot_ms,
            delete_snapshot_ms,
            delete_volume_ms,
            reclaim_s,
        });
        // The next B starts from a settled pool.
        let settle = Instant::now();
        while used_bytes(s)? > before && settle.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(out)
}

fn checksums(s: &Server) -> Result<Checksums, String> {
    let t = Instant::now();
    let r = s.call("scrub", |mut c| async move {
        c.scrub(vpb::ScrubRequest {}).await
    })?;
    let secs = t.elapsed().as_secs_f64();
    let block = vec![0x5au8; 4096];
    let n = 200_000u32;
    let t = Instant::now();
    let mut acc = 0u32;
    for i in 0..n {
        let mut h = crc32fast::Hasher::new_with_initial(i);
        h.update(&block);
        acc ^= h.finalize();
    }
    std::hint::black_box(acc);
    let crc_secs = t.elapsed().as_secs_f64();
    Ok(Checksums {
        verified_on_every_read: true,
        scrub_blocks: r.blocks_checked,
        scrub_seconds: secs,
        scrub_mb_per_s: r.blocks_checked as f64 * 4096.0 / secs.max(1e-9) / 1e6,
        scrub_errors: r.errors.len(),
        crc32_gb_per_s: f64::from(n) * 4096.0 / crc_secs / 1e9,
        crc32_ns_per_block: crc_secs * 1e9 / f64::from(n),
    })
}

fn mount_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn csi_rates(dir: &Path, calls: usize) -> Result<Vec<Phase>, String> {
    let data = dir.join("standalone");
    let (proc, ready) = start(
        Command::new(sibling("berth")?)
            .args(["standalone", "--data"])
            .arg(&data)
            .args(["--pool-size", "2G", "--nbd-listen", "none"])
            .args(["--listen", "none", "--metrics-listen", "none"]),
        "berth standalone",
    )?;
    let sock = ready["csi_socket"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| data.join("csi.sock").display().to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let pid = proc.pid();
    let phases = rt.block_on(async move {
        let ch = berth_proto::channel(&format!("unix://{sock}"), None)
            .await
            .map_err(|e| e.to_string())?;
        let c = csi::controller_client::ControllerClient::new(ch);
        // The volume server registers with the metadata service a moment
        // after the ready line: wait until there is capacity to place on.
        let t = Instant::now();
        loop {
            let cap = c
                .clone()
                .get_capacity(csi::GetCapacityRequest::default())
                .await
                .map(|r| r.into_inner().available_capacity)
                .unwrap_or(0);
            if cap > 0 {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("standalone reported no capacity within 30 s".to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = Vec::new();
        for (run, conc) in [1usize, 8].into_iter().enumerate() {
            // The driver's IDs, by call number, for the calls that follow.
            let vols = Arc::new(Mutex::new(vec![String::new(); calls]));
            let snaps = Arc::new(Mutex::new(vec![String::new(); calls]));
            let ids = vols.clone();
            out.push(
                phase("CSI CreateVolume", &c, pid, calls, conc, move |mut c, i| {
                    let ids = ids.clone();
                    async move {
                        let v = c
                            .create_volume(csi::CreateVolumeRequest {
                                name: format!("pvc-{run}-{i}"),
                                capacity_range: Some(csi::CapacityRange {
                                    required_bytes: 16 << 20,
                                    limit_bytes: 0,
                                }),
                                volume_capabilities: vec![mount_cap()],
                                parameters: [("tier".to_string(), "premium".to_string())].into(),
                                ..Default::default()
                            })
                            .await?
                            .into_inner()
                            .volume
                            .unwrap_or_default();
                        ids.lock()[i] = v.volume_id;
                        Ok(())
                    }
                })
                .await,
            );
            let (from, ids) = (vols.clone(), snaps.clone());
            out.push(
                phase(
                    "CSI CreateSnapshot",
                    &c,
                    pid,
                    calls,
                    conc,
                    move |mut c, i| {
                        let (from, ids) = (from.clone(), ids.clone());
                        async move {
                            let source_volume_id = from.lock()[i].clone();
                            let s = c
                                .create_snapshot(csi::CreateSnapshotRequest {
                                    source_volume_id,
                                    name: format!("snapshot-{run}-{i}"),
                                    ..Default::default()
                                })
                                .await?
                                .into_inner()
                                .snapshot
                                .unwrap_or_default();
                            ids.lock()[i] = s.snapshot_id;
                            Ok(())
                        }
                    },
                )
                .await,
            );
            out.push(
                phase(
                    "CSI DeleteSnapshot",
                    &c,
                    pid,
                    calls,
                    conc,
                    move |mut c, i| {
                        let snapshot_id = snaps.lock()[i].clone();
                        async move {
                            c.delete_snapshot(csi::DeleteSnapshotRequest {
                                snapshot_id,
                                ..Default::default()
                            })
                            .await
                            .map(drop)
                        }
                    },
                )
                .await,
            );
            out.push(
                phase("CSI DeleteVolume", &c, pid, calls, conc, move |mut c, i| {
                    let volume_id = vols.lock()[i].clone();
                    async move {
                        c.delete_volume(csi::DeleteVolumeRequest {
                            volume_id,
                            ..Default::default()
                        })
                        .await
                        .map(drop)
                    }
                })
                .await,
            );
        }
        Ok::<_, String>(out)
    })?;
    drop(proc);
    Ok(phases)
}

fn checks(f: &Features) -> Vec<Check> {
    let mut out = Vec::new();
    for what in ["snapshot", "clone"] {
        let rows: Vec<&CreationRow> = f.creation.iter().filter(|r| r.what == what).collect();
        let ratio = match rows.as_slice() {
            [small, big] => Some(big.p50_ms / small.p50_ms.max(1e-9)),
            _ => None,
        };
        out.push(Check {
            check: format!(
                "{what} creation: {} MiB / {} MiB volume, median time <= 1.5x",
                rows.last().map_or(0, |r| r.volume_bytes >> 20),
                rows.first().map_or(0, |r| r.volume_bytes >> 20),
            ),
            met: ratio.map(|r| r <= 1.5),
            value: ratio.map_or("not measured".into(), |r| format!("{r:.2}")),
        });
    }
    for t in &f.tiers {
        for (what, r) in [("IOPS", t.iops_ratio), ("throughput", t.bytes_ratio)] {
            if let Some(r) = r {
                out.push(Check {
                    check: format!("tier {}: {what} within 10% of its limit", t.tier),
                    met: Some((0.9..=1.1).contains(&r)),
                    value: format!("{r:.3}"),
                });
            }
        }
    }
    if let Some(alone) = f.isolation.iter().find(|r| r.b_bytes == 0) {
        for r in f.isolation.iter().filter(|r| r.b_bytes > 0) {
            out.push(Check {
                check: format!(
                    "isolation: A's slowest read while B of {} MiB is snapshotted and deleted, at most 10 ms over its slowest alone",
                    r.b_bytes >> 20
                ),
                met: Some(r.max_us <= alone.max_us + 10_000.0),
                value: format!("{:.1} ms vs {:.1} ms alone", r.max_us / 1e3, alone.max_us / 1e3),
            });
        }
    }
    out
}

fn print(f: &Features) {
    println!("\ncopy-on-write (4 KiB, QD32, median of repeats; every read verifies CRC32):");
    println!(
        "{:<18} {:<20} {:>10} {:>9} {:>9} {:>9}",
        "volume", "workload", "IOPS", "vs plain", "p50 us", "p99 us"
    );
    for r in &f.cow {
        println!(
            "{:<18} {:<20} {:>10.0} {:>8.2}x {:>9.1} {:>9.1}",
            r.volume, r.workload, r.median.iops, r.vs_plain, r.median.p50_us, r.median.p99_us
        );
    }
    println!("\ncreation time at the volume server's API:");
    println!(
        "{:<9} {:>9} {:>12} {:>8} {:>9} {:>9} {:>9}",
        "what", "volume", "written", "samples", "p50 ms", "p99 ms", "max ms"
    );
    for r in &f.creation {
        println!(
            "{:<9} {:>7}Mi {:>10}Mi {:>8} {:>9.2} {:>9.2} {:>9.2}",
            r.what,
            r.volume_bytes >> 20,
            r.written_bytes >> 20,
            r.samples,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        );
    }
    println!("\ntiers (limits as the server applies them to a volume of this size):");
    println!(
        "{:<34} {:>10} {:>10} {:>7} {:>11} {:>11} {:>7}",
        "tier", "IOPS limit", "IOPS", "ratio", "MB/s limit", "MB/s", "ratio"
    );
    let r3 = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.3}"));
    let lim = |l: u64, scale: f64| {
        if l == 0 {
            "none".to_string()
        } else {
            format!("{:.0}", l as f64 / scale)
        }
    };
    for t in &f.tiers {
        println!(
            "{:<34} {:>10} {:>10.0} {:>7} {:>11} {:>11.1} {:>7}",
            t.tier,
            lim(t.iops_limit, 1.0),
            t.iops,
            r3(t.iops_ratio),
            lim(t.bytes_per_second_limit, 1e6),
            t.bytes_per_second / 1e6,
            r3(t.bytes_ratio)
        );
    }
    println!("\npriority: an extreme volume's 4 KiB QD1 random reads");
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>11}",
        "condition", "IOPS", "p50 us", "p99 us", "flood IOPS"
    );
    for p in &f.priority {
        println!(
            "{:<40} {:>9.0} {:>9.1} {:>9.1} {:>11.0}",
            p.condition, p.iops, p.p50_us, p.p99_us, p.flood_iops
        );
    }
    println!("\nisolation: volume A's 4 KiB QD1 random reads while volume B's control work runs");
    println!(
        "{:<50} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
        "condition",
        "IOPS",
        "p50 us",
        "p99 us",
        "max us",
        "snap ms",
        "rm-s ms",
        "rm-v ms",
        "reclaim s"
    );
    for r in &f.isolation {
        println!(
            "{:<50} {:>8.0} {:>8.1} {:>9.1} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>9}",
            r.condition,
            r.iops,
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.snapshot_ms,
            r.delete_snapshot_ms,
            r.delete_volume_ms,
            r.reclaim_s.map_or("-".into(), |s| format!("{s:.2}"))
        );
    }
    let c = &f.checksums;
    println!(
        "\nchecksums: scrub verified {} blocks in {:.2} s ({:.0} MB/s, {} errors); crc32fast {:.1} GB/s, {:.0} ns per 4 KiB block",
        c.scrub_blocks, c.scrub_seconds, c.scrub_mb_per_s, c.scrub_errors, c.crc32_gb_per_s, c.crc32_ns_per_block
    );
    println!("\nCSI through berth standalone:");
    print_phases(&f.csi);
    println!();
    for c in &f.checks {
        let mark = match c.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "-",
        };
        println!("{mark:>8}  {} (this run: {})", c.check, c.value);
    }
}

/// Every feature measurement, printed; plots go into `folder`.
pub fn measure_all(mut a: FeatureArgs, folder: &Path) -> Result<Features, String> {
    a.apply_quick();
    if a.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    if a.big_bytes < a.size_bytes || a.size_bytes < 16 << 20 {
        return Err("--big-bytes must be at least --size-bytes, which is at least 16 MiB".into());
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let result: Result<Features, String> = (|| {
        // Room for: the filled volume, a snapshot's and a clone's rewrites
        // (freed each repeat), the big volume's sparse data, tier volumes.
        let pool = a.size_bytes * 8
            + a.big_bytes / 16
            + isolation_sizes(&a).into_iter().max().unwrap_or(0)
            + (1 << 30);
        let s = Server::start(&a.dir, pool)?;
        s.create("feat", a.size_bytes, "extreme", None)?;
        let feat = s.target("feat")?;
        eprintln!("features: filling a {} MiB volume", a.size_bytes >> 20);
        fio(&feat, a.size_bytes, &w("fill", "write", "1m", 8), 0, 1)?;
        if a.isolation_only {
            eprintln!("features: isolation");
            let isolation = isolation(&s, &a)?;
            let mut f = Features {
                cow: Vec::new(),
                creation: Vec::new(),
                tiers: Vec::new(),
                priority: Vec::new(),
                isolation,
                checksums: Checksums::default(),
                csi: Vec::new(),
                checks: Vec::new(),
            };
            f.checks = checks(&f);
            return Ok(f);
        }
        eprintln!("features: copy-on-write");
        let cow = cow(&s, &a)?;
        eprintln!("features: snapshot and clone creation time");
        let creation = creation(&s, &a)?;
        eprintln!("features: tiers");
        let tiers = tiers(&s, &a)?;
        eprintln!("features: priority");
        let priority = priority(&s, &a)?;
        eprintln!("features: isolation");
        let isolation = isolation(&s, &a)?;
        let checksums = checksums(&s)?;
        drop(s);
        eprintln!("features: CSI rates");
        let csi = csi_rates(&a.dir, a.csi_calls)?;
        let mut f = Features {
            cow,
            creation,
            tiers,
            priority,
            isolation,
            checksums,
            csi,
            checks: Vec::new(),
        };
        f.checks = checks(&f);
        Ok(f)
    })();
    let _ = std::fs::remove_dir_all(&a.dir);
    let f = result?;
    print(&f);
    if !f.cow.is_empty() {
        plots(&f, folder)?;
    }
    Ok(f)
}

fn plots(f: &Features, folder: &Path) -> Result<(), String> {
    std::fs::create_dir_all(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    let cats: Vec<String> = f.tiers.iter().map(|t| t.tier.clone()).collect();
    // Per plot: (limit, achieved) of a tier, in the plot's unit; a limit of 0 is none.
    type Pick = fn(&TierRow) -> (u64, f64);
    let per_tier: [(&str, &str, &str, f64, Pick); 2] = [
        (
            "tiers-iops.svg",
            "Tier IOPS: limit and achieved (4 KiB random reads, QD32)",
            "IOPS",
            1.0,
            |t| (t.iops_limit, t.iops),
        ),
        (
            "tiers-throughput.svg",
            "Tier throughput: limit and achieved (1 MiB writes, QD8)",
            "MB/s",
            1e6,
            |t| (t.bytes_per_second_limit, t.bytes_per_second),
        ),
    ];
    for (file, title, unit, scale, pick) in per_tier {
        let limit = |t: &TierRow| Some(pick(t).0).filter(|&l| l > 0).map(|l| l as f64 / scale);
        plot::bars(
            &folder.join(file),
            title,
            unit,
            &cats,
            &[
                plot::Series {
                    name: "limit".into(),
                    values: f.tiers.iter().map(limit).collect(),
                },
                plot::Series {
                    name: "achieved".into(),
                    values: f.tiers.iter().map(|t| Some(pick(t).1 / scale)).collect(),
                },
            ],
        )?;
    }
    let wls: Vec<String> = COW_WORKLOADS.iter().map(|w| w.name.to_string()).collect();
    let series: Vec<plot::Series> = ["plain", "after a snapshot", "fresh clone"]
        .iter()
        .map(|v| plot::Series {
            name: v.to_string(),
            values: COW_WORKLOADS
                .iter()
                .map(|wl| {
                    f.cow
                        .iter()
                        .find(|r| r.volume == *v && r.workload == wl.name)
                        .map(|r| r.median.iops)
                })
                .collect(),
        })
        .collect();
    plot::bars(
        &folder.join("cow-iops.svg"),
        "Copy-on-write: 4 KiB QD32 IOPS on a plain volume, after a snapshot, on a clone",
        "IOPS",
        &wls,
        &series,
    )
}

/// `berth-bench features`: the measurements alone, in a folder of their own.
pub fn run(a: FeatureArgs) -> Result<(), String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let folder = a.out.join(format!("features-{stamp}"));
    let quick = a.quick;
    let f = measure_all(a, &folder)?;
    let doc = serde_json::json!({"kind": "features", "quick": quick, "features": f});
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    // (An --isolation-only run draws no plots, which made the folder.)
    std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    let path = folder.join("features.json");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("wrote {}", folder.display());
    Ok(())
}
