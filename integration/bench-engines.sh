#!/usr/bin/env bash
# Every I/O engine on every kind of backing that can be made here, measured through vublk's
# socket without a VM, and whether `auto` picked the best (or within 5% of it).
#
# Backings: a fully written file, a fallocated (never written) file, a sparse file, a file
# with its first half written, a file on tmpfs, and a loop block device (O_DIRECT loop over
# a written file). Configurations: io-uring and threads with and without O_DIRECT, and
# linux-aio (always O_DIRECT); the ones vublk refuses for a backing (O_DIRECT on tmpfs) are
# left out. Workloads: 4k random read and write at QD1 and QD32, 128k sequential read QD8 with
# the frontend's buffers in 4 KiB pages and in 2 MiB huge pages (guests of vhost-user
# backends often have huge-page RAM; it decides how many segments an O_DIRECT request has).
# Writes run longer (VUBLK_BENCH_WRITE_RUNTIME, default 20 s): a short run flatters the page
# cache, which absorbs writes until writeback catches up. The last workload flushes after
# every 32 writes, as a guest that wants its data durable does.
# Files whose allocation a write would change are made again before every workload, so each
# one measures the backing as named. The backend's page cache is capped (VUBLK_BENCH_CACHE_MB)
# so that buffered engines cannot serve the image from RAM.
#
# Usage: integration/bench-engines.sh [--rounds N] [--size MB] [--out DIR] [--storage A,B]
# Environment: as bench-vs-qsd.sh; VUBLK_BENCH_RUNTIME defaults to 5 here.
# Needs root (losetup, mount, memory cgroup, huge pages). Takes about 45 minutes per round
# with the defaults.
set -euo pipefail
export VUBLK_LOG_TAG=bench-engines
VUBLK_BENCH_RUNTIME=${VUBLK_BENCH_RUNTIME:-5}
VUBLK_BENCH_RAMP=${VUBLK_BENCH_RAMP:-1}
# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
ROOT=$(repo_root)

ROUNDS=1
SIZE_MB=2048
OUT=$ROOT/target/bench/engines
STORAGES=filled,fallocated,sparse,half-written,tmpfs,loop
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --size) SIZE_MB=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --storage) STORAGES=$2; shift 2 ;;
        *) die "unknown argument '$1' (usage: bench-engines.sh [--rounds N] [--size MB] [--out DIR] [--storage A,B])" ;;
    esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive number"
need_root "losetup, mount and the memory cgroup"

bench_setup "$ROOT"
mkdir -p "$OUT"
SOCK=$OUT/vhost.sock
RESULTS=$OUT/results.jsonl
TMPFS=$OUT/tmpfs
LOOP=""
: >"$RESULTS"
cleanup() {
    stop_backend
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
    mountpoint -q "$TMPFS" && umount "$TMPFS"
    restore_hugepages
    return 0
}
trap cleanup EXIT

# make_backing KIND: (re)creates the backing of KIND; sets BACKING to its path. Not run in a
# subshell: the loop device it sets up once must be remembered (LOOP) and detached at exit.
make_backing() {
    local f
    case $1 in
        filled | loop)
            f=$OUT/filled.img
            if [[ ! -f $f || $(stat -c %s "$f") != $((SIZE_MB << 20)) || $(du -m "$f" | cut -f1) -lt $SIZE_MB ]]; then
                rm -f "$f"
                fallocate -l "${SIZE_MB}M" "$f"
                fill_file "$f" "$SIZE_MB"
            fi
            if [[ $1 == loop ]]; then
                if [[ -z $LOOP ]]; then
                    LOOP=$(losetup --find --show --direct-io=on "$f") || die "losetup failed"
                fi
                f=$LOOP
            fi
            ;;
        fallocated)
            f=$OUT/fallocated.img
            rm -f "$f"
            fallocate -l "${SIZE_MB}M" "$f"
            ;;
        sparse)
            f=$OUT/sparse.img
            rm -f "$f"
            truncate -s "${SIZE_MB}M" "$f"
            ;;
        half-written)
            f=$OUT/half-written.img
            rm -f "$f"
            truncate -s "${SIZE_MB}M" "$f"
            fill_file "$f" "$SIZE_MB" $((SIZE_MB / 2))
            ;;
        tmpfs)
            if ! mountpoint -q "$TMPFS"; then
                mkdir -p "$TMPFS"
                mount -t tmpfs -o size=$((SIZE_MB + 64))m vublk-bench "$TMPFS" || die "mounting tmpfs failed"
            fi
            f=$TMPFS/filled.img
            [[ -f $f ]] || fill_file "$f" "$SIZE_MB"
            ;;
        *) die "unknown storage '$1' (filled, fallocated, sparse, half-written, tmpfs, loop)" ;;
    esac
    BACKING=$f
}

# Whether writes change what the backing is (allocation), so it is made again per workload.
mutable() { [[ $1 == fallocated || $1 == sparse || $1 == half-written ]]; }

# name | engine | direct
CONFIGS=(
    "io-uring+direct|io-uring|on"
    "io-uring+buffered|io-uring|off"
    "linux-aio+direct|linux-aio|on"
    "threads+buffered|threads|off"
    "threads+direct|threads|on"
)
WRITE_RUNTIME=${VUBLK_BENCH_WRITE_RUNTIME:-20}
# name | vublk bench arguments | measured seconds
WORKLOADS=(
    "randread-4k-qd1|--rw randread --bs 4k --iodepth 1|$RUNTIME"
    "randread-4k-qd32|--rw randread --bs 4k --iodepth 32|$RUNTIME"
    "read-128k-qd8|--rw read --bs 128k --iodepth 8|$RUNTIME"
    "read-128k-qd8-hugepages|--rw read --bs 128k --iodepth 8 --hugepages|$RUNTIME"
    "randwrite-4k-qd1|--rw randwrite --bs 4k --iodepth 1|$WRITE_RUNTIME"
    "randwrite-4k-qd32|--rw randwrite --bs 4k --iodepth 32|$WRITE_RUNTIME"
    "randwrite-4k-qd32-flush32|--rw randwrite --bs 4k --iodepth 32 --flush-every 32|$WRITE_RUNTIME"
)
reserve_hugepages 2

# What auto picks for each backing, recorded once (from the pristine backing).
IFS=, read -ra STORAGE_LIST <<<"$STORAGES"
for s in "${STORAGE_LIST[@]}"; do
    make_backing "$s"
    img=$BACKING
    python3 - "$s" "$("$VUBLK_BIN" probe --json "$img")" >>"$RESULTS" <<'EOF'
import json, sys
c = json.loads(sys.argv[2])["choice"]
cfg = c["engine"].replace("_", "-") + ("+direct" if c["direct"] else "+buffered")
print(json.dumps({"suite": "choice", "storage": sys.argv[1], "config": cfg, "why": "; ".join(c["reasons"])}))
EOF
    log "$s: auto chooses $(tail -n1 "$RESULTS")"
done

for ((round = 1; round <= ROUNDS; round++)); do
    for s in "${STORAGE_LIST[@]}"; do
        for c in "${CONFIGS[@]}"; do
            IFS='|' read -r cname engine direct <<<"$c"
            make_backing "$s"
            img=$BACKING
            if ! why=$("$VUBLK_BIN" probe --engine "$engine" --direct "$direct" "$img" 2>&1 >/dev/null); then
                log "$s: $cname refused by vublk, not measured: $why"
                continue
            fi
            for w in "${WORKLOADS[@]}"; do
                IFS='|' read -r wname wargs secs <<<"$w"
                read -ra args <<<"$wargs"
                if mutable "$s"; then
                    make_backing "$s"
                    img=$BACKING
                fi
                start_vublk "$OUT/vublk.log" --file "$img" --engine "$engine" --direct "$direct"
                MEASURE_RUNTIME=$secs measure "{\"suite\":\"engines\",\"storage\":\"$s\",\"config\":\"$cname\",\"workload\":\"$wname\",\"round\":$round}" "${args[@]}"
                stop_backend
            done
        done
    done
done

python3 "$ROOT/integration/lib/summarize.py" engines "$RESULTS" | tee "$OUT/summary.md"
log "results: $RESULTS, summary: $OUT/summary.md"
