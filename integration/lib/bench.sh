# shellcheck shell=bash
# Shared helpers for the VM-less benchmarks (bench-vs-qsd.sh, bench-engines.sh). Source it.
#
# Every measurement is one `vublk bench --json` run against a backend's socket; each result
# is appended as one JSON line, tagged with what was measured, to $RESULTS, and
# lib/summarize.py turns the file into tables. Backends run one at a time, never side by side.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUNTIME=${VUBLK_BENCH_RUNTIME:-10}
RAMP=${VUBLK_BENCH_RAMP:-2}
# Page cache the backend may use, so buffered engines cannot serve the whole image from RAM
# (24 GiB here; production working sets do not fit in the host's cache). 0 turns it off.
CACHE_LIMIT_MB=${VUBLK_BENCH_CACHE_MB:-256}

BK_PID=""
BK_LOG=""
BK_CGROUP=""

# Makes sure fio and qemu-storage-daemon exist, builds vublk, sets VUBLK_BIN and QSD_BIN.
bench_setup() {
    local root=$1
    command -v fio >/dev/null || {
        need_root "installing fio"
        apt_update_once
        apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends fio >/dev/null ||
            die "apt-get install fio failed"
    }
    QSD_BIN=${VUBLK_QSD_BIN:-$(command -v qemu-storage-daemon || true)}
    [[ -n "$QSD_BIN" && -x "$QSD_BIN" ]] ||
        die "qemu-storage-daemon not found (Debian package qemu-utils; or set VUBLK_QSD_BIN)"
    VUBLK_BIN=${VUBLK_BIN:-}
    if [[ -z "$VUBLK_BIN" ]]; then
        log "building vublk: cargo build --release"
        (cd "$root" && cargo build --release -q) >&2 || die "cargo build --release failed"
        VUBLK_BIN=$root/target/release/vublk
    fi
    "$VUBLK_BIN" bench --help >/dev/null 2>&1 || die "'$VUBLK_BIN bench --help' fails: no bench command"
    setup_cache_cgroup
}

# A memory cgroup that caps the page cache charged to the backend: cgroup v1 (what these
# machines have); the v2 branches are untested and need the memory controller enabled for
# the parent's children.
setup_cache_cgroup() {
    [[ $CACHE_LIMIT_MB == 0 ]] && return 0
    local base=/sys/fs/cgroup/memory
    if [[ -w $base && -e $base/cgroup.procs ]]; then
        BK_CGROUP=$base/vublk-bench
    elif [[ -w /sys/fs/cgroup/unified && -e /sys/fs/cgroup/unified/cgroup.procs ]] &&
        grep -qw memory /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null; then
        BK_CGROUP=/sys/fs/cgroup/unified/vublk-bench
    elif [[ -e /sys/fs/cgroup/cgroup.controllers ]] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
        BK_CGROUP=/sys/fs/cgroup/vublk-bench
    else
        die "no writable memory cgroup to cap the backend's page cache (set VUBLK_BENCH_CACHE_MB=0 to run without, and expect buffered engines to read from RAM)"
    fi
    mkdir -p "$BK_CGROUP"
    if [[ -e $BK_CGROUP/memory.limit_in_bytes ]]; then
        echo $((CACHE_LIMIT_MB << 20)) >"$BK_CGROUP/memory.limit_in_bytes"
    else
        echo $((CACHE_LIMIT_MB << 20)) >"$BK_CGROUP/memory.max"
    fi
    log "backends run in memory cgroup ${BK_CGROUP#/sys/fs/cgroup/} limited to ${CACHE_LIMIT_MB} MiB (page cache included)"
}

# reserve_hugepages N: makes sure at least N free 2 MiB huge pages exist (for `vublk bench
# --hugepages`), raising vm.nr_hugepages if needed; restore_hugepages puts it back.
HUGEPAGES_BEFORE=""
reserve_hugepages() {
    local want=$1 sysctl=/proc/sys/vm/nr_hugepages free
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
    ((free >= want)) && return 0
    HUGEPAGES_BEFORE=${HUGEPAGES_BEFORE:-$(cat "$sysctl")}
    echo $(($(cat "$sysctl") + want - free)) >"$sysctl"
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
    ((free >= want)) || die "could not reserve $want huge pages of 2 MiB (HugePages_Free is $free)"
}
restore_hugepages() {
    [[ -z $HUGEPAGES_BEFORE ]] || echo "$HUGEPAGES_BEFORE" >/proc/sys/vm/nr_hugepages
    HUGEPAGES_BEFORE=""
}

# start_backend LOG CMD...: starts CMD in the cache cgroup; waits until its socket ($SOCK) accepts.
start_backend() {
    BK_LOG=$1
    shift
    local cg=${BK_CGROUP:+$BK_CGROUP/cgroup.procs}
    rm -f "$SOCK"
    # The shell moves itself into the cgroup and then becomes the backend.
    # shellcheck disable=SC2016
    RUST_LOG=${RUST_LOG:-warn} sh -c '[ -z "$1" ] || echo $$ >"$1"; shift; exec "$@"' sh "$cg" "$@" \
        </dev/null >"$BK_LOG" 2>&1 &
    BK_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$BK_PID" 2>/dev/null; then
            tail -n 20 "$BK_LOG" >&2
            die "backend exited before its socket accepted: $*"
        fi
        [[ -S $SOCK ]] && python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$SOCK" 2>/dev/null && return 0
        sleep 0.1
    done
    die "backend socket $SOCK did not accept within 30 s: $*"
}

stop_backend() {
    [[ -n "$BK_PID" ]] || return 0
    kill -TERM "$BK_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$BK_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$BK_PID" 2>/dev/null || true
    wait "$BK_PID" 2>/dev/null || true
    BK_PID=""
}

# start_vublk LOG ARGS...: vublk serving on $SOCK with ARGS.
start_vublk() {
    local blog=$1
    shift
    start_backend "$blog" "$VUBLK_BIN" serve --socket "$SOCK" "$@"
}

# start_qsd LOG BLOCKDEV QUEUES: qemu-storage-daemon exporting BLOCKDEV (node f0) on $SOCK.
start_qsd() {
    start_backend "$1" "$QSD_BIN" --blockdev "$2" \
        --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$3"
}

# measure TAGS_JSON BENCH_ARGS...: one `vublk bench` run against the running backend; the
# result, merged with TAGS_JSON (an object of labels), is appended to $RESULTS.
measure() {
    local tags=$1
    shift
    local out
    if ! out=$("$VUBLK_BIN" bench --socket "$SOCK" --json --runtime "${MEASURE_RUNTIME:-$RUNTIME}" --ramp "$RAMP" \
        --backend-pid "$BK_PID" "$@" 2>>"$BK_LOG.bench"); then
        tail -n 5 "$BK_LOG.bench" >&2
        die "vublk bench $* failed against ${tags} (see $BK_LOG.bench)"
    fi
    python3 -c 'import json,sys; r=json.loads(sys.argv[2]); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' \
        "$tags" "$out" >>"$RESULTS"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("  %-60s %9.0f IOPS %8.1f MiB/s p50 %7.1f us p99 %7.1f us cpu/io %s us" % (sys.argv[2], r["iops"], r["mib_s"], r["lat_p50_us"], r["lat_p99_us"], "%.2f" % r["backend_cpu_us_per_io"] if r.get("backend_cpu_us_per_io") is not None else "-"))' \
        "$out" "$tags" >&2
}

# fill_file PATH MB [MB_TO_WRITE]: writes MB_TO_WRITE MiB (default: all) of non-zero data from
# the start of PATH with O_DIRECT, so those extents are really written (not just allocated).
fill_file() {
    local path=$1 mb=$2 write_mb=${3:-$2}
    fio --name=fill --filename="$path" --rw=write --bs=1M --iodepth=16 --ioengine=io_uring \
        --direct=1 --size="${write_mb}M" --filesize="${mb}M" --refill_buffers=1 \
        --output=/dev/null >/dev/null 2>&1 ||
        fio --name=fill --filename="$path" --rw=write --bs=1M --iodepth=16 --ioengine=psync \
            --size="${write_mb}M" --filesize="${mb}M" --refill_buffers=1 --end_fsync=1 \
            --output=/dev/null >/dev/null || die "filling $path failed"
}

# host_fio TAGS_JSON IMG FIO_ARGS...: fio run directly on the host (O_DIRECT, io_uring), the
# physical limit the backends are compared with; appended to $RESULTS like a bench result.
host_fio() {
    local tags=$1 img=$2
    shift 2
    local out
    out=$(fio --name=host --filename="$img" --direct=1 --ioengine=io_uring --time_based \
        --runtime="$RUNTIME" --ramp_time="$RAMP" --lat_percentiles=1 --output-format=json "$@") ||
        die "host fio $* failed"
    python3 - "$tags" "$out" >>"$RESULTS" <<'EOF'
import json, sys
tags = json.loads(sys.argv[1])
job = json.loads(sys.argv[2])["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
pct = side["lat_ns"].get("percentile", {})
r = {
    "iops": side["iops"],
    "mib_s": side["bw_bytes"] / 2**20,
    "lat_p50_us": pct.get("50.000000", 0) / 1000,
    "lat_p99_us": pct.get("99.000000", 0) / 1000,
    "backend_cpu_us_per_io": None,
    "errors": job["error"],
}
r.update(tags)
print(json.dumps(r))
EOF
}
