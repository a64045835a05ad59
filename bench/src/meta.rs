//! `berth-bench meta`: the metadata service's control path, end to end: a
//! real `berth metadata` and real volume servers on loopback, driven through
//! the gRPC API. Each phase (create volumes, create snapshots, delete
//! snapshots, delete volumes) runs `count` calls with `concurrency` callers;
//! throughput and p50/p99 latency per phase and concurrency.
//!
//! Every call is a synced catalog write or two (intent, outcome + audit
//! entry) and a volume server call that itself syncs its block store, so the
//! figures are bounded by fsync latency; that is the point of measuring them.
//!
//! `--catalog rocksdb,etcd` (the default) runs everything once per catalog
//! in the same run: the embedded RocksDB, then a three-member etcd on
//! loopback (real `etcd` processes, each syncing its own WAL on the same
//! disk) under one metadata service that leads it, and prints etcd's rate as
//! a share of RocksDB's.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::meta::v1 as pb;
use berth_proto::meta::v1::metadata_service_client::MetadataServiceClient;
use serde::Serialize;

use crate::nbd::{cpu_seconds, sibling, Proc};

#[derive(clap::Args, Debug)]
pub struct MetaArgs {
    /// Scratch directory (removed first).
    #[arg(long, default_value = "/var/tmp/berth-bench-meta")]
    dir: PathBuf,
    /// Volume servers to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Calls per phase.
    #[arg(long, default_value_t = 300)]
    count: usize,
    /// Concurrent callers, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Catalogs to run on, one after the other (comma-separated: rocksdb, etcd).
    #[arg(long, value_delimiter = ',', default_value = "rocksdb,etcd")]
    catalog: Vec<String>,
    /// Members of the etcd cluster started for `--catalog etcd`.
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Phase {
    pub phase: &'static str,
    pub concurrency: usize,
    pub calls: usize,
    pub errors: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU the serving process (the metadata service, or standalone) used per call.
    pub meta_cpu_us_per_call: f64,
    /// The catalog behind the service (`meta` only).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub catalog: String,
}

/// Starts a Berth program and reads its one-line JSON ready report.
pub(crate) fn start(
    cmd: &mut Command,
    name: &'static str,
) -> Result<(Proc, serde_json::Value), String> {
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {name}: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
    }
    let v =
        serde_json::from_str(&line).map_err(|e| format!("{name} did not start: {e}: {line:?}"))?;
    Ok((Proc { child, name }, v))
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// Runs `count` calls of `op(client, i)` with `concurrency` callers; the CPU
/// is that of the process `pid` serving them.
pub(crate) async fn phase<C, F, Fut>(
    name: &'static str,
    c: &C,
    meta_pid: u32,
    count: usize,
    concurrency: usize,
    op: F,
) -> Phase
where
    C: Clone + Send + 'static,
    F: Fn(C, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_seconds(meta_pid);
    let t0 = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next, c) = (op.clone(), next.clone(), c.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return (lat, errors);
                    }
                    let t = Instant::now();
                    match op(c.clone(), i).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(s) => {
                            if errors == 0 {
                                eprintln!("{name} #{i}: {}", s.message());
                            }
                            errors += 1;
                        }
                    }
                }
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            lat.extend(l);
            errors += e;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(meta_pid) - cpu0;
    lat.sort();
    Phase {
        phase: name,
        concurrency,
        calls: count,
        errors,
        per_second: lat.len() as f64 / secs,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        max_ms: quantile(&lat, 1.0),
        meta_cpu_us_per_call: cpu * 1e6 / count.max(1) as f64,
        catalog: String::new(),
    }
}

pub fn run(a: MetaArgs) -> Result<(), String> {
    let mut results = Vec::new();
    for cat in &a.catalog {
        let mut phases = match cat.as_str() {
            "rocksdb" => run_on(&a, None)?,
            "etcd" => {
                let etcd = berth_catalog_etcd::testing::EtcdCluster::start(a.etcd_members);
                let r = run_on(&a, Some(&etcd.endpoints().join(",")));
                drop(etcd);
                r?
            }
            other => return Err(format!("--catalog {other}: rocksdb or etcd")),
        };
        for p in &mut phases {
            p.catalog = cat.clone();
        }
        println!("catalog: {cat}");
        print_phases(&phases);
        results.extend(phases);
    }
    // etcd's rate as a share of RocksDB's, phase by phase.
    let mut shares = Vec::new();
    for e in results.iter().filter(|p| p.catalog == "etcd") {
        if let Some(r) = results.iter().find(|r| {
            r.catalog == "rocksdb" && r.phase == e.phase && r.concurrency == e.concurrency
        }) {
            let share = e.per_second / r.per_second.max(f64::MIN_POSITIVE);
            println!(
                "{:<20} {:>3} callers: etcd {:>7.1}/s = {:>4.0}% of RocksDB's {:>7.1}/s",
                e.phase,
                e.concurrency,
                e.per_second,
                share * 100.0,
                r.per_second
            );
            shares.push(serde_json::json!({
                "phase": e.phase, "concurrency": e.concurrency, "etcd_share_of_rocksdb": share,
            }));
        }
    }
    let doc = serde_json::json!({
        "kind": "meta",
        "nodes": a.nodes,
        "count": a.count,
        "etcd_members": a.etcd_members,
        "results": results,
        "etcd_vs_rocksdb": shares,
    });
    crate::write_result(&a.out, "meta", &doc)?;
    if results.iter().any(|p| p.errors > 0) {
        return Err("some calls failed (see above)".into());
    }
    Ok(())
}

/// One metadata service on the catalog (`etcd`: its endpoints; else
/// RocksDB) and `a.nodes` volume servers; every phase at every concurrency.
fn run_on(a: &MetaArgs, etcd: Option<&str>) -> Result<Vec<Phase>, String> {
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let mut cmd = Command::new(sibling("berth")?);
    cmd.args(["metadata", "--data"])
        .arg(a.dir.join("meta"))
        .args(["--heartbeat-ms", "500"])
        // Loopback only, for the benchmark: plain TCP, asked for by name.
        .arg("--insecure-plaintext-tcp")
        // Thin 1 GiB volumes on small pools: nothing here writes data.
        .args(["--overcommit", "100"]);
    match etcd {
        // A service over etcd advertises its address: a fixed port.
        Some(urls) => {
            let port = berth_catalog_etcd::testing::free_port();
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--catalog", &format!("etcd:{urls}")]);
        }
        None => {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
    }
    let (meta, ready) = start(&mut cmd, "berth metadata")?;
    let endpoint = format!("http://{}", ready["tcp"].as_str().unwrap_or_default());
    let mut servers = Vec::new();
    for i in 0..a.nodes {
        let (p, _) = start(
            Command::new(sibling("berth")?)
                .args(["volume-server", "--data"])
                .arg(a.dir.join(format!("n{i}")))
                .args(["--pool-size", "2G", "--nbd-listen", "127.0.0.1:0"])
                .args([
                    "--control-listen",
                    "127.0.0.1:0",
                    "--insecure-plaintext-tcp",
                    "--metrics-listen",
                    "none",
                ])
                .args(["--metadata", &endpoint, "--node-name", &format!("n{i}")]),
            "berth volume-server",
        )?;
        servers.push(p);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let results = rt.block_on(async {
        let ch = berth_proto::channel(&endpoint, None)
            .await
            .map_err(|e| e.to_string())?;
        let c = MetadataServiceClient::new(ch);
        let t = Instant::now();
        loop {
            // Over etcd the service answers once it leads.
            let up = match c.clone().list_nodes(pb::ListNodesRequest {}).await {
                Ok(nodes) => nodes
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state == "up")
                    .count(),
                Err(_) => 0,
            };
            if up == a.nodes {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("volume servers did not register within 30 s".to_string());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = meta.pid();
        let mut out = Vec::new();
        for (run, &conc) in a.concurrency.iter().enumerate() {
            let vol = move |i: usize| format!("r{run}-vol-{i}");
            let snap = move |i: usize| format!("r{run}-snap-{i}");
            out.push(
                phase(
                    "create volume",
                    &c,
                    pid,
                    a.count,
                    conc,
                    move |mut c, i| async move {
                        c.create_volume(pb::CreateVolumeRequest {
                            name: vol(i),
                            required_bytes: 1 << 30,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    },
                )
                .await,
            );
            out.push(
                phase(
                    "create snapshot",
                    &c,
                    pid,
                    a.count,
                    conc,
                    move |mut c, i| async move {
                        c.create_snapshot(pb::CreateSnapshotRequest {
                            name: snap(i),
                            source_volume_id: vol(i),
                        })
                        .await
                        .map(|_| ())
                    },
                )
                .await,
            );
            out.push(
                phase(
                    "delete snapshot",
                    &c,
                    pid,
                    a.count,
                    conc,
                    move |mut c, i| async move {
                        c.delete_snapshot(pb::DeleteSnapshotRequest {
                            snapshot_id: snap(i),
                        })
                        .await
                        .map(|_| ())
                    },
                )
                .await,
            );
            out.push(
                phase(
                    "delete volume",
                    &c,
                    pid,
                    a.count,
                    conc,
                    move |mut c, i| async move {
                        c.delete_volume(pb::DeleteVolumeRequest { volume_id: vol(i) })
                            .await
                            .map(|_| ())
                    },
                )
                .await,
            );
        }
        Ok::<_, String>(out)
    })?;
    drop(servers);
    drop(meta);
    let _ = std::fs::remove_dir_all(&a.dir);
    Ok(results)
}

/// The phases as a table.
pub(crate) fn print_phases(phases: &[Phase]) {
    println!(
        "{:<20} {:>5} {:>6} {:>7} {:>10} {:>9} {:>9} {:>9} {:>15}",
        "phase",
        "conc",
        "calls",
        "errors",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "server cpu/call"
    );
    for p in phases {
        println!(
            "{:<20} {:>5} {:>6} {:>7} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>13.0}us",
            p.phase,
            p.concurrency,
            p.calls,
            p.errors,
            p.per_second,
            p.p50_ms,
            p.p99_ms,
            p.max_ms,
            p.meta_cpu_us_per_call
        );
    }
}
