//! The container image's runtime stage, on the binaries this build made: the
//! Dockerfile's runtime stage built with them (`scripts/image.sh --prebuilt`)
//! and smoke-tested by podman or docker: the image's tools and user, `berth
//! standalone` as uid 10001 under the project's seccomp profile on io_uring
//! with registered buffers, an NBD round trip from qemu-io on the host, a clean
//! SIGTERM. The whole multi-stage build is the long run (README: "The image").

use std::path::Path;
use std::process::Command;

use berth_tests::server::{binary, have};

#[test]
fn the_runtime_stage_serves_nbd_on_io_uring_as_uid_10001() {
    assert!(
        have("podman") || have("docker"),
        "a container engine is needed: scripts/deps.sh installs podman"
    );
    let berth = binary("berth");
    binary("berthctl");
    let bins = berth.parent().expect("binary folder");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let out = Command::new(repo.join("scripts/image.sh"))
        .arg("--prebuilt")
        .arg(bins)
        .args(["--tag", "localhost/berth:test"])
        .output()
        .expect("run scripts/image.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "image.sh failed:\n{stdout}\n{stderr}");
    for line in [
        "uid 10001, every library found, node plugin tools present",
        "engine: io_uring under the project's seccomp profile",
        "nbd round trip: ok",
        "SIGTERM: clean exit",
        "smoke test passed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // Under a container's 8 MiB RLIMIT_MEMLOCK and no CAP_IPC_LOCK, part of the
    // arena is registered, not none.
    let registered: u64 = stdout
        .split("registered buffers: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("registered buffers reported");
    assert!(registered >= 1, "registered {registered} MiB:\n{stdout}");
    eprintln!("{stdout}");
}
