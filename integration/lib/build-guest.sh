#!/usr/bin/env bash
# Build the tiny test guest for integration/guest-smoke.sh:
#   OUT/vmlinuz     Debian's kernel (linux-image-<abi>-amd64, via apt-get download + dpkg-deb -x)
#   OUT/initrd.img  busybox (busybox-static .deb), the virtio modules, fio with the
#                   shared libraries ldd lists plus the dynamic loader, the zeroout
#                   helper, the guest-written test pattern, and integration/guest/init
# Nothing is fetched from the web: only Debian packages through apt.
#
# Usage: integration/lib/build-guest.sh [OUT]     (OUT defaults to <repo>/target/guest)
# Env:   VUBLK_KERNEL_PKG=linux-image-X-amd64  pin the kernel package (default: what
#                                              linux-image-amd64 depends on)
#        VUBLK_GUEST_REFRESH=1                 forget cached .debs and rebuild everything
#        VUBLK_INITRD_COMPRESS=none|gzip|zstd  initramfs compression (default zstd)
# Reruns are cheap: the initramfs is rebuilt only when an input changed (the .debs,
# fio and its libraries, integration/guest/*, this script).
set -euo pipefail
export VUBLK_LOG_TAG=build-guest
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"
ROOT=$(repo_root)
OUT=${1:-$ROOT/target/guest}
GUEST_SRC=$ROOT/integration/guest
COMPRESS=${VUBLK_INITRD_COMPRESS:-zstd}
# Modules the guest needs; their dependencies are added from each module's
# own "depends=" field, and the load order is computed from them.
# Listed in Debian 6.1's load order; missing dependencies would be added.
WANT_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
# Size of the pattern the guest writes (host compares it with the image).
PATTERN_SECTORS=2048

mkdir -p "$OUT/debs"
DEBS=$OUT/debs

if [[ "${VUBLK_GUEST_REFRESH:-0}" == 1 ]]; then
    log "VUBLK_GUEST_REFRESH=1: dropping cached packages and builds"
    rm -rf "$DEBS" "$OUT/kernel" "$OUT/initrd.img" "$OUT/vmlinuz" "$OUT/guest.stamp"
    mkdir -p "$DEBS"
fi

# Download package $1 (exact name) into $DEBS unless a .deb of it is cached.
# Prints the path of the .deb.
fetch_deb() {
    local pkg=$1 deb
    deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" -print | sort | tail -n1)
    if [[ -z "$deb" ]]; then
        command -v apt-get >/dev/null || die "apt-get not found: cannot download $pkg"
        log "apt-get download $pkg"
        # As root apt warns that the download runs unsandboxed; that is harmless.
        (cd "$DEBS" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2) ||
            die "apt-get download $pkg failed"
        deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" -print | sort | tail -n1)
        [[ -n "$deb" ]] || die "apt-get download $pkg produced no .deb in $DEBS"
    fi
    printf '%s\n' "$deb"
}

kernel_pkg() {
    if [[ -n "${VUBLK_KERNEL_PKG:-}" ]]; then
        printf '%s\n' "$VUBLK_KERNEL_PKG"
        return
    fi
    local cached
    cached=$(find "$DEBS" -maxdepth 1 -name 'linux-image-*-amd64_*.deb' -printf '%f\n' | sort | tail -n1)
    if [[ -n "$cached" ]]; then
        printf '%s\n' "${cached%%_*}"
        return
    fi
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
    [[ -n "$pkg" ]] || die "cannot find the kernel package: 'apt-cache depends linux-image-amd64' names no linux-image-*"
    printf '%s\n' "$pkg"
}

# Copy one kernel module out of the unpacked tree, decompressing if needed.
copy_module() {
    local src=$1 dst=$2
    case $src in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
}

# Unpack vmlinuz and the needed modules (plus the load order) into $OUT/kernel/<deb>.
extract_kernel() {
    local deb=$1 dest=$2 tmp
    if [[ -f $dest/done ]]; then
        return 0
    fi
    rm -rf "$dest"
    mkdir -p "$dest/modules"
    tmp=$(mktemp -d "$OUT/.kx.XXXXXX")
    log "dpkg-deb -x $(basename "$deb")"
    dpkg-deb -x "$deb" "$tmp" || { rm -rf "$tmp"; die "dpkg-deb -x $deb failed"; }
    local vmlinuz
    vmlinuz=$(find "$tmp/boot" -maxdepth 1 -name 'vmlinuz-*' -print | head -n1)
    [[ -n "$vmlinuz" ]] || { rm -rf "$tmp"; die "no /boot/vmlinuz-* in $deb"; }
    cp "$vmlinuz" "$dest/vmlinuz"

    # Index every module by name (dashes and underscores are the same to the kernel).
    declare -A path_of=()
    local f name
    while IFS= read -r f; do
        name=$(basename "$f")
        name=${name%%.ko*}
        path_of[${name//-/_}]=$f
    done < <(find "$tmp/lib/modules" -name '*.ko*' -print)

    # Depth-first over "depends=", emitting dependencies before dependents.
    declare -A state=()
    local order=()
    visit() {
        local m=$1 deps d
        [[ "${state[$m]:-}" == "done" ]] && return 0
        [[ "${state[$m]:-}" == busy ]] && die "module dependency cycle at $m"
        [[ -n "${path_of[$m]:-}" ]] || die "module $m not found in $deb (is it built in? then drop it from WANT_MODULES)"
        state[$m]=busy
        copy_module "${path_of[$m]}" "$dest/modules/$m.ko"
        deps=$(tr '\0' '\n' <"$dest/modules/$m.ko" | sed -n 's/^depends=//p' | head -n1)
        local IFS=,
        for d in $deps; do
            [[ -n "$d" ]] && visit "${d//-/_}"
        done
        state[$m]="done"
        order+=("$m")
    }
    local m
    for m in "${WANT_MODULES[@]}"; do visit "$m"; done
    printf '%s\n' "${order[@]}" >"$dest/modules/load-order"
    rm -rf "$tmp"
    touch "$dest/done"
    log "kernel $(basename "$vmlinuz"), modules in load order: ${order[*]}"
}

# Print every file ldd says $1 needs (resolved), plus the loader.
needed_libs() {
    ldd "$1" | awk '
        $2 == "=>" && $3 ~ /^\// { print $3; next }
        $2 == "=>" && $3 == "not" { print "MISSING " $1; next }
        $1 ~ /^\// { print $1 }'
}

main() {
    for t in dpkg-deb cpio ldd awk sha256sum; do
        command -v "$t" >/dev/null || die "$t not found (run integration/lib/install-deps.sh)"
    done
    [[ -x /usr/bin/fio ]] || die "/usr/bin/fio not found (package fio; run integration/lib/install-deps.sh)"
    case $COMPRESS in
        none | gzip) ;;
        zstd) command -v zstd >/dev/null || die "zstd not found (package zstd), or set VUBLK_INITRD_COMPRESS=gzip" ;;
        *) die "VUBLK_INITRD_COMPRESS must be none, gzip or zstd (got '$COMPRESS')" ;;
    esac

    local kpkg kdeb bdeb kdir libs lib
    # Look-ups below run in command substitutions: update the lists here,
    # once, when something has to be resolved or downloaded.
    if [[ -z "$(find "$DEBS" -maxdepth 1 -name 'busybox-static_*.deb')" ||
        ( -z "${VUBLK_KERNEL_PKG:-}" && -z "$(find "$DEBS" -maxdepth 1 -name 'linux-image-*.deb')" ) ||
        ( -n "${VUBLK_KERNEL_PKG:-}" && -z "$(find "$DEBS" -maxdepth 1 -name "${VUBLK_KERNEL_PKG}_*.deb")" ) ]]; then
        apt_update_once
    fi
    kpkg=$(kernel_pkg)
    kdeb=$(fetch_deb "$kpkg")
    bdeb=$(fetch_deb busybox-static)
    kdir=$OUT/kernel/$(basename "$kdeb" .deb)
    extract_kernel "$kdeb" "$kdir"

    libs=$(needed_libs /usr/bin/fio)
    if grep -q '^MISSING' <<<"$libs"; then
        die "fio's libraries are missing on the host: $(grep '^MISSING' <<<"$libs" | tr '\n' ' ')"
    fi

    # Everything that goes into the initramfs determines the stamp.
    local stamp
    stamp=$({
        echo "kernel $(basename "$kdeb") busybox $(basename "$bdeb") compress $COMPRESS"
        echo "gcc $(gcc --version 2>/dev/null | head -n1 || echo none)"
        sha256sum "$HERE/build-guest.sh" "$HERE/common.sh" "$GUEST_SRC"/* /usr/bin/fio
        printf '%s\n' "$libs" | xargs -r readlink -f | xargs -r sha256sum
    } | sha256_stdin)
    if [[ -f $OUT/guest.stamp && "$(cat "$OUT/guest.stamp")" == "$stamp" && -f $OUT/initrd.img && -f $OUT/vmlinuz ]]; then
        log "guest is up to date ($OUT)"
        return 0
    fi

    log "building initramfs ($COMPRESS)"
    local R
    R=$(mktemp -d "$OUT/.root.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$R'" EXIT
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,lib/modules}
    # busybox-static from its .deb
    local bx
    bx=$(mktemp -d "$OUT/.bx.XXXXXX")
    dpkg-deb -x "$bdeb" "$bx"
    [[ -x $bx/bin/busybox ]] || die "busybox-static .deb has no bin/busybox"
    cp "$bx/bin/busybox" "$R/bin/busybox"
    rm -rf "$bx"
    ln -s busybox "$R/bin/sh"
    # kernel modules
    cp "$kdir"/modules/*.ko "$kdir/modules/load-order" "$R/lib/modules/"
    # fio with its libraries at the same paths, so the loader finds them
    cp /usr/bin/fio "$R/usr/bin/fio"
    while IFS= read -r lib; do
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done <<<"$libs"
    # zeroout helper (static): the write-zeroes check is skipped in the guest without it
    if command -v gcc >/dev/null; then
        if ! gcc -static -O2 -Wall -o "$R/usr/bin/zeroout" "$GUEST_SRC/zeroout.c" 2>"$OUT/zeroout.build.log"; then
            log "WARNING: building zeroout failed (see $OUT/zeroout.build.log); the guest will skip the write-zeroes check"
            rm -f "$R/usr/bin/zeroout"
        fi
    else
        log "WARNING: gcc not found; the guest will skip the write-zeroes check"
    fi
    # pattern the guest writes to the disk; the host regenerates it to compare
    make_pattern guest "$PATTERN_SECTORS" >"$R/etc/pattern-guest.bin"
    install -m 0755 "$GUEST_SRC/init" "$R/init"

    local tmpimg=$OUT/.initrd.img.tmp
    (cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) |
        case $COMPRESS in
            none) cat ;;
            gzip) gzip -1 ;;
            zstd) zstd -q -3 -T0 ;;
        esac >"$tmpimg"
    mv "$tmpimg" "$OUT/initrd.img"
    cp "$kdir/vmlinuz" "$OUT/vmlinuz"
    echo "$stamp" >"$OUT/guest.stamp"
    log "guest ready: $OUT/vmlinuz, $OUT/initrd.img ($(du -h "$OUT/initrd.img" | cut -f1))"
}

main "$@"
