#!/usr/bin/env bash
# Builds what tests/arm.rs boots on an emulated arm64 board: Debian's cloud kernel for arm64 and
# an initramfs with busybox-static, the C library, the virtio network modules, init.sh as /init
# and the cross-built ferryd. Debian's packages only, fetched with `apt-get download` (no
# debootstrap: an initramfs boots in seconds and needs no disk image).
#
#   tests/arm/make-initramfs.sh FERRYD OUT_DIR      writes OUT_DIR/vmlinuz and OUT_DIR/initrd
#
# The kernel and the base tree (everything but ferryd) are cached in /var/tmp/ferryd-arm64-base,
# rebuilt when the package versions change (a stamp records them); a lock makes a second run
# wait for the first. The initrd is the base archive followed by a second archive holding
# ferryd and /init, which the kernel unpacks over the first.
# Needs root (apt's arm64 package lists: dpkg --add-architecture arm64; apt-get update), apt,
# dpkg-deb and cpio.
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
die() { echo "make-initramfs.sh: $*" >&2; exit 2; }
[[ $# == 2 ]] || die "usage: $0 FERRYD OUT_DIR"
ferryd=$1
out=$2
[[ -f $ferryd ]] || die "no ferryd at '$ferryd' (bash .ci/cross --no-deb builds it)"
for tool in apt-get apt-cache dpkg-deb cpio; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y apt dpkg cpio"
done
[[ " $(dpkg --print-foreign-architectures | tr '\n' ' ') " == *" arm64 "* ]] ||
    die "apt has no arm64 packages: dpkg --add-architecture arm64 && apt-get update"

BASE=${BASE:-/var/tmp/ferryd-arm64-base}
# The kernel package the metapackage points at, and its version with the others'.
kernel=$(apt-cache depends linux-image-cloud-arm64:arm64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-arm64\).*/\1/p' | head -1)
[[ -n $kernel ]] || die "no linux-image-cloud-arm64:arm64 in apt's lists: apt-get update"
pkgs=("$kernel:arm64" busybox-static:arm64 libc6:arm64 libgcc-s1:arm64)
stamp=$(for p in "${pkgs[@]}"; do echo "$p $(apt-cache policy "$p" | sed -n 's/^ *Candidate: //p')"; done)

exec 9>"$BASE.lock"
flock 9
if [[ $(cat "$BASE/stamp" 2>/dev/null) != "$stamp" ]]; then
    rm -rf "$BASE.tmp" "$BASE"
    mkdir -p "$BASE.tmp/debs" "$BASE.tmp/x" "$BASE.tmp/root"
    # apt drops to the _apt user to download, which must be able to write there.
    chmod 0777 "$BASE.tmp/debs"
    (cd "$BASE.tmp/debs" && apt-get download "${pkgs[@]}")
    for deb in "$BASE.tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$BASE.tmp/x"; done
    x=$BASE.tmp/x
    r=$BASE.tmp/root
    cp "$x"/boot/vmlinuz-* "$BASE.tmp/vmlinuz"
    mkdir -p "$r"/{bin,sbin,proc,sys,dev,tmp,etc,modules,lib/aarch64-linux-gnu}
    cp "$x/bin/busybox" "$r/bin/busybox"
    # The C library's shared objects and the loader, not its locales and gconv modules.
    cp -a "$x"/lib/aarch64-linux-gnu/*.so* "$r/lib/aarch64-linux-gnu/"
    cp -a "$x"/lib/ld-linux-aarch64.so.1 "$r/lib/"
    # The virtio network card on the virt machine's MMIO bus (no PCI, so no option ROM).
    for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do
        ko=$(find "$x/lib/modules" -name "$m.ko" | head -1)
        [[ -n $ko ]] || die "$m.ko is not in $kernel"
        cp "$ko" "$r/modules/"
    done
    (cd "$r" && find . | cpio -o -H newc --owner 0:0 --quiet) >"$BASE.tmp/base.cpio"
    rm -rf "$BASE.tmp/debs" "$BASE.tmp/x" "$BASE.tmp/root"
    echo "$stamp" >"$BASE.tmp/stamp"
    mv "$BASE.tmp" "$BASE"
fi

mkdir -p "$out"
top=$(mktemp -d -t ferryd-initrd.XXXXXXXX)
trap 'rm -rf -- "$top"' EXIT
install -m 0755 "$ferryd" "$top/ferryd"
install -m 0755 "$here/init.sh" "$top/init"
cp "$BASE/vmlinuz" "$out/vmlinuz"
{
    cat "$BASE/base.cpio"
    (cd "$top" && printf '%s\n' ferryd init | cpio -o -H newc --owner 0:0 --quiet)
} >"$out/initrd"
echo "$out/initrd"
