#!/usr/bin/env bash
# Builds ferryd's Debian package from a built binary, with dpkg-deb only (no cargo-deb to
# compile, so CI and the real-systemd test build exactly this package in a second).
#
#   systemd/deb/build-deb.sh [PATH_TO_FERRYD [OUT_DIR [ARCH]]]
#       defaults: target/release/ferryd, target/debian, this machine's Debian architecture;
#       prints the path of the .deb. ARCH arm64 or armhf packages a cross-built binary
#       (.ci/cross does this), stripped and read with that architecture's cross binutils.
#
# Contents: /usr/bin/ferryd (stripped), the three units in /usr/lib/systemd/system with their
# Exec lines pointing at /usr/bin, /etc/ferryd/config.toml (a conffile), the documented full
# config, the README and docs/*.md in /usr/share/doc/ferryd, the manual pages ferryd(8) and ferryd.toml(5)
# from docs/man (gzipped, in /usr/share/man), and the maintainer scripts next to this file
# (postinst, prerm, postrm; each says its policy). Needs dpkg-deb, and strip and objdump from
# binutils (installed wherever Rust links: apt-get install -y binutils).
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$here/../.." && pwd)
die() { echo "build-deb.sh: $*" >&2; exit 2; }

[[ $# -le 3 ]] || die "usage: $0 [PATH_TO_FERRYD [OUT_DIR [ARCH]]]"
bin=${1:-$repo/target/release/ferryd}
out=${2:-$repo/target/debian}
arch=${3:-$(dpkg --print-architecture)}
[[ -f $bin && -x $bin ]] || die "no executable at '$bin' (cargo build --release first, or pass a path)"
# A binary for another architecture is stripped and read by that architecture's binutils.
binutils=binutils
prefix=
if [[ $arch != "$(dpkg --print-architecture)" ]]; then
    case $arch in
        arm64) prefix=aarch64-linux-gnu- ;;
        armhf) prefix=arm-linux-gnueabihf- ;;
        *) die "unsupported architecture '$arch' (amd64 builds natively; arm64, armhf cross)" ;;
    esac
    binutils=binutils-${prefix%-}
fi
strip=${prefix}strip
objdump=${prefix}objdump
for tool in dpkg-deb dpkg "$strip" "$objdump" gzip; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y dpkg $binutils gzip)"
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -1)
[[ -n $version ]] || die "no version in $repo/Cargo.toml"

pkg=$(mktemp -d -t ferryd-deb.XXXXXXXX)
trap 'rm -rf -- "$pkg"' EXIT
chmod 0755 "$pkg"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/lib/systemd/system" \
    "$pkg/etc/ferryd" "$pkg/usr/share/doc/ferryd" "$pkg/usr/share/man/man8" "$pkg/usr/share/man/man5"

# Stripped: the release profile keeps line tables for profiling (11 MB); the package does not.
"$strip" --strip-all -o "$pkg/usr/bin/ferryd" "$bin"
chmod 0755 "$pkg/usr/bin/ferryd"

for unit in ferryd.service ferryd-activated.service ferryd-activated.socket; do
    sed 's|/usr/local/bin/ferryd |/usr/bin/ferryd |g' "$repo/systemd/$unit" \
        >"$pkg/usr/lib/systemd/system/$unit"
    chmod 0644 "$pkg/usr/lib/systemd/system/$unit"
    if grep -q '^[^#]*/usr/local/bin/ferryd' "$pkg/usr/lib/systemd/system/$unit"; then
        die "$unit: a /usr/local/bin/ferryd path was not rewritten"
    fi
done
install -m 0644 "$repo/systemd/config.toml" "$pkg/etc/ferryd/config.toml"
install -m 0644 "$repo/config/config.toml" "$pkg/usr/share/doc/ferryd/config.toml.example"
install -m 0644 "$repo/README.md" "$pkg/usr/share/doc/ferryd/README.md"
# The pages the README links to, beside it, so that its links work there too.
install -d -m 0755 "$pkg/usr/share/doc/ferryd/docs"
install -m 0644 "$repo"/docs/*.md "$pkg/usr/share/doc/ferryd/docs/"
# The manual pages, compressed as Debian policy asks (gzip -9n: no name or time stamp inside).
for page in ferryd.8 ferryd.toml.5; do
    dest="$pkg/usr/share/man/man${page##*.}/$page.gz"
    gzip -9n <"$repo/docs/man/$page" >"$dest"
    chmod 0644 "$dest"
done
cat >"$pkg/usr/share/doc/ferryd/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ferryd

Files: *
Copyright: ferryd developers
License: MIT or Apache-2.0
COPYRIGHT
chmod 0644 "$pkg/usr/share/doc/ferryd/copyright"

for script in postinst prerm postrm; do
    install -m 0755 "$here/$script" "$pkg/DEBIAN/$script"
done
echo /etc/ferryd/config.toml >"$pkg/DEBIAN/conffiles"

# The newest glibc symbol version the binary uses, as dpkg-shlibdeps would find it.
glibc=$("$objdump" -T "$pkg/usr/bin/ferryd" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
[[ -n $glibc ]] || die "no GLIBC_ symbol versions in the binary"
# Relative relocations packed as DT_RELR (a build linked with -z pack-relative-relocs) need glibc
# 2.36, which the binary records as a version with no symbols (GLIBC_ABI_DT_RELR), so objdump -T
# does not list it.
if "$objdump" -p "$pkg/usr/bin/ferryd" | grep 'GLIBC_ABI_DT_RELR' >/dev/null; then
    glibc=$(printf '%s\n' "$glibc" 2.36 | sort -V | tail -1)
fi
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: ferryd
Version: $version
Architecture: $arch
Maintainer: ferryd developers <dev@ferryd.invalid>
Section: net
Priority: optional
Installed-Size: $size
Depends: libc6 (>= $glibc), libgcc-s1
Description: small synchronous TCP/UDP daemon: echo, chat and verified uploads
 A small synchronous TCP/UDP daemon you can talk to with netcat: echo or chat
 over TCP, a UDP echo, and verified file uploads (fixed binary header, BLAKE3,
 atomic no-clobber commit). Ships hardened systemd units (plain and
 socket-activated); none is enabled on install: enable one with systemctl.
CONTROL

mkdir -p "$out"
deb="$out/ferryd_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
