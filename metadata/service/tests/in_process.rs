//! The metadata service and its volume servers in the test's own process:
//! the catalog in memory (`MemStore`, injected as the program would inject
//! RocksDB or etcd), real volume servers (`berth_volume::start`) on unix
//! sockets in a temporary folder, reporting to the service; calls through
//! the API on the service's socket. No child processes, so the crash points
//! of create, delete, snapshot and publish are simulated in the process
//! (`Meta::simulate_crash_at`): the call stops there and nothing more is
//! written, and the "restart" is a new service over the same catalog.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_catalog::MemStore;
use berth_metadata::{Catalog, MetaConfig, ServiceConfig};
use berth_proto::meta::v1 as pb;
use berth_proto::volume::v1 as vpb;

struct World {
    dir: tempfile::TempDir,
    store: Arc<MemStore>,
    meta: Option<berth_metadata::Running>,
    servers: Vec<(String, berth_volume::Running)>,
}

fn config() -> MetaConfig {
    MetaConfig {
        heartbeat_interval: Duration::from_millis(100),
        node_timeout: Duration::from_secs(2),
        reconcile_interval: Duration::from_millis(500),
        replica_grace: None,
        overcommit: 1.0,
        tiers: berth_metadata::tiers::load(None).expect("tiers"),
        volume_tls: None,
    }
}

impl World {
    async fn start(nodes: &[(&str, u64)]) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(MemStore::new());
        let mut w = World {
            dir,
            store,
            meta: None,
            servers: Vec::new(),
        };
        w.restart_meta().await;
        for (name, size) in nodes {
            let d = w.dir.path().join(name);
            let mut cfg = berth_volume::ServerConfig::new(&d, *size);
            let control = d.join("control.sock");
            cfg.control_socket = Some(control.clone());
            cfg.nbd_socket = Some(d.join("nbd.sock"));
            cfg.metrics_listen = None;
            cfg.heartbeat = Some(berth_volume::heartbeat::HeartbeatConfig {
                metadata: format!("unix://{}", w.socket().display()),
                node_name: name.to_string(),
                labels: Default::default(),
                media: "file".into(),
                control_endpoint: format!("unix://{}", control.display()),
                nbd_address: String::new(),
                tls: None,
            });
            let s = berth_volume::start(cfg).await.expect("volume server");
            w.servers.push((name.to_string(), s));
        }
        w.wait("every node up", || async {
            let n = w.client().await.list_nodes(pb::ListNodesRequest {}).await;
            n.is_ok_and(|n| {
                n.into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state == "up")
                    .count()
                    == nodes.len()
            })
        })
        .await;
        w
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("meta").join("meta.sock")
    }

    /// A new service over the same catalog: a restart.
    async fn restart_meta(&mut self) {
        if let Some(m) = self.meta.take() {
            m.shutdown().await;
        }
        let cfg = ServiceConfig {
            data_dir: self.dir.path().join("meta"),
            socket: None,
            listen: None,
            tls: None,
            tls_allow: berth_proto::Allow::any(),
            insecure_tcp: false,
            meta: config(),
        };
        self.meta = Some(
            berth_metadata::start(cfg, Catalog::Single(self.store.clone()))
                .await
                .expect("metadata service"),
        );
    }

    async fn client(&self) -> berth_proto::MetaClient {
        berth_proto::meta_client(&format!("unix://{}", self.socket().display()), None)
            .expect("client")
    }

    async fn wait<F, Fut>(&self, what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let end = Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What a volume server holds: its volumes and snapshots by name.
    async fn held(&self, node: &str) -> (Vec<String>, Vec<String>) {
        let (_, s) = self.servers.iter().find(|(n, _)| n == node).expect("node");
        let ch = berth_proto::channel(
            &format!("unix://{}", s.bound.control_socket.display()),
            None,
        )
        .await
        .expect("control");
        let mut c = vpb::volume_service_client::VolumeServiceClient::new(ch);
        let mut v: Vec<String> = c
            .list_volumes(vpb::ListVolumesRequest::default())
            .await
            .expect("volumes")
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| v.name)
            .collect();
        let mut snaps: Vec<String> = c
            .list_snapshots(vpb::ListSnapshotsRequest::default())
            .await
            .expect("snapshots")
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| s.name)
            .collect();
        v.sort();
        snaps.sort();
        (v, snaps)
    }

    async fn catalog_volumes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .client()
            .await
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("list")
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| v.id)
            .collect();
        v.sort();
        v
    }

    fn meta(&self) -> Arc<berth_metadata::Meta> {
        self.meta.as_ref().and_then(|m| m.meta()).expect("leading")
    }

    async fn stop(mut self) {
        if let Some(m) = self.meta.take() {
            m.shutdown().await;
        }
        for (_, s) in self.servers.drain(..) {
            let _ = s.shutdown().await;
        }
        let _: &Path = self.dir.path();
    }
}

fn create(name: &str, bytes: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        required_bytes: bytes,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_idempotent_by_name_and_spread_by_room() {
    let w = World::start(&[("n1", 256 << 20), ("n2", 256 << 20)]).await;
    let mut c = w.client().await;
    let a = c
        .create_volume(create("a", 64 << 20))
        .await
        .expect("a")
        .into_inner();
    let again = c
        .create_volume(create("a", 64 << 20))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(
        (a.id.as_str(), a.node.as_str()),
        (again.id.as_str(), again.node.as_str())
    );
    let e = c
        .create_volume(create("a", 128 << 20))
        .await
        .expect_err("other size");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    // The next goes where there is more room: the other node.
    let b = c
        .create_volume(create("b", 64 << 20))
        .await
        .expect("b")
        .into_inner();
    assert_ne!(a.node, b.node);
    // One of each, on each server.
    assert_eq!(w.held(&a.node).await.0, ["a"]);
    assert_eq!(w.held(&b.node).await.0, ["b"]);
    // Nowhere to put it: RESOURCE_EXHAUSTED, nothing left behind.
    let e = c
        .create_volume(create("huge", 1 << 30))
        .await
        .expect_err("huge");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(w.catalog_volumes().await, ["a", "b"]);
    w.stop().await;
}

/// Waits until the catalog lists exactly `vols` and n1 holds exactly `vols`
/// and `snaps`.
async fn settle(w: &World, vols: Vec<&str>, snaps: Vec<&str>) {
    let vols: Vec<String> = vols.into_iter().map(String::from).collect();
    let snaps: Vec<String> = snaps.into_iter().map(String::from).collect();
    w.wait("catalog and server to agree", || {
        let (vols, snaps) = (vols.clone(), snaps.clone());
        async move { w.catalog_volumes().await == vols && w.held("n1").await == (vols, snaps) }
    })
    .await;
}

/// At every crash point of create, delete and snapshot: the call dies
/// there; a new service over the same catalog reconciles; then the catalog
/// and the volume server agree, and the caller's retry works once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_is_finished_or_undone_by_the_next_service() {
    let mut w = World::start(&[("n1", 512 << 20)]).await;
    for point in ["create-volume:after-catalog", "create-volume:after-server"] {
        w.meta().simulate_crash_at(point);
        let e = w
            .client()
            .await
            .create_volume(create("half", 16 << 20))
            .await
            .expect_err(point);
        assert!(e.message().contains(point), "{point}: {e:?}");
        w.restart_meta().await;
        // Nobody was told it exists: undone.
        settle(&w, vec![], vec![]).await;
        w.client()
            .await
            .create_volume(create("half", 16 << 20))
            .await
            .expect("retry");
        settle(&w, vec!["half"], vec![]).await;
        w.client()
            .await
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: "half".into(),
            })
            .await
            .expect("delete");
    }

    // A delete cut short is finished.
    w.client()
        .await
        .create_volume(create("doomed", 16 << 20))
        .await
        .expect("doomed");
    w.meta().simulate_crash_at("delete-volume:after-catalog");
    w.client()
        .await
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: "doomed".into(),
        })
        .await
        .expect_err("crash");
    w.restart_meta().await;
    settle(&w, vec![], vec![]).await;

    // Snapshots half made are removed.
    w.client()
        .await
        .create_volume(create("base", 16 << 20))
        .await
        .expect("base");
    for point in [
        "create-snapshot:after-catalog",
        "create-snapshot:after-server",
    ] {
        w.meta().simulate_crash_at(point);
        w.client()
            .await
            .create_snapshot(pb::CreateSnapshotRequest {
                name: "s".into(),
                source_volume_id: "base".into(),
            })
            .await
            .expect_err(point);
        w.restart_meta().await;
        settle(&w, vec!["base"], vec![]).await;
    }
    w.client()
        .await
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: "base".into(),
        })
        .await
        .expect("snapshot");
    settle(&w, vec!["base"], vec!["s"]).await;

    // The audit chain is whole through every "crash".
    let v = w
        .client()
        .await
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(v.intact, "{v:?}");
    w.stop().await;
}
