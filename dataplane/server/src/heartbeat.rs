//! Announces this volume server to the metadata service and keeps telling it
//! that the node is alive and how full its pool is.
//!
//! The metadata service decides from these heartbeats whether a node is up;
//! it reaches the node back through the control endpoint given here. Nothing
//! on the data path waits for it: an unreachable metadata service only means
//! retries and a warning every half minute.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::meta::v1 as mpb;
use tokio_util::sync::CancellationToken;

use crate::node::Node;

#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// The metadata service's endpoint (http://host:port or unix:///path).
    pub metadata: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    /// What the pool is made of (nvme, ssd, hdd, file).
    pub media: String,
    /// How the metadata service reaches this node's control API; filled from
    /// the bound control TCP address when empty.
    pub control_endpoint: String,
    /// host:port of NBD over TCP; filled from the bound address when empty.
    pub nbd_address: String,
    /// Certificates for an `https://` metadata endpoint.
    pub tls: Option<berth_proto::ClientTls>,
}

/// The label every node carries: CSI topology down to the node.
pub const NODE_LABEL: &str = "topology.berth.dev/node";

fn pool_status(node: &Node, media: &str) -> mpb::PoolStatus {
    let s = node.store.stats();
    mpb::PoolStatus {
        id: node.store.pool_uuid().to_string(),
        total_bytes: s.total_blocks * s.block_size,
        used_bytes: (s.used_blocks + s.pending_free_blocks) * s.block_size,
        media: media.to_string(),
        volumes: s.volumes,
        snapshots: s.snapshots,
    }
}

fn request<T>(node: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(10));
    berth_proto::name_caller(&mut r, &format!("volume-server:{node}"));
    r
}

/// Runs until `stop`: register, then heartbeat at the interval the metadata
/// service asks for, registering again whenever it does not know the node.
pub async fn run(node: Arc<Node>, mut cfg: HeartbeatConfig, stop: CancellationToken) {
    cfg.labels
        .entry(NODE_LABEL.to_string())
        .or_insert_with(|| cfg.node_name.clone());
    let nbd_socket = node.endpoints.lock().nbd_socket.display().to_string();
    let mut client: Option<berth_proto::MetaClient> = None;
    // The same channel, to move past a service that does not answer.
    let mut channel: Option<berth_proto::LeaderChannel> = None;
    let mut registered = false;
    let mut interval = Duration::from_secs(1);
    let mut last_warning: Option<Instant> = None;
    loop {
        // A paused service holds a call without refusing it: past twice the
        // interval (at least 5 s: a registration starts a reconcile pass,
        // and a heartbeat may write the catalog, which waits out an etcd
        // member lost under it), ask the next one.
        let answer_within = (interval * 2).max(berth_proto::REGISTER_ANSWER_WITHIN);
        let answered = tokio::time::timeout(answer_within, async {
            let c = match &mut client {
                Some(c) => c,
                None => {
                    // A,B,C: the metadata service that leads.
                    let ch = berth_proto::LeaderChannel::connect(&cfg.metadata, cfg.tls.as_ref())
                        .await
                        .map_err(|e| format!("cannot reach {}: {e}", cfg.metadata))?;
                    channel = Some(ch.clone());
                    client.insert(berth_proto::MetaClient::new(ch))
                }
            };
            let pool = Some(pool_status(&node, &cfg.media));
            let ms = if registered {
                match c
                    .heartbeat(request(&cfg.node_name, mpb::HeartbeatRequest {
                        name: cfg.node_name.clone(),
                        pool,
                    }))
                    .await
                {
                    Ok(r) => r.into_inner().heartbeat_interval_ms,
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        registered = false;
                        return Ok(());
                    }
                    Err(s) => return Err(format!("heartbeat: {}", s.message())),
                }
            } else {
                let r = c
                    .register_node(request(&cfg.node_name, mpb::RegisterNodeRequest {
                        name: cfg.node_name.clone(),
                        control_endpoint: cfg.control_endpoint.clone(),
                        nbd_address: cfg.nbd_address.clone(),
                        nbd_socket: nbd_socket.clone(),
                        labels: cfg.labels.clone().into_iter().collect(),
                        pool,
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    }))
                    .await
                    .map_err(|s| format!("register: {}", s.message()))?;
                registered = true;
                tracing::info!(node = %cfg.node_name, metadata = %cfg.metadata, "registered with the metadata service");
                r.into_inner().heartbeat_interval_ms
            };
            interval = Duration::from_millis(u64::from(ms.clamp(100, 60_000)));
            Ok(())
        })
        .await;
        let outcome: Result<(), String> = match answered {
            Ok(Ok(())) => Ok(()),
            // Reconnect next time: the channel may point at a dead process.
            Ok(Err(e)) => {
                client = None;
                Err(e)
            }
            // The channel moves on; reconnecting would start over at the
            // first endpoint, which may be the paused one.
            Err(_) => {
                if let Some(ch) = &channel {
                    ch.skip();
                }
                Err(format!(
                    "no answer within {} ms; asking the next service",
                    answer_within.as_millis()
                ))
            }
        };
        // A call that failed or went unanswered does not mean the service
        // forgot the node (a new leader knows it from the catalog and answers
        // heartbeats; NOT_FOUND is what asks for a registration): keep
        // heartbeating.
        if let Err(e) = outcome {
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                tracing::warn!(node = %cfg.node_name, error = %e, "metadata service unreachable; retrying");
                last_warning = Some(Instant::now());
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
