#!/usr/bin/env bash
# libvirt-guest.sh: boot the smoke-test guest as a real libvirt domain whose
# disk is a vublk export attached with <disk type='vhostuser'>, and check from
# inside the guest what it sees and that I/O is correct (the same /init checks
# as guest-smoke.sh: size, block size, queues, ring size, cache mode, serial,
# discard/write-zeroes, fio verify, no I/O errors in the guest's kernel log).
# Midway through fio, vublk is restarted once (SIGTERM, then started again on
# the same socket): the domain's <reconnect enabled='yes' timeout='1'/> must
# bring the disk back.
#
# Usage:
#   integration/libvirt-guest.sh [--attach-info auto|on|off] [--keep]
#                                [--no-install] [--no-restart] [-h]
#
# libvirt runs privileged but private: libvirtd (Debian's libvirt-daemon and
# libvirt-daemon-driver-qemu, installed by lib/install-deps.sh --libvirt)
# starts in its own mount namespace, where the run directory is bind-mounted
# over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
# /var/log/libvirt, and over /etc/passwd and /etc/group when the host has no
# libvirt-qemu user (a copy that adds one). Nothing of the host's libvirt
# configuration is read or changed; empty mount points that had to be created
# are removed at the end. QEMU runs as libvirt-qemu, as on a real host, so
# vublk's socket is created with --socket-group <libvirt-qemu's gid>
# --socket-mode 0660. virsh talks to the private daemon's socket.
#
# The <disk> element: with --attach-info on (default) it is what `vublk
# attach-info --format libvirt` prints for the export (the test fails if the
# binary has no attach-info); off: the hand-written element below; auto:
# attach-info when `vublk attach-info --help` works, else the hand-written one.
#
# Exit 0 = pass, 1 = a check failed (each one is named), 2 = setup problem.
#
# Environment (plus guest-smoke.sh's VUBLK_BIN, VUBLK_ACCEL, VUBLK_NO_INSTALL,
# VUBLK_KEEP, VUBLK_GUEST_TIMEOUT and build-guest.sh's variables):
#   VUBLK_ATTACH_INFO     on (default) | auto | off (same as --attach-info)
#   VUBLK_LIBVIRT_RESTART 1 (default): restart vublk once during fio; 0: do not
#   VUBLK_LIBVIRTD        libvirtd binary (default: from PATH)
set -euo pipefail
export VUBLK_LOG_TAG=libvirt-guest
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
ATTACH_INFO=${VUBLK_ATTACH_INFO:-on}
RESTART=${VUBLK_LIBVIRT_RESTART:-1}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --attach-info) ATTACH_INFO=${2:?--attach-info needs a value}; shift 2 ;;
        --attach-info=*) ATTACH_INFO=${1#*=}; shift ;;
        --keep) KEEP=1; shift ;;
        --no-install) NO_INSTALL=1; shift ;;
        --no-restart) RESTART=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; setup_die "unknown argument '$1'" ;;
    esac
done
case $ATTACH_INFO in auto | on | off) ;; *) setup_die "--attach-info must be auto, on or off (got '$ATTACH_INFO')" ;; esac
case $ACCEL_REQ in auto | tcg | kvm) ;; *) setup_die "VUBLK_ACCEL must be auto, tcg or kvm (got '$ACCEL_REQ')" ;; esac

RUN_DIR=""
BACKEND_PID=""
LIBVIRTD_PID=""
DOMAIN=""
VIRSH_URI=""
OVERALL_OK=0
declare -a CREATED_DIRS=()
declare -a STEP_TIMES=()

virsh_() { timeout --kill-after=5 60 virsh -q -c "$VIRSH_URI" "$@"; }

# shellcheck disable=SC2317 # invoked through trap
cleanup() {
    local rc=$? d
    if [[ -n "$DOMAIN" && -n "$LIBVIRTD_PID" ]] && kill -0 "$LIBVIRTD_PID" 2>/dev/null; then
        virsh_ destroy "$DOMAIN" >/dev/null 2>&1 || true
        virsh_ undefine "$DOMAIN" >/dev/null 2>&1 || true
    fi
    stop_pid "$LIBVIRTD_PID" libvirtd
    # a QEMU that outlived libvirtd (it should not): its pid file is ours
    if [[ -n "$RUN_DIR" && -n "$DOMAIN" && -f "$RUN_DIR/libvirt/run/qemu/$DOMAIN.pid" ]]; then
        d=$(cat "$RUN_DIR/libvirt/run/qemu/$DOMAIN.pid" 2>/dev/null || true)
        if [[ -n "$d" ]] && kill -0 "$d" 2>/dev/null && grep -qa "guest=$DOMAIN" "/proc/$d/cmdline" 2>/dev/null; then
            log "qemu (pid $d) still running after libvirtd stopped: killing it"
            kill -KILL "$d" 2>/dev/null || true
        fi
    fi
    stop_pid "$BACKEND_PID" backend
    for d in "${CREATED_DIRS[@]}"; do rmdir "$d" 2>/dev/null || log "could not remove $d (not empty?)"; done
    rm -f "${VUBLK_APT_MARK:-}"
    if [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]]; then
        if [[ "$KEEP" == 1 || "$OVERALL_OK" != 1 ]]; then
            rm -f "$RUN_DIR/disk.img"
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

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vublk-libvirt.XXXXXX")
chmod 0755 "$RUN_DIR" # QEMU (libvirt-qemu) must reach the socket, kernel and initramfs
export VUBLK_APT_MARK=$RUN_DIR/.apt-updated
T0=$(now_s)
[[ "$(id -u)" == 0 ]] || setup_die "libvirt-guest.sh runs a privileged libvirtd: run it as root"
guest_setup --libvirt
command -v unshare >/dev/null || setup_die "unshare not found (package util-linux)"
LIBVIRTD=${VUBLK_LIBVIRTD:-$(command -v libvirtd || true)}
[[ -n "$LIBVIRTD" && -x "$LIBVIRTD" ]] || setup_die "libvirtd not found (package libvirt-daemon; integration/lib/install-deps.sh --libvirt)"
command -v virsh >/dev/null || setup_die "virsh not found (package libvirt-clients)"
resolve_vublk_bin "$ROOT"
ACCEL=$(detect_accel)
case $ACCEL in kvm) DOMTYPE=kvm ;; *) DOMTYPE=qemu ;; esac
STEP_TIMES+=("setup (packages, guest build, accel): $(($(now_s) - T0)) s")

# ---------------------------------------------------------------- the export
MiB=$((1024 * 1024))
IMAGE_MB=256
Q=2 QS=256 SERIAL=vublk-libvirt-0
RD_OFF=$((128 * MiB))
DISC_OFF=$((144 * MiB)) DISC_LEN=$((8 * MiB))
WZ_OFF=$((160 * MiB)) WZ_LEN=$((1 * MiB))
WR_OFF=$((192 * MiB))
PAT_SECTORS=2048
IMG=$RUN_DIR/disk.img SOCK=$RUN_DIR/vhost.sock CON=$RUN_DIR/console.log
LV=$RUN_DIR/libvirt

# ---------------------------------------------------------------- private libvirtd
# The user QEMU runs as. libvirt's QEMU driver resolves its built-in default
# user (libvirt-qemu on Debian) before it reads qemu.conf and refuses to start
# without it; libvirt-daemon-system would create it, but that package also
# pulls systemd. So, unless the host has one, a private passwd/group copy adds it.
QEMU_USER=libvirt-qemu
setup_identity() {
    cp /etc/passwd "$LV/passwd"
    cp /etc/group "$LV/group"
    if getent passwd "$QEMU_USER" >/dev/null; then
        QEMU_UID=$(id -u "$QEMU_USER")
        QEMU_GID=$(id -g "$QEMU_USER")
        PRIVATE_IDS=0
        return
    fi
    local n=64055
    while getent passwd "$n" >/dev/null || getent group "$n" >/dev/null; do n=$((n + 1)); done
    QEMU_UID=$n QEMU_GID=$n PRIVATE_IDS=1
    echo "$QEMU_USER:x:$n:$n:libvirt qemu (vublk test):/var/lib/libvirt:/usr/sbin/nologin" >>"$LV/passwd"
    echo "$QEMU_USER:x:$n:" >>"$LV/group"
}

start_libvirtd() {
    mkdir -p "$LV"/{etc,run,lib,cache,log}
    setup_identity
    cat >"$LV/etc/libvirtd.conf" <<EOF
# private libvirtd of integration/libvirt-guest.sh
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_level = ${VUBLK_LIBVIRT_LOG_LEVEL:-3}
log_filters = "3:rpc 3:event 3:object 3:util.json 3:util.threadpool 3:util.file 3:conf"
log_outputs = "${VUBLK_LIBVIRT_LOG_LEVEL:-3}:file:$LV/libvirtd.log"
EOF
    # Each setting below and why:
    cat >"$LV/etc/qemu.conf" <<EOF
# private qemu.conf of integration/libvirt-guest.sh
# no AppArmor/SELinux profiles or labels for a test domain (DAC stays: QEMU runs as
# $QEMU_USER); not needed where neither exists, but keeps a host that has them untouched
security_driver = "none"
# libvirt creates no cgroups for the domain: the host's cgroup tree stays as it is
cgroup_controllers = [ ]
# needed: with its private /dev for QEMU, libvirt fails to start the domain ("Unable
# to move .../1-NAME.kvm mount to /dev/kvm: Invalid argument") once /dev/kvm is hidden
namespaces = [ ]
# QEMU's stdout/stderr to a plain file, without virtlogd
stdio_handler = "file"
EOF
    local d
    for d in /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
        if [[ ! -d $d ]]; then
            mkdir -p "$d" || setup_die "cannot create the mount point $d"
            CREATED_DIRS+=("$d")
        fi
    done
    local binds="mount --bind '$LV/etc' /etc/libvirt && mount --bind '$LV/run' /run/libvirt &&
        mount --bind '$LV/lib' /var/lib/libvirt && mount --bind '$LV/cache' /var/cache/libvirt &&
        mount --bind '$LV/log' /var/log/libvirt"
    if [[ $PRIVATE_IDS == 1 ]]; then
        binds="$binds && mount --bind '$LV/passwd' /etc/passwd && mount --bind '$LV/group' /etc/group"
    fi
    # A /dev/kvm that cannot run a guest (see detect_accel) is hidden from this
    # libvirtd: libvirt 9.0 otherwise finds KVM "enabled" when it probes QEMU but
    # not usable by the QEMU user, throws its capabilities cache away at every
    # look-up and probes QEMU again (about 4 s each, a minute per domain define).
    if [[ $ACCEL != kvm && -e /dev/kvm ]]; then
        : >"$LV/no-kvm"
        chmod 0600 "$LV/no-kvm"
        binds="$binds && mount --bind '$LV/no-kvm' /dev/kvm"
    fi
    log "libvirtd: $LIBVIRTD in a private mount namespace (config, state and sockets under $LV)"
    unshare --mount --propagation private -- sh -c "$binds && exec '$LIBVIRTD' --config /etc/libvirt/libvirtd.conf" \
        </dev/null >"$LV/libvirtd.stdout" 2>&1 &
    LIBVIRTD_PID=$!
    VIRSH_URI="qemu:///system?socket=$LV/run/libvirt-sock"
    local i
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$LIBVIRTD_PID" 2>/dev/null; then
            local rc=0
            wait "$LIBVIRTD_PID" || rc=$?
            LIBVIRTD_PID=""
            setup_die "libvirtd exited (status $rc) during start-up: $(tail -n 5 "$LV/libvirtd.stdout" | tr '\n' '|') log: $(grep -a ' error : ' "$LV/libvirtd.log" 2>/dev/null | tail -n 3 | tr '\n' '|')"
        fi
        if [[ -S $LV/run/libvirt-sock ]] && virsh_ version >"$LV/virsh-version.txt" 2>&1; then
            log "libvirtd up: $(tr '\n' ' ' <"$LV/virsh-version.txt")"
            return 0
        fi
        sleep 0.1
    done
    setup_die "libvirtd did not answer on $LV/run/libvirt-sock within 30 s: $(grep -a ' error : ' "$LV/libvirtd.log" 2>/dev/null | tail -n 3 | tr '\n' '|')"
}

# ---------------------------------------------------------------- the <disk> element
EXPORT_ARGS=(--socket "$SOCK" --file "$IMG" --queues "$Q" --queue-size "$QS" --serial "$SERIAL")

have_attach_info() { "$VUBLK_BIN" attach-info --help >/dev/null 2>&1; }

hand_written_disk() {
    cat <<EOF
<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw' queues='$Q' queue_size='$QS'/>
  <source type='unix' path='$SOCK'>
    <reconnect enabled='yes' timeout='1'/>
  </source>
  <target dev='vda' bus='virtio'/>
</disk>
EOF
}

# Prints the <disk> element and sets DISK_FROM.
disk_element() {
    local use=$ATTACH_INFO
    if [[ $use == auto ]]; then
        if have_attach_info; then use=on; else
            log "attach-info: '$VUBLK_BIN attach-info --help' fails: using the hand-written <disk> element"
            use=off
        fi
    fi
    if [[ $use == on ]]; then
        if ! have_attach_info; then
            cfg_fail "attach_info: '$VUBLK_BIN attach-info --help' fails: this vublk has no attach-info subcommand (--attach-info on)"
            return 1
        fi
        local out
        if ! out=$("$VUBLK_BIN" attach-info "${EXPORT_ARGS[@]}" --format libvirt 2>"$RUN_DIR/attach-info.err"); then
            cfg_fail "attach_info: vublk attach-info --format libvirt failed: $(tr '\n' '|' <"$RUN_DIR/attach-info.err")"
            return 1
        fi
        grep -q "<disk type='vhostuser'\|<disk type=\"vhostuser\"" <<<"$out" ||
            { cfg_fail "attach_info: its output has no <disk type='vhostuser'> element: $(head -c 300 <<<"$out" | tr '\n' ' ')"; return 1; }
        DISK_FROM="vublk attach-info --format libvirt"
        printf '%s\n' "$out"
    else
        DISK_FROM="hand-written"
        hand_written_disk
    fi
}

domain_xml() { # domain_xml DISK_XML_FILE
    local -a params=(
        "vublk.sectors=$((IMAGE_MB * MiB / 512))" "vublk.lbs=512" "vublk.queues=$Q" "vublk.qs=$QS"
        "vublk.ro=0" "vublk.serial=$SERIAL" "vublk.wc=writeback" "vublk.discard=1" "vublk.wz=1"
        "vublk.rd_off=$RD_OFF" "vublk.rd_len=$MiB" "vublk.rd_md5=$HOST_MD5"
        "vublk.fio_size=32M" "vublk.wr_off=$WR_OFF" "vublk.disc_off=$DISC_OFF" "vublk.disc_len=$DISC_LEN"
        "vublk.wz_off=$WZ_OFF" "vublk.wz_len=$WZ_LEN"
    )
    # with a restart during fio, fio is rate-limited so that it spans the restart
    [[ $RESTART == 1 ]] && params+=("vublk.fio_rate=4m")
    cat <<EOF
<domain type='$DOMTYPE'>
  <name>$DOMAIN</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$RUN_DIR/vmlinuz</kernel>
    <initrd>$RUN_DIR/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 ${params[*]}</cmdline>
  </os>
  <features><acpi/></features>
$(if [[ $DOMTYPE == kvm ]]; then echo "  <cpu mode='host-passthrough'/>"; fi)
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
$(sed 's/^/    /' "$1")
    <serial type='file'>
      <source path='$CON'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# ---------------------------------------------------------------- run
start_vublk() { # start_vublk N
    local blog=$RUN_DIR/backend.$1.log
    log "vublk #$1: $VUBLK_BIN serve ${EXPORT_ARGS[*]} --socket-group $QEMU_GID --socket-mode 0660"
    RUST_LOG=${RUST_LOG:-info} "$VUBLK_BIN" serve "${EXPORT_ARGS[@]}" --socket-group "$QEMU_GID" --socket-mode 0660 \
        </dev/null >"$blog" 2>&1 &
    BACKEND_PID=$!
    wait_socket "$SOCK" "$BACKEND_PID" "$blog" 30
}

# domain_state: virsh domstate, or "gone"
domain_state() { virsh_ domstate "$DOMAIN" 2>/dev/null | head -n1 || echo gone; }

run() {
    local t
    DOMAIN=vublk-it-$(basename "$RUN_DIR" | tr -cd 'a-zA-Z0-9')
    cp "$GUEST_DIR/vmlinuz" "$GUEST_DIR/initrd.img" "$RUN_DIR/"
    chmod 0644 "$RUN_DIR/vmlinuz" "$RUN_DIR/initrd.img"
    truncate -s $((IMAGE_MB * MiB)) "$IMG"
    make_pattern host "$PAT_SECTORS" >"$RUN_DIR/host-pattern.bin"
    dd if="$RUN_DIR/host-pattern.bin" of="$IMG" bs=1M seek=$((RD_OFF / MiB)) conv=notrunc,fsync status=none
    HOST_MD5=$(md5sum <"$RUN_DIR/host-pattern.bin" | cut -d' ' -f1)

    t=$(now_s)
    start_libvirtd
    STEP_TIMES+=("libvirtd start: $(($(now_s) - t)) s")
    start_vublk 0 || return 1
    local sock_perm
    sock_perm=$(stat -c '%a %g' "$SOCK")
    [[ "$sock_perm" == "660 $QEMU_GID" ]] || cfg_fail "socket_permissions: $SOCK has mode/group '$sock_perm', want '660 $QEMU_GID'"

    disk_element >"$RUN_DIR/disk.xml" || return 1
    log "<disk> element ($DISK_FROM):"
    sed 's/^/    /' "$RUN_DIR/disk.xml" >&2
    domain_xml "$RUN_DIR/disk.xml" >"$RUN_DIR/domain.xml"

    # libvirt 9.0 rejects <serial> on a vhostuser disk (the serial is the
    # backend's: vublk --serial answers the guest's GET_ID). Find out what
    # this libvirt does with one, on a copy of the domain.
    local probe_name=$DOMAIN-serial out
    sed -e "s|<name>$DOMAIN</name>|<name>$probe_name</name>|" \
        -e "s|<target dev='vda' bus='virtio'/>|<target dev='vda' bus='virtio'/><serial>$SERIAL</serial>|" \
        "$RUN_DIR/domain.xml" >"$RUN_DIR/domain-serial.xml"
    if out=$(virsh_ define "$RUN_DIR/domain-serial.xml" 2>&1); then
        log "libvirt accepts <serial> on a vhostuser disk"
        virsh_ undefine "$probe_name" >/dev/null 2>&1 || true
    else
        log "libvirt rejects <serial> on a vhostuser disk ($(grep -a -m1 -i 'not supported\|unsupported' <<<"$out" || tr '\n' ' ' <<<"$out")); the guest's serial comes from vublk --serial"
    fi

    t=$(now_s)
    out=$(virsh_ define "$RUN_DIR/domain.xml" 2>&1) || { cfg_fail "define: virsh define failed: $(tr '\n' ' ' <<<"$out")"; return 1; }
    STEP_TIMES+=("virsh define: $(($(now_s) - t)) s")
    t=$(now_s)
    if ! out=$(virsh_ start "$DOMAIN" 2>&1); then
        cfg_fail "start: virsh start failed: $(tr '\n' ' ' <<<"$out"); qemu log: $(tail -n 3 "$LV/log/qemu/$DOMAIN.log" 2>/dev/null | tr '\n' '|')"
        return 1
    fi
    STEP_TIMES+=("virsh start: $(($(now_s) - t)) s")
    local t_boot qpid quid
    t_boot=$(now_s)
    qpid=$(cat "$LV/run/qemu/$DOMAIN.pid" 2>/dev/null || true)
    if [[ -n "$qpid" ]]; then
        quid=$(awk '/^Uid:/ {print $2}' "/proc/$qpid/status" 2>/dev/null || true)
        [[ "$quid" == "$QEMU_UID" ]] || cfg_fail "qemu_user: QEMU (pid $qpid) runs as uid '${quid:-?}', want $QEMU_USER ($QEMU_UID)"
    else
        cfg_fail "qemu_pid: libvirt wrote no pid file $LV/run/qemu/$DOMAIN.pid"
    fi
    # what libvirt made of the <disk>: the vhost-user-blk-pci device and its chardev
    local qlog=$LV/log/qemu/$DOMAIN.log
    grep -a -o "socket,id=[^ ]*path=${SOCK}[^ ]*" "$qlog" | sed 's/^/    qemu -chardev /' >&2 || true
    grep -a -o '{"driver":"vhost-user-blk-pci"[^}]*}' "$qlog" | sed 's/^/    qemu -device /' >&2 || true
    grep -aq "path=$SOCK,reconnect" "$qlog" || cfg_fail "qemu_reconnect: libvirt's QEMU command line has no reconnect on the vhost-user chardev ($qlog)"

    local w=0 i state
    if [[ $RESTART == 1 ]]; then
        # the same orderly restart as guest-reconnect.sh, once, through libvirt's reconnect
        wait_console "$CON" '^VUBLK-MARK fio-start' "$GUEST_TIMEOUT" "$qpid" || w=$?
        if [[ $w != 0 ]]; then
            cfg_fail "fio_started: the guest never started fio; console tail: $(console_text "$CON" | tail -n 3 | tr '\n' '|')"
        else
            sleep 3
            if console_text "$CON" | grep -aq '^VUBLK-MARK fio-end'; then
                cfg_fail "restart_during_fio: fio had finished before the restart"
            else
                local t_stop t_up
                t_stop=$(date +%s.%N)
                log "restart: SIGTERM to vublk (pid $BACKEND_PID)"
                stop_backend_checked "$BACKEND_PID" "$RUN_DIR/backend.0.log" stop "$SOCK" || true
                BACKEND_PID=""
                sleep 1
                if start_vublk 1; then
                    for ((i = 0; i < 150; i++)); do
                        grep -q 'frontend connected' "$RUN_DIR/backend.1.log" && break
                        sleep 0.1
                    done
                    if grep -q 'frontend connected' "$RUN_DIR/backend.1.log"; then
                        t_up=$(date +%s.%N)
                        STEP_TIMES+=("restart: SIGTERM to QEMU reconnected: $(awk -v a="$t_stop" -v b="$t_up" 'BEGIN {printf "%.1f", b - a}') s")
                    else
                        cfg_fail "reconnect: QEMU did not connect to the restarted vublk within 15 s"
                    fi
                fi
            fi
        fi
    fi
    # wait for the guest to power off (on_poweroff=destroy: the domain stops)
    local deadline=$((t_boot + GUEST_TIMEOUT)) qrc=0
    while :; do
        state=$(domain_state)
        [[ "$state" == "shut off" || "$state" == gone ]] && break
        if (($(now_s) > deadline)); then
            qrc=124
            virsh_ destroy "$DOMAIN" >/dev/null 2>&1 || true
            break
        fi
        if [[ ${#FAILS[@]} -gt 0 && $RESTART == 1 ]] && ! grep -q 'frontend connected' "$RUN_DIR/backend.1.log" 2>/dev/null; then
            log "the restart failed: destroying the domain rather than waiting for its timeout"
            virsh_ destroy "$DOMAIN" >/dev/null 2>&1 || true
            qrc=1
            break
        fi
        sleep 0.5
    done
    STEP_TIMES+=("guest run (start to power-off): $(($(now_s) - t_boot)) s")
    report_from_console "$CON" "$RUN_DIR/report.txt"
    grep -a 'qemu-system' "$qlog" | sed 's/^/    qemu: /' >&2 || true
    # the reason libvirt recorded for the stop: the guest's own power-off
    grep -aq 'shutting down, reason=shutdown' "$qlog" || [[ $qrc != 0 ]] ||
        cfg_fail "shutdown_reason: QEMU did not stop because the guest powered off: $(grep -a 'shutting down' "$qlog" | tail -n1)"

    # shellcheck disable=SC2034 # read by judge_report through a nameref
    declare -A want=(
        [size_sectors]=$((IMAGE_MB * MiB / 512)) [logical_block_size]=512 [nr_queues]=$Q
        [read_only]=0 [serial]=$SERIAL [fio_rc]=0 [queues_used]=$Q [guest_io_errors]=0
        [write_cache]="write back" [host_pattern_md5]=$HOST_MD5 [discard_rc]=0
        [write_zeroes_nonzero_bytes]=0 [flushes_sent]=1
    )
    judge_report "$RUN_DIR/report.txt" "$CON" "$qrc" "$GUEST_TIMEOUT" want
    # nr_tags (the ring size QEMU set up from queue_size) is judged by the guest itself
    [[ -n "$GUEST_RESULT" ]] || return 1
    make_pattern guest "$PAT_SECTORS" >"$RUN_DIR/guest-pattern.bin"
    cmp -s "$RUN_DIR/guest-pattern.bin" <(dd if="$IMG" bs=1M skip=$((WR_OFF / MiB)) count=1 status=none) ||
        cfg_fail "image_guest_pattern: the image at offset $WR_OFF does not hold the pattern the guest wrote"

    t=$(now_s)
    virsh_ undefine "$DOMAIN" >/dev/null 2>&1 || cfg_fail "undefine: virsh undefine $DOMAIN failed"
    DOMAIN=""
    stop_backend_checked "$BACKEND_PID" "$RUN_DIR/backend.$RESTART.log" backend "$SOCK" || true
    BACKEND_PID=""
    STEP_TIMES+=("teardown: $(($(now_s) - t)) s")
}

log "accel=$ACCEL (domain type $DOMTYPE) attach-info=$ATTACH_INFO restart=$RESTART run_dir=$RUN_DIR"
run || true
echo "== libvirt guest test, $(libvirtd --version 2>/dev/null | awk '{print $NF}') + $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'), accel $ACCEL, disk from ${DISK_FROM:-?}, $(($(now_s) - T0)) s"
printf '  %s\n' "${STEP_TIMES[@]}"
if [[ ${#FAILS[@]} -eq 0 ]]; then
    echo "libvirt-guest: PASS"
    OVERALL_OK=1
    exit 0
fi
printf '  FAIL %s\n' "${FAILS[@]}"
echo "libvirt-guest: FAIL (${#FAILS[@]} failed checks; logs in $RUN_DIR)"
exit 1
