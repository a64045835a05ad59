//! `berth`: one binary for Berth's server programs.
//!
//! - `berth volume-server --data DIR`: the per-node volume server.
//!
//! The metadata service, CSI driver and `standalone` join as subcommands of
//! this same binary.

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
    /// Host name or address put in the TCP URIs of grants (default: the listen address).
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
