//! The NBD protocol as Berth speaks it: the wire format ([`proto`]) and a
//! client ([`client`]). The volume server serves it; the node plugin's
//! attachment daemon and the tests and benchmarks are its clients. No
//! storage, no gRPC: both sides depend on this crate and on nothing of each
//! other.

pub mod client;
pub mod proto;
pub mod session;
