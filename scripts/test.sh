#!/usr/bin/env bash
# Installs what Berth's tests need (Debian 12) and runs every test:
# formatting, clippy with warnings as errors, and the whole workspace's tests
# (unit, property, corruption, concurrency, and the 200-cycle kill -9 harness),
# then the block store's tests once more on the fallback I/O engine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: clang/libclang for RocksDB's bindings, protoc for the gRPC
# APIs, fio for the benchmarks, and the real NBD clients and filesystem tools the
# end-to-end tests drive: qemu-io (qemu-utils), nbdfuse/nbdcopy/nbdinfo
# (libnbd-bin, fuse3), nbdkit, mkfs.ext4/e2fsck (e2fsprogs), xfsprogs, losetup.
packages=(build-essential clang libclang-dev pkg-config protobuf-compiler fio
  qemu-utils libnbd-bin nbdkit fuse3 e2fsprogs xfsprogs util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi

# RocksDB's C++ takes minutes to build: keep build output where it survives.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/berth-target}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The block store again on the pread/pwrite fallback engine (no io_uring).
BERTH_IO_ENGINE=sync cargo test -p berth-store --locked --lib --tests
