//! The NBD protocol as Berth speaks it: the wire format ([`proto`]), a
//! client ([`client`]) and a session that outlives its connections
//! ([`session`]); the block-target seam a frontend serves ([`target`]) and
//! the replicated target over one session per replica ([`nexus`]). The
//! volume server serves it; the node plugin's attachment daemon and the
//! tests and benchmarks are its clients. No storage, no gRPC: both sides
//! depend on this crate and on nothing of each other.

pub mod client;
pub mod handoff;
pub mod nexus;
pub mod proto;
pub mod session;
pub mod target;
