#!/usr/bin/env bash
# Sets up and runs Berth on a data folder: installs what is missing (Debian),
# builds, and starts the volume server there (pool file, block maps, audit log,
# sockets all in DIR). Then, in another shell:
#   berthctl --data DIR volume create db --size 10G --tier premium
#   berthctl --data DIR export grant --volume db --client me   # prints NBD URIs
#   qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///db@TOKEN?socket=DIR/nbd.sock'
# Ctrl-C stops it cleanly (requests in flight finish, everything is flushed).
# Extra arguments go to `berth volume-server` (see --help), e.g. --pool-size 50G.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-./berth-data}"
shift || true
source scripts/deps.sh
cargo build --locked --bins
bin="$CARGO_TARGET_DIR/debug"
echo "berth and berthctl are in $bin"
exec "$bin/berth" volume-server --data "$dir" "$@"
