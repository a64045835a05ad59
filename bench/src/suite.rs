//! `berth-bench run`: the comparison people decide by. Every target on the
//! same disk, every workload, driven by fio, repeated, in one run:
//!
//! - `raw`: a plain file with fio's io_uring engine and O_DIRECT (the limit);
//! - `berth-unix`, `berth-tcp`: one Berth volume (tier extreme: no limits)
//!   over the volume server's unix socket and over TCP on loopback;
//! - `qemu-nbd`: `qemu-nbd -f raw -t --cache=none --aio=io_uring` serving a
//!   file (unix socket);
//! - `nbdkit`: nbdkit's file plugin with `cache=none` (unix socket).
//!
//! NBD targets are driven by fio's `nbd` engine (libnbd). A peer that is not
//! installed or does not start is reported as skipped, with the reason, never
//! measured in some other way. Runs rotate the order of the targets so no
//! target always goes first; the median of the repeats is reported with the
//! spread, and every Berth / peer ratio is computed from figures of this run
//! (absolute figures on shared machines drift by the minute).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::features::FeatureArgs;
use crate::nbd::{cpu_seconds, Proc};
use crate::plot;

#[derive(clap::Args, Debug)]
pub struct SuiteArgs {
    /// Scratch directory on the disk to measure (removed afterwards).
    #[arg(long, default_value = "/var/tmp/berth-bench-run")]
    dir: PathBuf,
    /// Size of each target (volume or file).
    #[arg(long, default_value_t = 1 << 30)]
    size_bytes: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of each target per workload; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// fio jobs (one NBD connection each) per run; IOPS are summed.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// Seconds over which the idle volume server's CPU use is measured.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// A smoke run (64 MiB, 1 s, one repeat, 1 s idle): checks the harness
    /// works, not the speed.
    #[arg(long)]
    quick: bool,
    /// Only these targets (comma-separated).
    #[arg(long)]
    targets: Option<String>,
    /// Only these workloads (comma-separated).
    #[arg(long)]
    workloads: Option<String>,
    /// Leave out Berth's own features (copy-on-write, creation time, tiers,
    /// priority, checksums, CSI rates; `berth-bench features` runs them alone).
    #[arg(long)]
    no_features: bool,
    /// Where the run's folder (JSON and plots) is written.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// A workload, as fio takes it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub depth: u32,
    /// Percentage of reads in a mixed workload.
    pub read_mix: Option<u32>,
    /// fsync (NBD FLUSH) after every write.
    pub fsync: bool,
}

pub(crate) const fn w(
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
) -> Workload {
    Workload {
        name,
        rw,
        bs,
        depth,
        read_mix: None,
        fsync: false,
    }
}

/// In this order: sequential runs first, on freshly filled targets; then the
/// random ones; last, sequential reads again, which shows what random
/// overwrites did to the layout (Berth writes every block to fresh space, so
/// they scatter a volume; a raw file stays where it was).
pub const WORKLOADS: &[Workload] = &[
    w("1m-read-qd8", "read", "1m", 8),
    w("1m-write-qd8", "write", "1m", 8),
    w("4k-randread-qd1", "randread", "4k", 1),
    w("4k-randread-qd32", "randread", "4k", 32),
    w("4k-randwrite-qd1", "randwrite", "4k", 1),
    w("4k-randwrite-qd32", "randwrite", "4k", 32),
    Workload {
        read_mix: Some(70),
        ..w("4k-randrw-70-30-qd32", "randrw", "4k", 32)
    },
    Workload {
        fsync: true,
        ..w("4k-write-qd1-fsync", "randwrite", "4k", 1)
    },
    w("1m-read-qd8-after-random-writes", "read", "1m", 8),
];

/// What fio is pointed at, and the server (if any) whose CPU it costs.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) fio_args: Vec<String>,
    pub(crate) server_pid: Option<u32>,
}

/// One measurement.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Run {
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Server CPU microseconds per I/O (none for the raw file).
    pub cpu_us_per_io: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub target: String,
    pub workload: String,
    /// The run with the median IOPS.
    pub median: Run,
    pub iops_min: f64,
    pub iops_max: f64,
    /// (max - min) / median, in percent.
    pub spread_percent: f64,
    pub runs: Vec<Run>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub workload: String,
    pub berth: String,
    pub peer: String,
    pub iops_ratio: f64,
    /// Berth's p99 over the peer's (below 1: Berth is faster).
    pub p99_ratio: f64,
}

/// fio's command line for a workload on a target (`secs` 0: one pass over `size`).
pub(crate) fn fio_command(t: &Target, size: u64, w: &Workload, secs: u64, jobs: u32) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--output-format=json",
        "--randrepeat=0",
        "--group_reporting",
    ])
    .args(&t.fio_args)
    .arg(format!("--numjobs={jobs}"))
    .arg(format!("--size={size}"))
    .arg(format!("--rw={}", w.rw))
    .arg(format!("--bs={}", w.bs))
    .arg(format!("--iodepth={}", w.depth));
    if secs > 0 {
        cmd.args(["--time_based", &format!("--runtime={secs}")]);
    }
    if let Some(m) = w.read_mix {
        cmd.arg(format!("--rwmixread={m}"));
    }
    if w.fsync {
        cmd.arg("--fsync=1");
    }
    cmd
}

pub(crate) fn fio(
    t: &Target,
    size: u64,
    w: &Workload,
    secs: u64,
    jobs: u32,
) -> Result<crate::FioReport, String> {
    let mut cmd = fio_command(t, size, w, secs, jobs);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run fio: {e} (apt-get install fio)"))?;
    if !out.status.success() {
        return Err(format!(
            "fio {} on {} failed: {}{}",
            w.name,
            t.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let r = crate::fio_summary(&out.stdout)?;
    if r.ios == 0 {
        return Err(format!("fio {} on {} did no I/O", w.name, t.name));
    }
    Ok(r)
}

pub(crate) fn measure(
    t: &Target,
    size: u64,
    w: &Workload,
    secs: u64,
    jobs: u32,
) -> Result<Run, String> {
    let cpu0 = t.server_pid.map(cpu_seconds);
    let f = fio(t, size, w, secs, jobs)?;
    let cpu = t
        .server_pid
        .zip(cpu0)
        .map(|(pid, c0)| (cpu_seconds(pid) - c0) * 1e6 / f.ios.max(1) as f64);
    Ok(Run {
        iops: f.iops,
        mb_per_s: f.mb_per_s,
        p50_us: f.p50_us,
        p99_us: f.p99_us,
        p999_us: f.p999_us,
        cpu_us_per_io: cpu,
    })
}

fn have(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

fn sized_file(path: &Path, size: u64) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn start_nbdkit(dir: &Path, size: u64) -> Result<(Proc, String), String> {
    if !have("nbdkit") {
        return Err("nbdkit is not installed (apt-get install nbdkit)".into());
    }
    let file = dir.join("nbdkit.raw");
    sized_file(&file, size)?;
    let sock = dir.join("nbdkit.sock");
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-t", "16", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(format!("file={}", file.display()))
        .arg("cache=none")
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start nbdkit: {e}"))?;
    let proc = Proc {
        child,
        name: "nbdkit",
    };
    crate::nbd::wait_for(&sock, "nbdkit")?;
    Ok((proc, format!("nbd+unix:///?socket={}", sock.display())))
}

pub(crate) fn nbd_target(name: &'static str, uri: &str, pid: u32) -> Target {
    Target {
        name,
        fio_args: vec!["--ioengine=nbd".into(), format!("--uri={uri}")],
        server_pid: Some(pid),
    }
}

/// A volume as a pod gets it: `berth attach` (the node plugin's FUSE file,
/// over the volume server's unix socket) and a loop device with direct I/O
/// on that file, which fio drives like a disk. Dropping it detaches the loop
/// device, then stops the attachment (which flushes and unmounts).
pub(crate) struct Attached {
    mnt: PathBuf,
    loop_dev: String,
    attach: Option<Proc>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
        drop(self.attach.take());
        // Only if the attachment could not unmount by itself.
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "-q"])
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// The `pod` target: a second volume `pod` on the volume server at
/// `dir/berth`, attached as a pod's would be (the volume server serves the
/// FUSE file). `pod-nbd` (`nbd`): the same through NBD, as attachments of
/// volumes on other nodes go (and as local ones did before the handoff).
fn start_pod(
    dir: &Path,
    size: u64,
    server_pid: u32,
    nbd: bool,
) -> Result<(Attached, Target), String> {
    let name = if nbd { "pod-nbd" } else { "pod" };
    if !Path::new("/dev/fuse").exists() || !have("losetup") {
        return Err("needs /dev/fuse and losetup (FUSE and loop devices)".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (a loop device)".into());
    }
    let grant = crate::nbd::volume_export(&dir.join("berth"), name, size, "berth-bench-pod")?;
    let uri = grant["unix_uri"].as_str().unwrap_or_default().to_string();
    let mnt = dir.join(name);
    std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
    let pid_file = dir.join(format!("{name}.pid"));
    let mut attach = Command::new(crate::nbd::sibling("berth")?);
    if nbd {
        // berth_csi::node::local::FORCE_NBD
        attach.env("BERTH_ATTACH_NBD", "1");
    }
    let child = attach
        .arg("attach")
        .arg(&mnt)
        .arg("--pid-file")
        .arg(&pid_file)
        // The export's name is a grant's secret: in the environment.
        .env("BERTH_ATTACH_URI", &uri)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("start berth attach: {e}"))?;
    let attach = Proc {
        child,
        name: "berth attach",
    };
    let t = Instant::now();
    while !pid_file.exists() {
        if t.elapsed() > Duration::from_secs(20) {
            return Err("berth attach did not serve its file within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let disk = mnt.join("disk");
    let out = Command::new("losetup")
        .args(["--direct-io=on", "--find", "--show"])
        .arg(&disk)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let target = Target {
        name,
        fio_args: vec![
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--filename={loop_dev}"),
        ],
        // The attachment's CPU is the pod side's; the server's is counted.
        server_pid: Some(server_pid),
    };
    Ok((
        Attached {
            mnt,
            loop_dev,
            attach: Some(attach),
        },
        target,
    ))
}

/// The targets, started, or why each is skipped.
fn start_targets(
    dir: &Path,
    size: u64,
    procs: &mut Vec<Proc>,
    pods: &mut Vec<Attached>,
) -> Vec<(&'static str, Result<Target, String>)> {
    let mut out = Vec::new();
    let raw = dir.join("raw.img");
    out.push((
        "raw",
        sized_file(&raw, size).map(|()| Target {
            name: "raw",
            fio_args: vec![
                "--ioengine=io_uring".into(),
                "--direct=1".into(),
                format!("--filename={}", raw.display()),
            ],
            server_pid: None,
        }),
    ));
    match crate::nbd::start_berth(dir, size, true) {
        Ok((p, unix, tcp)) => {
            out.push(("berth-unix", Ok(nbd_target("berth-unix", &unix, p.pid()))));
            out.push(("berth-tcp", Ok(nbd_target("berth-tcp", &tcp, p.pid()))));
            for nbd in [false, true] {
                let name = if nbd { "pod-nbd" } else { "pod" };
                match start_pod(dir, size, p.pid(), nbd) {
                    Ok((a, t)) => {
                        pods.push(a);
                        out.push((name, Ok(t)));
                    }
                    Err(e) => out.push((name, Err(e))),
                }
            }
            procs.push(p);
        }
        Err(e) => {
            out.push(("berth-unix", Err(e.clone())));
            out.push(("pod", Err(e.clone())));
            out.push(("pod-nbd", Err(e.clone())));
            out.push(("berth-tcp", Err(e)));
        }
    }
    let qemu = if have("qemu-nbd") {
        crate::nbd::start_qemu_nbd(dir, size, false)
    } else {
        Err("qemu-nbd is not installed (apt-get install qemu-utils)".into())
    };
    match qemu {
        Ok((p, uri)) => {
            out.push(("qemu-nbd", Ok(nbd_target("qemu-nbd", &uri, p.pid()))));
            procs.push(p);
        }
        Err(e) => out.push(("qemu-nbd", Err(e))),
    }
    match start_nbdkit(dir, size) {
        Ok((p, uri)) => {
            out.push(("nbdkit", Ok(nbd_target("nbdkit", &uri, p.pid()))));
            procs.push(p);
        }
        Err(e) => out.push(("nbdkit", Err(e))),
    }
    out
}

fn cell(target: &str, w: &Workload, runs: Vec<Run>) -> Cell {
    let mut sorted = runs.clone();
    sorted.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let median = sorted[sorted.len() / 2];
    let (min, max) = (sorted[0].iops, sorted[sorted.len() - 1].iops);
    Cell {
        target: target.into(),
        workload: w.name.into(),
        median,
        iops_min: min,
        iops_max: max,
        spread_percent: (max - min) * 100.0 / median.iops.max(1e-9),
        runs,
    }
}

fn pick<'a>(list: &Option<String>, all: &'a [&'a str]) -> Result<Vec<&'a str>, String> {
    match list {
        None => Ok(all.to_vec()),
        Some(l) => l
            .split(',')
            .map(|x| {
                all.iter()
                    .find(|a| **a == x)
                    .copied()
                    .ok_or_else(|| format!("{x:?} is not one of {}", all.join(", ")))
            })
            .collect(),
    }
}

const TARGETS: &[&str] = &[
    "raw",
    "berth-unix",
    "berth-tcp",
    "pod",
    "pod-nbd",
    "qemu-nbd",
    "nbdkit",
];

/// The compass the project steers by (from the benchmark and pod-path
/// issues): a Berth target (over its unix socket, or `pod`, a loop device
/// on the node attachment) against a peer on a workload, by IOPS (at least
/// the bound) or by p99 latency (at most the bound).
const COMPASS: &[(&str, &str, &str, bool, f64)] = &[
    ("berth-unix", "qemu-nbd", "4k-randread-qd32", true, 1.5),
    ("berth-unix", "qemu-nbd", "4k-randwrite-qd32", true, 1.5),
    ("berth-unix", "raw", "4k-randread-qd32", true, 0.8),
    ("berth-unix", "qemu-nbd", "1m-read-qd8", true, 1.0),
    ("berth-unix", "qemu-nbd", "1m-write-qd8", true, 1.0),
    ("berth-unix", "qemu-nbd", "4k-write-qd1-fsync", false, 1.0),
    ("pod", "raw", "4k-randread-qd32", true, 0.6),
    ("pod", "raw", "4k-randwrite-qd32", true, 0.6),
    ("pod", "raw", "4k-randread-qd1", true, 0.7),
    ("pod", "raw", "4k-randwrite-qd1", true, 0.7),
];

/// The layout's compass: a target's sequential reads after the random
/// overwrites against its own on the fresh layout, by throughput (at least
/// the bound).
const LAYOUT_COMPASS: &[(&str, f64)] = &[("berth-unix", 0.8), ("pod", 0.8)];

/// Each compass check, and whether this run meets it (None: not measured).
fn compass(cells: &[Cell]) -> Vec<(String, Option<bool>, String)> {
    let get = |t: &str, w: &str| cells.iter().find(|c| c.target == t && c.workload == w);
    let layout = LAYOUT_COMPASS.iter().map(|&(t, bound)| {
        let (after, fresh) = ("1m-read-qd8-after-random-writes", "1m-read-qd8");
        let got = get(t, after)
            .zip(get(t, fresh))
            .map(|(a, f)| a.median.mb_per_s / f.median.mb_per_s.max(1e-9));
        (
            format!("{t}: {after} / {fresh} MB/s >= {bound}"),
            got.map(|g| g >= bound),
            got.map_or("not measured".into(), |g| format!("{g:.2}")),
        )
    });
    COMPASS
        .iter()
        .map(|&(berth, peer, w, by_iops, bound)| {
            let metric = |r: &Run| if by_iops { r.iops } else { r.p99_us };
            let got = get(berth, w)
                .zip(get(peer, w))
                .map(|(b, p)| metric(&b.median) / metric(&p.median).max(1e-9));
            let what = if by_iops {
                format!("{w}: {berth} / {peer} IOPS >= {bound}")
            } else {
                format!("{w}: {berth} / {peer} p99 <= {bound}")
            };
            (
                what,
                got.map(|g| if by_iops { g >= bound } else { g <= bound }),
                got.map_or("not measured".into(), |g| format!("{g:.2}")),
            )
        })
        .chain(layout)
        .collect()
}

pub fn run(mut a: SuiteArgs) -> Result<(), String> {
    if a.quick {
        a.size_bytes = 64 << 20;
        a.seconds = 1;
        a.repeat = 1;
        a.idle_seconds = 1;
    }
    if a.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let target_names = pick(&a.targets, TARGETS)?;
    let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
    let workload_names = pick(&a.workloads, &names)?;
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| workload_names.contains(&w.name))
        .collect();
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let mut procs = Vec::new();
    let mut pods = Vec::new();
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for (name, t) in start_targets(&a.dir, a.size_bytes, &mut procs, &mut pods) {
        if !target_names.contains(&name) {
            continue;
        }
        match t {
            Ok(t) => targets.push(t),
            Err(why) => {
                eprintln!("skipping {name}: {why}");
                skipped.push(serde_json::json!({"target": name, "reason": why}));
            }
        }
    }
    if targets.is_empty() {
        return Err("no target could be started".into());
    }
    let total = (targets.len() * (1 + workloads.len() * a.repeat as usize)) as u64;
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let fill = w("fill", "write", "1m", 8);
    for t in &targets {
        pb.set_message(format!("filling {}", t.name));
        // Reads must hit written data: thin volumes read holes for free.
        fio(t, a.size_bytes, &fill, 0, 1)?;
        pb.inc(1);
    }
    let mut cells = Vec::new();
    for w in &workloads {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
        for r in 0..a.repeat as usize {
            for k in 0..targets.len() {
                let i = (k + r) % targets.len();
                let t = &targets[i];
                pb.set_message(format!("{} on {} (run {})", w.name, t.name, r + 1));
                let m = measure(t, a.size_bytes, w, a.seconds, a.jobs)?;
                pb.println(format!(
                    "  {:<10} {:<32} {:>9.0} IOPS {:>8.1} MB/s p50 {:>7.1} p99 {:>8.1} p99.9 {:>8.1} us",
                    t.name, w.name, m.iops, m.mb_per_s, m.p50_us, m.p99_us, m.p999_us
                ));
                runs[i].push(m);
                pb.inc(1);
            }
        }
        for (t, r) in targets.iter().zip(runs) {
            cells.push(cell(t.name, w, r));
        }
    }
    pb.finish_and_clear();
    // Idle: every fio connection closed, nothing to do.
    let idle = procs
        .iter()
        .find(|p| p.name == "berth volume-server")
        .map(|p| {
            std::thread::sleep(Duration::from_secs(1));
            let c0 = cpu_seconds(p.pid());
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs(a.idle_seconds));
            (cpu_seconds(p.pid()) - c0) * 100.0 / t0.elapsed().as_secs_f64()
        });
    // The attachment first: it flushes to the volume server.
    drop(pods);
    drop(procs);
    let _ = std::fs::remove_dir_all(&a.dir);

    let mut ratios = Vec::new();
    for b in ["berth-unix", "berth-tcp", "pod", "pod-nbd"] {
        for p in ["raw", "qemu-nbd", "nbdkit"] {
            for w in &workloads {
                let get = |t: &str| cells.iter().find(|c| c.target == t && c.workload == w.name);
                if let (Some(bc), Some(pc)) = (get(b), get(p)) {
                    ratios.push(Ratio {
                        workload: w.name.into(),
                        berth: b.into(),
                        peer: p.into(),
                        iops_ratio: bc.median.iops / pc.median.iops.max(1e-9),
                        p99_ratio: bc.median.p99_us / pc.median.p99_us.max(1e-9),
                    });
                }
            }
        }
    }

    // The table.
    println!(
        "{:<32} {:<11} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "workload", "target", "IOPS", "spread", "MB/s", "p50 us", "p99 us", "p99.9 us", "cpu us/io"
    );
    for c in &cells {
        let m = &c.median;
        println!(
            "{:<32} {:<11} {:>10.0} {:>6.1}% {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8}",
            c.workload,
            c.target,
            m.iops,
            c.spread_percent,
            m.mb_per_s,
            m.p50_us,
            m.p99_us,
            m.p999_us,
            m.cpu_us_per_io.map_or("-".into(), |v| format!("{v:.1}"))
        );
    }
    println!();
    for r in ratios
        .iter()
        .filter(|r| matches!(r.berth.as_str(), "berth-unix" | "pod" | "pod-nbd"))
    {
        println!(
            "{:<32} {:>10} / {:<9} IOPS {:>5.2}x   p99 {:>5.2}x",
            r.workload, r.berth, r.peer, r.iops_ratio, r.p99_ratio
        );
    }
    let compass = compass(&cells);
    println!();
    for (what, ok, got) in &compass {
        let mark = match ok {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "-",
        };
        println!("{mark:>8}  {what} (this run: {got})");
    }
    if let Some(i) = idle {
        println!(
            "idle volume server: {i:.2}% of a core over {} s",
            a.idle_seconds
        );
    }
    for s in &skipped {
        println!("skipped {}: {}", s["target"], s["reason"]);
    }

    // JSON and plots, in a folder of their own.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let folder = a.out.join(format!("run-{stamp}"));
    std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    let features = if a.no_features {
        None
    } else {
        let fa = FeatureArgs::for_run(&a.dir, a.seconds, a.repeat, a.quick, &a.out);
        Some(crate::features::measure_all(fa, &folder)?)
    };
    let doc = serde_json::json!({
        "kind": "run",
        "quick": a.quick,
        "size_bytes": a.size_bytes,
        "seconds": a.seconds,
        "repeat": a.repeat,
        "jobs": a.jobs,
        "workloads": workloads,
        "targets": targets.iter().map(|t| t.name).collect::<Vec<_>>(),
        "skipped": skipped,
        "cells": cells,
        "ratios": ratios,
        "compass": compass.iter().map(|(what, ok, got)| serde_json::json!({"check": what, "met": ok, "value": got})).collect::<Vec<_>>(),
        "idle_cpu_percent": idle,
        "features": features,
        "peers": {
            "qemu-nbd": "qemu-nbd -f raw -t --cache=none --aio=io_uring --shared=8 (unix socket)",
            "nbdkit": "nbdkit -t 16 file cache=none (unix socket)",
            "raw": "fio --ioengine=io_uring --direct=1 on a file",
            "pod": "fio --ioengine=io_uring --direct=1 on a loop device (--direct-io=on) over berth attach's FUSE file, which the volume server serves (the mount handed over fuse.sock)",
            "pod-nbd": "as pod, with berth attach speaking NBD to the volume server's unix socket (BERTH_ATTACH_NBD=1), as attachments of remote volumes do",
        },
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    let json_path = folder.join("run.json");
    std::fs::write(&json_path, text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let series = |pick: &dyn Fn(&Run) -> f64, ws: &[&&Workload]| -> Vec<plot::Series> {
        targets
            .iter()
            .map(|t| plot::Series {
                name: t.name.to_string(),
                values: ws
                    .iter()
                    .map(|w| {
                        cells
                            .iter()
                            .find(|c| c.target == t.name && c.workload == w.name)
                            .map(|c| pick(&c.median))
                    })
                    .collect(),
            })
            .collect()
    };
    let small: Vec<&&Workload> = workloads.iter().filter(|w| w.bs == "4k").collect();
    let large: Vec<&&Workload> = workloads.iter().filter(|w| w.bs != "4k").collect();
    let labels = |ws: &[&&Workload]| ws.iter().map(|w| w.name.to_string()).collect::<Vec<_>>();
    let mut plots = Vec::new();
    if !small.is_empty() {
        plots.push((
            "iops-4k.svg",
            "4 KiB IOPS (median)",
            "IOPS",
            labels(&small),
            series(&|r| r.iops, &small),
        ));
        plots.push((
            "p99-4k.svg",
            "4 KiB p99 latency (median run)",
            "microseconds",
            labels(&small),
            series(&|r| r.p99_us, &small),
        ));
    }
    if !large.is_empty() {
        plots.push((
            "throughput-1m.svg",
            "1 MiB throughput (median)",
            "MB/s",
            labels(&large),
            series(&|r| r.mb_per_s, &large),
        ));
    }
    for (file, title, y, cats, s) in plots {
        plot::bars(&folder.join(file), title, y, &cats, &s)?;
    }
    eprintln!("wrote {}", folder.display());
    Ok(())
}
