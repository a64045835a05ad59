#!/usr/bin/env bash
# Builds Berth's container image from the Dockerfile and smoke-tests it, with
# whatever engine the machine has: docker (with a running engine) or podman.
#
#   scripts/image.sh                   the whole multi-stage build (RocksDB in
#                                      release: tens of minutes), then the smoke test
#   scripts/image.sh --prebuilt DIR    the runtime stage only, on DIR/berth and
#                                      DIR/berthctl (built on this Debian 12 host):
#                                      a minute; scripts/test.sh runs this
#   options: --tag IMAGE (default ghcr.io/berth-storage/berth:VERSION, or
#            localhost/berth:prebuilt with --prebuilt), --no-smoke,
#            --local-bases (make base images here even if a registry answers)
#
# Base images: used when present, pulled when a registry answers, otherwise
# made here from Debian's packages and tagged with the names the Dockerfile
# uses: debian:12.13-slim from `mmdebstrap --variant=minbase bookworm`, and
# rust:1.95.0-bookworm as that plus this machine's Rust 1.95.0 toolchain. They
# stand in for the official images (same Debian release and toolchain), they
# are not them: publish from the official ones.
#
# The smoke test runs, in the image: berth --version, berthctl --help, uid
# 10001, no missing shared library, every tool the node plugin calls; then
# `berth standalone` as uid 10001 under deploy/seccomp/berth-io-uring.json
# without extra capabilities, as deploy/ runs the volume server: the engine
# must be io_uring; the registered buffer bytes are reported; a volume is made
# with the image's berthctl and written and read back by qemu-io on this host
# through the NBD socket; SIGTERM must end it with status 0. It also reports
# the engine under the engine's default seccomp profile (most block io_uring).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

prebuilt=""
tag=""
smoke=yes
local_bases=no
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuilt) prebuilt=$(cd "$2" && pwd); shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-smoke) smoke=no; shift ;;
    --local-bases) local_bases=yes; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
if [ -z "$tag" ]; then
  if [ -n "$prebuilt" ]; then tag=localhost/berth:prebuilt; else tag=ghcr.io/berth-storage/berth:$version; fi
fi

fail() { echo "image.sh: FAIL: $*" >&2; exit 1; }
say() { echo "image.sh: $*"; }

# ---- the engine ---------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || fail "run this as root: the smoke test hands its data folder to uid 10001 and runs rootful containers"
bash scripts/deps.sh image
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null; then
  engine=podman
else
  fail "no container engine: install podman (apt-get install podman runc) or start Docker"
fi
run_flags=()
build_flags=()
if [ "$engine" = podman ]; then
  build_flags+=(--pull=never)
fi
# Where this host trusts certificate authorities of its own (a TLS-inspecting
# proxy between it and crates.io, say), cargo in the build must trust them
# too: the host's bundle goes in as the build secret host-ca, mounted for the
# cargo step only and kept in no layer.
if [ -n "$(ls /usr/local/share/ca-certificates 2>/dev/null)" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  build_flags+=(--secret id=host-ca,src=/etc/ssl/certs/ca-certificates.crt)
fi

tmp=$(mktemp -d /var/tmp/berth-image.XXXXXX)
smoke_name="berth-smoke-$$"
cleanup() {
  # One at a time: `rm -f A B` stops at A when A is already gone.
  local c
  for c in "$smoke_name" "$smoke_name-default"; do
    $engine rm -f "$c" >/dev/null 2>&1 || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---- base images --------------------------------------------------------------
# The official images when present or pullable; otherwise stand-ins made here,
# under localhost/berth-base/ so that they are never mistaken for the real ones.
debian_base=docker.io/library/debian:12.13-slim
rust_base=docker.io/library/rust:1.95.0-bookworm
stand_ins=""

have_image() { $engine image inspect "$1" >/dev/null 2>&1; }

make_debian() {
  command -v mmdebstrap >/dev/null || fail "mmdebstrap is needed to make $debian_base (apt-get install mmdebstrap)"
  say "making $1, a stand-in for $debian_base, from Debian's packages (mmdebstrap minbase bookworm)"
  mmdebstrap --variant=minbase --quiet bookworm "$tmp/debian.tar" http://deb.debian.org/debian
  $engine import --change 'CMD ["bash"]' "$tmp/debian.tar" "$1" >/dev/null
  rm -f "$tmp/debian.tar"
}

make_rust() {
  local have
  have=$(rustc --version 2>/dev/null | cut -d' ' -f2)
  [ "$have" = 1.95.0 ] || fail "making $rust_base needs this machine's rustc to be 1.95.0 (it is ${have:-missing})"
  say "making $1, a stand-in for $rust_base, from $debian_base and this machine's Rust $have"
  mkdir -p "$tmp/rust"
  cp -a "$(rustc --print sysroot)" "$tmp/rust/toolchain"
  rm -rf "$tmp/rust/toolchain/share/doc"
  cat > "$tmp/rust/Dockerfile" <<EOF
FROM $debian_base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc g++ libc6-dev make git \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version
EOF
  $engine build "${build_flags[@]}" "${run_flags[@]}" -t "$1" "$tmp/rust" >/dev/null
  rm -rf "$tmp/rust"
}

# Sets the variable named $1 to the official image $2, or to the stand-in $3
# (made by $4 if missing).
ensure_base() {
  local var=$1 image=$2 local_image=$3 maker=$4
  if [ "$local_bases" = no ] && { have_image "$image" || $engine pull -q "$image" >/dev/null 2>&1; }; then
    printf -v "$var" %s "$image"
    return 0
  fi
  have_image "$local_image" || $maker "$local_image"
  printf -v "$var" %s "$local_image"
  stand_ins="$stand_ins $local_image"
}

ensure_base debian_base "$debian_base" localhost/berth-base/debian:12.13-slim make_debian

# Some hosts refuse what the engine asks by default: a higher RLIMIT_NOFILE or
# RLIMIT_NPROC than this process may set (no CAP_SYS_RESOURCE), or crun with
# cgroups in hybrid mode. Keep the host's limits and use runc there.
if ! $engine run --rm "$debian_base" true >/dev/null 2>"$tmp/probe.err"; then
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
  [ "$nofile" = unlimited ] && nofile=1048576
  run_flags=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
  if [ "$engine" = podman ] && command -v runc >/dev/null; then
    engine="podman --runtime runc"
  fi
  $engine run --rm "${run_flags[@]}" "$debian_base" true >/dev/null 2>>"$tmp/probe.err" \
    || fail "$engine cannot run a container here: $(cat "$tmp/probe.err")"
  say "running containers with ${run_flags[*]} (${engine})"
fi

# ---- build --------------------------------------------------------------------
if [ -n "$prebuilt" ]; then
  for b in berth berthctl; do
    [ -x "$prebuilt/$b" ] || fail "$prebuilt/$b is missing: build it first (cargo build --workspace)"
  done
  ctx="$tmp/context"
  mkdir -p "$ctx/scripts" "$ctx/prebuilt"
  cp Dockerfile "$ctx/"
  cp scripts/deps.sh "$ctx/scripts/"
  cp "$prebuilt/berth" "$prebuilt/berthctl" "$ctx/prebuilt/"
  build_args=(--target prebuilt)
else
  ensure_base rust_base "$rust_base" localhost/berth-base/rust:1.95.0-bookworm make_rust
  ctx=$repo
  build_args=(--build-arg "RUST_IMAGE=$rust_base")
fi
say "building $tag with $engine ($([ -n "$prebuilt" ] && echo "runtime stage on $prebuilt" || echo "all stages"))"
start=$SECONDS
$engine build "${build_flags[@]}" "${run_flags[@]}" "${build_args[@]}" \
  --build-arg "DEBIAN_IMAGE=$debian_base" -t "$tag" -f Dockerfile "$ctx" > "$tmp/build.log" 2>&1 \
  || { tail -40 "$tmp/build.log" >&2; fail "the build failed (the last lines are above)"; }
build_s=$((SECONDS - start))
size=$($engine image inspect --format '{{.Size}}' "$tag")
say "built $tag in ${build_s} s; image size $((size / 1024 / 1024)) MiB"
[ -z "$stand_ins" ] || say "NOTE: built on local stand-in base images ($stand_ins ): for testing here, do not publish it"
[ "$smoke" = yes ] || exit 0

# ---- smoke test ---------------------------------------------------------------
in_image() { $engine run --rm "${run_flags[@]}" --entrypoint "$1" "$tag" "${@:2}"; }

v=$($engine run --rm "${run_flags[@]}" "$tag" --version) || fail "berth --version"
say "berth --version: $v"
in_image berthctl --help >/dev/null || fail "berthctl --help"
uid=$(in_image id -u)
[ "$uid" = 10001 ] || fail "the image runs as uid $uid, not 10001"
missing=$(in_image sh -c 'ldd /usr/local/bin/berth /usr/local/bin/berthctl | grep "not found" || true')
[ -z "$missing" ] || fail "missing shared libraries: $missing"
tools="fusermount3 losetup mount umount blkid mkfs.ext4 mkfs.xfs resize2fs xfs_growfs dd nbdinfo nbdcopy nbdfuse"
absent=$(in_image sh -c "for t in $tools; do command -v \$t >/dev/null || echo \$t; done")
[ -z "$absent" ] || fail "tools missing from the image: $absent"
say "uid 10001, every library found, node plugin tools present"

command -v qemu-io >/dev/null || fail "qemu-io is needed on the host for the NBD round trip (apt-get install qemu-utils)"
data="$tmp/data"
mkdir -p "$data"
chown 10001:10001 "$data"
chmod 0700 "$data"

# Starts `berth standalone` on DATA (as /data) with extra run flags; prints its
# ready line.
standalone() {
  local name=$1 dir=$2
  shift 2
  $engine run -d --name "$name" "${run_flags[@]}" "$@" -v "$dir:/data" "$tag" \
    standalone --data /data --pool-size 256M >/dev/null
  local i ready=""
  for i in $(seq 1 120); do
    ready=$($engine logs "$name" 2>/dev/null | grep '"event":"ready"' || true)
    [ -n "$ready" ] && break
    if [ "$($engine inspect --format '{{.State.Running}}' "$name")" != true ]; then
      $engine logs "$name" >&2 || true
      fail "berth standalone exited before it was ready"
    fi
    sleep 0.5
  done
  [ -n "$ready" ] || fail "berth standalone was not ready after 60 s"
  echo "$ready"
}
field() { sed -n "s/.*\"$1\":\"\\{0,1\\}\([^\",}]*\).*/\1/p"; }

ready=$(standalone "$smoke_name" "$data" --security-opt "seccomp=$repo/deploy/seccomp/berth-io-uring.json")
engine_name=$(echo "$ready" | field engine)
registered=$(echo "$ready" | field registered_buffer_bytes)
[ "$engine_name" = io_uring ] \
  || fail "under deploy/seccomp/berth-io-uring.json the engine is ${engine_name:-unknown}, not io_uring: $ready"
say "engine: io_uring under the project's seccomp profile; registered buffers: $((registered / 1024 / 1024)) MiB (RLIMIT_MEMLOCK $(in_image sh -c 'ulimit -l') KiB, no CAP_IPC_LOCK)"

ctl() { $engine exec "$smoke_name" berthctl --data /data --output json "$@"; }
ctl volume create smoke --size 64M --tier premium >/dev/null || fail "berthctl volume create in the image"
export_json=$(ctl volume export smoke) || fail "berthctl volume export in the image"
uri=$(echo "$export_json" | field unix_uri)
[ -n "$uri" ] || fail "no unix URI in: $export_json"
host_uri=${uri//\/data\//$data/}
out=$(qemu-io -f raw -c 'write -P 0x6b 0 1M' -c 'write -P 0x2c 5M 64k' -c 'read -P 0x6b 0 1M' -c 'read -P 0x2c 5M 64k' "$host_uri" 2>&1) \
  || fail "qemu-io: $out"
case "$out" in *fail*|*rror*|*mismatch*) fail "qemu-io: $out" ;; esac
say "nbd round trip: ok (qemu-io on the host, through the container's socket)"

$engine stop -t 20 "$smoke_name" >/dev/null
status=$($engine inspect --format '{{.State.ExitCode}}' "$smoke_name")
[ "$status" = 0 ] || { $engine logs "$smoke_name" 2>&1 | tail -20 >&2; fail "berth standalone exited with $status after SIGTERM"; }
say "SIGTERM: clean exit"
$engine rm -f "$smoke_name" >/dev/null

# For information: what the engine's own default seccomp profile gives.
mkdir -p "$tmp/data-default"
chown 10001:10001 "$tmp/data-default"
ready=$(standalone "$smoke_name-default" "$tmp/data-default")
say "engine under $engine's default seccomp profile: $(echo "$ready" | field engine)"
say "smoke test passed"
