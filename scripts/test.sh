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

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the `berth` and `berthctl` programs from the
# target directory, which outlives checkouts: build them from this one first
# (cargo test alone rebuilds only the binaries of packages with tests).
# --all-targets, not --bins: the same targets as cargo test's, so the same
# features of the build-time crates, so RocksDB's C++ (15 minutes) is built
# once for both; with --bins a fresh machine built it a third time.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The block store again on the pread/pwrite fallback engine (no io_uring).
BERTH_IO_ENGINE=sync cargo test -p berth-store --locked --lib --tests
