//! `berth`: one binary for Berth's server programs.
//!
//! - `berth volume-server --data DIR`: the per-node volume server;
//! - `berth metadata --data DIR`: the cluster's catalog and placement.
//!
//! The CSI driver and `standalone` join as subcommands of this same binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Berth: Kubernetes-native block storage"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "BERTH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve this node's pool: volumes and snapshots over NBD, control over gRPC.
    VolumeServer(VolumeServerArgs),
    /// The catalog: nodes, pools, tiers, volumes, snapshots, attachments, audit.
    Metadata(MetadataArgs),
}

#[derive(Debug, clap::Args)]
struct MetadataArgs {
    /// Data directory: the catalog (RocksDB) and the default socket.
    #[arg(long, env = "BERTH_META_DATA")]
    data: PathBuf,
    /// gRPC unix socket (default DATA/meta.sock).
    #[arg(long, env = "BERTH_META_SOCKET")]
    socket: Option<PathBuf>,
    /// gRPC over TCP, for volume servers and CSI controllers ("none" to disable).
    #[arg(long, env = "BERTH_META_LISTEN", default_value = "127.0.0.1:9580")]
    listen: String,
    /// Tier definitions (JSON: {"tiers": [...]}) replacing or adding to the defaults.
    #[arg(long, env = "BERTH_TIERS")]
    tiers: Option<PathBuf>,
    /// Interval volume servers report at, in milliseconds.
    #[arg(long, env = "BERTH_HEARTBEAT_MS", default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Silence after which a node is marked down, in milliseconds.
    #[arg(long, env = "BERTH_NODE_TIMEOUT_MS", default_value_t = 10_000)]
    node_timeout_ms: u64,
    /// Seconds between full comparisons of each node with the catalog.
    #[arg(long, env = "BERTH_RECONCILE_SECONDS", default_value_t = 60)]
    reconcile_seconds: u64,
    /// How much thin volumes may promise beyond the pools' size (1.0: nothing).
    #[arg(long, env = "BERTH_OVERCOMMIT", default_value_t = 1.0)]
    overcommit: f64,
}

#[derive(Debug, clap::Args)]
struct VolumeServerArgs {
    /// Data directory: pool file, block maps, audit log, sockets.
    #[arg(long, env = "BERTH_DATA")]
    data: PathBuf,
    /// Pool device or file (default DATA/pool.img).
    #[arg(long, env = "BERTH_POOL")]
    pool: Option<PathBuf>,
    /// Size of a new pool file (ignored for devices and existing pools).
    #[arg(long, env = "BERTH_POOL_SIZE", default_value = "10G", value_parser = berth_cli::parse_size)]
    pool_size: u64,
    /// NBD unix socket (default DATA/nbd.sock).
    #[arg(long, env = "BERTH_NBD_SOCKET")]
    nbd_socket: Option<PathBuf>,
    /// NBD over TCP ("none" to disable).
    #[arg(long, env = "BERTH_NBD_LISTEN", default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// Host name or address other hosts reach this node at: put in the TCP URIs of
    /// grants and reported to the metadata service (default: the listen addresses).
    #[arg(long, env = "BERTH_ADVERTISE_HOST", default_value = "")]
    advertise_host: String,
    /// gRPC control unix socket (default DATA/control.sock).
    #[arg(long, env = "BERTH_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    /// gRPC control over TCP as well ("none" to disable).
    #[arg(long, env = "BERTH_CONTROL_LISTEN", default_value = "none")]
    control_listen: String,
    /// Prometheus metrics at http://ADDR/metrics ("none" to disable).
    #[arg(long, env = "BERTH_METRICS_LISTEN", default_value = "127.0.0.1:9570")]
    metrics_listen: String,
    /// Seconds shutdown waits for requests in flight.
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
    /// Report to this metadata service (http://host:port or unix:///path).
    #[arg(long, env = "BERTH_METADATA")]
    metadata: Option<String>,
    /// This node's name in the catalog (default: the host name).
    #[arg(long, env = "BERTH_NODE_NAME")]
    node_name: Option<String>,
    /// Topology label key=value (repeat), e.g. topology.kubernetes.io/zone=a.
    #[arg(long = "label", value_parser = berth_cli::parse_label)]
    labels: Vec<(String, String)>,
    /// What the pool is made of (nvme, ssd, hdd, file); tiers may require one.
    #[arg(long, env = "BERTH_POOL_MEDIA", default_value = "file")]
    pool_media: String,
    /// How the metadata service reaches the control API (default: http://CONTROL_LISTEN).
    #[arg(long, env = "BERTH_ADVERTISE_CONTROL", default_value = "")]
    advertise_control: String,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn addr(flag: &str, v: &str) -> Result<Option<SocketAddr>, String> {
    if v.is_empty() || v == "none" {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|e| format!("--{flag} {v:?} is not an address like 127.0.0.1:10809: {e}"))
}

async fn volume_server(a: VolumeServerArgs) -> Result<(), String> {
    let mut cfg = berth_volume::ServerConfig::new(&a.data, a.pool_size);
    cfg.pool_path = a.pool;
    cfg.nbd_socket = a.nbd_socket;
    cfg.nbd_listen = addr("nbd-listen", &a.nbd_listen)?;
    cfg.advertise_host = a.advertise_host;
    cfg.control_socket = a.control_socket;
    cfg.control_listen = addr("control-listen", &a.control_listen)?;
    cfg.metrics_listen = addr("metrics-listen", &a.metrics_listen)?;
    cfg.drain_timeout = Duration::from_secs(a.drain_seconds);
    if let Some(metadata) = a.metadata {
        cfg.heartbeat = Some(berth_volume::heartbeat::HeartbeatConfig {
            metadata,
            node_name: a.node_name.unwrap_or_else(host_name),
            labels: a.labels.into_iter().collect(),
            media: a.pool_media,
            control_endpoint: a.advertise_control,
            nbd_address: String::new(),
        });
    }
    let running = berth_volume::start(cfg).await.map_err(|e| e.to_string())?;
    let b = &running.bound;
    // One line on stdout for people and scripts (tests read it).
    let ready = serde_json::json!({
        "event": "ready",
        "nbd_socket": b.nbd_socket,
        "nbd_tcp": b.nbd_tcp.map(|a| a.to_string()),
        "control_socket": b.control_socket,
        "control_tcp": b.control_tcp.map(|a| a.to_string()),
        "metrics": b.metrics.map(|a| format!("http://{a}/metrics")),
        "engine": running.node.store.engine_name(),
        "pid": std::process::id(),
    });
    println!("{ready}");
    berth_volume::server::wait_for_signal().await;
    running.shutdown().await.map_err(|e| e.to_string())
}

async fn metadata(a: MetadataArgs) -> Result<(), String> {
    let tiers_json = match &a.tiers {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| format!("--tiers {}: {e}", p.display()))?)
        }
        None => None,
    };
    if !(a.overcommit >= 1.0 && a.overcommit <= 100.0) {
        return Err(format!(
            "--overcommit {} must be between 1 and 100",
            a.overcommit
        ));
    }
    let meta = berth_metadata::MetaConfig {
        heartbeat_interval: Duration::from_millis(a.heartbeat_ms.max(100)),
        node_timeout: Duration::from_millis(a.node_timeout_ms.max(a.heartbeat_ms * 2)),
        reconcile_interval: Duration::from_secs(a.reconcile_seconds.max(1)),
        overcommit: a.overcommit,
        tiers: berth_metadata::tiers::load(tiers_json.as_deref()).map_err(|e| e.to_string())?,
    };
    let cfg = berth_metadata::ServiceConfig {
        data_dir: a.data,
        socket: a.socket,
        listen: addr("listen", &a.listen)?,
        meta,
    };
    let running = berth_metadata::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let ready = serde_json::json!({
        "event": "ready",
        "socket": running.bound.socket,
        "tcp": running.bound.tcp.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    println!("{ready}");
    berth_volume::server::wait_for_signal().await;
    running.shutdown().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    berth_cli::init_logging(cli.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cli.command {
            Command::VolumeServer(a) => volume_server(a).await,
            Command::Metadata(a) => metadata(a).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
