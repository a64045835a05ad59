//! A volume server on a temp dir, in this process, with a gRPC client.

#![allow(dead_code, clippy::unwrap_used)]

use berth_proto::volume::v1 as pb;
use berth_proto::volume::v1::volume_service_client::VolumeServiceClient;
use berth_volume::nbd::client::Client;
use berth_volume::{Running, ServerConfig};
use tonic::transport::Channel;

#[derive(Debug)]
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub server: Option<Running>,
    pub api: VolumeServiceClient<Channel>,
}

pub async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir).await
}

pub async fn start_in(dir: tempfile::TempDir) -> Fixture {
    start_with(dir, |_| {}).await
}

/// A server on `dir` with the test defaults, then `tune` applied.
pub async fn start_with(dir: tempfile::TempDir, tune: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let mut cfg = ServerConfig::new(dir.path(), 256 << 20);
    cfg.nbd_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    tune(&mut cfg);
    let server = berth_volume::start(cfg).await.unwrap();
    let ch = berth_proto::channel(
        &format!("unix://{}", server.bound.control_socket.display()),
        None,
    )
    .await
    .unwrap();
    Fixture {
        dir,
        server: Some(server),
        api: VolumeServiceClient::new(ch),
    }
}

impl Fixture {
    pub fn bound(&self) -> &berth_volume::Bound {
        &self.server.as_ref().unwrap().bound
    }

    pub fn node(&self) -> &std::sync::Arc<berth_volume::node::Node> {
        &self.server.as_ref().unwrap().node
    }

    pub async fn volume(&mut self, name: &str, size: u64) -> pb::Volume {
        self.api
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                tier: "extreme".into(),
                overrides: None,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn grant(&mut self, kind: pb::TargetKind, name: &str, client: &str) -> pb::Export {
        self.api
            .grant_export(pb::GrantExportRequest {
                kind: kind as i32,
                name: name.into(),
                client: client.into(),
                read_only: false,
                peer_address: String::new(),
                generation: 0,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn unix(&self, export: &str) -> Client<tokio::net::UnixStream> {
        let s = tokio::net::UnixStream::connect(&self.bound().nbd_socket)
            .await
            .unwrap();
        Client::connect(s, export).await.unwrap()
    }

    pub async fn tcp(&self, export: &str) -> Client<tokio::net::TcpStream> {
        let s = tokio::net::TcpStream::connect(self.bound().nbd_tcp.unwrap())
            .await
            .unwrap();
        Client::connect(s, export).await.unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.unwrap();
        }
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}
