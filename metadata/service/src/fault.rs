//! Crash points for tests: `BERTH_FAULT_CRASH=<point>` makes the process abort
//! (like kill -9: no cleanup, no flush) when it reaches that point, so tests
//! can stop the service between a catalog write and the volume server call.
//! Unset (always, outside tests) it costs one cached comparison.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

/// The points the service passes, in the order a create or delete passes them.
pub const POINTS: &[&str] = &[
    "create-volume:after-catalog",
    "create-volume:after-server",
    "delete-volume:after-catalog",
    "create-snapshot:after-catalog",
    "create-snapshot:after-server",
    "publish-volume:after-catalog",
    "publish-volume:after-generation",
    "publish-volume:after-server",
    "replica-fault:before-catalog",
    "replica-fault:after-catalog",
    "rebuild:before-catalog",
    "rebuild:after-catalog",
];

pub fn point(name: &str) {
    let at = CRASH_AT.get_or_init(|| std::env::var("BERTH_FAULT_CRASH").ok());
    if at.as_deref() == Some(name) {
        eprintln!("berth: fault injection: crashing at {name}");
        std::process::abort();
    }
}
