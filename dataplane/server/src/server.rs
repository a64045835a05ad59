//! `berth volume-server`: opens the pool, binds the NBD listeners (unix socket
//! and TCP), the gRPC control API (unix socket, optionally TCP) and the metrics
//! endpoint, and serves until told to stop.
//!
//! Shutdown (SIGTERM, SIGINT, or [`Running::shutdown`]): stop accepting, stop
//! reading new requests, let every request in flight finish and its reply go
//! out, flush the store (pool `fdatasync` + synced WAL), record the
//! disconnects, close. A restart serves the same data, grants and limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_store::{Store, StoreConfig};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::error::{Result, ServerError};
use crate::grpc::Service;
use crate::nbd::threads::NbdThreads;
use crate::node::{Endpoints, Node, Peer};
use crate::qos::{default_tiers, TierPolicy};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Pool device or file; default `DATA/pool.img`.
    pub pool_path: Option<PathBuf>,
    /// Size of a new pool file.
    pub pool_size_bytes: u64,
    /// NBD unix socket; default `DATA/nbd.sock`.
    pub nbd_socket: Option<PathBuf>,
    /// Serve local attachments' FUSE mounts on `fuse.sock` beside the NBD
    /// socket (see [`crate::fuse`]).
    pub fuse: bool,
    /// NBD over TCP; `None` serves the unix socket only.
    pub nbd_listen: Option<SocketAddr>,
    /// Host put in TCP URIs; default the listen address.
    pub advertise_host: String,
    /// gRPC control API unix socket; default `DATA/control.sock`.
    pub control_socket: Option<PathBuf>,
    /// gRPC over TCP as well.
    pub control_listen: Option<SocketAddr>,
    /// Prometheus `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    pub tiers: Vec<TierPolicy>,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// Report to a metadata service (None: run alone).
    pub heartbeat: Option<crate::heartbeat::HeartbeatConfig>,
    /// Threads serving NBD connections (0: a quarter of the cores, at least one).
    pub nbd_threads: usize,
    /// Certificates: the control API over TCP then requires mutual TLS, NBD
    /// over TCP offers STARTTLS (with the same client-certificate rule), and
    /// the control endpoint reported to the metadata service is `https://`.
    pub tls: Option<berth_proto::TlsDir>,
    /// With `tls`: the certificate names that may call the control API over
    /// TCP (empty: any the CA signed).
    pub tls_allow: berth_proto::Allow,
    /// Serve `control_listen` without `tls` (see [`berth_proto::plaintext_tcp`]).
    pub insecure_tcp: bool,
    /// With `tls`: NBD clients over TCP may go without STARTTLS (by default
    /// they must use it).
    pub nbd_tls_optional: bool,
    /// Connection limits; `None`: from the process's descriptor limit (raised
    /// to its hard limit), keeping descriptors for the control plane.
    pub nbd_connection_limits: Option<crate::nbd::limits::ConnLimits>,
    /// Payload bytes all NBD connections together may hold in memory.
    pub nbd_buffer_bytes: u64,
    /// The store's polling window ([`berth_store::StoreConfig::poll`]).
    pub poll: Duration,
    /// Pool reads the disk may hold at once
    /// ([`berth_store::StoreConfig::read_depth`]).
    pub read_depth: berth_store::ReadDepthMode,
    /// The largest deferred write
    /// ([`berth_store::StoreConfig::defer_max_bytes`]; 0: none).
    pub defer_max_bytes: u64,
    /// Memory for the block-map cache
    /// ([`berth_store::StoreConfig::map_cache_entries`]).
    pub map_cache_bytes: u64,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, pool_size_bytes: u64) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            pool_path: None,
            pool_size_bytes,
            nbd_socket: None,
            fuse: true,
            nbd_listen: None,
            advertise_host: String::new(),
            control_socket: None,
            control_listen: None,
            metrics_listen: None,
            tiers: default_tiers(),
            drain_timeout: Duration::from_secs(30),
            heartbeat: None,
            nbd_threads: 0,
            tls: None,
            tls_allow: berth_proto::Allow::any(),
            insecure_tcp: false,
            nbd_tls_optional: false,
            nbd_connection_limits: None,
            nbd_buffer_bytes: crate::node::NbdLimits::default().buffer_bytes,
            poll: berth_store::DEFAULT_POLL,
            read_depth: berth_store::ReadDepthMode::Auto,
            defer_max_bytes: berth_store::DEFAULT_DEFER_MAX_BYTES,
            map_cache_bytes: berth_store::DEFAULT_MAP_CACHE_BYTES,
        }
    }
}

/// Where a started server listens (ports resolved when 0 was asked for).
#[derive(Debug, Clone)]
pub struct Bound {
    pub nbd_socket: PathBuf,
    /// Local attachments hand their FUSE mounts over here.
    pub fuse_socket: Option<PathBuf>,
    pub nbd_tcp: Option<SocketAddr>,
    pub control_socket: PathBuf,
    pub control_tcp: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug)]
pub struct Running {
    pub node: Arc<Node>,
    pub bound: Bound,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    conns: tokio_util::task::TaskTracker,
    /// Where the connections run; kept until they have drained.
    nbd_threads: Arc<NbdThreads>,
    stop_accepting: CancellationToken,
    drain_timeout: Duration,
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    // A socket left by a crashed server is replaced; a live one is not (the
    // pool lock already proved nobody else runs on this data dir).
    if path.exists() {
        std::fs::remove_file(path)
            .map_err(ServerError::io(format!("remove {}", path.display())))?;
    }
    let l =
        UnixListener::bind(path).map_err(ServerError::io(format!("bind {}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(ServerError::io(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Opens the store and starts every listener; returns once they are bound.
pub async fn start(cfg: ServerConfig) -> Result<Running> {
    cfg.tls_allow
        .needs_tls(cfg.tls.is_some())
        .map_err(ServerError::InvalidArgument)?;
    berth_proto::plaintext_tcp(
        "the volume server's control API",
        cfg.control_listen,
        cfg.tls.is_some(),
        cfg.insecure_tcp,
    )
    .map_err(ServerError::InvalidArgument)?;
    // A fault drill with a mistyped plan must not silently run without faults.
    let faults = berth_store::FaultPlan::from_env()
        .map_err(|e| ServerError::InvalidArgument(format!("BERTH_FAULTS: {e}")))?;
    // The pool, the grants' tokens and the audit log live here: 0700.
    berth_proto::private::dir(&cfg.data_dir).map_err(ServerError::io(format!(
        "create {}",
        cfg.data_dir.display()
    )))?;
    let mut scfg = StoreConfig::new(&cfg.data_dir, cfg.pool_size_bytes);
    scfg.pool_path = cfg.pool_path.clone();
    scfg.faults = faults;
    scfg.poll = cfg.poll;
    scfg.read_depth = cfg.read_depth;
    scfg.defer_max_bytes = cfg.defer_max_bytes;
    scfg.map_cache_entries = berth_store::map_cache_entries_for(cfg.map_cache_bytes);
    let store = tokio::task::spawn_blocking(move || Store::open_or_create(&scfg))
        .await
        .map_err(|e| ServerError::FailedPrecondition(format!("store open task: {e}")))??;
    let limits = crate::node::NbdLimits {
        connections: cfg
            .nbd_connection_limits
            .unwrap_or_else(crate::nbd::limits::ConnLimits::from_process),
        buffer_bytes: cfg.nbd_buffer_bytes,
    };
    tracing::info!(?limits, "NBD limits");
    let node = Arc::new(Node::new(
        Arc::new(store),
        &cfg.data_dir,
        cfg.tiers.clone(),
        limits,
    )?);

    let nbd_socket = cfg
        .nbd_socket
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("nbd.sock"));
    let control_socket = cfg
        .control_socket
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("control.sock"));
    let nbd_unix = bind_unix(&nbd_socket)?;
    // Beside the NBD socket, where `berth attach` looks for it.
    let fuse_socket = cfg.fuse.then(|| {
        nbd_socket
            .parent()
            .unwrap_or(Path::new("."))
            .join(berth_nbd::handoff::SOCKET)
    });
    let fuse_unix = match &fuse_socket {
        Some(p) => Some(bind_unix(p)?),
        None => None,
    };
    let nbd_tcp = match cfg.nbd_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(ServerError::io(format!("bind NBD {a}")))?,
        ),
        None => None,
    };
    let ctl_unix = bind_unix(&control_socket)?;
    let ctl_tcp = match cfg.control_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(ServerError::io(format!("bind control {a}")))?,
        ),
        None => None,
    };
    let metrics = match cfg.metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(ServerError::io(format!("bind metrics {a}")))?,
        ),
        None => None,
    };
    let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let bound = Bound {
        nbd_socket: nbd_socket.clone(),
        fuse_socket,
        nbd_tcp: local(&nbd_tcp),
        control_socket,
        control_tcp: local(&ctl_tcp),
        metrics: local(&metrics),
    };
    *node.endpoints.lock() = Endpoints {
        nbd_socket,
        nbd_tcp: bound.nbd_tcp,
        advertise_host: cfg.advertise_host.clone(),
    };

    let stop_accepting = CancellationToken::new();
    let conns = tokio_util::task::TaskTracker::new();
    let nbd_threads = Arc::new(
        NbdThreads::start(match cfg.nbd_threads {
            0 => crate::nbd::threads::default_count(),
            n => n,
        })
        .map_err(ServerError::io("start the NBD threads"))?,
    );
    let mut tasks = Vec::new();
    let nbd_tls = match &cfg.tls {
        Some(t) => Some(crate::nbd::server::NbdTls {
            acceptor: tokio_rustls::TlsAcceptor::from(
                t.rustls_server()
                    .map_err(|e| ServerError::InvalidArgument(e.to_string()))?,
            ),
            required: !cfg.nbd_tls_optional,
        }),
        None => None,
    };

    for l in [
        Some(NbdListener::Unix(nbd_unix)),
        nbd_tcp.map(|l| NbdListener::Tcp(l, nbd_tls.clone())),
    ]
    .into_iter()
    .flatten()
    {
        tasks.push(tokio::spawn(accept_nbd(
            l,
            node.clone(),
            stop_accepting.clone(),
            conns.clone(),
            nbd_threads.clone(),
        )));
    }
    if let Some(l) = fuse_unix {
        tasks.push(tokio::spawn(accept_fuse(
            l,
            node.clone(),
            stop_accepting.clone(),
            conns.clone(),
            nbd_threads.clone(),
        )));
    }
    tasks.push(tokio::spawn(audit_refusal_summaries(
        node.clone(),
        stop_accepting.clone(),
    )));
    let control = || tonic::service::Routes::new(Service::new(node.clone()).into_server());
    let tls_err = |e: berth_proto::TlsError| ServerError::InvalidArgument(e.to_string());
    tasks.push(
        berth_proto::spawn_server(
            control(),
            tokio_stream::wrappers::UnixListenerStream::new(ctl_unix),
            None,
            stop_accepting.clone().cancelled_owned(),
            "volume control (unix)",
        )
        .map_err(tls_err)?,
    );
    if let Some(l) = ctl_tcp {
        tasks.push(
            berth_proto::spawn_server(
                control(),
                berth_proto::tcp_incoming(l),
                cfg.tls.as_ref().map(|t| (t, &cfg.tls_allow)),
                stop_accepting.clone().cancelled_owned(),
                "volume control (tcp)",
            )
            .map_err(tls_err)?,
        );
    }
    if let Some(l) = metrics {
        let n = node.clone();
        let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || n.refresh_gauges());
        tasks.push(tokio::spawn(crate::metrics::serve(
            l,
            node.metrics.clone(),
            refresh,
            stop_accepting.clone(),
        )));
    }
    if let Some(mut hb) = cfg.heartbeat.clone() {
        // The node's name is also its topology label's value.
        berth_proto::validate::label(crate::heartbeat::NODE_LABEL, &hb.node_name).map_err(|e| {
            ServerError::InvalidArgument(format!(
                "node name {}: it is the value of the node's topology label: {e}",
                berth_proto::validate::quote(&hb.node_name)
            ))
        })?;
        // Where other hosts reach a listener. NBD: the advertised host (the
        // one grant URIs carry), else the bound address. Control: the bound
        // address, or the advertised host when bound to a wildcard. A
        // wildcard with nothing advertised is refused: nobody can dial it.
        let reachable = |a: SocketAddr, prefer_advertised: bool, what: &str| -> Result<String> {
            let advertised = !cfg.advertise_host.is_empty();
            let host = if advertised && (prefer_advertised || a.ip().is_unspecified()) {
                cfg.advertise_host.clone()
            } else if a.ip().is_unspecified() {
                return Err(ServerError::InvalidArgument(format!(
                    "{what} listens on {a}, which other hosts cannot dial: set --advertise-host"
                )));
            } else {
                a.ip().to_string()
            };
            Ok(if host.contains(':') {
                format!("[{host}]:{}", a.port())
            } else {
                format!("{host}:{}", a.port())
            })
        };
        if hb.control_endpoint.is_empty() {
            let Some(a) = bound.control_tcp else {
                return Err(ServerError::InvalidArgument(
                    "reporting to a metadata service needs the control API on TCP \
                     (--control-listen) or an explicit --advertise-control"
                        .into(),
                ));
            };
            let scheme = if cfg.tls.is_some() { "https" } else { "http" };
            hb.control_endpoint = format!("{scheme}://{}", reachable(a, false, "the control API")?);
        }
        if hb.nbd_address.is_empty() {
            if let Some(a) = bound.nbd_tcp {
                hb.nbd_address = reachable(a, true, "NBD")?;
            }
        }
        tasks.push(tokio::spawn(crate::heartbeat::run(
            node.clone(),
            hb,
            stop_accepting.clone(),
        )));
    }
    tracing::info!(
        nbd_socket = %bound.nbd_socket.display(),
        nbd_tcp = ?bound.nbd_tcp,
        control_socket = %bound.control_socket.display(),
        control_tcp = ?bound.control_tcp,
        metrics = ?bound.metrics,
        engine = node.store.engine_name(),
        nbd_threads = nbd_threads.len(),
        "volume server ready"
    );
    Ok(Running {
        node,
        bound,
        tasks,
        conns,
        nbd_threads,
        stop_accepting,
        drain_timeout: cfg.drain_timeout,
    })
}

/// An accepted connection, on its way to the thread that serves it.
enum Accepted {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream, SocketAddr),
}

enum NbdListener {
    Unix(UnixListener),
    /// With STARTTLS offered, when configured.
    Tcp(TcpListener, Option<crate::nbd::server::NbdTls>),
}

/// Accepts NBD connections until `stop`; each is served on one of the NBD
/// threads, tracked by the tracker that shutdown waits for.
async fn accept_nbd(
    l: NbdListener,
    node: Arc<Node>,
    stop: CancellationToken,
    conns: tokio_util::task::TaskTracker,
    threads: Arc<NbdThreads>,
) {
    use crate::nbd::server::serve;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = async {
                let s = match &l {
                    NbdListener::Unix(l) => {
                        l.accept().await.and_then(|(s, _)| Ok(Accepted::Unix(s.into_std()?)))
                    }
                    NbdListener::Tcp(l, _) => l.accept().await.and_then(|(s, peer)| {
                        let _ = s.set_nodelay(true);
                        Ok(Accepted::Tcp(s.into_std()?, peer))
                    }),
                }?;
                let peer = match &s {
                    Accepted::Unix(_) => Peer::Unix,
                    Accepted::Tcp(_, a) => Peer::Tcp(*a),
                };
                let admitted = match node.admission.admit(&peer) {
                    Ok(a) => a,
                    Err(why) => {
                        // Closed at once (the descriptor is back); counted,
                        // and audited like a refused lookup, summed per peer.
                        drop(s);
                        node.metrics.nbd_connections_refused.inc();
                        crate::nbd::server::refuse_connection(&node, &peer, why);
                        return Ok(());
                    }
                };
                let (thread, placed) = threads.place();
                let node = node.clone();
                let tls = match &l {
                    NbdListener::Tcp(_, tls) => tls.clone(),
                    NbdListener::Unix(_) => None,
                };
                conns.spawn_on(
                    async move {
                        let _placed = placed;
                        // The socket joins the reactor of the thread it is served on.
                        type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
                        let served: std::io::Result<Serving> = match s {
                            Accepted::Unix(s) => tokio::net::UnixStream::from_std(s)
                                .map(|s| Box::pin(serve(node, s, peer, None, admitted)) as Serving),
                            Accepted::Tcp(s, _) => tokio::net::TcpStream::from_std(s)
                                .map(|s| Box::pin(serve(node, s, peer, tls, admitted)) as Serving),
                        };
                        match served {
                            Ok(serving) => serving.await,
                            Err(e) => tracing::warn!(error = %e, "cannot serve an NBD connection on its thread"),
                        }
                    },
                    &thread,
                );
                Ok::<(), std::io::Error>(())
            } => r,
        };
        if let Err(e) = accepted {
            // Out of file descriptors, typically: back off instead of spinning.
            tracing::warn!(error = %e, "nbd accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Accepts local attachments' FUSE handoffs until `stop`; each session runs
/// on one of the NBD threads, tracked like an NBD connection (and limited
/// like one from a unix socket).
async fn accept_fuse(
    l: UnixListener,
    node: Arc<Node>,
    stop: CancellationToken,
    conns: tokio_util::task::TaskTracker,
    threads: Arc<NbdThreads>,
) {
    loop {
        let s = tokio::select! {
            _ = stop.cancelled() => return,
            r = l.accept() => r.and_then(|(s, _)| s.into_std()),
        };
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "fuse accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match node.admission.admit(&Peer::Unix) {
            Ok(a) => a,
            Err(why) => {
                drop(s);
                node.metrics.nbd_connections_refused.inc();
                crate::nbd::server::refuse_connection(&node, &Peer::Unix, why);
                continue;
            }
        };
        let (thread, placed) = threads.place();
        let node = node.clone();
        conns.spawn_on(
            async move {
                let _placed = placed;
                match tokio::net::UnixStream::from_std(s) {
                    Ok(s) => crate::fuse::serve(node, s, admitted).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot serve a FUSE handoff on its thread")
                    }
                }
            },
            &thread,
        );
    }
}

/// Writes the summaries of refused lookups whose window ended (see
/// `nbd::limits::Refusals`), and at shutdown the rest.
async fn audit_refusal_summaries(node: Arc<Node>, stop: CancellationToken) {
    loop {
        let all = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        for ev in node.refusals.due(std::time::Instant::now(), all) {
            crate::nbd::server::audit(&node, ev).await;
        }
        if all {
            return;
        }
    }
}

impl Running {
    /// Stops accepting, drains connections, flushes the store.
    pub async fn shutdown(self) -> Result<()> {
        tracing::info!(
            connections = self.node.connection_count(),
            "shutting down: draining requests in flight"
        );
        self.stop_accepting.cancel();
        self.node.shutdown.cancel();
        self.conns.close();
        if tokio::time::timeout(self.drain_timeout, self.conns.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open after {:?}; closing anyway",
                self.drain_timeout
            );
        }
        for t in self.tasks {
            let _ = t.await;
        }
        drop(self.nbd_threads);
        let store = self.node.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| ServerError::FailedPrecondition(format!("flush task: {e}")))??;
        tracing::info!("volume server stopped cleanly");
        Ok(())
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}
