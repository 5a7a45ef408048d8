#!/usr/bin/env bash
# guest-reconnect.sh: restart vublk under a running guest. The guest runs fio
# with crc32c verification (rate-limited, so the write phase spans the
# restarts); meanwhile the host stops vublk with SIGTERM (orderly: in-flight
# requests finish, the socket is removed, exit status 0) and starts it again
# on the same socket and image. QEMU's chardev has reconnect-ms, so it
# reconnects and re-sends the vring state; the guest must carry on.
#
# Usage:
#   integration/guest-reconnect.sh [--restarts N] [--sabotage MODE] [--keep]
#                                  [--no-install] [-h]
#
# Pass only if: the guest's /init reports PASS (disk checks, fio verify, no
# "I/O error" in the guest's kernel log, the pattern/discard/write-zeroes steps
# after fio); each restart happened while fio was still writing; each stop
# exited 0 within 10 s and removed the socket; each new vublk saw QEMU
# reconnect within VUBLK_RECONNECT_TIMEOUT seconds; and, on the host, the
# image holds what fio wrote (fio --verify_only against the image file, same
# job) and the guest's pattern. Exit 0 = pass, 1 = a check failed (each one is
# named), 2 = setup problem (a tool is missing).
#
# --sabotage checks the test itself (the run must then FAIL):
#   no-restart    vublk is stopped and not started again (nothing relistens)
#   other-socket  vublk is started again on a different socket path
#   corrupt       while vublk is down, 4 MiB of fio's region in the image are zeroed
#
# Environment (plus guest-smoke.sh's VUBLK_BIN, VUBLK_ACCEL, VUBLK_NO_INSTALL,
# VUBLK_KEEP, VUBLK_GUEST_TIMEOUT and build-guest.sh's variables):
#   VUBLK_RECONNECT_RESTARTS   restarts during fio (default 3; same as --restarts)
#   VUBLK_RECONNECT_TIMEOUT    seconds QEMU has to reconnect after a restart (default 15)
#   VUBLK_RECONNECT_DOWN       seconds vublk stays down (default 1)
#   VUBLK_RECONNECT_CACHE      writethrough (default: every write is made durable
#                              before it completes, so requests are more often in
#                              flight when SIGTERM arrives) or writeback
#   VUBLK_QEMU_TRACE           comma-separated QEMU trace events for the console log,
#                              e.g. vhost_user_write,vhost_user_read,vhost_dev_start,vhost_dev_stop
#   RUST_LOG                   vublk's log level (default info); logs are backend.N.log
set -euo pipefail
export VUBLK_LOG_TAG=guest-reconnect
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$HERE/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/guest-lib.sh
source "$HERE/lib/guest-lib.sh"
ROOT=$(repo_root)
GUEST_DIR=$ROOT/target/guest

KEEP=${VUBLK_KEEP:-0}
NO_INSTALL=${VUBLK_NO_INSTALL:-0}
ACCEL_REQ=${VUBLK_ACCEL:-auto}
GUEST_TIMEOUT=${VUBLK_GUEST_TIMEOUT:-240}
RESTARTS=${VUBLK_RECONNECT_RESTARTS:-3}
RECONNECT_TIMEOUT=${VUBLK_RECONNECT_TIMEOUT:-15}
DOWN_S=${VUBLK_RECONNECT_DOWN:-1}
CACHE=${VUBLK_RECONNECT_CACHE:-writethrough}
SABOTAGE=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --restarts) RESTARTS=${2:?--restarts needs a value}; shift 2 ;;
        --sabotage) SABOTAGE=${2:?--sabotage needs a value}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --no-install) NO_INSTALL=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; setup_die "unknown argument '$1'" ;;
    esac
done
[[ $RESTARTS =~ ^[1-9][0-9]*$ ]] || setup_die "--restarts must be a positive number (got '$RESTARTS')"
case $SABOTAGE in "" | no-restart | other-socket | corrupt) ;; *) setup_die "unknown --sabotage '$SABOTAGE'" ;; esac
case $CACHE in writeback | writethrough) ;; *) setup_die "VUBLK_RECONNECT_CACHE must be writeback or writethrough (got '$CACHE')" ;; esac
case $ACCEL_REQ in auto | tcg | kvm) ;; *) setup_die "VUBLK_ACCEL must be auto, tcg or kvm (got '$ACCEL_REQ')" ;; esac

RUN_DIR=""
QEMU_PID=""
BACKEND_PID=""
OVERALL_OK=0

# shellcheck disable=SC2317 # invoked through trap
cleanup() {
    local rc=$?
    stop_pid "$QEMU_PID" qemu
    stop_pid "$BACKEND_PID" backend
    rm -f "${VUBLK_APT_MARK:-}"
    if [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]]; then
        if [[ "$KEEP" == 1 || "$OVERALL_OK" != 1 ]]; then
            rm -f "$RUN_DIR/disk.img"  # 256 MiB; the logs are what matters
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

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vublk-reconnect.XXXXXX")
export VUBLK_APT_MARK=$RUN_DIR/.apt-updated
T0=$(now_s)
# shellcheck disable=SC2119 # no extra packages
guest_setup
resolve_vublk_bin "$ROOT"
ACCEL=$(detect_accel)
T_SETUP=$(now_s)

# ---------------------------------------------------------------- the disk
MiB=$((1024 * 1024))
IMAGE_MB=256
Q=2 QS=256 SERIAL=vublk-reconnect
RD_OFF=$((128 * MiB))
DISC_OFF=$((144 * MiB)) DISC_LEN=$((8 * MiB))
WZ_OFF=$((160 * MiB)) WZ_LEN=$((1 * MiB))
WR_OFF=$((192 * MiB))
PAT_SECTORS=2048
# fio: Q jobs of FIO_MB each at FIO_RATE per job: about FIO_MB/rate seconds of
# writes (16 s), then the verify pass. Restarts are spread over the first 10 s.
# iodepth 16 and one I/O thread per queue in vublk, so that requests queue up
# in vublk now and then and a SIGTERM sometimes finds some in flight.
FIO_MB=64 FIO_RATE=4m
FIO_JOB=(--name=verify --rw=randwrite --bsrange=4k-64k --numjobs="$Q" --offset_increment="${FIO_MB}M"
    --size="${FIO_MB}M" --verify=crc32c)
FIRST_RESTART_S=2
RESTART_GAP_S=$(((10 - FIRST_RESTART_S) / RESTARTS))
((RESTART_GAP_S >= 2)) || RESTART_GAP_S=2

IMG=$RUN_DIR/disk.img SOCK=$RUN_DIR/vhost.sock CON=$RUN_DIR/console.log
truncate -s $((IMAGE_MB * MiB)) "$IMG"
make_pattern host "$PAT_SECTORS" >"$RUN_DIR/host-pattern.bin"
dd if="$RUN_DIR/host-pattern.bin" of="$IMG" bs=1M seek=$((RD_OFF / MiB)) conv=notrunc,fsync status=none
HOST_MD5=$(md5sum <"$RUN_DIR/host-pattern.bin" | cut -d' ' -f1)

VUBLK_ARGS=(serve --file "$IMG" --queues "$Q" --queue-size "$QS" --serial "$SERIAL" --write-cache "$CACHE" --io-threads 1)
start_vublk() { # start_vublk N SOCK: instance N (0 = before boot)
    local blog=$RUN_DIR/backend.$1.log
    log "vublk #$1: $VUBLK_BIN ${VUBLK_ARGS[*]} --socket $2"
    RUST_LOG=${RUST_LOG:-info} "$VUBLK_BIN" "${VUBLK_ARGS[@]}" --socket "$2" </dev/null >"$blog" 2>&1 &
    BACKEND_PID=$!
    wait_socket "$2" "$BACKEND_PID" "$blog" 30
}

# wait_log FILE REGEX SECONDS: a line matching REGEX appears in FILE in time
wait_log() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

declare -a STEP_TIMES=()
result_line() {
    echo "== guest reconnect test, accel $ACCEL, $CACHE, $RESTARTS restart(s)${SABOTAGE:+, sabotage $SABOTAGE}, $(($(now_s) - T0)) s"
    printf '  %s\n' "${STEP_TIMES[@]}"
}

run() {
    start_vublk 0 "$SOCK" || return 1
    grep -a 'engine' "$RUN_DIR/backend.0.log" | head -n1 | sed 's/^/    /' >&2 || true

    local -a params=(
        "vublk.sectors=$((IMAGE_MB * MiB / 512))" "vublk.lbs=512" "vublk.queues=$Q" "vublk.qs=$QS"
        "vublk.ro=0" "vublk.serial=$SERIAL" "vublk.wc=$CACHE" "vublk.discard=1" "vublk.wz=1"
        "vublk.rd_off=$RD_OFF" "vublk.rd_len=$MiB" "vublk.rd_md5=$HOST_MD5"
        "vublk.fio_size=${FIO_MB}M" "vublk.fio_rate=$FIO_RATE" "vublk.fio_iodepth=16" "vublk.fio_timeout=$((GUEST_TIMEOUT - 30))"
        "vublk.wr_off=$WR_OFF" "vublk.disc_off=$DISC_OFF" "vublk.disc_len=$DISC_LEN"
        "vublk.wz_off=$WZ_OFF" "vublk.wz_len=$WZ_LEN"
    )
    local -a qemu=(qemu-system-x86_64 -machine q35 -accel "$ACCEL")
    # shellcheck disable=SC2207
    qemu+=($(qemu_cpu_args "$ACCEL"))
    qemu+=(-smp 2 -m 512M
        -object "memory-backend-memfd,id=mem,size=512M,share=on" -machine memory-backend=mem
        -chardev "socket,id=c0,path=$SOCK,reconnect-ms=1000"
        -device "vhost-user-blk-pci,chardev=c0,num-queues=$Q,queue-size=$QS"
        -kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initrd.img"
        -append "console=ttyS0 quiet panic=-1 ${params[*]}"
        -nic none -nographic -no-reboot)
    local ev
    for ev in ${VUBLK_QEMU_TRACE:+${VUBLK_QEMU_TRACE//,/ }}; do qemu+=(-trace "enable=$ev"); done
    log "qemu ($ACCEL, timeout ${GUEST_TIMEOUT}s): ${qemu[*]}"
    local t_boot t_fio t
    t_boot=$(now_s)
    timeout --kill-after=10 "$GUEST_TIMEOUT" "${qemu[@]}" </dev/null >"$CON" 2>&1 &
    QEMU_PID=$!

    local w=0
    wait_console "$CON" '^VUBLK-MARK fio-start' "$GUEST_TIMEOUT" "$QEMU_PID" || w=$?
    if [[ $w != 0 ]]; then
        cfg_fail "fio_started: the guest never started fio ($([[ $w == 1 ]] && echo "qemu exited" || echo "timeout")); console tail: $(console_text "$CON" | tail -n 3 | tr '\n' '|')"
    else
        t_fio=$(now_s)
        STEP_TIMES+=("boot to fio start: $((t_fio - t_boot)) s")
        local k sock=$SOCK t_stop t_up
        sleep "$FIRST_RESTART_S"
        for ((k = 1; k <= RESTARTS; k++)); do
            ((k > 1)) && sleep "$RESTART_GAP_S"
            if console_text "$CON" | grep -aq '^VUBLK-MARK fio-end'; then
                cfg_fail "restart_during_fio: fio had finished before restart $k; the restart did not overlap guest I/O (make fio longer: FIO_MB/FIO_RATE)"
                break
            fi
            t_stop=$(date +%s.%N)
            log "restart $k: SIGTERM to vublk (pid $BACKEND_PID)"
            stop_backend_checked "$BACKEND_PID" "$RUN_DIR/backend.$((k - 1)).log" "stop$k" "$sock" || true
            BACKEND_PID=""
            local inflight
            inflight=$(grep -aE 'queue [0-9]+: finishing [0-9]+ in-flight' "$RUN_DIR/backend.$((k - 1)).log" | sed -E 's/.*(queue [0-9]+): finishing ([0-9]+) .*/\1: \2/' | paste -sd, - || true)
            STEP_TIMES+=("restart $k: in flight at SIGTERM: ${inflight:-none}")
            if [[ $SABOTAGE == corrupt ]]; then
                log "sabotage: zeroing 4 MiB of fio's region in the image while vublk is down"
                dd if=/dev/zero of="$IMG" bs=1M seek=4 count=4 conv=notrunc,fsync status=none
            fi
            sleep "$DOWN_S"
            if [[ $SABOTAGE == no-restart ]]; then
                log "sabotage: vublk is not started again"
                break
            fi
            [[ $SABOTAGE == other-socket ]] && sock=$RUN_DIR/other.sock
            start_vublk "$k" "$sock" || break
            if wait_log "$RUN_DIR/backend.$k.log" 'frontend connected' "$RECONNECT_TIMEOUT"; then
                t_up=$(date +%s.%N)
                STEP_TIMES+=("restart $k: SIGTERM to QEMU reconnected: $(awk -v a="$t_stop" -v b="$t_up" 'BEGIN {printf "%.1f", b - a}') s")
            else
                cfg_fail "reconnect$k: QEMU did not connect to the restarted vublk within ${RECONNECT_TIMEOUT}s"
                break
            fi
        done
        if [[ ${#FAILS[@]} -gt 0 ]]; then
            log "a restart check failed: stopping the guest now rather than waiting for its timeout"
            stop_pid "$QEMU_PID" qemu
        fi
    fi
    local qrc=0
    wait "$QEMU_PID" || qrc=$?
    QEMU_PID=""
    t=$(now_s)
    STEP_TIMES+=("guest total (boot to power-off): $((t - t_boot)) s")
    report_from_console "$CON" "$RUN_DIR/report.txt"
    console_text "$CON" | grep -a 'qemu-system' | sed 's/^/    qemu: /' >&2 || true

    # shellcheck disable=SC2034 # read by judge_report through a nameref
    declare -A want=(
        [size_sectors]=$((IMAGE_MB * MiB / 512)) [logical_block_size]=512 [nr_queues]=$Q
        [read_only]=0 [serial]=$SERIAL [fio_rc]=0 [queues_used]=$Q [guest_io_errors]=0
        [host_pattern_md5]=$HOST_MD5 [discard_rc]=0 [write_zeroes_nonzero_bytes]=0
    )
    # the guest flushes a write-back disk, never a write-through one
    if [[ $CACHE == writeback ]]; then
        want[write_cache]="write back"
        want[flushes_sent]=1
    else
        want[write_cache]="write through"
        # shellcheck disable=SC2034 # read by judge_report through a nameref
        want[flushes_sent]=0
    fi
    judge_report "$RUN_DIR/report.txt" "$CON" "$qrc" "$GUEST_TIMEOUT" want
    if [[ -z "$GUEST_RESULT" ]]; then return 1; fi

    # The host's view of the image, after the guest powered off.
    make_pattern guest "$PAT_SECTORS" >"$RUN_DIR/guest-pattern.bin"
    cmp -s "$RUN_DIR/guest-pattern.bin" <(dd if="$IMG" bs=1M skip=$((WR_OFF / MiB)) count=1 status=none) ||
        cfg_fail "image_guest_pattern: the image at offset $WR_OFF does not hold the pattern the guest wrote"
    if [[ -n "$BACKEND_PID" ]]; then
        stop_backend_checked "$BACKEND_PID" "$RUN_DIR/backend.$RESTARTS.log" final "$SOCK" || true
        BACKEND_PID=""
    fi
    t=$(now_s)
    # fio's own check of every block it wrote, against the image file (same job,
    # same offsets and seeds: randrepeat is on by default).
    if (cd "$RUN_DIR" && fio "${FIO_JOB[@]}" --filename="$IMG" --ioengine=psync --verify_only --verify_fatal=1 \
        --verify_state_save=0 --output="$RUN_DIR/host-verify.txt" >/dev/null 2>&1); then
        STEP_TIMES+=("host fio --verify_only of the image: $(($(now_s) - t)) s")
    else
        cfg_fail "image_fio_verify: fio --verify_only on the image found bad blocks: $(grep -a -m3 -iE 'verify|bad|crc' "$RUN_DIR/host-verify.txt" | tr '\n' '|')"
    fi
}

log "accel=$ACCEL restarts=$RESTARTS${SABOTAGE:+ sabotage=$SABOTAGE} run_dir=$RUN_DIR"
STEP_TIMES+=("setup (packages, guest build, accel): $((T_SETUP - T0)) s")
run || true
result_line
if [[ ${#FAILS[@]} -eq 0 ]]; then
    echo "guest-reconnect: PASS"
    OVERALL_OK=1
    exit 0
fi
printf '  FAIL %s\n' "${FAILS[@]}"
echo "guest-reconnect: FAIL (${#FAILS[@]} failed checks; logs in $RUN_DIR)"
exit 1
