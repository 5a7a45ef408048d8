#!/usr/bin/env bash
# Install the host tools the guest smoke test needs, from Debian's packages only:
#   * qemu-system-x86 at exactly the installed qemu-utils version. On this
#     project's machines qemu-utils 10.x comes from <codename>-backports, and a
#     plain `apt-get install qemu-system-x86` would pull bookworm's 7.2 and
#     remove qemu-utils 10.x; so the backports suite is configured when missing
#     (the mirror is derived from the already-configured Debian source) and the
#     exact version is requested from it.
#   * fio (its binary and shared libraries are copied into the guest), cpio,
#     xz-utils, zstd (initramfs building, module decompression and compression).
#   * with --libvirt: libvirt-daemon, libvirt-daemon-driver-qemu and
#     libvirt-clients (libvirt-guest.sh), at the default candidate (bookworm:
#     9.0). A dry run (apt-get -s) must show that nothing is removed and that
#     no qemu package is installed or upgraded; otherwise nothing is installed.
# busybox-static and the kernel are not installed: build-guest.sh downloads
# and unpacks their .deb files into target/guest/.
#
# Usage: integration/lib/install-deps.sh [--libvirt]   (idempotent; root
#        needed only when something is missing)
set -euo pipefail
export VUBLK_LOG_TAG=install-deps
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

pkg_version() { { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }

codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && printf '%s\n' "${VERSION_CODENAME:-}")
}

# URI of the configured Debian mirror for the release itself (not -security).
debian_mirror_uri() {
    local cn=$1
    # shellcheck disable=SC2016 # $(...) is apt's format syntax
    apt-get indextargets --format '$(REPO_URI)' "Release: $cn" 'Created-By: Packages' 2>/dev/null | head -n1
}

have_backports_source() {
    # shellcheck disable=SC2016 # $(...) is apt's format syntax
    apt-get indextargets --format '$(RELEASE)' 'Created-By: Packages' 2>/dev/null | grep -qx "$1-backports"
}

ensure_backports_source() {
    local cn=$1 uri file keyring
    if have_backports_source "$cn"; then
        return 0
    fi
    uri=$(debian_mirror_uri "$cn")
    [[ -n "$uri" ]] || die "cannot derive the Debian mirror URI: 'apt-get indextargets' lists no Packages target for release '$cn'"
    file=/etc/apt/sources.list.d/vublk-${cn}-backports.sources
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    log "adding ${cn}-backports source ($file) on the configured mirror $uri"
    {
        echo "# Added by vublk integration/lib/install-deps.sh (mirror derived from apt-get indextargets)"
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: ${cn}-backports"
        echo "Components: main"
        if [[ -f $keyring ]]; then echo "Signed-By: $keyring"; fi
    } >"$file"
    apt_update_now
    have_backports_source "$cn" || die "backports source written to $file but apt does not list it"
}

install_qemu_system() {
    local utils_ver sys_ver cn img_before img_after
    utils_ver=$(pkg_version qemu-utils)
    sys_ver=$(pkg_version qemu-system-x86)
    if [[ -n "$sys_ver" && ( -z "$utils_ver" || "$sys_ver" == "$utils_ver" ) ]] && command -v qemu-system-x86_64 >/dev/null; then
        log "qemu-system-x86 $sys_ver already installed"
        return 0
    fi
    need_root "installing qemu-system-x86"
    apt_update_once
    if [[ -z "$utils_ver" ]]; then
        log "qemu-utils is not installed: installing qemu-system-x86 and qemu-utils at the default candidate"
        apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends qemu-system-x86 qemu-utils >/dev/null ||
            die "apt-get install qemu-system-x86 qemu-utils failed"
        return 0
    fi
    img_before=$(qemu-img --version | head -n1)
    cn=$(codename)
    [[ -n "$cn" ]] || die "VERSION_CODENAME missing from /etc/os-release"
    local target=()
    if [[ "$utils_ver" == *bpo* ]]; then
        ensure_backports_source "$cn"
        target=(-t "${cn}-backports")
    fi
    if ! apt-cache madison qemu-system-x86 | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$utils_ver"; then
        die "qemu-system-x86 version $utils_ver (= installed qemu-utils) is not available from any configured apt source; apt-cache madison qemu-system-x86 lists: $(apt-cache madison qemu-system-x86 | awk -F'|' '{gsub(/ /,"",$2); printf "%s ", $2}')"
    fi
    log "installing qemu-system-x86=$utils_ver ${target[*]}"
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${target[@]}" "qemu-system-x86=$utils_ver" >/dev/null ||
        die "apt-get install ${target[*]} qemu-system-x86=$utils_ver failed"
    img_after=$(qemu-img --version | head -n1)
    [[ "$img_after" == "$img_before" ]] ||
        die "installing qemu-system-x86 changed qemu-img: before '$img_before', after '$img_after'"
    [[ "$(pkg_version qemu-utils)" == "$utils_ver" ]] || die "qemu-utils version changed during install"
}

install_plain() {
    local missing=() p
    for p in "$@"; do
        [[ -n "$(pkg_version "$p")" ]] || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    need_root "installing ${missing[*]}"
    apt_update_once
    log "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# libvirt's daemon and QEMU driver, without touching the installed QEMU.
install_libvirt() {
    local pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients) missing=() p
    for p in "${pkgs[@]}"; do
        [[ -n "$(pkg_version "$p")" ]] || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "libvirt $(pkg_version libvirt-daemon) already installed"
        return 0
    fi
    need_root "installing ${missing[*]}"
    apt_update_once
    local sim bad utils_before sys_before
    sim=$(apt-get -s install --no-install-recommends "${missing[@]}" 2>&1) ||
        die "apt-get -s install ${missing[*]} failed: $(tail -n 3 <<<"$sim" | tr '\n' ' ')"
    bad=$(grep -E '^(Remv|Purg) |^Inst qemu' <<<"$sim" || true)
    [[ -z "$bad" ]] ||
        die "installing ${missing[*]} would change QEMU or remove packages; not installing. apt-get -s says: $(tr '\n' ';' <<<"$bad")"
    utils_before=$(pkg_version qemu-utils)
    sys_before=$(pkg_version qemu-system-x86)
    log "installing ${missing[*]} (dry run: nothing removed, QEMU untouched)"
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    [[ "$(pkg_version qemu-utils)" == "$utils_before" && "$(pkg_version qemu-system-x86)" == "$sys_before" ]] ||
        die "installing libvirt changed QEMU: qemu-utils $utils_before -> $(pkg_version qemu-utils), qemu-system-x86 $sys_before -> $(pkg_version qemu-system-x86)"
}

main() {
    local libvirt=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --libvirt) libvirt=1; shift ;;
            *) die "unknown argument '$1' (usage: install-deps.sh [--libvirt])" ;;
        esac
    done
    command -v apt-get >/dev/null || die "apt-get not found: this test expects a Debian-based host"
    install_qemu_system
    install_plain fio cpio xz-utils zstd
    if [[ $libvirt == 1 ]]; then
        install_libvirt
        command -v libvirtd >/dev/null || die "libvirtd still missing after installing libvirt-daemon"
        command -v virsh >/dev/null || die "virsh still missing after installing libvirt-clients"
        log "libvirt:            $(libvirtd --version)"
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing after install"
    log "qemu-system-x86_64: $(qemu-system-x86_64 --version | head -n1)"
    log "qemu-img:           $(qemu-img --version | head -n1)"
}

main "$@"
