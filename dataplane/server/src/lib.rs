//! Berth's volume server: serves the block store's volumes and snapshots over
//! NBD (unix socket and TCP), controlled through gRPC, with QoS by tier,
//! Prometheus metrics and a durable audit log.
//!
//! - `nbd`: the NBD protocol and the connection handling (the data path);
//! - `fuse`: local attachments' FUSE requests, answered from the store;
//! - `grpc`: `berth.volume.v1.VolumeService`;
//! - `node`: shared state and the control operations;
//! - `qos`: tiers, token buckets, priority between tiers;
//! - `metrics`, `audit`, `state`: observability and what survives restarts;
//! - `heartbeat`: registration and liveness reports to the metadata service;
//! - `server`: wiring, listeners, graceful shutdown.

pub mod audit;
pub mod error;
pub mod fuse;
pub mod grpc;
pub mod heartbeat;
pub mod metrics;
pub mod nbd;
pub mod node;
mod poll;
pub mod qos;
pub mod server;
pub mod state;

pub use berth_store::{ReadDepthMode, DEFAULT_POLL};
pub use error::{Result, ServerError};
pub use server::{start, Bound, Running, ServerConfig};
