#!/usr/bin/env bash
# Per-host deployment: vublk runs as a host service (vublk.service, configured in
# /etc/vublk/vublk.conf, see vublk.conf), independent of any VM; QEMU only connects to its
# socket. The chardev's reconnect-ms=1000 lets the guest ride out a restart of the service
# (`systemctl restart vublk`): its I/O waits and resumes.
#
#   systemctl start vublk && ./qemu-per-host.sh -cdrom installer.iso
set -euo pipefail
CONF=${CONF:-/etc/vublk/vublk.conf}
MEM=${MEM:-4G}
ACCEL=${ACCEL:-kvm}

# The same variables the unit passes to vublk: VUBLK_SOCKET, VUBLK_IMAGE, VUBLK_OPTS.
# shellcheck source=vublk.conf
. "$CONF"

# Word splitting of $VUBLK_OPTS is intended, as in the unit's ExecStart.
# shellcheck disable=SC2086
mapfile -t ATTACH < <(vublk attach-info --socket-path "$VUBLK_SOCKET" --blk-file "$VUBLK_IMAGE" \
    $VUBLK_OPTS --format qemu --memory "$MEM")

exec qemu-system-x86_64 -machine q35,accel="$ACCEL" -smp 4 -m "$MEM" "${ATTACH[@]}" "$@"
