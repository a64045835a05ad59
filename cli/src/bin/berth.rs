//! `berth`: one binary for Berth's server programs.
//!
//! - `berth volume-server --data DIR`: the per-node volume server;
//! - `berth metadata --data DIR [--catalog rocksdb:DIR | etcd:URL,...]`: the
//!   cluster's catalog and placement (several over etcd: one leads);
//! - `berth csi --mode controller|node|all`: the CSI driver (csi.berth.dev);
//! - `berth standalone --data DIR`: the metadata service, a volume server and
//!   the CSI driver on one folder, in one process;
//! - `berth attach DIR`: an NBD export as the file `DIR/disk` (FUSE), the
//!   node plugin's attachment where the kernel has no NBD client.

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
    /// The CSI driver (csi.berth.dev) on a unix socket, for kubelet and the sidecars.
    Csi(CsiArgs),
    /// The metadata service, a volume server and the CSI driver on one data
    /// folder, in one process.
    Standalone(StandaloneArgs),
    /// Serve an NBD export as the file DIR/disk in a FUSE mount, reconnecting
    /// (and replaying unflushed writes) when the server restarts; SIGHUP
    /// re-reads the export's size. The node plugin runs one per staged volume.
    Attach(AttachArgs),
}

#[derive(Debug, clap::Args)]
struct AttachArgs {
    /// The FUSE mount point.
    dir: PathBuf,
    /// nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH, or a
    /// replicated volume's legs (berth-replicas:{JSON}, as the node plugin
    /// writes it). Its export names are grants' secrets: the node plugin
    /// passes it in the environment (readable by the process's owner only),
    /// not on the command line (readable by anyone on the node).
    #[arg(long, env = "BERTH_ATTACH_URI", hide_env_values = true)]
    uri: String,
    /// The metadata service, where a replicated volume's failed replicas are
    /// reported (http://host:port, https://host:port with --tls-dir, or
    /// unix:///path).
    #[arg(long, env = "BERTH_METADATA")]
    metadata: Option<String>,
    #[arg(long)]
    read_only: bool,
    /// Written with the process id once the file is served.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Seconds I/O waits for a server that went away before failing with EIO.
    #[arg(long, default_value_t = 300)]
    reconnect_timeout: u64,
    /// Certificates: NBD over TCP then uses STARTTLS (nbds:// requires it).
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Debug, clap::Args)]
struct CsiArgs {
    /// Which services to serve: controller (beside the provisioner, attacher,
    /// snapshotter and resizer sidecars), node (on every node, for kubelet), or all.
    #[arg(long, env = "BERTH_CSI_MODE", default_value = "all")]
    mode: berth_csi::Mode,
    /// The socket to serve on (unix:///path or /path).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: PathBuf,
    /// The metadata service (http://host:port, https://host:port with
    /// --tls-dir, or unix:///path).
    #[arg(long, env = "BERTH_METADATA", default_value = "http://127.0.0.1:9580")]
    metadata: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Node plugin: this node's id, the name its volume server registers
    /// under (default: the host name).
    #[arg(long, env = "BERTH_NODE_NAME")]
    node_id: Option<String>,
    /// Node plugin: where staged volumes are recorded and attached.
    #[arg(long, env = "BERTH_CSI_STATE", default_value = "/var/lib/berth/csi")]
    state_dir: PathBuf,
    /// Node plugin: topology label key=value (repeat), as the node's volume server has.
    #[arg(long = "label", value_parser = berth_cli::parse_topology_label)]
    labels: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
struct MetadataArgs {
    /// Data directory: the default socket, and the catalog when it is RocksDB.
    #[arg(long, env = "BERTH_META_DATA")]
    data: PathBuf,
    /// Where the catalog is kept: `rocksdb:DIR` (embedded, one service;
    /// default DATA/catalog) or `etcd:URL[,URL...]` (several services share
    /// it; one leads, the others send clients to it).
    #[arg(long = "catalog", env = "BERTH_CATALOG")]
    store: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// gRPC unix socket (default DATA/meta.sock).
    #[arg(long, env = "BERTH_META_SOCKET")]
    socket: Option<PathBuf>,
    /// gRPC over TCP, for volume servers and CSI controllers on other hosts,
    /// e.g. 0.0.0.0:9580 ("none": the unix socket only). Needs --tls-dir
    /// (or --insecure-plaintext-tcp).
    #[arg(long, env = "BERTH_META_LISTEN", default_value = "none")]
    listen: String,
    #[command(flatten)]
    catalog: CatalogArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    allow: AllowArgs,
}

#[derive(Debug, clap::Args)]
struct VolumeServerArgs {
    /// Data directory: pool file, block maps, audit log, sockets.
    #[arg(long, env = "BERTH_DATA")]
    data: PathBuf,
    /// Pool device or file (default DATA/pool.img).
    #[arg(long, env = "BERTH_POOL")]
    pool: Option<PathBuf>,
    /// Usable size of a new pool file: what volumes get (the file is 1 MiB
    /// larger, for its header). Ignored for devices (usable: their size less
    /// 1 MiB) and existing pools.
    #[arg(long, env = "BERTH_POOL_SIZE", default_value = "10G", value_parser = berth_cli::parse_size)]
    pool_size: u64,
    /// NBD unix socket (default DATA/nbd.sock).
    #[arg(long, env = "BERTH_NBD_SOCKET")]
    nbd_socket: Option<PathBuf>,
    /// Do not serve local attachments' FUSE mounts (`fuse.sock` beside the
    /// NBD socket): `berth attach` then speaks NBD.
    #[arg(long, env = "BERTH_NO_FUSE")]
    no_fuse: bool,
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
    /// gRPC control over TCP as well ("none" to disable). Needs --tls-dir
    /// (or --insecure-plaintext-tcp).
    #[arg(long, env = "BERTH_CONTROL_LISTEN", default_value = "none")]
    control_listen: String,
    /// Prometheus metrics at http://ADDR/metrics ("none" to disable).
    #[arg(long, env = "BERTH_METRICS_LISTEN", default_value = "127.0.0.1:9570")]
    metrics_listen: String,
    /// Seconds shutdown waits for requests in flight; the process ends at
    /// most 5 s after that, whatever hangs.
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
    /// Report to this metadata service (http://host:port or unix:///path).
    #[arg(long, env = "BERTH_METADATA")]
    metadata: Option<String>,
    #[command(flatten)]
    node: NodeArgs,
    /// How the metadata service reaches the control API (default:
    /// http://CONTROL_LISTEN, https:// with --tls-dir).
    #[arg(long, env = "BERTH_ADVERTISE_CONTROL", default_value = "")]
    advertise_control: String,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    allow: AllowArgs,
    /// With --tls-dir: let NBD clients over TCP skip STARTTLS (by default
    /// they must use it; the unix socket never does).
    #[arg(long, env = "BERTH_NBD_TLS_OPTIONAL")]
    nbd_tls_optional: bool,
}

/// Certificates (shared by every server program).
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// Folder with tls.crt, tls.key and ca.crt (a cert-manager Secret mounted
    /// as is). TCP listeners then require mutual TLS, and https:// endpoints
    /// are dialed with this certificate. Unix sockets stay plaintext.
    #[arg(long, env = "BERTH_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Let a gRPC API listen on TCP WITHOUT certificates: anyone who can
    /// reach the port can then call it as anyone (list grants with their
    /// tokens, create, export and delete volumes). For throwaway test setups
    /// only; without --tls-dir, use the unix sockets.
    #[arg(long, env = "BERTH_INSECURE_PLAINTEXT_TCP")]
    insecure_plaintext_tcp: bool,
}

/// Which certificates may call a server's TCP gRPC listeners.
#[derive(Debug, clap::Args)]
struct AllowArgs {
    /// With --tls-dir: the certificates that may call the TCP gRPC listener,
    /// by name (a certificate's name is its common name, else its first DNS
    /// name), comma-separated; NAME* allows every name starting with NAME.
    /// Others are refused with PERMISSION_DENIED. Default: any certificate
    /// the CA signed.
    #[arg(long, env = "BERTH_TLS_ALLOW", default_value = "", value_parser = berth_proto::Allow::parse)]
    tls_allow: berth_proto::Allow,
}

impl TlsArgs {
    fn load(&self) -> Result<Option<berth_proto::TlsDir>, String> {
        self.tls_dir
            .as_ref()
            .map(|d| berth_proto::TlsDir::load(d).map_err(|e| format!("--tls-dir: {e}")))
            .transpose()
    }
}

/// The catalog on etcd.
#[derive(Debug, clap::Args)]
struct EtcdArgs {
    /// With etcd: every key of this catalog starts with this prefix (one
    /// etcd may hold several clusters' catalogs).
    #[arg(long, env = "BERTH_ETCD_PREFIX", default_value = "/berth")]
    etcd_prefix: String,
    /// With etcd: a folder with ca.crt, tls.crt and tls.key (a cert-manager
    /// Secret) to dial https:// etcd endpoints with a client certificate.
    #[arg(long, env = "BERTH_ETCD_TLS_DIR")]
    etcd_tls_dir: Option<PathBuf>,
    /// With etcd: the leadership lease in seconds. A leader that dies is
    /// replaced about this long after; one that is paused or cut off has
    /// its writes refused by etcd from then on.
    #[arg(long, env = "BERTH_LEASE_SECONDS", default_value_t = 3)]
    lease_seconds: u64,
    /// With etcd: the address followers send clients to, e.g.
    /// https://berth-metadata-0.berth-metadata:9580 (default: the --listen
    /// address, else the unix socket).
    #[arg(long, env = "BERTH_ADVERTISE")]
    advertise: Option<String>,
}

/// How the catalog runs (shared by `metadata` and `standalone`).
#[derive(Debug, clap::Args)]
struct CatalogArgs {
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
    /// Seconds a node may stay down before the replicas on it are replaced
    /// on other nodes (rebuilt in full); 0: never by itself (`berthctl
    /// drain NODE` does it at once).
    #[arg(long, env = "BERTH_REPLICA_GRACE_SECONDS", default_value_t = 600)]
    replica_grace_seconds: u64,
    /// How much thin volumes may promise beyond the pools' size (1.0: nothing).
    /// Every volume counts at its full size, clones and restored snapshots too
    /// (O(1) to make, but each may come to own a full volume's worth).
    #[arg(long, env = "BERTH_OVERCOMMIT", default_value_t = 1.0)]
    overcommit: f64,
}

impl CatalogArgs {
    /// With `tls`, volume servers are dialed over mutual TLS.
    fn config(
        &self,
        tls: Option<&berth_proto::TlsDir>,
    ) -> Result<berth_metadata::MetaConfig, String> {
        let tiers_json = match &self.tiers {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|e| format!("--tiers {}: {e}", p.display()))?,
            ),
            None => None,
        };
        if !(self.overcommit >= 1.0 && self.overcommit <= 100.0) {
            return Err(format!(
                "--overcommit {} must be between 1 and 100",
                self.overcommit
            ));
        }
        Ok(berth_metadata::MetaConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms.max(100)),
            node_timeout: Duration::from_millis(self.node_timeout_ms.max(self.heartbeat_ms * 2)),
            reconcile_interval: Duration::from_secs(self.reconcile_seconds.max(1)),
            replica_grace: (self.replica_grace_seconds > 0)
                .then(|| Duration::from_secs(self.replica_grace_seconds)),
            overcommit: self.overcommit,
            tiers: berth_metadata::tiers::load(tiers_json.as_deref()).map_err(|e| e.to_string())?,
            volume_tls: tls.map(|t| berth_proto::ClientTls {
                dir: t.clone(),
                server_name: Some(berth_proto::tls::VOLUME_SERVER_NAME.into()),
            }),
        })
    }
}

/// Who this node is in the catalog (shared by `volume-server` and `standalone`).
#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// This node's name in the catalog (default: the host name).
    #[arg(long, env = "BERTH_NODE_NAME")]
    node_name: Option<String>,
    /// Topology label key=value (repeat), e.g. topology.kubernetes.io/zone=a.
    #[arg(long = "label", value_parser = berth_cli::parse_topology_label)]
    labels: Vec<(String, String)>,
    /// What the pool is made of (nvme, ssd, hdd, file); tiers may require one.
    #[arg(long, env = "BERTH_POOL_MEDIA", default_value = "file")]
    pool_media: String,
    /// Threads serving NBD connections; each connection stays on one (0: a
    /// quarter of the cores, at least one).
    #[arg(long, env = "BERTH_NBD_THREADS", default_value_t = 0)]
    nbd_threads: usize,
    /// Request and reply payloads all NBD connections together may hold in
    /// memory (one connection: a quarter of it).
    #[arg(long, env = "BERTH_NBD_BUFFER_SIZE", default_value = "512M", value_parser = berth_cli::parse_size)]
    nbd_buffer_size: u64,
    /// Microseconds the store's I/O thread keeps polling for work after its
    /// last request or completion before it sleeps (and, while the load is
    /// shallow, an NBD connection's reader and a local attachment's FUSE
    /// session after their last request): I/O answers sooner (no wake-up,
    /// which is slow on virtual machines), an idle node is unchanged; 0
    /// always sleeps (see docs/pod-path.md).
    #[arg(long, env = "BERTH_POLL_US", default_value_t = berth_volume::DEFAULT_POLL.as_micros() as u64, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    poll_us: u64,
    /// How many pool reads of up to 128 KiB the disk is given at once:
    /// `auto` finds the depth that completes the most reads per second and
    /// follows it (a disk that answers in batches, as virtual disks do,
    /// turns a deeper queue into a convoy); `off` gives it every read at
    /// once; a number fixes the limit (see docs/pod-path.md).
    #[arg(long, env = "BERTH_READ_DEPTH", default_value = "auto")]
    read_depth: berth_volume::ReadDepthMode,
    /// Writes of at most this size (not FUA) are deferred: answered once
    /// their data is in the metadata commit (durable against a crash of the
    /// process, and against power loss after a flush, as any write), and
    /// written to the pool right after. Small writes then do not wait for
    /// the disk; 0 writes everything to the pool first (see
    /// docs/pod-path.md). At most 1M.
    #[arg(long, env = "BERTH_DEFER_MAX", default_value = "64K", value_parser = parse_defer)]
    defer_max: u64,
    /// Memory for the cache of block-map entries in front of the catalog
    /// (about 53 bytes an entry: the default holds the blocks of 10 GiB of
    /// hot data). A read whose entry is not cached looks it up in RocksDB
    /// first, which costs the store's I/O thread several microseconds.
    #[arg(long, env = "BERTH_MAP_CACHE_SIZE", default_value = "128M", value_parser = berth_cli::parse_size)]
    map_cache_size: u64,
}

fn parse_defer(s: &str) -> Result<u64, String> {
    let n = berth_cli::parse_size(s)?;
    if n > 1 << 20 {
        return Err(format!("{s} is more than 1M"));
    }
    Ok(n)
}

impl NodeArgs {
    fn heartbeat(
        self,
        metadata: String,
        control_endpoint: String,
        tls: Option<berth_proto::TlsDir>,
    ) -> berth_volume::heartbeat::HeartbeatConfig {
        berth_volume::heartbeat::HeartbeatConfig {
            metadata,
            node_name: self.node_name.unwrap_or_else(host_name),
            labels: self.labels.into_iter().collect(),
            media: self.pool_media,
            control_endpoint,
            nbd_address: String::new(),
            tls: tls.map(berth_proto::ClientTls::new),
        }
    }
}

/// Everything on one data folder, in one process.
#[derive(Debug, clap::Args)]
struct StandaloneArgs {
    /// Data folder: DIR/csi.sock (the CSI driver), DIR/meta.sock (berthctl
    /// --data DIR), DIR/control.sock and DIR/nbd.sock, the catalog in
    /// DIR/metadata, the pool in DIR/node, staged volumes in DIR/csi-node.
    #[arg(long, env = "BERTH_DATA")]
    data: PathBuf,
    /// Pool device or file (default DIR/node/pool.img).
    #[arg(long, env = "BERTH_POOL")]
    pool: Option<PathBuf>,
    /// Usable size of a new pool file: what volumes get (the file is 1 MiB
    /// larger, for its header). Ignored for devices (usable: their size less
    /// 1 MiB) and existing pools.
    #[arg(long, env = "BERTH_POOL_SIZE", default_value = "10G", value_parser = berth_cli::parse_size)]
    pool_size: u64,
    /// NBD over TCP ("none" for the unix socket only).
    #[arg(long, env = "BERTH_NBD_LISTEN", default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// Host put in NBD URIs (default: the listen address).
    #[arg(long, env = "BERTH_ADVERTISE_HOST", default_value = "")]
    advertise_host: String,
    /// The metadata API over TCP as well, e.g. 127.0.0.1:9580 ("none": the
    /// unix socket only). Needs --tls-dir (or --insecure-plaintext-tcp).
    #[arg(long, env = "BERTH_META_LISTEN", default_value = "none")]
    listen: String,
    /// Prometheus metrics of the volume server ("none" to disable).
    #[arg(long, env = "BERTH_METRICS_LISTEN", default_value = "127.0.0.1:9570")]
    metrics_listen: String,
    #[command(flatten)]
    catalog: CatalogArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Certificates for the TCP listeners (the metadata API and NBD):
    /// mutual TLS and STARTTLS; the unix sockets need none.
    #[command(flatten)]
    tls: TlsArgs,
    /// Applies to both TCP gRPC listeners (metadata and volume control).
    #[command(flatten)]
    allow: AllowArgs,
}

/// This very binary, which the node plugin runs as `berth attach`.
fn attach_program() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("berth"))
}

use berth_cli::host_name;

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
    cfg.fuse = !a.no_fuse;
    cfg.nbd_listen = addr("nbd-listen", &a.nbd_listen)?;
    cfg.advertise_host = a.advertise_host;
    cfg.control_socket = a.control_socket;
    cfg.control_listen = addr("control-listen", &a.control_listen)?;
    cfg.metrics_listen = addr("metrics-listen", &a.metrics_listen)?;
    cfg.drain_timeout = Duration::from_secs(a.drain_seconds);
    cfg.nbd_threads = a.node.nbd_threads;
    cfg.nbd_buffer_bytes = a.node.nbd_buffer_size;
    cfg.poll = Duration::from_micros(a.node.poll_us);
    cfg.read_depth = a.node.read_depth;
    cfg.defer_max_bytes = a.node.defer_max;
    cfg.map_cache_bytes = a.node.map_cache_size;
    cfg.tls = a.tls.load()?;
    cfg.tls_allow = a.allow.tls_allow;
    cfg.insecure_tcp = a.tls.insecure_plaintext_tcp;
    cfg.nbd_tls_optional = a.nbd_tls_optional;
    if let Some(metadata) = a.metadata {
        cfg.heartbeat = Some(
            a.node
                .heartbeat(metadata, a.advertise_control, cfg.tls.clone()),
        );
    }
    let running = berth_volume::start(cfg).await.map_err(|e| e.to_string())?;
    let b = &running.bound;
    // One line on stdout for people and scripts (tests read it).
    let ready = serde_json::json!({
        "event": "ready",
        "nbd_socket": b.nbd_socket,
        "fuse_socket": b.fuse_socket,
        "nbd_tcp": b.nbd_tcp.map(|a| a.to_string()),
        "control_socket": b.control_socket,
        "control_tcp": b.control_tcp.map(|a| a.to_string()),
        "metrics": b.metrics.map(|a| format!("http://{a}/metrics")),
        "engine": running.node.store.engine_name(),
        "registered_buffer_bytes": running.node.store.registered_buffer_bytes(),
        "pid": std::process::id(),
    });
    println!("{ready}");
    berth_volume::server::wait_for_signal().await;
    shutdown_deadline(Duration::from_secs(a.drain_seconds));
    running.shutdown().await.map_err(|e| e.to_string())
}

/// The catalog `--catalog` names.
enum Opened {
    Single(std::sync::Arc<berth_catalog_rocksdb::RocksCatalog>),
    /// Shared: the campaign starts once the service listens (a service that
    /// cannot bind its port must not lead, even for a lease).
    Etcd {
        cat: std::sync::Arc<berth_catalog_etcd::EtcdCatalog>,
        me: String,
        ttl: Duration,
    },
}

fn open_catalog(a: &MetadataArgs, socket: &std::path::Path, tls: bool) -> Result<Opened, String> {
    let spec = a
        .store
        .clone()
        .unwrap_or_else(|| format!("rocksdb:{}", a.data.join("catalog").display()));
    if let Some(dir) = spec.strip_prefix("rocksdb:") {
        // The catalog names every volume and holds the audit log: 0700.
        let dir = PathBuf::from(dir);
        berth_proto::private::dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let store = berth_catalog_rocksdb::RocksCatalog::open(&dir).map_err(|e| e.to_string())?;
        return Ok(Opened::Single(std::sync::Arc::new(store)));
    }
    let Some(list) = spec.strip_prefix("etcd:") else {
        return Err(format!(
            "--catalog {spec:?}: give rocksdb:DIR or etcd:URL[,URL...]"
        ));
    };
    let mut cfg = berth_catalog_etcd::EtcdConfig::new(berth_catalog_etcd::parse_endpoints(list)?);
    cfg.prefix = a.etcd.etcd_prefix.clone();
    if let Some(d) = &a.etcd.etcd_tls_dir {
        let dir = berth_proto::TlsDir::load(d).map_err(|e| format!("--etcd-tls-dir: {e}"))?;
        cfg.tls = Some(dir.grpc_client(None));
    }
    if !(2..=60).contains(&a.etcd.lease_seconds) {
        return Err(format!(
            "--lease-seconds {} must be between 2 and 60",
            a.etcd.lease_seconds
        ));
    }
    let me = match (&a.etcd.advertise, addr("listen", &a.listen)?) {
        (Some(me), _) => me.clone(),
        (None, Some(l)) if l.ip().is_unspecified() || l.port() == 0 => {
            return Err(format!(
                "--listen {l} is not an address clients can reach (every address, or a port \
                 the kernel picks): give --advertise, the address clients reach this service \
                 at, or a fixed address"
            ))
        }
        (None, Some(l)) => format!("{}://{l}", if tls { "https" } else { "http" }),
        (None, None) => format!("unix://{}", socket.display()),
    };
    let cat = berth_catalog_etcd::EtcdCatalog::connect(&cfg).map_err(|e| e.to_string())?;
    Ok(Opened::Etcd {
        cat,
        me,
        ttl: Duration::from_secs(a.etcd.lease_seconds),
    })
}

async fn metadata(a: MetadataArgs) -> Result<(), String> {
    let tls = a.tls.load()?;
    let socket = a.socket.clone().unwrap_or_else(|| a.data.join("meta.sock"));
    let opened = tokio::task::block_in_place(|| open_catalog(&a, &socket, tls.is_some()))?;
    // Over etcd the service starts as a follower; its role follows the
    // campaign, which starts once it listens.
    let (roles_tx, roles_rx) =
        tokio::sync::watch::channel(berth_catalog::Role::Follower { leader: None });
    let catalog = match &opened {
        Opened::Single(store) => berth_metadata::Catalog::Single(store.clone()),
        Opened::Etcd { .. } => berth_metadata::Catalog::Elected(roles_rx),
    };
    let cfg = berth_metadata::ServiceConfig {
        data_dir: a.data,
        socket: Some(socket),
        listen: addr("listen", &a.listen)?,
        meta: a.catalog.config(tls.as_ref())?,
        tls,
        tls_allow: a.allow.tls_allow,
        insecure_tcp: a.tls.insecure_plaintext_tcp,
    };
    let running = berth_metadata::start(cfg, catalog)
        .await
        .map_err(|e| e.to_string())?;
    let resign = match opened {
        Opened::Single(_) => None,
        Opened::Etcd { cat, me, ttl } => {
            // The campaign holds the catalog (its client and runtime) as
            // long as it runs.
            let (mut roles, resign) = berth_catalog_etcd::campaign(&cat, me, ttl);
            tokio::spawn(async move {
                loop {
                    let r = roles.borrow_and_update().clone();
                    if roles_tx.send(r).is_err() || roles.changed().await.is_err() {
                        return;
                    }
                }
            });
            Some(resign)
        }
    };
    let ready = serde_json::json!({
        "event": "ready",
        "socket": running.bound.socket,
        "tcp": running.bound.tcp.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    println!("{ready}");
    berth_volume::server::wait_for_signal().await;
    shutdown_deadline(Duration::ZERO);
    running.shutdown().await;
    if let Some(r) = resign {
        r.now().await;
    }
    Ok(())
}

async fn csi(a: CsiArgs) -> Result<(), String> {
    let node = a.mode.node().then(|| berth_csi::NodeConfig {
        node_id: a.node_id.unwrap_or_else(host_name),
        labels: a.labels.into_iter().collect(),
        state_dir: a.state_dir,
        attach_program: attach_program(),
        attach_tls_dir: a.tls.tls_dir.clone(),
        attach_metadata: Some(a.metadata.clone()),
    });
    let running = berth_csi::start(berth_csi::CsiConfig {
        socket: a.endpoint,
        mode: a.mode,
        metadata: a.metadata,
        tls: a.tls.load()?.map(berth_proto::ClientTls::new),
        node,
    })
    .await
    .map_err(|e| e.to_string())?;
    let ready = serde_json::json!({
        "event": "ready",
        "csi_socket": running.socket,
        "driver": berth_csi::DRIVER_NAME,
        "pid": std::process::id(),
    });
    println!("{ready}");
    berth_volume::server::wait_for_signal().await;
    shutdown_deadline(Duration::ZERO);
    running.shutdown().await;
    Ok(())
}

async fn standalone(a: StandaloneArgs) -> Result<(), String> {
    let d = &a.data;
    // Sockets, the pool, the catalog and the grants' tokens: 0700.
    berth_proto::private::dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
    let meta_socket = d.join("meta.sock");
    let control_socket = d.join("control.sock");
    let tls = a.tls.load()?;
    let catalog_dir = d.join("metadata").join("catalog");
    berth_proto::private::dir(&catalog_dir)
        .map_err(|e| format!("create {}: {e}", catalog_dir.display()))?;
    let store =
        tokio::task::block_in_place(|| berth_catalog_rocksdb::RocksCatalog::open(&catalog_dir))
            .map_err(|e| e.to_string())?;
    let meta = berth_metadata::start(
        berth_metadata::ServiceConfig {
            data_dir: d.join("metadata"),
            socket: Some(meta_socket.clone()),
            listen: addr("listen", &a.listen)?,
            // The volume server is dialed on its unix socket.
            meta: a.catalog.config(None)?,
            tls: tls.clone(),
            tls_allow: a.allow.tls_allow.clone(),
            insecure_tcp: a.tls.insecure_plaintext_tcp,
        },
        berth_metadata::Catalog::Single(std::sync::Arc::new(store)),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut cfg = berth_volume::ServerConfig::new(d.join("node"), a.pool_size);
    cfg.pool_path = a.pool;
    cfg.nbd_socket = Some(d.join("nbd.sock"));
    cfg.nbd_listen = addr("nbd-listen", &a.nbd_listen)?;
    cfg.advertise_host = a.advertise_host;
    cfg.control_socket = Some(control_socket.clone());
    cfg.metrics_listen = addr("metrics-listen", &a.metrics_listen)?;
    cfg.nbd_threads = a.node.nbd_threads;
    cfg.nbd_buffer_bytes = a.node.nbd_buffer_size;
    cfg.poll = Duration::from_micros(a.node.poll_us);
    cfg.read_depth = a.node.read_depth;
    cfg.defer_max_bytes = a.node.defer_max;
    cfg.map_cache_bytes = a.node.map_cache_size;
    cfg.tls = tls;
    cfg.tls_allow = a.allow.tls_allow;
    let drain = cfg.drain_timeout;
    let node_name = a.node.node_name.clone().unwrap_or_else(host_name);
    let labels = a.node.labels.iter().cloned().collect();
    // The two talk over their unix sockets: no port needed for control.
    cfg.heartbeat = Some(a.node.heartbeat(
        format!("unix://{}", meta_socket.display()),
        format!("unix://{}", control_socket.display()),
        None,
    ));
    let node = match berth_volume::start(cfg).await {
        Ok(n) => n,
        Err(e) => {
            meta.shutdown().await;
            return Err(e.to_string());
        }
    };
    let csi = berth_csi::start(berth_csi::CsiConfig {
        socket: d.join("csi.sock"),
        mode: berth_csi::Mode::All,
        metadata: format!("unix://{}", meta_socket.display()),
        tls: None,
        node: Some(berth_csi::NodeConfig {
            node_id: node_name,
            labels,
            state_dir: d.join("csi-node"),
            attach_program: attach_program(),
            attach_tls_dir: a.tls.tls_dir.clone(),
            attach_metadata: Some(format!("unix://{}", meta_socket.display())),
        }),
    })
    .await;
    let csi = match csi {
        Ok(c) => c,
        Err(e) => {
            let _ = node.shutdown().await;
            meta.shutdown().await;
            return Err(e.to_string());
        }
    };
    let b = &node.bound;
    let ready = serde_json::json!({
        "event": "ready",
        "csi_socket": csi.socket,
        "metadata_socket": meta.bound.socket,
        "metadata_tcp": meta.bound.tcp.map(|a| a.to_string()),
        "control_socket": b.control_socket,
        "nbd_socket": b.nbd_socket,
        "nbd_tcp": b.nbd_tcp.map(|a| a.to_string()),
        "metrics": b.metrics.map(|a| format!("http://{a}/metrics")),
        "engine": node.node.store.engine_name(),
        "registered_buffer_bytes": node.node.store.registered_buffer_bytes(),
        "berthctl": format!("berthctl --data {}", d.display()),
        "pid": std::process::id(),
    });
    println!("{ready}");
    berth_volume::server::wait_for_signal().await;
    shutdown_deadline(drain);
    csi.shutdown().await;
    let r = node.shutdown().await.map_err(|e| e.to_string());
    meta.shutdown().await;
    r
}

/// Once shutdown has begun it ends within `drain` plus [`SHUTDOWN_GRACE`],
/// whatever hangs (a disk that stopped answering, say): after that, or at a
/// second SIGTERM or SIGINT, the process exits with status 1. Every
/// acknowledged write is already in the WAL; only the final flush and the
/// clients' clean goodbyes are lost.
fn shutdown_deadline(drain: Duration) {
    let limit = drain + SHUTDOWN_GRACE;
    let spawned = std::thread::Builder::new()
        .name("berth-deadline".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("berth: shutdown did not finish within {limit:?}; exiting");
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        eprintln!("berth: cannot arm the shutdown deadline: {e}");
    }
    tokio::spawn(async {
        berth_volume::server::wait_for_signal().await;
        eprintln!("berth: second signal during shutdown; exiting");
        std::process::exit(1);
    });
}

/// Time a server's shutdown may take beyond draining its connections: the
/// store's final flush and the listeners' goodbyes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> std::process::ExitCode {
    berth_cli::abort_on_panic("berth");
    let cli = Cli::parse();
    berth_cli::init_logging(cli.log_json);
    if let Command::Attach(a) = cli.command {
        // Its own runtime and the FUSE loop on this thread.
        return match berth_csi::node::fuse::run(berth_csi::node::fuse::AttachOptions {
            uri: a.uri,
            dir: a.dir,
            read_only: a.read_only,
            pid_file: a.pid_file,
            reconnect_timeout: Duration::from_secs(a.reconnect_timeout),
            tls_dir: a.tls.tls_dir,
            metadata: a.metadata,
        }) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("berth attach: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
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
            Command::Csi(a) => csi(a).await,
            Command::Standalone(a) => standalone(a).await,
            // Served above, before the runtime.
            Command::Attach(_) => Ok(()),
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
