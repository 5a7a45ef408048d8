#!/usr/bin/env bash
# Per-VM deployment: one vublk per VM, started beside QEMU and stopped with it.
#
# Guest RAM must be shared with the daemon (memory-backend-memfd with share=on): vublk reads
# and writes guest buffers directly. `vublk attach-info --format qemu` prints the QEMU
# arguments for the export (memfd memory, chardev with reconnect-ms, vhost-user-blk-pci with
# num-queues/queue-size equal to --queues/--queue-size), one per line, from the same options
# vublk serves with, so the two cannot disagree.
#
#   IMG=/var/lib/vublk/vm1.img ./qemu-per-vm.sh -cdrom installer.iso
set -euo pipefail
IMG=${IMG:-/var/lib/vublk/vm1.img}
RUN=${RUN:-/run/vublk}
MEM=${MEM:-2G}
ACCEL=${ACCEL:-kvm}
SOCK=$RUN/vm1.sock
PIDFILE=$RUN/vm1.pid

# The export: served by vublk, described by vublk attach-info. --size creates the image
# (preallocated) the first time.
VUBLK_ARGS=(--socket-path "$SOCK" --blk-file "$IMG" --size 10G --queues 2 --queue-size 256 --serial vm1-disk0)

mkdir -p "$RUN"
# In its own session, so a Ctrl-C meant for QEMU does not reach vublk too: the trap below
# stops it once, after QEMU (a second signal would make vublk exit without cleaning up).
setsid vublk "${VUBLK_ARGS[@]}" --pidfile "$PIDFILE" &
vublk_pid=$!
trap 'kill -TERM "$vublk_pid" 2>/dev/null; wait "$vublk_pid"' EXIT

# vublk writes its pid file once the socket accepts connections.
until [ -s "$PIDFILE" ]; do
    kill -0 "$vublk_pid" 2>/dev/null || { echo "vublk failed to start" >&2; exit 1; }
    sleep 0.1
done

mapfile -t ATTACH < <(vublk attach-info "${VUBLK_ARGS[@]}" --format qemu --memory "$MEM")

# -m must equal the memory backend's size (--memory above).
qemu-system-x86_64 -machine q35,accel="$ACCEL" -smp 2 -m "$MEM" "${ATTACH[@]}" "$@"
