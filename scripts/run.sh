#!/usr/bin/env bash
# Sets up and runs Berth on a data folder: installs what is missing (Debian),
# builds, and starts `berth standalone` there: the metadata service (catalog
# in DIR/metadata, DIR/meta.sock, 127.0.0.1:9580), a volume server (pool in
# DIR/node, DIR/control.sock, NBD on DIR/nbd.sock and 127.0.0.1:10809) and the
# CSI driver (DIR/csi.sock, for kubelet and the sidecars) in one process. Then,
# in another shell:
#   berthctl --data DIR volume create db --size 4G --tier premium
#   berthctl --data DIR volume export db     # prints an NBD URI
#   qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd://127.0.0.1:10809/db@TOKEN'
#   berthctl --data DIR audit list           # who did what, hash-chained
# Ctrl-C stops it cleanly (requests in flight finish, everything is flushed).
# Extra arguments go to `berth standalone` (see --help), e.g. --pool-size 50G.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-./berth-data}"
shift || true
source scripts/deps.sh
cargo build --locked --bins
bin="$CARGO_TARGET_DIR/debug"
echo "berth and berthctl are in $bin"
exec "$bin/berth" standalone --data "$dir" "$@"
