#!/usr/bin/env bash
# Registered io_uring buffers or not, over NBD: 4 KiB random reads and writes
# at QD32 and 1 MiB sequential reads at QD8 (fio's nbd engine, 8 s each, a
# filled 1 GiB extreme volume on a 2 GiB pool under DIR), with the whole 64 MiB
# arena registered (root, CAP_IPC_LOCK), 7 MiB (an 8 MiB RLIMIT_MEMLOCK without
# CAP_IPC_LOCK, a container's default) and none (1 MiB: the ring only).
# Usage: bench/scripts/memlock.sh [DIR]   (binaries from CARGO_TARGET_DIR/debug;
# ORDER="8388608 1048576 root" changes the order of the three configurations)
set -euo pipefail
B=${CARGO_TARGET_DIR:-/var/tmp/berth-target}/debug
root=${1:-/var/tmp}
json() { sed -n '/^{/,$p' | python3 -c "import json,sys;j=json.load(sys.stdin)['jobs'][0];print($1)"; }
for cfg in ${ORDER:-root 8388608 1048576}; do
  d=$(mktemp -d "$root/berth-memlock.XXXX")
  pre=()
  [ $cfg = root ] || pre=(setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock prlimit --memlock=$cfg:$cfg --)
  "${pre[@]}" "$B/berth" volume-server --data "$d" --pool-size 2G --nbd-listen none \
    --metrics-listen 127.0.0.1:0 > "$d/out" 2> "$d/err" &
  pid=$!
  for _ in $(seq 100); do [ -s "$d/out" ] && break; sleep 0.2; done
  reg=$(grep -o '"registered_buffer_bytes":[0-9]*' "$d/out" | cut -d: -f2)
  ctl() { "$B/berthctl" --endpoint "unix://$d/control.sock" --output json server "$@"; }
  ctl volume create v --size 1G --tier extreme > /dev/null
  uri=$(ctl export grant --volume v --client bench | python3 -c 'import json,sys;print(json.load(sys.stdin)["unix_uri"])')
  f=(fio --name=b --ioengine=nbd --uri="$uri" --size=1G --output-format=json)
  "${f[@]}" --rw=write --bs=1M --iodepth=8 > /dev/null 2>&1
  r4=$("${f[@]}" --rw=randread --bs=4k --iodepth=32 --runtime=8 --time_based 2> /dev/null | json "int(j['read']['iops'])")
  s1=$("${f[@]}" --rw=read --bs=1M --iodepth=8 --runtime=8 --time_based 2> /dev/null | json "int(j['read']['bw']/1024)")
  w4=$("${f[@]}" --rw=randwrite --bs=4k --iodepth=32 --runtime=8 --time_based 2> /dev/null | json "int(j['write']['iops'])")
  echo "memlock=$cfg registered_bytes=$reg randread_4k_qd32_iops=$r4 read_1m_qd8_MiBps=$s1 randwrite_4k_qd32_iops=$w4"
  kill "$pid"
  wait "$pid" || true
  rm -rf "$d"
done
