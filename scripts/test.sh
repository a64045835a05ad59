#!/usr/bin/env bash
# Installs what Berth's tests need (Debian 12) and runs every test: formatting,
# clippy with warnings as errors, and the whole workspace's tests (unit,
# property, corruption, concurrency, the 200-cycle kill -9 harness, the volume
# server in-process and fuzzed, and as a real process driven by qemu-io,
# nbdfuse + a loop device + ext4, nbdcopy and berthctl, with kill -9 under NBD
# load; the metadata service with three volume servers; the CSI driver on
# `berth standalone` with real mounts; the Kubernetes manifests), then the
# block store's tests once more on the fallback I/O engine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# The image test (tests/tests/image.rs) needs a container engine.
berth_deps image

cargo fmt --all -- --check
# The workspace-hack crate must match the dependency graph, or some cargo
# command resolves other features and builds RocksDB's C++ again
# (workspace-hack/README.md). .ci/run installs cargo-hakari.
if command -v cargo-hakari >/dev/null; then
  cargo hakari generate --diff
  cargo hakari manage-deps --dry-run
else
  echo "SKIP workspace-hack check: cargo-hakari is not installed (cargo install cargo-hakari --version 0.9.39 --locked)"
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the `berth` and `berthctl` programs from the
# target directory, which outlives checkouts: build them from this one first
# (cargo test alone rebuilds only the binaries of packages with tests).
# Every cargo command here and in run.sh resolves the same features (the
# workspace-hack crate), so RocksDB's C++ (15 minutes) is built once.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The block store again on the pread/pwrite fallback engine (no io_uring).
BERTH_IO_ENGINE=sync cargo test -p berth-store --locked --lib --tests
