//! `berth-bench nbd`: a Berth volume over NBD beside qemu-nbd serving a raw
//! file on the same disk, both driven by fio's `nbd` engine (libnbd), in the
//! same run, alternating which goes first.
//!
//! Workloads: 4 KiB random read and write at QD32, 1 MiB sequential read and
//! write at QD8, 4 KiB random write at QD1 with a flush after every write
//! (`--fsync=1`). Both targets are filled first, so reads hit real data. Also
//! measured: each server's CPU time per I/O (from /proc), and the volume
//! server's CPU use while idle.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::suite::{fio, nbd_target, w, Workload};

#[derive(clap::Args, Debug)]
pub struct NbdArgs {
    /// Scratch directory on the disk to measure (removed afterwards).
    #[arg(long, default_value = "/var/tmp/berth-bench-nbd")]
    dir: PathBuf,
    /// Volume and file size.
    #[arg(long, default_value_t = 1 << 30)]
    size_bytes: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of each target per workload; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// `unix` (the node-local path) or `tcp` (loopback).
    #[arg(long, default_value = "unix")]
    transport: String,
    /// Seconds to measure the idle volume server's CPU use.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// fio jobs (one NBD connection each) per run; IOPS are summed.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// Only these workloads (comma-separated names), default all.
    #[arg(long)]
    only: Option<String>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Debug, Serialize, Clone)]
pub struct NbdMeasure {
    pub target: String,
    pub workload: String,
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Server CPU microseconds per I/O during the run.
    pub cpu_us_per_io: f64,
}

/// In this order: sequential runs first, on freshly filled targets; then random
/// writes, after which the last run shows what they did to sequential reads
/// (Berth redirects every write to fresh blocks, so random overwrites scatter a
/// volume's layout; a raw file keeps it).
const WORKLOADS: &[Workload] = &[
    w("1m-read-qd8", "read", "1m", 8),
    w("1m-write-qd8", "write", "1m", 8),
    w("4k-randread-qd32", "randread", "4k", 32),
    w("4k-randwrite-qd32", "randwrite", "4k", 32),
    Workload {
        fsync: true,
        ..w("4k-write-qd1-fsync", "randwrite", "4k", 1)
    },
    w("1m-read-qd8-after-random-writes", "read", "1m", 8),
];

/// A server process the harness started (killed on drop).
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) name: &'static str,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {}", self.name);
    }
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

pub(crate) fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build -p berth-cli`",
            p.display()
        ))
    }
}

pub(crate) fn wait_for(path: &Path, what: &str) -> Result<(), String> {
    let t = Instant::now();
    while !path.exists() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{what} did not create {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A volume server with one extreme-tier volume of `size` granted to the
/// harness: its unix URI, and its TCP URI (empty without `tcp`).
pub(crate) fn start_berth(
    dir: &Path,
    size: u64,
    tcp: bool,
) -> Result<(Proc, String, String), String> {
    let data = dir.join("berth");
    let mut cmd = Command::new(sibling("berth")?);
    cmd.args(["volume-server", "--data"])
        .arg(&data)
        // The NBD volume and the two pod volumes with their allocation
        // groups' slack (an eighth more: see the store's `alloc`), and room
        // to redirect writes. A pool filled into the slack keeps working but
        // loses the layout after overwrites, which the benchmark measures.
        .args(["--pool-size", &(size * 27 / 8 + (512 << 20)).to_string()])
        .args(["--nbd-listen", if tcp { "127.0.0.1:0" } else { "none" }])
        .args(["--metrics-listen", "none"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("start berth: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
    }
    let proc = Proc {
        child,
        name: "berth volume-server",
    };
    let e = volume_export(&data, "bench", size, "berth-bench")?;
    let uri = |k: &str| e[k].as_str().unwrap_or_default().to_string();
    Ok((proc, uri("unix_uri"), uri("tcp_uri")))
}

/// On the volume server whose data folder is `data`: a volume `name` of
/// `size` bytes (tier extreme: no QoS limit) and an export of it to
/// `client`; the grant as berthctl prints it (`unix_uri`, `tcp_uri`).
pub(crate) fn volume_export(
    data: &Path,
    name: &str,
    size: u64,
    client: &str,
) -> Result<serde_json::Value, String> {
    let ctl = |args: &[&str]| -> Result<serde_json::Value, String> {
        let out = Command::new(sibling("berthctl")?)
            .arg("--data")
            .arg(data)
            .args(["-o", "json", "server"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "berthctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    };
    let size = size.to_string();
    ctl(&[
        "volume", "create", name, "--size", &size, "--tier", "extreme",
    ])?;
    ctl(&["export", "grant", "--volume", name, "--client", client])
}

pub(crate) fn start_qemu_nbd(dir: &Path, size: u64, tcp: bool) -> Result<(Proc, String), String> {
    let file = dir.join("qemu-nbd.raw");
    let f = std::fs::File::create(&file).map_err(|e| e.to_string())?;
    f.set_len(size).map_err(|e| e.to_string())?;
    let sock = dir.join("qemu-nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-f",
        "raw",
        "-t",
        "--cache=none",
        "--aio=io_uring",
        "--shared=8",
        "-x",
        "bench",
    ]);
    let uri = if tcp {
        // A port unlikely to be taken; qemu-nbd cannot report an ephemeral one.
        cmd.args(["-b", "127.0.0.1", "-p", "10899"]);
        "nbd://127.0.0.1:10899/bench".to_string()
    } else {
        cmd.arg("-k").arg(&sock);
        format!("nbd+unix:///bench?socket={}", sock.display())
    };
    let child = cmd
        .arg(&file)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start qemu-nbd: {e} (apt-get install qemu-utils)"))?;
    let proc = Proc {
        child,
        name: "qemu-nbd",
    };
    if tcp {
        let t = Instant::now();
        while std::net::TcpStream::connect("127.0.0.1:10899").is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err("qemu-nbd did not listen on 127.0.0.1:10899".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        wait_for(&sock, "qemu-nbd")?;
    }
    Ok((proc, uri))
}

fn measure(
    name: &'static str,
    proc: &Proc,
    uri: &str,
    size: u64,
    w: &Workload,
    secs: u64,
    jobs: u32,
) -> Result<NbdMeasure, String> {
    let cpu0 = cpu_seconds(proc.pid());
    let f = fio(&nbd_target(name, uri, proc.pid()), size, w, secs, jobs)?;
    let cpu = cpu_seconds(proc.pid()) - cpu0;
    Ok(NbdMeasure {
        target: name.into(),
        workload: w.name.into(),
        iops: f.iops,
        mb_per_s: f.mb_per_s,
        p50_us: f.p50_us,
        p99_us: f.p99_us,
        cpu_us_per_io: cpu * 1e6 / f.ios.max(1) as f64,
    })
}

pub fn run(a: NbdArgs) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let tcp = match a.transport.as_str() {
        "unix" => false,
        "tcp" => true,
        t => return Err(format!("--transport {t:?}: use unix or tcp")),
    };
    let (berth, unix_uri, tcp_uri) = start_berth(&a.dir, a.size_bytes, tcp)?;
    let berth_uri = if tcp { tcp_uri } else { unix_uri };
    let (qemu, qemu_uri) = start_qemu_nbd(&a.dir, a.size_bytes, tcp)?;
    let targets = [
        ("berth", &berth, &berth_uri),
        ("qemu-nbd", &qemu, &qemu_uri),
    ];
    eprintln!("filling both targets ({} MiB each)...", a.size_bytes >> 20);
    let fill = w("fill", "write", "1m", 8);
    for (name, proc, uri) in &targets {
        fio(
            &nbd_target(name, uri, proc.pid()),
            a.size_bytes,
            &fill,
            0,
            1,
        )?;
    }
    let only: Option<Vec<&str>> = a.only.as_deref().map(|o| o.split(',').collect());
    let mut rows = Vec::new();
    for w in WORKLOADS
        .iter()
        .filter(|w| only.as_ref().is_none_or(|o| o.contains(&w.name)))
    {
        let mut runs: [Vec<NbdMeasure>; 2] = [Vec::new(), Vec::new()];
        for r in 0..a.repeat {
            let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (name, proc, uri) = targets[i];
                let m = measure(name, proc, uri, a.size_bytes, w, a.seconds, a.jobs)?;
                eprintln!(
                    "  {:<9} {:<32} {:>9.0} IOPS {:>8.1} MB/s p50 {:>7.1} us p99 {:>8.1} us cpu {:>5.1} us/io",
                    m.target, m.workload, m.iops, m.mb_per_s, m.p50_us, m.p99_us, m.cpu_us_per_io
                );
                runs[i].push(m);
            }
        }
        let [b, q] = runs;
        rows.push((crate::median(b, |m| m.iops), crate::median(q, |m| m.iops)));
    }
    // Idle: connections closed, nothing to do.
    std::thread::sleep(Duration::from_secs(1));
    let c0 = cpu_seconds(berth.pid());
    std::thread::sleep(Duration::from_secs(a.idle_seconds));
    let idle_pct = (cpu_seconds(berth.pid()) - c0) * 100.0 / a.idle_seconds.max(1) as f64;
    drop(berth);
    drop(qemu);
    let _ = std::fs::remove_dir_all(&a.dir);

    println!(
        "{:<32} {:>12} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "workload",
        "berth IOPS",
        "qemu IOPS",
        "ratio",
        "berth MB/s",
        "qemu MB/s",
        "berth p99",
        "qemu p99",
        "berth cpu",
        "qemu cpu"
    );
    let mut json = Vec::new();
    for (b, q) in &rows {
        let ratio = b.iops / q.iops.max(1.0);
        println!(
            "{:<32} {:>12.0} {:>12.0} {:>6.2}x {:>10.1} {:>10.1} {:>8.0}us {:>8.0}us {:>7.1}us {:>7.1}us",
            b.workload, b.iops, q.iops, ratio, b.mb_per_s, q.mb_per_s, b.p99_us, q.p99_us, b.cpu_us_per_io, q.cpu_us_per_io
        );
        json.push(serde_json::json!({"berth": b, "qemu_nbd": q, "ratio": ratio}));
    }
    println!(
        "idle volume server: {idle_pct:.2}% of a core over {} s",
        a.idle_seconds
    );
    let doc = serde_json::json!({
        "kind": "nbd",
        "transport": a.transport,
        "jobs": a.jobs,
        "size_bytes": a.size_bytes,
        "seconds": a.seconds,
        "repeat": a.repeat,
        "qemu_nbd": "qemu-nbd -f raw -t --cache=none --aio=io_uring",
        "results": json,
        "idle_cpu_percent": idle_pct,
    });
    crate::write_result(&a.out, "nbd", &doc)
}
