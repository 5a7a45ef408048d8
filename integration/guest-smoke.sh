#!/usr/bin/env bash
# guest-smoke.sh: boot a real Linux guest in QEMU with a vhost-user-blk disk
# served by vublk (or by qemu-storage-daemon, for comparison) and check, from
# inside the guest, what the guest sees and that I/O is correct.
#
# Usage:
#   integration/guest-smoke.sh [--backend vublk|qsd] [--config NAME[,NAME...]]
#                              [--keep] [--no-install] [--list-configs] [-h]
#
# Steps: (1) install qemu-system-x86 (at the installed qemu-utils version),
# fio and cpio if absent (integration/lib/install-deps.sh); (2) build or reuse
# the guest in target/guest/ (integration/lib/build-guest.sh); (3) for each
# configuration: start the backend on a raw image, (4) boot the guest with the
# disk as vhost-user-blk-pci, (5) the guest's /init (integration/guest/init)
# checks size, logical block size, queue count, ring size, write cache mode,
# read-only flag, serial, discard/write-zeroes limits, reads a pattern the host
# wrote, runs fio (random 4k-64k writes, one job per queue, crc32c verify),
# writes a pattern, discards and write-zeroes a range, and reports on the
# serial console; the host re-checks every reported value against its own
# expectations, compares the image file, and stops the backend with SIGTERM
# (it must exit 0). (6) Exit status 0 only if every check of every
# configuration passed; otherwise 1, with a message naming each failed check
# (missing tools or a broken setup: 2).
#
# Configurations (see --list-configs):
#   mq512wb  2 queues, ring 256, 512-byte blocks, write back, image created by the backend (vublk)
#   sq4kwt   1 queue,  ring 128, 4096-byte blocks, write through
#   ro       1 queue,  ring 128, 512-byte blocks, read-only
#   direct   2 queues, ring 256, 512-byte blocks, write back, image written in full first,
#            so vublk serves it with O_DIRECT and its huge-page bounce buffers (checked in
#            its log; the run directory must be on a file system with O_DIRECT)
#   attach   2 queues, ring 128, 512-byte blocks, write back; QEMU gets exactly the
#            shared-memory, chardev and device arguments `vublk attach-info --format
#            qemu` prints for the export (fails if vublk has no attach-info; vublk only)
#
# Environment:
#   VUBLK_BACKEND        vublk (default) | qsd
#   VUBLK_BIN            vublk binary (default target/release/vublk, brought up to
#                        date with `cargo build --release` first)
#   VUBLK_CONFIGS        comma-separated configurations (default: all)
#   VUBLK_ACCEL          auto (default) | tcg | kvm. auto boots a probe guest with
#                        KVM and uses it only if that guest reports back in time
#   VUBLK_GUEST_TIMEOUT  seconds allowed per guest boot+test (default 240)
#   VUBLK_EXPECT_DISCARD, VUBLK_EXPECT_WRITE_ZEROES
#                        1 (default): the disk must offer it and it must work;
#                        0: it must not be offered; any: not checked
#   VUBLK_NO_INSTALL=1   never run apt-get (fail if something is missing)
#   VUBLK_KEEP=1         keep the run directory (also kept on failure)
#   VUBLK_QSD_BIN        qemu-storage-daemon binary (default: from PATH)
#   plus build-guest.sh's VUBLK_KERNEL_PKG, VUBLK_GUEST_REFRESH, VUBLK_INITRD_COMPRESS
set -euo pipefail
export VUBLK_LOG_TAG=guest-smoke
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$HERE/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/guest-lib.sh
source "$HERE/lib/guest-lib.sh"
ROOT=$(repo_root)
GUEST_DIR=$ROOT/target/guest

BACKEND=${VUBLK_BACKEND:-vublk}
CONFIGS=${VUBLK_CONFIGS:-}
KEEP=${VUBLK_KEEP:-0}
NO_INSTALL=${VUBLK_NO_INSTALL:-0}
ACCEL_REQ=${VUBLK_ACCEL:-auto}
GUEST_TIMEOUT=${VUBLK_GUEST_TIMEOUT:-240}
EXPECT_DISCARD=${VUBLK_EXPECT_DISCARD:-1}
EXPECT_WZ=${VUBLK_EXPECT_WRITE_ZEROES:-1}
IMAGE_MB=256
SERIAL_BASE=vublk-smoke

# name  queues  ring  lbs  cache         ro  create  qemu-args (own | attach-info)
# create: 1 the backend creates the image (--size), 0 a sparse file, w a fully written file
ALL_CONFIGS="
mq512wb 2 256 512  writeback    0 1 own
sq4kwt  1 128 4096 writethrough 0 0 own
ro      1 128 512  writeback    1 0 own
direct  2 256 512  writeback    0 w own
attach  2 128 512  writeback    0 0 attach-info
"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) BACKEND=${2:?--backend needs a value}; shift 2 ;;
        --backend=*) BACKEND=${1#*=}; shift ;;
        --config) CONFIGS=${2:?--config needs a value}; shift 2 ;;
        --config=*) CONFIGS=${1#*=}; shift ;;
        --keep) KEEP=1; shift ;;
        --no-install) NO_INSTALL=1; shift ;;
        --list-configs) echo "name queues ring lbs cache ro backend-creates-image qemu-args"; echo "$ALL_CONFIGS" | sed '/^$/d'; exit 0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; setup_die "unknown argument '$1'" ;;
    esac
done
case $BACKEND in vublk | qsd) ;; *) setup_die "backend must be vublk or qsd (got '$BACKEND')" ;; esac
case $ACCEL_REQ in auto | tcg | kvm) ;; *) setup_die "VUBLK_ACCEL must be auto, tcg or kvm (got '$ACCEL_REQ')" ;; esac
# attach-info is vublk's: the qsd backend runs the other configurations
[[ -z "$CONFIGS" ]] && CONFIGS=$(echo "$ALL_CONFIGS" | awk -v b="$BACKEND" 'NF && !(b == "qsd" && $8 == "attach-info") {printf "%s%s", s, $1; s=","}')

# ---------------------------------------------------------------- processes
RUN_DIR=""
QEMU_PID=""
BACKEND_PID=""
OVERALL_OK=0

# shellcheck disable=SC2317 # invoked through trap
cleanup() {
    local rc=$?
    stop_pid "$QEMU_PID" qemu
    stop_pid "$BACKEND_PID" backend
    QEMU_PID=""
    BACKEND_PID=""
    rm -f "${VUBLK_APT_MARK:-}"
    if [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]]; then
        rm -f "$RUN_DIR/.apt-updated"
        if [[ "$KEEP" == 1 || ( "$OVERALL_OK" != 1 && -n "$(ls -A "$RUN_DIR")" ) ]]; then
            log "run directory kept: $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vublk-smoke.XXXXXX")
export VUBLK_APT_MARK=$RUN_DIR/.apt-updated
T0=$(date +%s)

# shellcheck disable=SC2119 # no extra packages
guest_setup

case $BACKEND in
    vublk)
        resolve_vublk_bin "$ROOT"
        ;;
    qsd)
        QSD_BIN=${VUBLK_QSD_BIN:-$(command -v qemu-storage-daemon || true)}
        [[ -n "$QSD_BIN" && -x "$QSD_BIN" ]] || setup_die "qemu-storage-daemon not found (package qemu-utils 10.x, or VUBLK_QSD_BIN)"
        ;;
esac

# ---------------------------------------------------------------- accelerator
ACCEL=$(detect_accel)

# ---------------------------------------------------------------- one configuration
MiB=$((1024 * 1024))
RD_OFF=$((128 * MiB))  # host writes a pattern here before boot; the guest reads it
DISC_OFF=$((144 * MiB)) DISC_LEN=$((8 * MiB))
WZ_OFF=$((160 * MiB)) WZ_LEN=$((1 * MiB))
WR_OFF=$((192 * MiB))  # the guest writes its pattern here; the host compares
PAT_SECTORS=2048       # 1 MiB patterns
FIO_SIZE=32M           # per job; jobs = queues, at 32M apart (below RD_OFF)

# vublk's export options (serve and attach-info take the same): sets EXPORT_ARGS.
export_args() { # export_args NAME Q QS LBS WC RO CREATE IMG SOCK
    local name=$1 q=$2 qs=$3 lbs=$4 wc=$5 ro=$6 create=$7 img=$8 sock=$9
    EXPORT_ARGS=(--socket "$sock" --file "$img" --queues "$q" --queue-size "$qs"
        --serial "$SERIAL_BASE-$name" --logical-block-size "$lbs" --write-cache "$wc")
    [[ $create == 1 ]] && EXPORT_ARGS+=(--size "${IMAGE_MB}M")
    [[ $ro == 1 ]] && EXPORT_ARGS+=(--read-only)
    return 0
}

start_backend() { # start_backend NAME Q QS LBS WC RO CREATE IMG SOCK LOG
    local name=$1 q=$2 qs=$3 lbs=$4 wc=$5 ro=$6 create=$7 img=$8 sock=$9 blog=${10}
    local -a cmd
    if [[ $BACKEND == vublk ]]; then
        export_args "$@"
        cmd=("$VUBLK_BIN" serve "${EXPORT_ARGS[@]}")
    else
        local wt=off writable=on
        [[ $wc == writethrough ]] && wt=on
        [[ $ro == 1 ]] && writable=off
        cmd=("$QSD_BIN" --blockdev "driver=file,node-name=f0,filename=$img,discard=unmap"
            --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock,writable=$writable,writethrough=$wt,num-queues=$q,logical-block-size=$lbs")
    fi
    log "[$name] backend: ${cmd[*]}"
    RUST_LOG=${RUST_LOG:-info} "${cmd[@]}" </dev/null >"$blog" 2>&1 &
    BACKEND_PID=$!
}

run_config() {
    local name=$1 q=$2 qs=$3 lbs=$4 wc=$5 ro=$6 create=$7 qargs=$8
    local dir=$RUN_DIR/$name
    mkdir -p "$dir"
    local img=$dir/disk.img sock=$dir/vhost.sock blog=$dir/backend.log con=$dir/console.log
    local size=$((IMAGE_MB * MiB)) t0 t1
    FAILS=()
    t0=$(date +%s)
    [[ $BACKEND == vublk || $create == w ]] || create=0
    if [[ $create == w ]]; then
        dd if=/dev/zero of="$img" bs=1M count="$IMAGE_MB" oflag=direct conv=fsync status=none ||
            setup_die "cannot write $img with O_DIRECT (put TMPDIR on a disk file system)"
    elif [[ $create != 1 ]]; then
        truncate -s "$size" "$img"
    fi

    # expectations, as the guest should report them
    local serial=$SERIAL_BASE-$name wc_seen=$wc discard=$EXPECT_DISCARD wz=$EXPECT_WZ
    if [[ $BACKEND == qsd ]]; then
        serial=vhost_user_blk  # qsd's GET_ID is fixed
        wc_seen=writethrough   # qsd starts with wce=0 whatever writethrough= says
    fi
    # read-only: discard, write-zeroes and the cache mode are not checked
    if [[ $ro == 1 ]]; then discard=any; wz=any; wc_seen=any; fi
    declare -A want=(
        [size_sectors]=$((size / 512)) [logical_block_size]=$lbs [nr_queues]=$q
        [read_only]=$ro [serial]=$serial [fio_rc]=0 [queues_used]=$q [guest_io_errors]=0
    )
    case $wc_seen in
        writeback) want[write_cache]="write back" ;;
        writethrough) want[write_cache]="write through" ;;
    esac
    want[host_pattern_md5]=x # filled in once the pattern is written
    if [[ $ro != 1 ]]; then
        [[ $discard == 1 ]] && want[discard_rc]=0
        [[ $wz == 1 ]] && want[write_zeroes_nonzero_bytes]=0
        # the guest must send flushes to a write-back disk, none to write-through
        case $wc_seen in writeback) want[flushes_sent]=1 ;; *) want[flushes_sent]=0 ;; esac
    else
        want[write_rejected]=ok
    fi

    start_backend "$name" "$q" "$qs" "$lbs" "$wc" "$ro" "$create" "$img" "$sock" "$blog"
    if ! wait_socket "$sock" "$BACKEND_PID" "$blog" 30; then
        stop_pid "$BACKEND_PID" backend
        BACKEND_PID=""
        return 1
    fi
    if [[ $create == 1 ]]; then
        # --size must have created a preallocated image of exactly that size
        local got alloc
        got=$(stat -c %s "$img" 2>/dev/null || echo missing)
        alloc=$(($(stat -c '%b*%B' "$img" 2>/dev/null || echo 0)))
        [[ "$got" == "$size" ]] || cfg_fail "image_created: backend created '$img' with size $got, want $size"
        ((alloc >= size)) || cfg_fail "image_preallocated: created image has $alloc bytes allocated, want >= $size"
    fi
    # the host's pattern, read back by the guest
    make_pattern host "$PAT_SECTORS" >"$dir/host-pattern.bin"
    dd if="$dir/host-pattern.bin" of="$img" bs=1M seek=$((RD_OFF / MiB)) conv=notrunc,fsync status=none
    want[host_pattern_md5]=$(md5sum <"$dir/host-pattern.bin" | cut -d' ' -f1)

    local -a params=(
        "vublk.sectors=${want[size_sectors]}" "vublk.lbs=$lbs" "vublk.queues=$q" "vublk.qs=$qs"
        "vublk.ro=$ro" "vublk.serial=$serial"
        "vublk.rd_off=$RD_OFF" "vublk.rd_len=$MiB" "vublk.rd_md5=${want[host_pattern_md5]}"
        "vublk.fio_size=$FIO_SIZE"
    )
    [[ $wc_seen == any ]] || params+=("vublk.wc=$wc_seen")
    [[ $discard == 0 || $discard == 1 ]] && params+=("vublk.discard=$discard")
    [[ $wz == 0 || $wz == 1 ]] && params+=("vublk.wz=$wz")
    if [[ $ro != 1 ]]; then
        params+=("vublk.wr_off=$WR_OFF")
        [[ $discard == 1 ]] && params+=("vublk.disc_off=$DISC_OFF" "vublk.disc_len=$DISC_LEN")
        [[ $wz == 1 ]] && params+=("vublk.wz_off=$WZ_OFF" "vublk.wz_len=$WZ_LEN")
    fi

    local -a qemu=(qemu-system-x86_64 -machine q35 -accel "$ACCEL")
    # shellcheck disable=SC2207
    qemu+=($(qemu_cpu_args "$ACCEL"))
    qemu+=(-smp 2 -m 512M)
    if [[ $qargs == attach-info ]]; then
        # exactly what attach-info prints for this export, nothing of our own
        [[ $BACKEND == vublk ]] || setup_die "configuration $name needs the vublk backend (attach-info)"
        if ! "$VUBLK_BIN" attach-info --help >/dev/null 2>&1; then
            cfg_fail "attach_info: '$VUBLK_BIN attach-info --help' fails: this vublk has no attach-info subcommand"
            stop_backend_checked "$BACKEND_PID" "$blog" backend || true
            BACKEND_PID=""
            return 1
        fi
        export_args "$name" "$q" "$qs" "$lbs" "$wc" "$ro" "$create" "$img" "$sock"
        if ! "$VUBLK_BIN" attach-info "${EXPORT_ARGS[@]}" --format qemu --memory 512M >"$dir/attach-info.txt" 2>"$dir/attach-info.err"; then
            cfg_fail "attach_info: vublk attach-info --format qemu failed: $(tr '\n' '|' <"$dir/attach-info.err")"
            stop_backend_checked "$BACKEND_PID" "$blog" backend || true
            BACKEND_PID=""
            return 1
        fi
        local -a ai
        mapfile -t ai <"$dir/attach-info.txt"
        log "[$name] vublk attach-info --format qemu: ${ai[*]}"
        qemu+=("${ai[@]}")
    else
        qemu+=(-object "memory-backend-memfd,id=mem,size=512M,share=on" -machine memory-backend=mem
            -chardev "socket,id=c0,path=$sock"
            -device "vhost-user-blk-pci,chardev=c0,num-queues=$q,queue-size=$qs")
    fi
    qemu+=(-kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initrd.img"
        -append "console=ttyS0 quiet panic=-1 ${params[*]}"
        -nic none -nographic -no-reboot)
    log "[$name] qemu ($ACCEL, timeout ${GUEST_TIMEOUT}s): ${qemu[*]}"
    timeout --kill-after=10 "$GUEST_TIMEOUT" "${qemu[@]}" </dev/null >"$con" 2>&1 &
    QEMU_PID=$!
    local qrc=0
    wait "$QEMU_PID" || qrc=$?
    QEMU_PID=""
    report_from_console "$con" "$dir/report.txt"

    # --- host-side judgement
    judge_report "$dir/report.txt" "$con" "$qrc" "$GUEST_TIMEOUT" want
    local result=$GUEST_RESULT
    if [[ $ro != 1 && -n "$result" ]]; then
        make_pattern guest "$PAT_SECTORS" >"$dir/guest-pattern.bin"
        if ! cmp -s "$dir/guest-pattern.bin" <(dd if="$img" bs=1M skip=$((WR_OFF / MiB)) count=1 status=none); then
            cfg_fail "image_guest_pattern: the image at offset $WR_OFF does not hold the pattern the guest wrote"
        fi
        if [[ $wz == 1 ]] && ! cmp -s <(head -c "$WZ_LEN" /dev/zero) <(dd if="$img" bs=1M skip=$((WZ_OFF / MiB)) count=$((WZ_LEN / MiB)) status=none); then
            cfg_fail "image_write_zeroes: the image at offset $WZ_OFF is not all zeros after the guest's write-zeroes"
        fi
    fi
    if [[ $ro == 1 ]] && ! cmp -s "$dir/host-pattern.bin" <(dd if="$img" bs=1M skip=$((RD_OFF / MiB)) count=1 status=none); then
        cfg_fail "image_read_only: the read-only image changed"
    fi

    # backend: must have survived the guest and must stop cleanly on SIGTERM
    local gone=""  # vublk removes its socket on exit
    [[ $BACKEND == vublk ]] && gone=$sock
    stop_backend_checked "$BACKEND_PID" "$blog" backend "$gone" || true
    BACKEND_PID=""
    if [[ $create == w && $BACKEND == vublk ]]; then
        grep -q 'O_DIRECT on' "$blog" ||
            cfg_fail "direct_engine: vublk did not choose O_DIRECT for the written image (see $blog)"
        grep -q 'huge-page bounce buffers for large O_DIRECT transfers' "$blog" ||
            cfg_fail "huge_bounce: the guest's large transfers did not go through vublk's huge-page bounce buffers (see $blog)"
    fi

    t1=$(date +%s)
    if [[ ${#FAILS[@]} -eq 0 ]]; then
        log "[$name] PASS ($((t1 - t0)) s)"
        rm -f "$img"
        return 0
    fi
    log "[$name] FAIL ($((t1 - t0)) s); logs in $dir (console.log, backend.log)"
    return 1
}

# ---------------------------------------------------------------- main
log "backend=$BACKEND accel=$ACCEL configs=$CONFIGS run_dir=$RUN_DIR"
passed=0 failed=0
declare -a SUMMARY=()
IFS=, read -r -a cfg_names <<<"$CONFIGS"
for cname in "${cfg_names[@]}"; do
    line=$(echo "$ALL_CONFIGS" | awk -v n="$cname" '$1 == n')
    [[ -n "$line" ]] || setup_die "unknown configuration '$cname' (see --list-configs)"
    # shellcheck disable=SC2086
    if run_config $line; then
        passed=$((passed + 1))
        SUMMARY+=("PASS $cname")
    else
        failed=$((failed + 1))
        SUMMARY+=("FAIL $cname: $(printf '%s; ' "${FAILS[@]}" | sed 's/; $//')")
    fi
done

echo "== guest smoke test, backend $BACKEND, accel $ACCEL, $(($(date +%s) - T0)) s"
printf '  %s\n' "${SUMMARY[@]}"
echo "guest-smoke: $passed passed, $failed failed"
if [[ $failed -eq 0 ]]; then
    OVERALL_OK=1
    exit 0
fi
exit 1
