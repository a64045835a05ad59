#!/usr/bin/env bash
# Installs the Debian packages Berth builds and tests with (sourced by run.sh and
# test.sh): clang/libclang for RocksDB's bindings, protoc for the gRPC APIs, fio
# for the benchmarks, and the real NBD clients and filesystem tools the
# end-to-end tests drive: qemu-io/qemu-nbd (qemu-utils), nbdfuse/nbdcopy/nbdinfo
# (libnbd-bin, fuse3), nbdkit, mkfs.ext4/e2fsck (e2fsprogs), xfsprogs, losetup,
# and openssl s_client (a TLS client without a certificate, in the TLS tests).
packages=(build-essential clang libclang-dev pkg-config protobuf-compiler fio
  qemu-utils libnbd-bin nbdkit fuse3 e2fsprogs xfsprogs util-linux openssl)
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
