# syntax=docker/dockerfile:1
#
# One image for every Berth program: `berth` (volume-server, metadata, csi,
# standalone, attach) and `berthctl`, as ghcr.io/berth-storage/berth:VERSION
# (the workspace version; deploy/ uses 0.1.0).
#
#   docker build -t ghcr.io/berth-storage/berth:0.1.0 .
#
# Built and smoke-tested by scripts/image.sh (docker, or podman/buildah; with
# local base images made from Debian's packages where no registry is
# reachable), which also runs the runtime stage alone on binaries built
# outside (--prebuilt DIR, the test in scripts/test.sh). Pinned base images
# (pin them by digest too when publishing, `docker buildx imagetools inspect
# IMAGE`), a non-root default user, no secrets (nothing is fetched with
# credentials and no token or key is copied in; see .dockerignore).

# Where the runtime stage takes the binaries from: "build" (compiled below) or
# "prebuilt" (a prebuilt/ folder in the build context).
ARG BINARIES=build

# ---- build ------------------------------------------------------------------
# The toolchain the workspace is tested with (rust-version 1.87 is the floor).
FROM rust:1.95.0-bookworm AS build
ARG DEBIAN_FRONTEND=noninteractive
# The same package list as every other build (scripts/deps.sh build): RocksDB's
# C++ and bindings, protoc and the well-known .proto files.
COPY scripts/deps.sh /usr/local/bin/berth-deps
RUN bash /usr/local/bin/berth-deps build && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace: cargo needs every member's manifest even to build one
# package. Cargo.lock pins every crate (--locked).
COPY . .
# The caches keep the registry and RocksDB's build between builds (BuildKit,
# buildah); the binaries are copied out of the cached target directory in the
# same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p berth-cli --bins \
 && install -D -m 0755 -t /out target/release/berth target/release/berthctl

# ---- prebuilt ---------------------------------------------------------------
# Binaries built outside the image (same Debian release, same glibc).
FROM scratch AS prebuilt
COPY prebuilt/berth prebuilt/berthctl /out/

FROM ${BINARIES} AS binaries

# ---- runtime ----------------------------------------------------------------
# The same Debian release as the builder (glibc and libstdc++ match).
FROM debian:12.13-slim AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# What the node plugin runs (csi/src/node: fusermount3, losetup, mount,
# umount, blkid, mkfs.ext4, mkfs.xfs, resize2fs, xfs_growfs, dd), NBD tools for
# admins (nbdinfo/nbdcopy/nbdfuse, nbd-client) and ca-certificates: the
# runtime set of scripts/deps.sh. The volume server and the metadata service
# need nothing beyond glibc and libstdc++.
COPY scripts/deps.sh /tmp/berth-deps
RUN bash /tmp/berth-deps runtime && rm -rf /var/lib/apt/lists/* /tmp/berth-deps
# A fixed uid/gid (10001), which deploy/ names in runAsUser and in the
# volume server's chown of its host directories.
RUN groupadd --system --gid 10001 berth \
 && useradd --system --uid 10001 --gid berth --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin berth
COPY --from=binaries /out/berth /out/berthctl /usr/local/bin/
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
