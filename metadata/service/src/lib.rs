//! Berth's metadata service: the cluster's catalog and the one place that
//! decides where volumes live.
//!
//! - `meta`: state and operations (idempotent by name, intent → volume server
//!   → outcome), one file per kind of object (`meta/volumes.rs`,
//!   `snapshots.rs`, `attachments.rs`, `replicas.rs`, `reconcile.rs`). The
//!   catalog is injected (any `CatalogStore`: `MemStore` in tests), volume
//!   servers are dialed by their registered endpoints (in-process ones on
//!   unix sockets in tests), and crash points can be simulated in the process
//!   (`Meta::simulate_crash_at`): `tests/in_process.rs` runs all of it
//!   without a child process;
//! - `grpc`: `berth.meta.v1.MetadataService`;
//! - `placement`: choosing a pool by room, topology and media;
//! - `tiers`: QoS tiers and StorageClass parameters;
//! - `fault`: crash points for tests.
//!
//! - `lead`: serving only while this process leads the catalog (several
//!   services over one etcd), answering UNAVAILABLE with the leader's address
//!   otherwise.
//!
//! The catalog itself is `berth-catalog` (trait, records, audit chain); which
//! store it is kept in (embedded RocksDB, etcd) is the program's choice: the
//! service takes a [`Catalog`].

pub mod error;
pub mod fault;
pub mod grpc;
pub mod lead;
pub mod meta;
pub mod nexus;
pub mod placement;
pub mod tiers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use error::{MetaError, Result};
pub use lead::Catalog;
pub use meta::{Meta, MetaConfig};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Holds the default socket.
    pub data_dir: PathBuf,
    /// gRPC unix socket; default DATA/meta.sock.
    pub socket: Option<PathBuf>,
    /// gRPC over TCP (volume servers and CSI controllers on other hosts).
    pub listen: Option<SocketAddr>,
    /// Mutual TLS on the TCP listener (the unix socket stays plaintext).
    pub tls: Option<berth_proto::TlsDir>,
    /// With `tls`: the certificate names that may call over TCP (empty: any
    /// the CA signed).
    pub tls_allow: berth_proto::Allow,
    /// Serve `listen` without `tls` (see [`berth_proto::plaintext_tcp`]).
    pub insecure_tcp: bool,
    pub meta: MetaConfig,
}

/// Where the started service listens.
#[derive(Debug, Clone)]
pub struct Bound {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
}

#[derive(Debug)]
pub struct Running {
    pub bound: Bound,
    serving: tokio::sync::watch::Receiver<lead::Serving>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds the listeners and serves the catalog while this process leads it,
/// with the background loop (liveness, audit pulls, reconcile) of each term.
pub async fn start(cfg: ServiceConfig, catalog: Catalog) -> Result<Running> {
    cfg.tls_allow
        .needs_tls(cfg.tls.is_some())
        .map_err(MetaError::InvalidArgument)?;
    berth_proto::plaintext_tcp(
        "the metadata API",
        cfg.listen,
        cfg.tls.is_some(),
        cfg.insecure_tcp,
    )
    .map_err(MetaError::InvalidArgument)?;
    if let Ok(p) = std::env::var("BERTH_FAULT_CRASH") {
        if !fault::POINTS.contains(&p.as_str()) {
            return Err(MetaError::InvalidArgument(format!(
                "BERTH_FAULT_CRASH={p:?} is not a fault point (known: {})",
                fault::POINTS.join(", ")
            )));
        }
        tracing::warn!(point = %p, "fault injection armed: the service will abort there");
    }
    berth_proto::private::dir(&cfg.data_dir).map_err(|e| {
        MetaError::FailedPrecondition(format!("create {}: {e}", cfg.data_dir.display()))
    })?;
    let socket = cfg
        .socket
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("meta.sock"));
    // A socket left by a process that died is in the way (the program checked
    // that no other service runs on this folder: RocksDB's lock, or one
    // service per folder with etcd).
    let _ = std::fs::remove_file(&socket);
    let unix = UnixListener::bind(&socket)
        .map_err(|e| MetaError::FailedPrecondition(format!("bind {}: {e}", socket.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            MetaError::FailedPrecondition(format!("chmod {}: {e}", socket.display()))
        })?;
    }
    let tcp = match cfg.listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| MetaError::FailedPrecondition(format!("bind {a}: {e}")))?,
        ),
        None => None,
    };
    let bound = Bound {
        socket,
        tcp: tcp.as_ref().and_then(|l| l.local_addr().ok()),
    };
    let stop = CancellationToken::new();
    let (serving_tx, serving) = tokio::sync::watch::channel(lead::Serving::Follower(None));
    let api = || tonic::service::Routes::new(lead::Switch::new(serving.clone()));
    let tls_err = |e: berth_proto::TlsError| MetaError::InvalidArgument(e.to_string());
    let mut tasks = vec![berth_proto::spawn_server(
        api(),
        tokio_stream::wrappers::UnixListenerStream::new(unix),
        None,
        stop.clone().cancelled_owned(),
        "metadata (unix)",
    )
    .map_err(tls_err)?];
    if let Some(l) = tcp {
        tasks.push(
            berth_proto::spawn_server(
                api(),
                berth_proto::tcp_incoming(l),
                cfg.tls.as_ref().map(|t| (t, &cfg.tls_allow)),
                stop.clone().cancelled_owned(),
                "metadata (tcp)",
            )
            .map_err(tls_err)?,
        );
    }
    tasks.push(tokio::spawn(lead::govern(
        catalog,
        cfg.meta.clone(),
        serving_tx,
        stop.clone(),
    )));
    tracing::info!(socket = %bound.socket.display(), tcp = ?bound.tcp, "metadata service ready");
    Ok(Running {
        serving,
        bound,
        stop,
        tasks,
    })
}

/// Liveness every half heartbeat; audit pulls with it; a full reconcile of
/// every up node at start and every reconcile interval.
pub(crate) async fn background(meta: Arc<Meta>, stop: CancellationToken) {
    let tick = (meta.cfg.heartbeat_interval / 2).max(Duration::from_millis(100));
    let mut last_full: Option<Instant> = None;
    loop {
        let full = last_full.is_none_or(|t| t.elapsed() >= meta.cfg.reconcile_interval);
        if full {
            last_full = Some(Instant::now());
        }
        meta.tick(full).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

impl Running {
    /// The service's state while it leads (None while it follows).
    pub fn meta(&self) -> Option<Arc<Meta>> {
        match &*self.serving.borrow() {
            lead::Serving::Leader(m, _) => Some(m.clone()),
            lead::Serving::Follower(_) => None,
        }
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        // The governing task ends the term: calls whose clients left still
        // finish their catalog changes.
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("metadata service stopped");
    }
}
