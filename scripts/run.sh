#!/usr/bin/env bash
# Sets up and runs Berth on a data folder: installs what is missing (Debian),
# builds, and starts the metadata service (catalog in DIR/metadata, gRPC on
# 127.0.0.1:9580) and one volume server reporting to it (pool, block maps,
# audit log and sockets in DIR/node). Then, in another shell:
#   berthctl volume create db --size 10G --tier premium
#   berthctl volume export db            # prints an NBD URI
#   qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd://127.0.0.1:10809/db@TOKEN'
#   berthctl audit list                  # who did what, hash-chained
# Ctrl-C stops both cleanly (requests in flight finish, everything is flushed).
# Extra arguments go to `berth volume-server` (see --help), e.g. --pool-size 50G.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-./berth-data}"
shift || true
source scripts/deps.sh
cargo build --locked --bins
bin="$CARGO_TARGET_DIR/debug"
echo "berth and berthctl are in $bin"
mkdir -p "$dir"
"$bin/berth" metadata --data "$dir/metadata" --listen 127.0.0.1:9580 &
meta=$!
trap 'kill -TERM $meta 2>/dev/null; wait $meta 2>/dev/null' EXIT
"$bin/berth" volume-server --data "$dir/node" \
    --metadata http://127.0.0.1:9580 --control-listen 127.0.0.1:9581 "$@" &
node=$!
trap 'kill -TERM $node $meta 2>/dev/null; wait $node $meta 2>/dev/null' EXIT INT TERM
wait $node
