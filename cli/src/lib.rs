//! Shared pieces of Berth's programs: logging setup and size parsing.

/// Parses a size such as `4096`, `10G`, `10GiB`, `1.5T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size (examples: 4096, 512M, 10G): {e}"))
}

/// Parses `key=value` (labels, parameters).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Parses a topology label `key=value`, as Kubernetes accepts labels
/// (they become CSI topology segments).
pub fn parse_topology_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = parse_label(s)?;
    berth_proto::validate::label(&k, &v)?;
    Ok((k, v))
}

/// `tracing` to stderr, human-readable or JSON; `RUST_LOG` filters (default info).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // rustls warns about every client that sends an IP address as SNI
    // (qemu does); a failed handshake is reported by Berth itself.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rustls")) {
        if let Ok(d) = "rustls=error".parse() {
            filter = filter.add_directive(d);
        }
    }
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// A panic anywhere ends the process at once. Tokio keeps a runtime alive
/// when one of its tasks panics, and a store thread that died would leave a
/// server answering health checks while every request hangs (a nexus task
/// that died, a volume whose rebuilds or pauses silently stopped): a crash
/// is the state the supervisor (kubelet, systemd) and the clients' reconnect
/// logic know how to recover from; a half-dead process is not.
pub fn abort_on_panic(program: &'static str) {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("{program}: a thread panicked; aborting the process");
        std::process::abort();
    }));
}

/// This host's name: the default node name of its volume server and node
/// plugin, and the node `berthctl volume attach` publishes to.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units_and_garbage_is_refused() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert!(parse_size("ten gigs").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn labels_are_key_value() {
        assert_eq!(parse_label(" zone = a "), Ok(("zone".into(), "a".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
        assert!(parse_topology_label("topology.kubernetes.io/zone=eu-1a").is_ok());
        for bad in ["zone=a b", "Zone.IO/x=a", "zone=-a", "a/b/c=d"] {
            assert!(parse_topology_label(bad).is_err(), "{bad}");
        }
    }
}
