# syntax=docker/dockerfile:1
#
# One image for every Berth program: `berth` (volume-server, metadata, csi,
# standalone, attach) and `berthctl`, as ghcr.io/berth-storage/berth:VERSION
# (the workspace version; deploy/ uses 0.1.0).
#
#   docker build -t ghcr.io/berth-storage/berth:0.1.0 .
#
# NOT BUILT HERE: the machines Berth is developed on have a docker client but
# no Docker engine, so this file has never been built. What it claims is what
# it was written to do, checked only by reading: pinned base images (pin them
# by digest too when publishing, `docker buildx imagetools inspect IMAGE`;
# the digests are not recorded here because no registry was reachable), a
# non-root default user, no secrets (nothing is fetched with credentials and
# no token or key is copied in; see .dockerignore).

# ---- build ------------------------------------------------------------------
# The toolchain the workspace is tested with (rust-version 1.85 is the floor).
FROM rust:1.95.0-bookworm AS build
ARG DEBIAN_FRONTEND=noninteractive
# RocksDB's C++ (librocksdb-sys: clang and libclang for its bindings) and
# protoc for the gRPC APIs (proto/build.rs uses the system's protoc).
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev pkg-config protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace: cargo needs every member's manifest even to build one
# package. Cargo.lock pins every crate (--locked).
COPY . .
# The caches keep the registry and RocksDB's build between builds (BuildKit);
# the binaries are copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p berth-cli --bins \
 && install -D -m 0755 -t /out target/release/berth target/release/berthctl

# ---- runtime ----------------------------------------------------------------
# The same Debian release as the builder (glibc and libstdc++ match).
FROM debian:12.13-slim
ARG DEBIAN_FRONTEND=noninteractive
# What the node plugin runs (csi/src/node: fusermount3, losetup, mount,
# umount, blkid, mkfs.ext4, mkfs.xfs, resize2fs, xfs_growfs, dd) and NBD
# tools for admins: nbdinfo/nbdcopy/nbdfuse (libnbd-bin) to inspect or copy
# an export, nbd-client for nodes whose kernel has an NBD client.
# ca-certificates for TLS endpoints. The volume server and the metadata
# service need nothing beyond glibc and libstdc++.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates \
      e2fsprogs \
      fuse3 \
      libnbd-bin \
      mount \
      nbd-client \
      util-linux \
      xfsprogs \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid (10001), which deploy/ names in runAsUser and in the
# volume server's chown of its host directories.
RUN groupadd --system --gid 10001 berth \
 && useradd --system --uid 10001 --gid berth --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin berth
COPY --from=build /out/berth /out/berthctl /usr/local/bin/
# Non-root by default: the volume server (on a pool file), the metadata
# service and the CSI controller need no privilege and run as this user. The
# CSI node plugin cannot: it mounts filesystems for kubelet, attaches loop
# devices and FUSE mounts, and runs mkfs on block devices, which needs root
# and a privileged container; its manifest (deploy/06-csi-node.yaml) says so
# with runAsUser: 0 and privileged: true. So does a volume server given a raw
# disk as its pool (device access).
USER 10001:10001
ENTRYPOINT ["berth"]
CMD ["--help"]
