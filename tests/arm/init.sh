#!/bin/busybox sh
# /init of the emulated arm64 board that tests/arm.rs boots (see make-initramfs.sh): brings up
# the virtio network card with QEMU's user-mode addresses, starts two ferryd daemons on the
# cross-built binary, echo on port 7878 (TCP and UDP) and chat on 7879, and powers the board off
# once the host connects to port 7900: SIGTERM to both daemons, their exit codes on the console,
# then poweroff. Its own lines start with "ferryd-arm:" (among them each daemon's exit status);
# the daemons log to the console, telling themselves apart by their ports.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
say() { echo "ferryd-arm: $*"; }
halt() { say "power off: $*"; sync; poweroff -f; }

for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do
    insmod "/modules/$m.ko" || halt "insmod $m failed"
done
ip link set lo up
ip link set eth0 up || halt "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
say "$(uname -m) $(uname -r), network up"

daemon() { # NAME PORT MODE UDP
    cat >"/tmp/$1.toml" <<EOF
[server]
bind = "0.0.0.0"
port = $2
mode = "$3"

[udp]
enabled = $4

[files]
dir = "/tmp/$1-uploads"

[access]
max_per_ip = 64
EOF
    # Straight to the console (a pipe through a filter would hold lines back in its buffer).
    { /ferryd --config "/tmp/$1.toml"; say "$1 daemon exit status $?"; } &
}
daemon echo 7878 echo true
daemon chat 7879 chat false
say "daemons started"

nc -l -p 7900 </dev/null >/dev/null
say "stop asked"
for name in echo chat; do
    pid=$(pidof ferryd | tr ' ' '\n' | while read -r p; do
        grep -q "/tmp/$name.toml" "/proc/$p/cmdline" 2>/dev/null && echo "$p"
    done)
    [ -n "$pid" ] || { say "$name daemon is not running"; continue; }
    kill -TERM "$pid"
done
# Each job ends with its daemon, after its "ferryd-arm: NAME daemon exit status N" line.
wait
halt "done"
