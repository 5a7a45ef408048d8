#!/usr/bin/env bash
# vublk against qemu-storage-daemon's vhost-user-blk export, side by side, without a VM.
#
# Both serve the same image, which is filled with written data first (unwritten extents read
# as zeros without touching the device and would flatter every backend). They run in turn,
# A B A B (--rounds), each measured by the same `vublk bench` frontend (libblkio), and the
# summary prints medians and vublk/qsd ratios next to the targets of README "Performance":
#   * 4k random read QD32 and QD1, 4k random write QD32, 128k sequential read QD8 (also with
#     the frontend's buffers in 2 MiB huge pages) and write QD8: vublk's auto engine vs qsd
#     with aio=io_uring,cache.direct=on, one queue; the 128k workloads also with vublk's
#     huge-page bounce buffers off, to show what they are worth;
#   * transport only: vublk --null vs qsd's null-co driver, 4k random read QD32, 1 and 2 queues;
#   * the host figure: fio directly on the image (O_DIRECT, io_uring), the physical limit.
#
# Usage: integration/bench-vs-qsd.sh [--rounds N] [--size MB] [--out DIR]
# Environment: VUBLK_BENCH_RUNTIME (s, default 10), VUBLK_BENCH_RAMP (s, default 2),
#   VUBLK_BENCH_CACHE_MB (page-cache cap for the backend, default 256), VUBLK_BIN, VUBLK_QSD_BIN,
#   VUBLK_BENCH_VUBLK_ARGS (extra `vublk serve` options for every vublk run, e.g. "--poll-us 200").
# Needs root (memory cgroup, huge pages; fio is installed when missing). Takes about
#   rounds x 23 x (runtime + ramp) seconds plus the fill: about 12 minutes with the defaults.
set -euo pipefail
export VUBLK_LOG_TAG=bench-vs-qsd
# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
ROOT=$(repo_root)

ROUNDS=2
SIZE_MB=4096
OUT=$ROOT/target/bench/vs-qsd
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --size) SIZE_MB=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) die "unknown argument '$1' (usage: bench-vs-qsd.sh [--rounds N] [--size MB] [--out DIR])" ;;
    esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive number"
read -ra VUBLK_EXTRA <<<"${VUBLK_BENCH_VUBLK_ARGS:-}"

bench_setup "$ROOT"
mkdir -p "$OUT"
IMG=$OUT/filled.img
SOCK=$OUT/vhost.sock
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
trap 'stop_backend; restore_hugepages' EXIT

if [[ ! -f $IMG || $(stat -c %s "$IMG") != $((SIZE_MB << 20)) ]]; then
    log "filling a ${SIZE_MB} MiB image with written data: $IMG"
    rm -f "$IMG"
    fallocate -l "${SIZE_MB}M" "$IMG"
    fill_file "$IMG" "$SIZE_MB"
fi
[[ ${#VUBLK_EXTRA[@]} -eq 0 ]] || log "extra vublk options: ${VUBLK_EXTRA[*]}"
log "vublk's choice for it: $("$VUBLK_BIN" probe "$IMG" | grep -i -m1 'engine' || true)"

# name | vublk bench arguments
WORKLOADS=(
    "randread-4k-qd32|--rw randread --bs 4k --iodepth 32"
    "randread-4k-qd1|--rw randread --bs 4k --iodepth 1"
    "randwrite-4k-qd32|--rw randwrite --bs 4k --iodepth 32"
    "read-128k-qd8|--rw read --bs 128k --iodepth 8"
    "read-128k-qd8-hugepages|--rw read --bs 128k --iodepth 8 --hugepages"
    "write-128k-qd8|--rw write --bs 128k --iodepth 8"
)
# What vublk's huge-page bounce buffers are worth: the large-transfer workloads again with
# `--huge-bounce off` (vublk only).
NOBOUNCE_WORKLOADS=(
    "read-128k-qd8|--rw read --bs 128k --iodepth 8"
    "write-128k-qd8|--rw write --bs 128k --iodepth 8"
)
reserve_hugepages 2

run_storage() { # run_storage BACKEND ROUND [WORKLOAD...]
    local w name args backend=$1 round=$2
    shift 2
    [[ $# -gt 0 ]] || set -- "${WORKLOADS[@]}"
    for w in "$@"; do
        name=${w%%|*}
        read -ra args <<<"${w#*|}"
        measure "{\"suite\":\"storage\",\"backend\":\"$backend\",\"workload\":\"$name\",\"round\":$round}" "${args[@]}"
    done
}

run_null() { # run_null BACKEND ROUND QUEUES
    measure "{\"suite\":\"null\",\"backend\":\"$1\",\"workload\":\"null-randread-4k-qd32-q$3\",\"round\":$2}" \
        --rw randread --bs 4k --iodepth 32 --queues "$3"
}

for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round/$ROUNDS: host fio"
    host_fio "{\"suite\":\"storage\",\"backend\":\"host\",\"workload\":\"randread-4k-qd32\",\"round\":$round}" \
        "$IMG" --rw=randread --bs=4k --iodepth=32
    host_fio "{\"suite\":\"storage\",\"backend\":\"host\",\"workload\":\"randread-4k-qd1\",\"round\":$round}" \
        "$IMG" --rw=randread --bs=4k --iodepth=1
    host_fio "{\"suite\":\"storage\",\"backend\":\"host\",\"workload\":\"randwrite-4k-qd32\",\"round\":$round}" \
        "$IMG" --rw=randwrite --bs=4k --iodepth=32
    host_fio "{\"suite\":\"storage\",\"backend\":\"host\",\"workload\":\"read-128k-qd8\",\"round\":$round}" \
        "$IMG" --rw=read --bs=128k --iodepth=8
    host_fio "{\"suite\":\"storage\",\"backend\":\"host\",\"workload\":\"write-128k-qd8\",\"round\":$round}" \
        "$IMG" --rw=write --bs=128k --iodepth=8

    log "round $round/$ROUNDS: vublk (engine auto)"
    start_vublk "$OUT/vublk.log" --file "$IMG" "${VUBLK_EXTRA[@]}"
    run_storage vublk "$round"
    stop_backend
    log "round $round/$ROUNDS: vublk --huge-bounce off"
    start_vublk "$OUT/vublk.log" --file "$IMG" --huge-bounce off "${VUBLK_EXTRA[@]}"
    run_storage vublk-nobounce "$round" "${NOBOUNCE_WORKLOADS[@]}"
    stop_backend
    log "round $round/$ROUNDS: qemu-storage-daemon (aio=io_uring, cache.direct=on)"
    start_qsd "$OUT/qsd.log" "driver=file,node-name=f0,filename=$IMG,aio=io_uring,cache.direct=on" 1
    run_storage qsd "$round"
    stop_backend

    for q in 1 2; do
        log "round $round/$ROUNDS: null backings, $q queue(s)"
        start_vublk "$OUT/vublk-null.log" --null "${SIZE_MB}M" --queues "$q" "${VUBLK_EXTRA[@]}"
        run_null vublk "$round" "$q"
        stop_backend
        start_qsd "$OUT/qsd-null.log" "driver=null-co,node-name=f0,size=$((SIZE_MB << 20)),read-zeroes=on" "$q"
        run_null qsd "$round" "$q"
        stop_backend
    done
done

python3 "$ROOT/integration/lib/summarize.py" vs-qsd "$RESULTS" | tee "$OUT/summary.md"
log "results: $RESULTS, summary: $OUT/summary.md"
