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

# The base images (scripts/image.sh passes local stand-ins where no registry
# is reachable; publish only what is built on these).
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG DEBIAN_IMAGE=debian:12.13-slim

# ---- build ------------------------------------------------------------------
# The toolchain the workspace is tested with (rust-version 1.87 is the floor).
FROM ${RUST_IMAGE} AS build
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
# same step. host-ca is an optional build secret: the CA bundle of a host
# whose way to crates.io passes a TLS-inspecting proxy (scripts/image.sh
# passes it); a secret is mounted for this step only, never kept in a layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    --mount=type=secret,id=host-ca \
    if [ -s /run/secrets/host-ca ]; then export CARGO_HTTP_CAINFO=/run/secrets/host-ca; fi \
 && cargo build --release --locked -p berth-cli --bins \
 && install -D -m 0755 -t /out target/release/berth target/release/berthctl

# ---- runtime ----------------------------------------------------------------
# The same Debian release as the builder (glibc and libstdc++ match).
FROM ${DEBIAN_IMAGE} AS runtime-base
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

# ---- the image ----------------------------------------------------------------
# `--target prebuilt` instead takes berth and berthctl from a prebuilt/ folder
# in the build context (binaries built on Debian 12 outside the image:
# scripts/image.sh --prebuilt, the test on CI's build); the default target
# compiles them in the build stage. Both are the same base, the same COPY.
FROM runtime-base AS prebuilt
COPY prebuilt/berth prebuilt/berthctl /usr/local/bin/

FROM runtime-base AS runtime
COPY --from=build /out/berth /out/berthctl /usr/local/bin/
