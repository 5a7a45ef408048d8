# shellcheck shell=bash
# Shared helpers for the integration scripts. Source it; do not run it.

# Messages go to stderr so that stdout stays free for values a caller captures.
log() { printf '[%s] %s\n' "${VUBLK_LOG_TAG:-vublk-it}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${VUBLK_LOG_TAG:-vublk-it}" "$*" >&2; exit 1; }

# Absolute path of the repository root (integration/..).
repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); }

# Debian's tools must never ask a question: CI has no stdin.
export DEBIAN_FRONTEND=noninteractive

# Run `apt-get update` at most once per test run (look-ups need fresh lists).
# guest-smoke.sh sets VUBLK_APT_MARK to a marker file so that its child
# scripts share the "done"; standalone, a shell variable remembers it.
apt_update_once() {
    [[ "${VUBLK_APT_DONE:-0}" == 1 ]] && return 0
    [[ -n "${VUBLK_APT_MARK:-}" && -e "$VUBLK_APT_MARK" ]] && return 0
    apt_update_now
}

# Unconditional update (after adding a source).
apt_update_now() {
    log "apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    VUBLK_APT_DONE=1
    if [[ -n "${VUBLK_APT_MARK:-}" ]]; then : >"$VUBLK_APT_MARK"; fi
}

need_root() {
    [[ "$(id -u)" == 0 ]] || die "$1 needs root (apt-get / dpkg); run as root or install the missing tools first"
}

# sha256 of stdin, hex only.
sha256_stdin() { sha256sum | cut -d' ' -f1; }

# Deterministic test pattern: SECTORS lines of exactly 512 bytes each, every
# sector distinct ("TAG sector 0000042 ..."), so a misplaced sector is
# detected. Written to stdout. Used by the host and by the guest build.
make_pattern() {
    local tag=$1 sectors=$2
    awk -v tag="$tag" -v n="$sectors" 'BEGIN {
        for (i = 0; i < n; i++) {
            s = sprintf("%s sector %07d ", tag, i)
            while (length(s) < 511) s = s s
            printf "%s\n", substr(s, 1, 511)
        }
    }'
}
