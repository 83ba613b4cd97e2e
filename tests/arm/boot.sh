#!/usr/bin/env bash
# Boots the emulated arm64 board that tests/arm.rs drives: QEMU's `virt` machine without KVM
# (TCG), Debian's cloud kernel and the initramfs of make-initramfs.sh, the console written to a
# file, user-mode networking with host loopback ports forwarded to the board's daemons.
#
#   tests/arm/boot.sh DIR ECHO_PORT UDP_PORT CHAT_PORT STOP_PORT [SECONDS]
#
# DIR holds vmlinuz and initrd; the console goes to DIR/console.log. 127.0.0.1:ECHO_PORT (TCP)
# and UDP_PORT (UDP) reach the echo daemon's 7878, CHAT_PORT the chat daemon's 7879, STOP_PORT
# the board's 7900 (a connection there powers it off). QEMU exits when the board powers off,
# or is killed after SECONDS (default 240). Needs qemu-system-aarch64 (qemu-system-arm).
set -euo pipefail
die() { echo "boot.sh: $*" >&2; exit 2; }
[[ $# == 5 || $# == 6 ]] || die "usage: $0 DIR ECHO_PORT UDP_PORT CHAT_PORT STOP_PORT [SECONDS]"
dir=$1
command -v qemu-system-aarch64 >/dev/null ||
    die "qemu-system-aarch64 not found: apt-get install -y qemu-system-arm"
for f in vmlinuz initrd; do [[ -f $dir/$f ]] || die "no $dir/$f (make-initramfs.sh)"; done
fwd="hostfwd=tcp:127.0.0.1:$2-:7878,hostfwd=udp:127.0.0.1:$3-:7878"
fwd="$fwd,hostfwd=tcp:127.0.0.1:$4-:7879,hostfwd=tcp:127.0.0.1:$5-:7900"
# The network card sits on the virt machine's MMIO bus: no PCI, so no option ROM to find.
exec timeout --kill-after=5 "${6:-240}" qemu-system-aarch64 \
    -machine virt -cpu cortex-a57 -smp 2 -m 512 \
    -display none -monitor none -serial "file:$dir/console.log" -no-reboot \
    -kernel "$dir/vmlinuz" -initrd "$dir/initrd" \
    -append "console=ttyAMA0 rdinit=/init panic=-1 quiet" \
    -netdev "user,id=net0,$fwd" -device virtio-net-device,netdev=net0
