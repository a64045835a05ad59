//! `berth-bench run --quick` as CI runs it: a smoke test that the harness
//! starts every target, measures every workload, and writes its JSON and
//! plots, and Berth's own features (copy-on-write, creation time, tiers,
//! priority, checksums, CSI rates). It checks that the harness works, not
//! how fast anything is.

use std::path::Path;
use std::process::Command;

fn have(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

#[test]
fn a_quick_run_measures_every_target_workload_and_feature_and_writes_json_and_plots() {
    let berth = Path::new(env!("CARGO_BIN_EXE_berth-bench")).with_file_name("berth");
    if !berth.exists() || !have("fio") {
        // scripts/test.sh builds the programs and installs fio first.
        panic!(
            "needs {} (cargo build --bins) and fio on PATH",
            berth.display()
        );
    }
    // O_DIRECT needs a real filesystem (not tmpfs): under /var/tmp.
    let scratch = tempfile::tempdir_in("/var/tmp").expect("scratch");
    let out = tempfile::tempdir().expect("out");
    let r = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .args(["run", "--quick", "--dir"])
        .arg(scratch.path().join("run"))
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run berth-bench");
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "berth-bench run --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let folder = std::fs::read_dir(out.path())
        .expect("results")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .expect("a run folder")
        .path();
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("run.json")).expect("run.json"))
            .expect("json");
    let workloads: Vec<&str> = doc["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(workloads.len(), 9, "{workloads:?}");
    let skipped: Vec<&str> = doc["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .filter_map(|s| s["target"].as_str())
        .collect();
    let mut must = vec!["raw", "berth-unix", "berth-tcp"];
    // What pods get (FUSE and a loop device) where the machine allows it.
    // SAFETY: geteuid has no preconditions.
    if Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0 {
        must.extend(["pod", "pod-nbd"]);
    } else {
        assert!(skipped.contains(&"pod"), "pod neither measured nor skipped");
    }
    // A peer is measured wherever it is installed; skipped, with its
    // reason, only where it is not.
    for (peer, program) in [("qemu-nbd", "qemu-nbd"), ("nbdkit", "nbdkit")] {
        if have(program) {
            must.push(peer);
        } else {
            assert!(
                skipped.contains(&peer),
                "{peer} neither measured nor skipped"
            );
        }
    }
    let cells = doc["cells"].as_array().expect("cells");
    for t in &must {
        assert!(!skipped.contains(t), "{t} was skipped: {}", doc["skipped"]);
        for w in &workloads {
            let c = cells
                .iter()
                .find(|c| c["target"] == *t && c["workload"] == *w)
                .unwrap_or_else(|| panic!("no measurement of {w} on {t}"));
            let m = &c["median"];
            assert!(m["iops"].as_f64().unwrap_or(0.0) > 0.0, "{t} {w}: {m}");
            assert!(m["p99_us"].as_f64().unwrap_or(0.0) > 0.0, "{t} {w}: {m}");
            assert!(
                m["p999_us"].as_f64().unwrap_or(0.0) >= m["p99_us"].as_f64().unwrap_or(0.0),
                "{t} {w}: {m}"
            );
            if t.starts_with("berth") {
                assert!(
                    m["cpu_us_per_io"].as_f64().unwrap_or(0.0) > 0.0,
                    "{t} {w}: {m}"
                );
            }
        }
    }
    let compass = doc["compass"].as_array().expect("compass");
    assert_eq!(compass.len(), 12);
    // The pod path's targets are judged whenever pod was measured.
    if must.contains(&"pod") {
        for c in compass.iter().filter(|c| {
            c["check"]
                .as_str()
                .is_some_and(|s| s.contains("pod / raw") && s.contains("qd"))
        }) {
            assert!(c["met"].is_boolean(), "{c}");
        }
    }
    assert!(doc["idle_cpu_percent"].as_f64().is_some());
    assert!(stdout.contains("berth-unix / qemu-nbd") || !must.contains(&"qemu-nbd"));
    for plot in ["iops-4k.svg", "p99-4k.svg", "throughput-1m.svg"] {
        let svg = std::fs::read_to_string(folder.join(plot)).expect(plot);
        assert!(svg.contains("<svg"), "{plot} is not SVG");
        for t in &must {
            assert!(svg.contains(t), "{plot} has no series for {t}");
        }
    }
    check_features(&doc["features"], &folder);
}

/// The feature section of a quick run: every measurement present.
fn check_features(f: &serde_json::Value, folder: &Path) {
    let rows = |k: &str| f[k].as_array().cloned().unwrap_or_default();
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    // Three kinds of volume, two workloads each, all measured.
    let cow = rows("cow");
    assert_eq!(cow.len(), 6, "{cow:?}");
    for r in &cow {
        assert!(num(&r["median"], "iops") > 0.0, "{r}");
    }
    // Snapshot and clone, each timed on the small and the large volume.
    let creation = rows("creation");
    assert_eq!(creation.len(), 4, "{creation:?}");
    for r in &creation {
        assert!(num(r, "p50_ms") > 0.0 && num(r, "samples") >= 3.0, "{r}");
    }
    // Every limited tier reports its limit and what it achieved.
    let tiers = rows("tiers");
    assert_eq!(tiers.len(), 4, "{tiers:?}");
    for t in tiers.iter().filter(|t| t["iops_limit"].as_u64() != Some(0)) {
        assert!(num(t, "iops") > 0.0 && num(t, "iops_ratio") > 0.0, "{t}");
        assert!(num(t, "bytes_ratio") > 0.0, "{t}");
    }
    let priority = rows("priority");
    assert_eq!(priority.len(), 3, "{priority:?}");
    assert!(priority[1..].iter().all(|p| num(p, "flood_iops") > 0.0));
    assert!(f["checksums"]["scrub_blocks"].as_u64().unwrap_or(0) > 0);
    assert_eq!(f["checksums"]["scrub_errors"].as_u64(), Some(0));
    // Four CSI phases at two concurrencies, none with errors.
    let csi = rows("csi");
    assert_eq!(csi.len(), 8, "{csi:?}");
    for p in &csi {
        assert_eq!(p["errors"].as_u64(), Some(0), "{p}");
        assert!(num(p, "per_second") > 0.0, "{p}");
    }
    // A's reads alone, then beside each B's snapshot and deletes: each B's
    // space came back within the measurement.
    let isolation = rows("isolation");
    assert_eq!(isolation.len(), 3, "{isolation:?}");
    for r in &isolation {
        assert!(num(r, "iops") > 0.0 && num(r, "max_us") > 0.0, "{r}");
    }
    for r in &isolation[1..] {
        assert!(num(r, "delete_volume_ms") > 0.0, "{r}");
        assert!(r["reclaim_s"].as_f64().is_some(), "{r}");
    }
    // Two creation checks, two per limited tier (three of them), one per B.
    assert_eq!(rows("checks").len(), 10);
    for plot in ["tiers-iops.svg", "tiers-throughput.svg", "cow-iops.svg"] {
        let svg = std::fs::read_to_string(folder.join(plot)).expect(plot);
        assert!(svg.contains("<svg"), "{plot} is not SVG");
    }
}
