//! Prometheus metrics (the `prometheus` crate's registry and text encoder),
//! served as text on HTTP `GET /metrics`.
//!
//! Per volume and operation: requests, bytes, errors, and a latency histogram;
//! checksum errors and QoS throttling time per volume; connections; pool
//! capacity and use. Connections fetch their label handles once, so the data
//! path only touches atomics.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The operations metrics are kept for.
pub const OPS: [&str; 6] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
];

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    ops: IntCounterVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
    checksum_errors: IntCounterVec,
    throttled: IntCounterVec,
    connections: IntGaugeVec,
    pub pool_total_bytes: IntGauge,
    pub pool_used_bytes: IntGauge,
    pub pool_pending_free_bytes: IntGauge,
    pub volumes: IntGauge,
    pub snapshots: IntGauge,
    pub pool_checksum_errors: IntGauge,
    /// Pool reads that fetched a window of scattered blocks at once.
    pub pool_gathered_reads: IntGauge,
    /// Times the store's I/O thread found work while polling.
    pub io_polled_work: IntGauge,
    /// Reads the I/O engine lets the device hold at once, and how many waited.
    pub io_read_depth_limit: IntGauge,
    pub io_reads_held: IntGauge,
    /// Writes answered before their data reached the pool (deferred).
    pub pool_deferred_writes: IntGauge,
    /// Deferred writes' data whose records are still in the catalog.
    pub pool_deferred_bytes: IntGauge,
    /// Pool reads, writes and syncs the disk failed.
    pub pool_io_errors: IntGauge,
    /// The block-map cache: entries, capacity, hits and misses.
    pub map_cache_entries: IntGauge,
    pub map_cache_capacity: IntGauge,
    pub map_cache_hits: IntGauge,
    pub map_cache_misses: IntGauge,
    /// 1 for the I/O engine in use (`io_uring` or `sync`, the fallback where the
    /// kernel or a seccomp profile refuses io_uring).
    pub io_engine: IntGaugeVec,
    pub io_registered_buffer_bytes: IntGauge,
    /// Request and reply payloads buffered across all NBD connections.
    pub nbd_buffered_bytes: IntGauge,
    pub nbd_handshakes: IntGauge,
    pub nbd_connections: IntGauge,
    /// Connections closed at accept: over a connection limit.
    pub nbd_connections_refused: IntCounter,
}

/// One operation's handles for one volume.
#[derive(Debug, Clone)]
pub struct OpMetrics {
    pub ops: IntCounter,
    pub bytes: IntCounter,
    pub errors: IntCounter,
    pub latency: Histogram,
}

/// A volume's handles, indexed like [`OPS`].
#[derive(Debug, Clone)]
pub struct VolumeMetrics {
    pub op: [OpMetrics; 6],
    pub checksum_errors: IntCounter,
    pub throttled_micros: IntCounter,
    pub connections: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // The metric definitions below are static and valid; an error here is a
    // programming mistake caught by the unit test.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("berth".into()), None).unwrap_or_default();
        let vol_op = &["volume", "op"];
        let ops = must(IntCounterVec::new(
            Opts::new("volume_requests_total", "NBD requests answered"),
            vol_op,
        ));
        let bytes = must(IntCounterVec::new(
            Opts::new(
                "volume_bytes_total",
                "Bytes read, written, trimmed or zeroed",
            ),
            vol_op,
        ));
        let errors = must(IntCounterVec::new(
            Opts::new("volume_errors_total", "NBD requests answered with an error"),
            vol_op,
        ));
        let latency = must(HistogramVec::new(
            HistogramOpts::new(
                "volume_request_seconds",
                "Time from a request's header read to its reply queued",
            )
            .buckets(must(prometheus::exponential_buckets(10e-6, 2.0, 20))),
            vol_op,
        ));
        let checksum_errors = must(IntCounterVec::new(
            Opts::new(
                "volume_checksum_errors_total",
                "Reads refused because a block failed its checksum",
            ),
            &["volume"],
        ));
        let throttled = must(IntCounterVec::new(
            Opts::new(
                "volume_qos_throttled_microseconds_total",
                "Time requests waited for the volume's QoS limits",
            ),
            &["volume"],
        ));
        let connections = must(IntGaugeVec::new(
            Opts::new("volume_connections", "Open NBD connections"),
            &["volume"],
        ));
        let io_engine = must(IntGaugeVec::new(
            Opts::new(
                "io_engine",
                "1 for the pool's I/O engine: io_uring, or sync where io_uring is refused",
            ),
            &["engine"],
        ));
        let g = |n: &str, h: &str| must(IntGauge::new(n, h));
        let m = Metrics {
            registry,
            ops,
            bytes,
            errors,
            latency,
            checksum_errors,
            throttled,
            connections,
            pool_total_bytes: g("pool_capacity_bytes", "Pool size"),
            pool_used_bytes: g(
                "pool_used_bytes",
                "Pool bytes referenced by volumes and snapshots",
            ),
            pool_pending_free_bytes: g(
                "pool_pending_free_bytes",
                "Freed pool bytes waiting for a durable commit",
            ),
            volumes: g("volumes", "Volumes on this node"),
            snapshots: g("snapshots", "Snapshots on this node"),
            pool_checksum_errors: g(
                "pool_checksum_errors",
                "Checksum mismatches seen by reads and scrubs since start",
            ),
            pool_gathered_reads: g(
                "pool_gathered_reads",
                "Pool reads that fetched a window of scattered blocks with one I/O (an overwritten layout) since start",
            ),
            io_polled_work: g(
                "io_polled_work",
                "Times the store's I/O thread found work while polling instead of sleeping (--poll-us) since start",
            ),
            io_read_depth_limit: g(
                "io_read_depth_limit",
                "Reads the I/O engine lets the disk hold at once, found by measuring the rate of completed reads (0: not limited)",
            ),
            io_reads_held: g(
                "io_reads_held",
                "Reads that waited in the I/O engine for that limit since start",
            ),
            pool_deferred_writes: g(
                "pool_deferred_writes",
                "Writes answered once their data was in the metadata commit, before it reached the pool (--defer-max), since start",
            ),
            pool_deferred_bytes: g(
                "pool_deferred_bytes",
                "Deferred writes' bytes whose records are still in the catalog (in the pool once the next pool sync is done)",
            ),
            pool_io_errors: g(
                "pool_io_errors",
                "Pool reads, writes and syncs the disk failed since start (a deferred write's pool write among them: its data is read from its record until the next start writes it)",
            ),
            map_cache_entries: g(
                "map_cache_entries",
                "Block-map entries cached in front of the catalog",
            ),
            map_cache_capacity: g(
                "map_cache_capacity_entries",
                "Block-map entries the cache holds at most (--map-cache-size)",
            ),
            map_cache_hits: g(
                "map_cache_hits",
                "Block-map lookups the cache answered since start",
            ),
            map_cache_misses: g(
                "map_cache_misses",
                "Block-map lookups that went to the catalog (RocksDB) since start: many against hits means the cache is smaller than the hot data",
            ),
            io_engine,
            io_registered_buffer_bytes: g(
                "io_registered_buffer_bytes",
                "Buffer bytes registered with io_uring (0: every I/O pins its pages; RLIMIT_MEMLOCK or CAP_IPC_LOCK)",
            ),
            nbd_buffered_bytes: g(
                "nbd_buffered_bytes",
                "Request and reply payload bytes held in memory, all NBD connections",
            ),
            nbd_handshakes: g("nbd_handshakes", "NBD connections in the handshake"),
            nbd_connections: g("nbd_connections", "NBD connections, all phases"),
            nbd_connections_refused: must(IntCounter::new(
                "nbd_connections_refused_total",
                "NBD connections closed at accept because a connection limit was reached",
            )),
        };
        let r = &m.registry;
        must(r.register(Box::new(m.ops.clone())));
        must(r.register(Box::new(m.bytes.clone())));
        must(r.register(Box::new(m.errors.clone())));
        must(r.register(Box::new(m.latency.clone())));
        must(r.register(Box::new(m.checksum_errors.clone())));
        must(r.register(Box::new(m.throttled.clone())));
        must(r.register(Box::new(m.connections.clone())));
        must(r.register(Box::new(m.io_engine.clone())));
        for gauge in [
            &m.pool_total_bytes,
            &m.pool_used_bytes,
            &m.pool_pending_free_bytes,
            &m.volumes,
            &m.snapshots,
            &m.pool_checksum_errors,
            &m.pool_gathered_reads,
            &m.io_polled_work,
            &m.io_read_depth_limit,
            &m.io_reads_held,
            &m.pool_deferred_writes,
            &m.pool_deferred_bytes,
            &m.pool_io_errors,
            &m.map_cache_entries,
            &m.map_cache_capacity,
            &m.map_cache_hits,
            &m.map_cache_misses,
            &m.io_registered_buffer_bytes,
            &m.nbd_buffered_bytes,
            &m.nbd_handshakes,
            &m.nbd_connections,
        ] {
            must(r.register(Box::new(gauge.clone())));
        }
        must(r.register(Box::new(m.nbd_connections_refused.clone())));
        m
    }

    pub fn volume(&self, volume: &str) -> VolumeMetrics {
        let op = OPS.map(|op| OpMetrics {
            ops: self.ops.with_label_values(&[volume, op]),
            bytes: self.bytes.with_label_values(&[volume, op]),
            errors: self.errors.with_label_values(&[volume, op]),
            latency: self.latency.with_label_values(&[volume, op]),
        });
        VolumeMetrics {
            op,
            checksum_errors: self.checksum_errors.with_label_values(&[volume]),
            throttled_micros: self.throttled.with_label_values(&[volume]),
            connections: self.connections.with_label_values(&[volume]),
        }
    }

    /// Drops a deleted volume's series.
    pub fn forget(&self, volume: &str) {
        for op in OPS {
            let _ = self.ops.remove_label_values(&[volume, op]);
            let _ = self.bytes.remove_label_values(&[volume, op]);
            let _ = self.errors.remove_label_values(&[volume, op]);
            let _ = self.latency.remove_label_values(&[volume, op]);
        }
        let _ = self.checksum_errors.remove_label_values(&[volume]);
        let _ = self.throttled.remove_label_values(&[volume]);
        let _ = self.connections.remove_label_values(&[volume]);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `GET /metrics` until `stop` fires. `refresh` runs before each scrape
/// (it updates the pool gauges). One request per connection, bounded headers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let head = loop {
                let r = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[n..]),
                )
                .await;
                match r {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
                if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                    break String::from_utf8_lossy(&buf[..end]).to_string();
                }
                if n == buf.len() {
                    return;
                }
            };
            let line = head.lines().next().unwrap_or("");
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) =
                if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                    refresh();
                    ("200 OK", "text/plain; version=0.0.4", metrics.encode())
                } else if method == "GET" && path == "/healthz" {
                    ("200 OK", "text/plain", b"ok\n".to_vec())
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        b"try GET /metrics\n".to_vec(),
                    )
                };
            let hdr = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(hdr.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_volume_series_appear_in_the_text_format_and_go_with_the_volume() {
        let m = Metrics::new();
        let v = m.volume("db");
        v.op[0].ops.inc();
        v.op[0].bytes.inc_by(4096);
        v.op[0].latency.observe(0.0002);
        v.checksum_errors.inc();
        m.pool_total_bytes.set(1 << 30);
        let text = String::from_utf8(m.encode()).expect("utf8");
        assert!(
            text.contains("berth_volume_requests_total{op=\"read\",volume=\"db\"} 1"),
            "{text}"
        );
        assert!(text.contains("berth_volume_bytes_total{op=\"read\",volume=\"db\"} 4096"));
        assert!(text.contains("berth_volume_checksum_errors_total{volume=\"db\"} 1"));
        assert!(text.contains("berth_pool_capacity_bytes 1073741824"));
        assert!(text.contains("berth_volume_request_seconds_bucket"));
        m.forget("db");
        let text = String::from_utf8(m.encode()).expect("utf8");
        assert!(!text.contains("volume=\"db\""));
    }
}
