#!/usr/bin/env bash
# One vublk per VM, started beside QEMU. Guest RAM must be shared with the daemon
# (memory-backend-memfd with share=on): vublk reads and writes guest buffers directly.
# num-queues and queue-size must not exceed what vublk was started with (--queues,
# --queue-size); reconnect-ms lets the guest survive a vublk restart.
set -euo pipefail
IMG=${IMG:-/var/lib/vublk/vm1.img}
SOCK=${SOCK:-/run/vublk/vm1.sock}
QUEUES=${QUEUES:-2}
QUEUE_SIZE=${QUEUE_SIZE:-256}

mkdir -p "$(dirname "$SOCK")"
vublk serve --socket "$SOCK" --file "$IMG" --size 10G --queues "$QUEUES" \
    --queue-size "$QUEUE_SIZE" --serial vm1-disk0 &

qemu-system-x86_64 \
    -machine q35,accel=kvm -cpu host -smp 2 -m 2G \
    -object memory-backend-memfd,id=mem,size=2G,share=on \
    -machine memory-backend=mem \
    -chardev socket,id=vublk0,path="$SOCK",reconnect-ms=1000 \
    -device vhost-user-blk-pci,chardev=vublk0,num-queues="$QUEUES",queue-size="$QUEUE_SIZE" \
    "$@"
