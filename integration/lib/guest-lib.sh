# shellcheck shell=bash
# Helpers shared by the guest tests (guest-smoke.sh, guest-reconnect.sh,
# libvirt-guest.sh). Source it after common.sh; do not run it.
#
# The functions use these globals of the caller:
#   RUN_DIR      the run directory (kept on failure)
#   GUEST_DIR    where build-guest.sh puts vmlinuz and initrd.img
#   ACCEL_REQ    auto | tcg | kvm
#   NO_INSTALL   1: never run apt-get
#   BACKEND_PID  the backend being waited for (wait_socket clears it when it died)
# and cfg_fail() (defined here: it appends to FAILS).

# Exit 2 for setup problems (something missing), 1 for failed checks.
setup_die() { printf '[%s] SETUP ERROR: %s\n' "${VUBLK_LOG_TAG:-vublk-it}" "$*" >&2; exit 2; }

declare -a FAILS=()
cfg_fail() { FAILS+=("$*"); log "FAIL: $*"; }

# Seconds since the epoch, for per-step timing.
now_s() { date +%s; }

stop_pid() { # stop_pid PID NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1 i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$2 (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Console text without escape sequences and carriage returns.
console_text() { sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$1" | tr -d '\r' | tr -cd '[:print:]\n'; }

qemu_cpu_args() { if [[ $1 == kvm ]]; then echo "-cpu host"; fi; }

# Host packages, the guest and QEMU's vhost-user-blk-pci; exits 2 when one is missing.
guest_setup() {
    local here
    here=$(dirname "${BASH_SOURCE[0]}")
    if [[ "${NO_INSTALL:-0}" == 1 ]]; then
        command -v qemu-system-x86_64 >/dev/null || setup_die "qemu-system-x86_64 not found (VUBLK_NO_INSTALL=1; see integration/lib/install-deps.sh)"
    else
        "$here/install-deps.sh" "$@" || setup_die "installing host packages failed (see above)"
    fi
    "$here/build-guest.sh" "$GUEST_DIR" || setup_die "building the guest failed (see above)"
    [[ -f $GUEST_DIR/vmlinuz && -f $GUEST_DIR/initrd.img ]] || setup_die "guest kernel or initramfs missing in $GUEST_DIR"
    qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-blk-pci"' ||
        setup_die "this qemu-system-x86_64 has no vhost-user-blk-pci device"
}

# Sets VUBLK_BIN: $VUBLK_BIN, else ROOT/target/release/vublk, rebuilt every time
# (a no-op when it is up to date) so a stale binary is never what gets tested.
resolve_vublk_bin() {
    local root=$1
    VUBLK_BIN=${VUBLK_BIN:-}
    if [[ -z "$VUBLK_BIN" ]]; then
        VUBLK_BIN=$root/target/release/vublk
        log "building vublk: cargo build --release"
        (cd "$root" && cargo build --release) >&2 || setup_die "cargo build --release failed: no vublk binary to test"
    fi
    [[ -x "$VUBLK_BIN" ]] || setup_die "vublk binary '$VUBLK_BIN' not found or not executable"
    "$VUBLK_BIN" serve --help >/dev/null 2>&1 || setup_die "'$VUBLK_BIN serve --help' failed: the binary has no working 'serve' command"
}

# Prints the accelerator to use: tcg or kvm (see VUBLK_ACCEL in integration/README.md).
detect_accel() {
    if [[ "$ACCEL_REQ" != auto ]]; then
        echo "$ACCEL_REQ"
        return
    fi
    if [[ ! -c /dev/kvm || ! -r /dev/kvm || ! -w /dev/kvm ]]; then
        log "accel: no usable /dev/kvm: tcg"
        echo tcg
        return
    fi
    # /dev/kvm may exist without being able to run an ordinary guest (nested,
    # paging-only): boot the real test kernel with KVM; it must report back.
    local key cache=$GUEST_DIR/accel.cache
    key="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) $(qemu-system-x86_64 --version | head -n1) $(cat "$GUEST_DIR/guest.stamp")"
    if [[ -f $cache && "$(sed -n 1p "$cache")" == "$key" ]]; then
        local cached
        cached=$(sed -n 2p "$cache")
        log "accel: $cached (cached probe result for this boot)"
        echo "$cached"
        return
    fi
    local out=$RUN_DIR/kvm-probe.log result=tcg
    # shellcheck disable=SC2046
    timeout --kill-after=5 "${VUBLK_KVM_PROBE_TIMEOUT:-20}" qemu-system-x86_64 -machine q35 -accel kvm $(qemu_cpu_args kvm) \
        -smp 1 -m 256M -kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initrd.img" \
        -append 'console=ttyS0 quiet panic=-1 vublk.mode=probe' -nographic -no-reboot </dev/null >"$out" 2>&1 || true
    if grep -q 'VUBLK-PROBE ok' "$out"; then result=kvm; fi
    if [[ $result == kvm ]]; then
        log "accel: KVM probe guest booted: kvm"
    else
        log "accel: KVM probe guest did not report back within ${VUBLK_KVM_PROBE_TIMEOUT:-20}s ($(console_text "$out" | grep -a -m1 'qemu-system' || echo 'no error printed')): tcg"
    fi
    printf '%s\n%s\n' "$key" "$result" >"$cache"
    echo "$result"
}

wait_socket() { # wait_socket SOCK PID LOG SECONDS
    local i
    for ((i = 0; i < $4 * 10; i++)); do
        [[ -S $1 ]] && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            local rc=0
            wait "$2" 2>/dev/null || rc=$?
            # shellcheck disable=SC2034 # the caller's global
            BACKEND_PID=""
            cfg_fail "backend exited (status $rc) before creating its socket; its log: $(tail -n 5 "$3" | tr '\n' '|')"
            return 1
        fi
        sleep 0.1
    done
    cfg_fail "backend did not create socket $1 within $4 s"
    return 1
}

# wait_console FILE REGEX SECONDS PID: wait until the console shows a line
# matching REGEX (0), PID exits (1) or time runs out (2).
wait_console() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        console_text "$1" 2>/dev/null | grep -aqE "$2" && return 0
        kill -0 "$4" 2>/dev/null || return 1
        sleep 0.1
    done
    return 2
}

# stop_backend_checked PID LOG NAME [SOCK]: SIGTERM; the backend must exit 0
# within 10 s and, when SOCK is given, must have removed its socket.
stop_backend_checked() {
    local pid=$1 blog=$2 what=$3 sock=${4:-} i rc=0
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || rc=$?
        cfg_fail "${what}_alive: the backend exited (status $rc) during the test; its log: $(tail -n 5 "$blog" | tr '\n' '|')"
        return 1
    fi
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        cfg_fail "${what}_sigterm: the backend was still running 10 s after SIGTERM"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    if [[ $rc != 0 ]]; then
        cfg_fail "${what}_sigterm: the backend exited with status $rc after SIGTERM; its log: $(tail -n 5 "$blog" | tr '\n' '|')"
        return 1
    fi
    if [[ -n "$sock" && -e "$sock" ]]; then
        cfg_fail "${what}_socket_removed: $sock still exists after the backend exited"
        return 1
    fi
    return 0
}

# judge_report REPORT CONSOLE QEMU_RC TIMEOUT WANT_ARRAY_NAME
# The guest's verdict and every expected value (a broken /init cannot pass by
# omission). Failures go to cfg_fail. Sets GUEST_RESULT to the RESULT line.
judge_report() {
    local report=$1 con=$2 qrc=$3 tmo=$4
    local -n wanted=$5
    if [[ $qrc == 124 || $qrc == 137 ]]; then
        cfg_fail "timeout: the guest did not finish within ${tmo}s; last guest line: '$(tail -n1 "$report")'; console tail: $(console_text "$con" | grep -av '^\s*$' | tail -n 3 | tr '\n' '|')"
    elif [[ $qrc != 0 ]]; then
        cfg_fail "qemu exited with status $qrc: $(console_text "$con" | grep -a 'qemu-system' | tail -n 3 | tr '\n' '|')"
    fi
    local l k got
    declare -A guest_failed=()
    GUEST_RESULT=$(grep -a '^VUBLK-RESULT ' "$report" | tail -n1 || true)
    while IFS= read -r l; do
        l=${l#VUBLK-FAIL }
        guest_failed[${l%% *}]=1
        cfg_fail "${l%% *}: ${l#* }"
    done < <(grep -a '^VUBLK-FAIL ' "$report")
    if [[ -z "$GUEST_RESULT" ]]; then
        cfg_fail "guest printed no VUBLK-RESULT line (see $con)"
    elif [[ "$GUEST_RESULT" != "VUBLK-RESULT PASS" && ${#guest_failed[@]} -eq 0 ]]; then
        cfg_fail "guest: ${GUEST_RESULT#VUBLK-}"
    fi
    for k in "${!wanted[@]}"; do
        [[ -n "${guest_failed[$k]:-}" ]] && continue
        if [[ $k == write_rejected ]]; then
            grep -aqx 'VUBLK-OK write_rejected' "$report" || cfg_fail "write_rejected: guest did not confirm that writes to the read-only disk fail"
            continue
        fi
        if ! got=$(grep -a "^VUBLK-CHECK $k=" "$report" | tail -n1); then
            [[ -n "$GUEST_RESULT" ]] && cfg_fail "$k: the guest did not report it"
            continue
        fi
        got=${got#"VUBLK-CHECK $k="}
        [[ "$got" == "${wanted[$k]}" ]] || cfg_fail "$k: guest saw '$got', expected '${wanted[$k]}'"
    done
}

# report_from_console CONSOLE REPORT: the VUBLK-* lines, also shown on stderr.
report_from_console() {
    console_text "$1" | grep -ao 'VUBLK-[A-Z]*.*' >"$2" || true
    sed 's/^/    /' "$2" >&2
}
