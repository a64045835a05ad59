//! The NBD frontend: the server ([`server`]); the wire format ([`proto`]) and
//! the small client ([`client`]) live in `berth-nbd`, shared with the node
//! plugin.

pub use berth_nbd::{client, proto};
pub mod limits;
pub mod server;
pub mod threads;
