#!/usr/bin/env bash
# Install what the real-router lab (tests/lab) needs, on Debian/Ubuntu. Idempotent.
#
#   sudo .ci/lab-deps.sh          # then: IGDTRIGGER_REQUIRE_LAB=1 python -m pytest tests/lab
#
# Only the backend package miniupnpd-nftables is installed: it ships the binary and the
# /etc/miniupnpd/nft_*.sh helpers, has no maintainer scripts and no service. The separate
# `miniupnpd` package (init script, debconf questions, a system daemon touching the host
# firewall) is NOT wanted; it is preseeded to not start, service starts are blocked during the
# install, and a system miniupnpd service, if one is installed anyway, is stopped and disabled.
# The lab starts its own miniupnpd inside network namespaces.
#
# LAB_DEPS_FORCE=1 runs apt-get even when everything is already installed.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PKGS=(miniupnpd-nftables miniupnpc natpmpc nftables iproute2 conntrack chromium fonts-dejavu-core curl)

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "lab-deps: must run as root (or have sudo)" >&2
    exit 1
fi

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ "${LAB_DEPS_FORCE:-0}" = "1" ]; then
    missing=("${PKGS[@]}")
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "lab-deps: installing ${missing[*]}"
    # Should the `miniupnpd` package ever get pulled in: no question, no daemon.
    if command -v debconf-set-selections >/dev/null 2>&1; then
        echo "miniupnpd miniupnpd/start_daemon boolean false" | "${SUDO[@]}" debconf-set-selections
    fi
    # Block service starts from maintainer scripts while we install (sysvinit/invoke-rc.d).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# temporary, from .ci/lab-deps.sh\nexit 101\n' |
            "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 0755 "$policy"
        trap '"${SUDO[@]}" rm -f "$policy"' EXIT
    fi
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
else
    echo "lab-deps: ${PKGS[*]} already installed"
fi

# No system-wide miniupnpd: stop and disable it if the `miniupnpd` package is present.
if installed miniupnpd; then
    echo "lab-deps: stopping/disabling the system miniupnpd service"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now miniupnpd.service || true
    else
        "${SUDO[@]}" service miniupnpd stop >/dev/null 2>&1 || true
        "${SUDO[@]}" update-rc.d miniupnpd disable >/dev/null 2>&1 || true
    fi
fi

# Sanity: the nftables build, and the tools the lab calls.
if ! /usr/sbin/miniupnpd --version 2>&1 | grep -q nftables; then
    echo "lab-deps: /usr/sbin/miniupnpd is not the nftables build" >&2
    exit 1
fi
for tool in ip nft upnpc natpmpc conntrack chromium curl; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "lab-deps: $tool not found after install" >&2
        exit 1
    }
done
/usr/sbin/miniupnpd --version 2>&1 | head -1
echo "lab-deps: ok"
