#!/usr/bin/env bash
# Runs the whole test suite including the tests whose point is a real outside program ("real
# peers": netcat, the Qt tutorials' clients, Python's hashlib, a mosquitto broker, systemd's tools,
# a real systemd in a container), which plain `cargo test` ignores:
#
#   bash tests/real-peers.sh [cargo test arguments]
#   e.g. bash tests/real-peers.sh --no-fail-fast
#        bash tests/real-peers.sh --test clients
#        bash tests/real-peers.sh -- --skip units_and_package_under_systemd_252
#
# First it looks for each program below. On Debian or Ubuntu as root it installs the packages of
# those that are missing (apt-get install --no-install-recommends; apt-get update and again if
# that fails) and says what it installed; elsewhere, or as an ordinary user, it prints the
# packages and the command that installs them. Then it runs
# `cargo test --features real-peers "$@"`: a test whose program is still missing fails, naming
# its package. tests/systemd_real.rs also needs root (it boots a container) and, the first time,
# a Debian mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every real peer: a program, then the Debian package(s) that provide it. This is the only list;
# the tests name the same packages when a program is missing (tests/support's `need`), and
# tests/real_peers.rs checks that each package they name is here.
peers=(
    # tests of echo and chat through netcat, `ferryd pack | nc`, the README's shell recipe
    "nc netcat-openbsd"
    "basenc coreutils"
    # the README's Python client (hashlib only)
    "python3 python3"
    # the Qt tutorials' clients in tests/qt, built with qmake and make
    "qmake qtbase5-dev qt5-qmake"
    "make make"
    "g++ g++"
    # files.on_stored publishing to a real MQTT broker (tests/hooks.rs)
    "mosquitto mosquitto"
    "mosquitto_sub mosquitto-clients"
    "mosquitto_pub mosquitto-clients"
    # systemd/check.sh and socket activation (tests/systemd.rs)
    "systemd-analyze systemd"
    "systemd-socket-activate systemd"
    # a real systemd 252 in a container and the Debian package (tests/systemd_real.rs)
    "systemd-nspawn systemd-container"
    "debootstrap debootstrap"
    "nsenter util-linux"
    "mount mount"
    "pgrep procps"
    "dpkg-deb dpkg"
    "strip binutils"
    "objdump binutils"
    "readelf binutils"
    # the manual pages render without warnings, and the package installs them (tests/manpages.rs)
    "man man-db"
    # IPv6 peers of one /64 in a network namespace (tests/hardening_peers.rs)
    "ip iproute2"
    # a 64 MiB file over an impaired link between network namespaces (tests/links.rs)
    "tc iproute2"
    "nft nftables"
    # a real HAProxy in front of three ferryd instances, send-proxy-v2 (tests/haproxy.rs)
    "haproxy haproxy"
    # ferryd on an emulated arm64 board (tests/arm.rs; its cross build is .ci/cross's)
    "qemu-system-aarch64 qemu-system-arm"
    "cpio cpio"
)

# Whether program $1 is there: on PATH, or in /usr/sbin or /sbin (mosquitto), as `need` looks.
# nc must be OpenBSD's netcat: the tests use its -N.
have() {
    PATH=$PATH:/usr/sbin:/sbin command -v "$1" >/dev/null || return 1
    if [[ $1 == nc ]]; then
        nc -h 2>&1 | grep -q -- '^[[:space:]]*-N' || return 1
    fi
}

missing=()
for peer in "${peers[@]}"; do
    read -r program packages <<<"$peer"
    have "$program" && continue
    for p in $packages; do
        [[ " ${missing[*]-} " == *" $p "* ]] || missing+=("$p")
    done
done

if ((${#missing[@]})); then
    echo "real-peers.sh: missing packages: ${missing[*]}" >&2
    if [[ $EUID == 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
            apt-get update
            apt-get install -y --no-install-recommends "${missing[@]}"
        fi
        echo "real-peers.sh: installed ${missing[*]}" >&2
    else
        echo "real-peers.sh: install them first (Debian/Ubuntu, as root):" >&2
        echo "    apt-get install --no-install-recommends ${missing[*]}" >&2
        echo "real-peers.sh: the tests that need them will fail, naming the package" >&2
    fi
fi

exec cargo test --features real-peers "$@"
