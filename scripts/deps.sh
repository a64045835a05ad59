#!/usr/bin/env bash
# The Debian packages Berth needs, listed once, by purpose:
#
#   build    RocksDB's C++ and its bindings (build-essential, clang, libclang),
#            protoc and the well-known .proto files for the gRPC APIs
#            (protobuf-compiler, libprotobuf-dev: google/protobuf/*.proto).
#   test     the benchmarks (fio) and the real clients and tools the
#            end-to-end tests drive: qemu-io/qemu-nbd (qemu-utils),
#            nbdfuse/nbdcopy/nbdinfo (libnbd-bin, fuse3), nbdkit, mkfs.ext4
#            (e2fsprogs), xfsprogs, losetup/setpriv/prlimit (util-linux), openssl
#            s_client.
#   image    a container engine for scripts/image.sh and the image test:
#            mmdebstrap (base images where no registry is reachable), and
#            podman with runc unless a Docker engine answers (Docker's
#            containerd.io package conflicts with Debian's runc: nothing of
#            Docker's is replaced).
#   runtime  what the image's programs call (csi/src/node: fusermount3,
#            losetup, mount, blkid, mkfs.*, resize2fs, xfs_growfs) and NBD
#            tools for admins; the Dockerfile's runtime stage installs these.
#
# Sourced by run.sh and test.sh: installs build and test, checks for cargo and
# exports CARGO_TARGET_DIR. Run as a program (the Dockerfile does), installs the
# sets named as arguments. build and runtime go without recommended packages,
# so that the image gets exactly these lists and CI builds with them too.
build=(build-essential clang libclang-dev pkg-config protobuf-compiler libprotobuf-dev)
test=(etcd-server fio qemu-utils libnbd-bin nbdkit fuse3 e2fsprogs xfsprogs util-linux openssl)
runtime=(ca-certificates e2fsprogs fuse3 libnbd-bin mount nbd-client util-linux xfsprogs)

berth_deps_install() {
  local recommends=$1
  shift
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  echo "installing: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  local flags=(-y -qq)
  [ "$recommends" = yes ] || flags+=(--no-install-recommends)
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install "${flags[@]}" "${missing[@]}"
}

berth_deps() {
  local set
  for set in "$@"; do
    case "$set" in
      build) berth_deps_install no "${build[@]}" ;;
      test) berth_deps_install yes "${test[@]}" ;;
      runtime) berth_deps_install no "${runtime[@]}" ;;
      image)
        if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
          berth_deps_install yes mmdebstrap
        elif dpkg-query -W -f='${Status}' containerd.io 2>/dev/null | grep -q "install ok installed"; then
          berth_deps_install yes podman mmdebstrap
        else
          berth_deps_install yes podman runc mmdebstrap
        fi
        ;;
      *) echo "deps.sh: unknown set $set (build, test, image, runtime)" >&2; return 2 ;;
    esac
  done
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: the caller's arguments are its own, not sets.
  berth_deps build test || return
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again" >&2
    return 1
  fi
  # RocksDB's C++ takes minutes to build: keep build output where it survives.
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/berth-target}"
else
  set -euo pipefail
  berth_deps "${@:-build}"
fi
