#!/usr/bin/env bash
# Builds a minimal Debian 12 root with systemd 252 in it, for boot.sh (adapted from the project's
# shared systemd-container scripts). Takes a few minutes the first time; reuses the root when it
# exists and was built from the same package list (the stamp file records it).
# Needs root and: apt-get install -y systemd-container debootstrap
set -euo pipefail
ROOT=${ROOT:-/var/tmp/ferryd-sd-root}
PKGS=systemd,systemd-sysv,dbus,netcat-openbsd,iproute2,procps,util-linux,ca-certificates,libpam-systemd
stamp="bookworm $PKGS"
# Two runs at once (two checkouts) build the root once: the second waits for the first.
exec 9>"$ROOT.lock"
flock 9
if [[ -x $ROOT/lib/systemd/systemd && $(cat "$ROOT/.ferryd-root-stamp" 2>/dev/null) == "$stamp" ]]; then
  echo "$ROOT exists"
  exit 0
fi
for tool in debootstrap systemd-nspawn; do
  command -v "$tool" >/dev/null || {
    echo "make-root.sh: $tool not found: apt-get install -y systemd-container debootstrap" >&2
    exit 2
  }
done
# The Debian mirror this machine's apt already uses.
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n $MIRROR ]] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n $MIRROR ]] || MIRROR=http://deb.debian.org/debian
rm -rf "$ROOT.tmp" "$ROOT"
debootstrap --variant=minbase --include="$PKGS" bookworm "$ROOT.tmp" "$MIRROR"
echo sd-test > "$ROOT.tmp/etc/hostname"
echo "$stamp" > "$ROOT.tmp/.ferryd-root-stamp"
mv "$ROOT.tmp" "$ROOT"
