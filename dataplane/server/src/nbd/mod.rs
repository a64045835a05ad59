//! The NBD frontend: the wire format ([`proto`]), the server ([`server`]) and a
//! small client ([`client`]) for tests and benchmarks.

pub mod client;
pub mod proto;
pub mod server;
