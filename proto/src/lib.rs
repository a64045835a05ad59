//! Berth's gRPC APIs, generated from the `.proto` files beside this crate.
//!
//! - [`volume::v1`]: the volume server's control API (volumes, snapshots, clones,
//!   exports, QoS, scrub, stats, audit).
//! - [`meta::v1`]: the metadata service's API (nodes, pools, tiers, volumes,
//!   snapshots, attachments, capacity, the hash-chained audit log).

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

/// Opens a gRPC channel to an endpoint: `unix:///path/to.sock` (or a bare
/// path), or `http://host:port`.
pub async fn channel(endpoint: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::Endpoint;
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.starts_with('/').then_some(endpoint));
    match path {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            // The URI is required by tonic but unused for a unix socket.
            Endpoint::from_static("http://[::1]:50051")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
        }
        None => Endpoint::from_shared(endpoint.to_string())?.connect().await,
    }
}
