#!/usr/bin/env bash
# Rebuild of a replicated volume's copy: by delta (only the blocks changed
# while it was away) and in full, beside the raw disk's sequential speed.
# The metadata service and two volume servers on loopback, all on this
# machine's one disk; a 4 GiB extreme volume with 2 copies, attached with
# `berthctl volume attach` (the nexus runs there and copies) and filled.
# Each round changes 1% of the volume with 4 KiB random writes (fio,
# O_DIRECT, through the attached file) and, 1 s in, kills -9 the second
# copy's server (or stops it: the "hung" round); fio's longest write is the
# stall. Then the server is restarted (or continued) and timed until
# `volume get` says every copy is in sync; the bytes copied come from the
# FinishRebuild audit entry. The full round first makes the first copy
# forget its changed blocks (`berthctl server volume stop-tracking`), so the
# rebuild copies everything.
# Usage: bench/scripts/rebuild.sh [DIR] [SIZE_GIB]
#        (binaries from CARGO_TARGET_DIR/debug, or BERTH_BIN)
set -euo pipefail
B=${BERTH_BIN:-${CARGO_TARGET_DIR:-/var/tmp/berth-target}/debug}
GIB=${2:-4}
D=$(mktemp -d "${1:-/var/tmp}/berth-rebuild.XXXX")
PIDS=()
cleanup() {
  [ -n "${AP:-}" ] && kill -INT "$AP" 2> /dev/null && wait "$AP" 2> /dev/null
  for p in "${PIDS[@]}" ${N2:-}; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$B/berth" metadata --data "$D/meta" --listen "127.0.0.1:$port" --insecure-plaintext-tcp \
  --heartbeat-ms 200 > "$D/meta.out" 2> "$D/meta.err" &
PIDS+=($!)
sleep 1
server() { # N
  "$B/berth" volume-server --data "$D/n$1" --pool-size "$((GIB + 1))G" --nbd-listen 127.0.0.1:0 \
    --control-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --insecure-plaintext-tcp \
    --metadata "http://127.0.0.1:$port" --node-name "n$1" >> "$D/n$1.out" 2>> "$D/n$1.err" &
}
server 1
PIDS+=($!)
server 2
N2=$!
C=("$B/berthctl" --endpoint "http://127.0.0.1:$port")
up() { [ "$("${C[@]}" --output json nodes | grep -o '"up"' | wc -l)" = 2 ]; }
for _ in $(seq 100); do up && break; sleep 0.2; done
state() { "${C[@]}" --output json volume get r | python3 -c '
import json,sys
v=json.load(sys.stdin)
print(" ".join(r["node"]+"="+r["state"] for r in v["replicas"]))'; }
"${C[@]}" volume create r --size "${GIB}G" --tier extreme --param replicas=2 \
  --param maxIops=1000000 --param maxMBps=100000 > /dev/null
mkdir -p "$D/m"
"${C[@]}" volume attach r "$D/m" --node n1 2> "$D/attach.err" &
AP=$!
for _ in $(seq 100); do [ -s "$D/m/disk" ] && break; sleep 0.1; done
[ -s "$D/m/disk" ] || { echo "attaching failed: $(tail -3 "$D/attach.err")"; exit 1; }
fio --filename="$D/m/disk" --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 \
  --size="${GIB}G" --name=fill > /dev/null 2>&1
CHANGE=$((GIB * 1024 * 1024 * 1024 / 100))
round() { # LABEL [full|hung]
  # The loss: 4 KiB random writes at QD32, paced at 1,000 a second for
  # 4 s; n2 goes 1 s in (killed, or stopped when "hung"). fio's longest
  # completion is the stall the loss caused.
  fio --filename="$D/m/disk" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
    --size="${GIB}G" --time_based --runtime=4 --rate_iops=1000 \
    --randrepeat=0 --name=loss --output-format=json > "$D/loss.json" 2> /dev/null &
  local fp=$!
  sleep 1
  if [ "${2:-}" = hung ]; then kill -STOP "$N2"; else kill -9 "$N2"; fi
  wait "$fp"
  local before
  before=$(python3 -c '
import json,sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
stall, n = w["clat_ns"]["max"] / 1e6, w["total_ios"]
print(f"{sys.argv[2]}: longest write across the loss of the copy: {stall:.0f} ms ({n} writes)", file=sys.stderr)
print(n * 4096)' "$D/loss.json" "$1")
  # The change while it is away: 1% of the volume.
  fio --filename="$D/m/disk" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
    --size="${GIB}G" --io_size="$CHANGE" --randrepeat=0 --name=change > /dev/null 2>&1
  [ "${2:-}" = full ] && "$B/berthctl" --data "$D/n1" server volume stop-tracking r
  if [ "${2:-}" = hung ]; then
    kill -CONT "$N2"
  else
    wait "$N2" 2> /dev/null || true
    server 2
    N2=$!
  fi
  local t0 t1
  t0=$(date +%s.%N)
  for _ in $(seq 6000); do
    [ "$(state)" = "n1=in-sync n2=in-sync" ] && break
    sleep 0.1
  done
  t1=$(date +%s.%N)
  [ "$(state)" = "n1=in-sync n2=in-sync" ] || { echo "$1: not in sync: $(state)"; exit 1; }
  "${C[@]}" --output json audit list --volume r | python3 -c '
import json,sys
label, change, wall = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# At most: the 1% plus every write of the loss phase (a quarter of them
# reached both copies before the loss).
es = json.load(sys.stdin)
fin = [x for x in es if x["action"] == "FinishRebuild" and x["result"] == "ok"][-1]
start = [x for x in es if x["action"] == "StartRebuild" and x["result"] == "ok"][-1]
copied = int(fin["detail"].split("after copying ")[1].split(" ")[0])
t = (fin["time_unix_ms"] - start["time_unix_ms"]) / 1000
print(f"{label}: changed at most {change/2**20:.0f} MiB, copied {copied/2**20:.0f} MiB "
      f"({copied/change:.2f}x the change) in {t:.2f} s ({copied/2**20/max(t,1e-3):.0f} MiB/s) "
      f"from StartRebuild to FinishRebuild; {wall:.1f} s from the restart to in sync")
' "$1" "$((CHANGE + before))" "$(python3 -c "print($t1-$t0)")"
}
round "delta rebuild"
round "delta rebuild after a hung server" hung
round "full rebuild" full
kill -INT "$AP"
wait "$AP"
AP=
fio --filename="$D/raw" --size="${GIB}G" --direct=1 --ioengine=libaio --rw=write --bs=1M \
  --iodepth=8 --name=raw --output-format=json 2> /dev/null | python3 -c '
import json,sys
bw = json.load(sys.stdin)["jobs"][0]["write"]["bw"] / 1024
print(f"raw file, sequential 1 MiB writes QD8: {bw:.0f} MiB/s")'
