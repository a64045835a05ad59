#!/usr/bin/env bash
# Replicated volumes through the path a consumer uses: `berthctl volume attach`
# (the nexus and the FUSE file) on one node, three volume servers and the
# metadata service on loopback, all on this machine's one disk. fio with
# libaio and O_DIRECT on the attached file: 4 KiB random writes and reads at
# QD32, 1 MiB sequential writes and reads at QD8, 8 s each, on a filled 1 GiB
# extreme volume with 1, 2 and 3 copies, beside a raw file on the same disk.
# With every copy on one disk, N copies can reach at most 1/N of one copy's
# write figures. Not yet a berth-bench target (docs/replication.md).
# Usage: bench/scripts/replicas.sh [DIR]   (binaries from CARGO_TARGET_DIR/debug)
set -euo pipefail
B=${CARGO_TARGET_DIR:-/var/tmp/berth-target}/debug
D=$(mktemp -d "${1:-/var/tmp}/berth-replicas.XXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$B/berth" metadata --data "$D/meta" --listen "127.0.0.1:$port" --insecure-plaintext-tcp \
  --heartbeat-ms 200 > "$D/meta.out" 2> "$D/meta.err" &
PIDS+=($!)
sleep 1
for i in 1 2 3; do
  "$B/berth" volume-server --data "$D/n$i" --pool-size 3G --nbd-listen 127.0.0.1:0 \
    --control-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --insecure-plaintext-tcp \
    --metadata "http://127.0.0.1:$port" --node-name "n$i" > "$D/n$i.out" 2> "$D/n$i.err" &
  PIDS+=($!)
done
C=("$B/berthctl" --endpoint "http://127.0.0.1:$port")
for _ in $(seq 100); do
  [ "$("${C[@]}" --output json nodes | grep -o '"up"' | wc -l)" = 3 ] && break
  sleep 0.2
done
fig() { python3 -c "import json,sys;j=json.load(sys.stdin)['jobs'][0];k='write' if 'write' in '$1' else 'read';print(f\"{j[k]['iops']:.0f} IOPS {j[k]['bw']/1024:.0f} MiB/s\")"; }
run() { # FILE LABEL
  for job in "randwrite 4k 32" "write 1M 8" "randread 4k 32" "read 1M 8"; do
    set -- "$1" "$2" $job
    r=$(fio --filename="$1" --size=1G --direct=1 --ioengine=libaio --rw="$3" --bs="$4" \
      --iodepth="$5" --runtime=8 --time_based --name=b --output-format=json 2> /dev/null | fig "$3")
    echo "$2 $3 $4 QD$5: $r"
  done
}
fio --filename="$D/raw" --size=1G --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 \
  --name=fill > /dev/null 2>&1
run "$D/raw" "raw file"
rm -f "$D/raw"
for r in 1 2 3; do
  "${C[@]}" volume create "r$r" --size 1G --tier extreme --param "replicas=$r" \
    --param maxIops=1000000 --param maxMBps=100000 > /dev/null
  mkdir -p "$D/m$r"
  "${C[@]}" volume attach "r$r" "$D/m$r" --node n1 2> "$D/attach$r.err" &
  ap=$!
  for _ in $(seq 100); do [ -s "$D/m$r/disk" ] && break; sleep 0.1; done
  [ -s "$D/m$r/disk" ] || { echo "attaching r$r failed: $(tail -3 "$D/attach$r.err")"; exit 1; }
  fio --filename="$D/m$r/disk" --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 \
    --size=1G --name=fill > /dev/null 2>&1
  run "$D/m$r/disk" "replicas=$r"
  kill -INT "$ap"
  wait "$ap"
done
