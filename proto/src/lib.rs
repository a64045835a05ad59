//! Berth's gRPC APIs, generated from the `.proto` files beside this crate.
//!
//! - [`volume::v1`]: the volume server's control API (volumes, snapshots, clones,
//!   exports, QoS, scrub, stats, audit).
//! - [`meta::v1`]: the metadata service's API (nodes, pools, tiers, volumes,
//!   snapshots, attachments, capacity, the hash-chained audit log).
//! - [`csi::v1`]: the Container Storage Interface (package `csi.v1`), which
//!   the CSI driver serves to kubelet and the sidecars.

#![allow(missing_debug_implementations, clippy::unwrap_used)]

pub mod volume {
    pub mod v1 {
        tonic::include_proto!("berth.volume.v1");
    }
}

pub mod meta {
    pub mod v1 {
        tonic::include_proto!("berth.meta.v1");
    }
}

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub mod endpoints;
pub mod peer;
pub mod tls;
pub mod validate;
pub use berth_io::private;
pub use endpoints::{meta_client, LeaderChannel, MetaClient};
pub use peer::{plaintext_tcp, Allow, INSECURE_TCP_FLAG};
pub use tls::{TlsDir, TlsError};

/// How long (at least) a volume server waits for the metadata service to
/// answer a registration or a heartbeat before it asks the next instance: a
/// paused leader holds calls without refusing them, a registration starts a
/// reconcile pass, and a heartbeat may write the catalog (which waits out a
/// lost etcd member). A newly elected leader gives every node it finds up this
/// much beyond its node timeout to report, so a node still waiting on the
/// old leader is not counted down.
pub const REGISTER_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The request header a caller names itself with ("berthctl:alice",
/// "volume-server:n1"...), recorded in the audit logs.
pub const CALLER_HEADER: &str = "x-berth-client";

/// Who is calling, for the audit logs: the name in [`CALLER_HEADER`], else
/// the transport peer; over TLS, prefixed with the name of the certificate
/// the peer proved it holds, in brackets (`[berth-admin] berthctl:alice`):
/// the header is a claim, the bracketed name is checked.
pub fn caller<T>(r: &tonic::Request<T>) -> String {
    let claim = r
        .metadata()
        .get(CALLER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| {
            r.remote_addr()
                .map_or_else(|| "local".to_string(), |a| a.to_string())
        });
    match peer::peer(r) {
        Some(cert) => format!("[{}] {claim}", cert.as_deref().unwrap_or("?")),
        None => claim,
    }
}

/// Names the caller on an outgoing request (a name that is not a valid header
/// value is left out rather than failing the call).
pub fn name_caller<T>(r: &mut tonic::Request<T>, who: &str) {
    if let Ok(v) = who.parse() {
        r.metadata_mut().insert(CALLER_HEADER, v);
    }
}

/// Percent-encodes what may not stand in a URI path segment (export names).
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@:!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `nbd://HOST:PORT/EXPORT`, as qemu-io, nbdinfo and nbdfuse take it
/// (`address` is `host:port`, with an IPv6 host in brackets).
pub fn nbd_tcp_uri(address: &str, export: &str) -> String {
    format!("nbd://{address}/{}", uri_escape(export))
}

/// `nbd+unix:///EXPORT?socket=PATH`.
pub fn nbd_unix_uri(socket: &std::path::Path, export: &str) -> String {
    format!(
        "nbd+unix:///{}?socket={}",
        uri_escape(export),
        socket.display()
    )
}

/// Serves `routes` on the connections of `incoming` until `shutdown`
/// completes, on a task of its own; a server that stops with an error says so
/// in the log, naming `what`. With `tls`, every connection must complete a
/// mutual TLS handshake (a client certificate signed by the CA) first, and
/// every call is refused (PERMISSION_DENIED) unless `allow` permits the
/// name of that certificate.
pub fn spawn_server<S, IO, E>(
    routes: tonic::service::Routes,
    incoming: S,
    tls: Option<(&TlsDir, &Allow)>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    what: &'static str,
) -> Result<tokio::task::JoinHandle<()>, TlsError>
where
    S: tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut server = tonic::transport::Server::builder();
    let mut allow = Allow::any();
    if let Some((t, a)) = tls {
        server = server
            .tls_config(t.grpc_server())
            .map_err(|e| TlsError::Config(format!("{}: {e}", t.dir.display())))?;
        allow = a.clone();
    }
    let mut server = server.layer(tonic::service::InterceptorLayer::new(
        move |r: tonic::Request<()>| match allow.check(&r) {
            Ok(()) => Ok(r),
            Err(refused) => {
                tracing::warn!(server = what, peer = ?r.remote_addr(), "{}", refused.message());
                Err(refused)
            }
        },
    ));
    Ok(tokio::spawn(async move {
        if let Err(e) = server
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(error = %e, server = what, "gRPC server stopped");
        }
    }))
}

/// Accepted TCP connections for a gRPC server, with Nagle off: control calls
/// are small request/response pairs, and Nagle with delayed ACKs adds ~40 ms
/// to some of them.
pub fn tcp_incoming(
    l: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(l).map(|r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}

/// The socket path of a `unix:///path` (or bare `/path`) endpoint.
fn unix_path(endpoint: &str) -> Option<std::path::PathBuf> {
    endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.starts_with('/').then_some(endpoint))
        .map(std::path::PathBuf::from)
}

/// Dials a unix socket for tonic.
fn unix_connector(
    path: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    })
}

/// The URI tonic requires for a unix socket endpoint (and does not use).
const UNIX_PLACEHOLDER: &str = "http://[::1]:50051";

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Endpoint(String),
}

/// How a client dials TLS endpoints: its certificates, and the name the
/// server's certificate must carry when that is not the endpoint's host.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub dir: TlsDir,
    pub server_name: Option<String>,
}

impl ClientTls {
    pub fn new(dir: TlsDir) -> ClientTls {
        ClientTls {
            dir,
            server_name: None,
        }
    }
}

/// A TCP endpoint, set up for TLS when it is `https://`. A TLS client does
/// not dial `http://` (it would send in the clear what it was configured to
/// protect), and `https://` needs certificates.
fn tcp_endpoint(
    endpoint: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Endpoint, ChannelError> {
    // A peer that accepts connections but never answers (a paused process)
    // fails calls after the keep-alive instead of holding them forever.
    let e = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(2))
        .keep_alive_timeout(std::time::Duration::from_secs(3));
    match (endpoint.starts_with("https://"), tls) {
        (true, Some(t)) => Ok(e.tls_config(t.dir.grpc_client(t.server_name.as_deref()))?),
        (true, None) => Err(ChannelError::Endpoint(format!(
            "{endpoint} is TLS: give this program certificates (--tls-dir)"
        ))),
        (false, Some(t)) => Err(ChannelError::Endpoint(format!(
            "TLS is configured ({}), so {endpoint} would be plaintext: use https://",
            t.dir.dir.display()
        ))),
        (false, None) => Ok(e),
    }
}

/// Opens a gRPC channel to an endpoint: `unix:///path/to.sock` (or a bare
/// path), `http://host:port`, or with `tls`, `https://host:port`.
pub async fn channel(
    endpoint: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Channel, ChannelError> {
    use tonic::transport::Endpoint;
    Ok(match unix_path(endpoint) {
        Some(path) => {
            Endpoint::from_static(UNIX_PLACEHOLDER)
                .connect_with_connector(unix_connector(path))
                .await?
        }
        None => tcp_endpoint(endpoint, tls)?.connect().await?,
    })
}

/// Like [`channel`], but connects on first use (and again after the peer
/// restarts): for long-running clients that must start before their server.
pub fn lazy_channel(
    endpoint: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Channel, ChannelError> {
    use tonic::transport::Endpoint;
    Ok(match unix_path(endpoint) {
        Some(path) => Endpoint::from_static(UNIX_PLACEHOLDER)
            .connect_with_connector_lazy(unix_connector(path)),
        None => tcp_endpoint(endpoint, tls)?.connect_lazy(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn nbd_uris_escape_export_names() {
        assert_eq!(
            super::nbd_tcp_uri("[::1]:10809", "db@ab12"),
            "nbd://[::1]:10809/db@ab12"
        );
        assert_eq!(
            super::nbd_unix_uri(std::path::Path::new("/d/nbd.sock"), "a b%c?#"),
            "nbd+unix:///a%20b%25c%3F%23?socket=/d/nbd.sock"
        );
    }
}
