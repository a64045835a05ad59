//! Performance tiers and StorageClass parameters.
//!
//! A tier is a named QoS policy: IOPS and throughput that scale with the
//! volume's size up to a cap, a burst, a priority class the volume servers
//! schedule by, a default filesystem and the pool media it may use. The
//! defaults below can be replaced or extended by a JSON file (`--tiers`).
//! A volume's parameters pick a tier and may override its limits.

use std::collections::BTreeMap;

use berth_catalog::records::QosRecord;
use serde::{Deserialize, Serialize};

use crate::error::{MetaError, Result};

const GIB: f64 = (1u64 << 30) as f64;
const MB: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tier {
    pub name: String,
    pub description: String,
    pub iops_base: u64,
    pub iops_per_gib: u64,
    /// 0: no cap.
    pub iops_cap: u64,
    pub bytes_per_second_base: u64,
    pub bytes_per_second_per_gib: u64,
    pub bytes_per_second_cap: u64,
    pub burst_seconds: f64,
    /// 0 is served first when a pool is saturated; 0, 1 or 2.
    pub priority: u32,
    pub fs_type: String,
    /// Pool media this tier may use; empty: any.
    pub media: Vec<String>,
}

impl Default for Tier {
    fn default() -> Self {
        Tier {
            name: String::new(),
            description: String::new(),
            iops_base: 0,
            iops_per_gib: 0,
            iops_cap: 0,
            bytes_per_second_base: 0,
            bytes_per_second_per_gib: 0,
            bytes_per_second_cap: 0,
            burst_seconds: 1.0,
            priority: 2,
            fs_type: "ext4".into(),
            media: Vec::new(),
        }
    }
}

/// The volume servers schedule three priority classes, named like the
/// built-in tiers; a configured tier runs in the class of its priority.
pub fn server_class(priority: u32) -> &'static str {
    match priority {
        0 => "extreme",
        1 => "premium",
        _ => "standard",
    }
}

pub fn default_tiers() -> Vec<Tier> {
    vec![
        Tier {
            name: "standard".into(),
            description: "everyday read-write work, CI/CD".into(),
            iops_base: 3_000,
            iops_per_gib: 10,
            iops_cap: 16_000,
            bytes_per_second_base: 125 * MB,
            bytes_per_second_per_gib: MB / 4,
            bytes_per_second_cap: 500 * MB,
            priority: 2,
            fs_type: "ext4".into(),
            ..Tier::default()
        },
        Tier {
            name: "premium".into(),
            description: "databases: low latency, served before standard".into(),
            iops_base: 10_000,
            iops_per_gib: 50,
            iops_cap: 80_000,
            bytes_per_second_base: 250 * MB,
            bytes_per_second_per_gib: MB,
            bytes_per_second_cap: 2_000 * MB,
            priority: 1,
            fs_type: "xfs".into(),
            ..Tier::default()
        },
        Tier {
            name: "extreme".into(),
            description: "unlimited, served first".into(),
            priority: 0,
            fs_type: "xfs".into(),
            ..Tier::default()
        },
    ]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    tiers: Vec<Tier>,
}

/// The tiers in force: the defaults, with those named in `json` replaced and
/// new ones added.
pub fn load(json: Option<&str>) -> Result<Vec<Tier>> {
    let mut tiers = default_tiers();
    if let Some(json) = json {
        let f: TierFile = serde_json::from_str(json)
            .map_err(|e| MetaError::InvalidArgument(format!("tier configuration: {e}")))?;
        for t in f.tiers {
            if t.name.is_empty() {
                return Err(MetaError::InvalidArgument(
                    "tier configuration: a tier has no name".into(),
                ));
            }
            if t.priority > 2 {
                return Err(MetaError::InvalidArgument(format!(
                    "tier {}: priority {} (accepted: 0, 1, 2)",
                    t.name, t.priority
                )));
            }
            check_fs(&t.fs_type)
                .map_err(|e| MetaError::InvalidArgument(format!("tier {}: {e}", t.name)))?;
            match tiers.iter_mut().find(|x| x.name == t.name) {
                Some(x) => *x = t,
                None => tiers.push(t),
            }
        }
    }
    Ok(tiers)
}

fn check_fs(fs: &str) -> std::result::Result<(), String> {
    match fs {
        "ext4" | "xfs" => Ok(()),
        other => Err(format!("fsType {other:?} (accepted: ext4, xfs)")),
    }
}

fn scaled(base: u64, per_gib: u64, cap: u64, size_bytes: u64) -> u64 {
    if base == 0 && per_gib == 0 {
        return 0;
    }
    let v = base.saturating_add((per_gib as f64 * size_bytes as f64 / GIB) as u64);
    if cap == 0 {
        v
    } else {
        v.min(cap)
    }
}

/// The keys a volume's parameters may carry.
pub const PARAMETER_KEYS: &str =
    "tier, fsType, maxIops, maxMBps, iopsPerGiB, burstSeconds, replicas, replicaSpread, media, csi.storage.k8s.io/*";
/// Of those, what ModifyVolume may change on a live volume.
pub const MUTABLE_KEYS: &str = "tier, maxIops, maxMBps, iopsPerGiB, burstSeconds";

/// What a volume's parameters resolve to.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub tier: Tier,
    pub max_iops: Option<u64>,
    pub max_bytes_per_second: Option<u64>,
    pub iops_per_gib: Option<u64>,
    pub burst_seconds: Option<f64>,
    pub fs_type: String,
    /// Pool media allowed: the parameter's, else the tier's.
    pub media: Vec<String>,
    /// Copies on distinct nodes (1 to 3).
    pub replicas: usize,
    /// A topology label whose values the replicas must all differ in
    /// (`replicaSpread: zone` is `topology.kubernetes.io/zone`).
    pub spread: Option<String>,
}

/// The most copies a volume may have.
pub const MAX_REPLICAS: usize = 3;
/// The label `replicaSpread: zone` spreads over.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl Spec {
    /// The limits for a volume of `size_bytes`.
    pub fn qos(&self, size_bytes: u64) -> QosRecord {
        let t = &self.tier;
        QosRecord {
            tier: t.name.clone(),
            iops_limit: self.max_iops.unwrap_or_else(|| {
                scaled(
                    t.iops_base,
                    self.iops_per_gib.unwrap_or(t.iops_per_gib),
                    t.iops_cap,
                    size_bytes,
                )
            }),
            bytes_per_second_limit: self.max_bytes_per_second.unwrap_or_else(|| {
                scaled(
                    t.bytes_per_second_base,
                    t.bytes_per_second_per_gib,
                    t.bytes_per_second_cap,
                    size_bytes,
                )
            }),
            burst_seconds: self.burst_seconds.unwrap_or(t.burst_seconds),
            priority: t.priority,
        }
    }
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
    v.trim().parse().map_err(|_| {
        MetaError::InvalidArgument(format!(
            "parameter {key}={} is not a number",
            berth_proto::validate::quote(v)
        ))
    })
}

/// StorageClass parameters a volume may carry (Kubernetes passes a few of
/// its own, csi.storage.k8s.io/*, beside the StorageClass's).
const MAX_PARAMETERS: usize = 64;
/// The longest parameter key or value.
const MAX_PARAMETER_BYTES: usize = 1024;

/// Resolves parameters against the tiers; the first offending key is named.
pub fn resolve(tiers: &[Tier], params: &BTreeMap<String, String>) -> Result<Spec> {
    if params.len() > MAX_PARAMETERS {
        return Err(MetaError::InvalidArgument(format!(
            "{} parameters, more than {MAX_PARAMETERS}",
            params.len()
        )));
    }
    for (k, v) in params {
        if k.len() > MAX_PARAMETER_BYTES || v.len() > MAX_PARAMETER_BYTES {
            return Err(MetaError::InvalidArgument(format!(
                "parameter {}={} is longer than {MAX_PARAMETER_BYTES} bytes",
                berth_proto::validate::quote(k),
                berth_proto::validate::quote(v)
            )));
        }
    }
    let tier_name = params.get("tier").map_or("standard", String::as_str);
    let tier = tiers
        .iter()
        .find(|t| t.name == tier_name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
            MetaError::InvalidArgument(format!(
                "parameter tier={tier_name:?} is not a tier (accepted: {})",
                names.join(", ")
            ))
        })?;
    let mut spec = Spec {
        fs_type: tier.fs_type.clone(),
        media: tier.media.clone(),
        tier,
        max_iops: None,
        max_bytes_per_second: None,
        iops_per_gib: None,
        burst_seconds: None,
        replicas: 1,
        spread: None,
    };
    for (k, v) in params {
        match k.as_str() {
            "tier" => {}
            "fsType" => {
                check_fs(v).map_err(|e| MetaError::InvalidArgument(format!("parameter {e}")))?;
                spec.fs_type = v.clone();
            }
            "maxIops" => spec.max_iops = Some(number(k, v)?),
            "maxMBps" => spec.max_bytes_per_second = Some(number::<u64>(k, v)?.saturating_mul(MB)),
            "iopsPerGiB" => spec.iops_per_gib = Some(number(k, v)?),
            "burstSeconds" => {
                let b: f64 = number(k, v)?;
                if !(b > 0.0 && b <= 3600.0) {
                    return Err(MetaError::InvalidArgument(format!(
                        "parameter burstSeconds={v:?} must be above 0 and at most 3600"
                    )));
                }
                spec.burst_seconds = Some(b);
            }
            "replicas" => {
                spec.replicas = match v.trim().parse::<usize>() {
                    Ok(n) if (1..=MAX_REPLICAS).contains(&n) => n,
                    _ => {
                        return Err(MetaError::InvalidArgument(format!(
                            "parameter replicas={}: 1, 2 or 3 copies, each on its own node",
                            berth_proto::validate::quote(v)
                        )))
                    }
                }
            }
            "replicaSpread" => {
                spec.spread = match v.trim() {
                    "node" => None,
                    "zone" => Some(ZONE_LABEL.to_string()),
                    _ => {
                        return Err(MetaError::InvalidArgument(format!(
                            "parameter replicaSpread={}: node (the default: distinct nodes) \
                             or zone (distinct {ZONE_LABEL} values too)",
                            berth_proto::validate::quote(v)
                        )))
                    }
                }
            }
            "media" => spec.media = vec![v.clone()],
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => {
                return Err(MetaError::InvalidArgument(format!(
                    "unknown parameter {other:?} (accepted: {PARAMETER_KEYS})"
                )))
            }
        }
    }
    Ok(spec)
}

/// Checks that `changes` only touch what may change on a live volume.
pub fn check_mutable(changes: &BTreeMap<String, String>) -> Result<()> {
    for k in changes.keys() {
        if !matches!(
            k.as_str(),
            "tier" | "maxIops" | "maxMBps" | "iopsPerGiB" | "burstSeconds"
        ) {
            return Err(MetaError::InvalidArgument(format!(
                "parameter {k:?} cannot change on an existing volume (mutable: {MUTABLE_KEYS})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tiers_scale_with_size_up_to_their_caps() {
        let tiers = default_tiers();
        let std = resolve(&tiers, &params(&[])).expect("standard");
        let q = std.qos(100 << 30);
        assert_eq!(
            (q.tier.as_str(), q.iops_limit, q.priority),
            ("standard", 4_000, 2)
        );
        assert_eq!(q.bytes_per_second_limit, 150 * MB);
        assert_eq!(std.qos(10_000 << 30).iops_limit, 16_000);
        let ext = resolve(&tiers, &params(&[("tier", "extreme")])).expect("extreme");
        let q = ext.qos(1 << 40);
        assert_eq!(
            (q.iops_limit, q.bytes_per_second_limit, q.priority),
            (0, 0, 0)
        );
        assert_eq!(ext.fs_type, "xfs");
    }

    #[test]
    fn parameters_override_the_tier() {
        let tiers = default_tiers();
        let s = resolve(
            &tiers,
            &params(&[
                ("tier", "premium"),
                ("maxMBps", "300"),
                ("iopsPerGiB", "100"),
                ("fsType", "ext4"),
                ("csi.storage.k8s.io/pvc/name", "data-0"),
            ]),
        )
        .expect("resolve");
        let q = s.qos(10 << 30);
        assert_eq!(q.iops_limit, 11_000);
        assert_eq!(q.bytes_per_second_limit, 300 * MB);
        assert_eq!(s.fs_type, "ext4");
        assert_eq!(
            resolve(&tiers, &params(&[("maxIops", "500")]))
                .expect("r")
                .qos(1 << 30)
                .iops_limit,
            500
        );
    }

    #[test]
    fn bad_parameters_are_named_with_what_is_accepted() {
        let tiers = default_tiers();
        let msg = |kv: &[(&str, &str)]| resolve(&tiers, &params(kv)).expect_err("bad").to_string();
        let m = msg(&[("speed", "fast")]);
        assert!(m.contains("\"speed\"") && m.contains("maxIops"), "{m}");
        let m = msg(&[("tier", "gold")]);
        assert!(
            m.contains("gold") && m.contains("standard, premium, extreme"),
            "{m}"
        );
        assert!(msg(&[("maxIops", "lots")]).contains("maxIops"));
        assert!(msg(&[("fsType", "ntfs")]).contains("ntfs"));
        assert!(msg(&[("replicas", "4")]).contains("1, 2 or 3"));
        assert!(msg(&[("replicas", "0")]).contains("1, 2 or 3"));
        assert!(msg(&[("replicaSpread", "rack")]).contains("node (the default"));
        let three = resolve(
            &default_tiers(),
            &params(&[("replicas", " 3"), ("replicaSpread", "zone")]),
        )
        .expect("three copies");
        assert_eq!(
            (three.replicas, three.spread.as_deref()),
            (3, Some(ZONE_LABEL))
        );
        assert!(msg(&[("burstSeconds", "0")]).contains("burstSeconds"));
        assert!(check_mutable(&params(&[("fsType", "xfs")])).is_err());
        assert!(check_mutable(&params(&[("tier", "premium")])).is_ok());
    }

    #[test]
    fn configuration_replaces_and_adds_tiers() {
        let tiers = load(Some(
            r#"{"tiers": [
                {"name": "standard", "iops_base": 1000, "priority": 2},
                {"name": "bulk", "bytes_per_second_base": 50000000, "media": ["hdd"]}
            ]}"#,
        ))
        .expect("load");
        assert_eq!(tiers.len(), 4);
        let std = resolve(&tiers, &params(&[])).expect("std");
        assert_eq!(std.qos(0).iops_limit, 1000);
        let bulk = resolve(&tiers, &params(&[("tier", "bulk")])).expect("bulk");
        assert_eq!(bulk.media, ["hdd"]);
        assert!(load(Some(r#"{"tiers": [{"name": "x", "iops": 1}]}"#)).is_err());
        assert!(load(Some(r#"{"tiers": [{"name": "x", "priority": 7}]}"#)).is_err());
    }

    /// StorageClass parameters from outside, fuzzed: keys drawn from the
    /// accepted ones and anything else, values from near-misses of valid
    /// numbers to arbitrary Unicode. `resolve` never panics, and what it
    /// accepts holds: known keys only, numbers that parse, a burst in range,
    /// a file system it supports. `BERTH_FUZZ_CASES` sets the count.
    #[test]
    fn fuzzed_parameters_never_panic_and_accepted_ones_are_valid() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let n = std::env::var("BERTH_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000u32);
        let key = prop_oneof![
            Just("tier".to_string()),
            Just("fsType".to_string()),
            Just("maxIops".to_string()),
            Just("maxMBps".to_string()),
            Just("iopsPerGiB".to_string()),
            Just("burstSeconds".to_string()),
            Just("replicas".to_string()),
            Just("replicaSpread".to_string()),
            Just("csi.storage.k8s.io/pvc/name".to_string()),
            "\\PC{0,12}",
            ".{0,40}",
        ];
        let value = prop_oneof![
            Just("standard".to_string()),
            Just("premium".to_string()),
            Just("extreme".to_string()),
            Just("ext4".to_string()),
            Just("xfs".to_string()),
            Just("zone".to_string()),
            "[0-9]{1,25}",
            "-?[0-9]{0,5}(\\.[0-9]{0,5})?(e[+-]?[0-9]{1,3})?",
            Just("NaN".to_string()),
            Just("inf".to_string()),
            Just(" 1 ".to_string()),
            ".{0,64}",
            proptest::collection::vec(any::<u8>(), 0..32)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ];
        let tiers = default_tiers();
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::with_cases(n)
        });
        let accepted = std::cell::Cell::new(0u32);
        runner
            .run(&proptest::collection::btree_map(key, value, 0..6), |p| {
                if let Ok(spec) = resolve(&tiers, &p) {
                    accepted.set(accepted.get() + 1);
                    for (k, v) in &p {
                        match k.as_str() {
                            "maxIops" | "maxMBps" | "iopsPerGiB" => {
                                prop_assert!(v.trim().parse::<u64>().is_ok(), "{k}={v:?}")
                            }
                            "burstSeconds" => {
                                let b: f64 = v.trim().parse().expect("accepted");
                                prop_assert!(b > 0.0 && b <= 3600.0, "{v:?}");
                            }
                            "fsType" => prop_assert!(v == "ext4" || v == "xfs", "{v:?}"),
                            "replicas" => {
                                let n: usize = v.trim().parse().expect("accepted");
                                prop_assert!((1..=MAX_REPLICAS).contains(&n), "{v:?}");
                                prop_assert_eq!(spec.replicas, n);
                            }
                            "replicaSpread" => prop_assert!(matches!(v.trim(), "node" | "zone")),
                            "tier" => prop_assert_eq!(&spec.tier.name, v),
                            other => prop_assert!(
                                other.starts_with("csi.storage.k8s.io/"),
                                "unknown key {other:?} accepted"
                            ),
                        }
                    }
                }
                Ok(())
            })
            .expect("fuzzed parameters");
        eprintln!(
            "{n} fuzzed StorageClass parameter sets resolved ({} accepted)",
            accepted.get()
        );
        // The generator reaches valid sets too, so the checks above ran.
        assert!(accepted.get() > n / 20, "{} accepted", accepted.get());
    }
}
