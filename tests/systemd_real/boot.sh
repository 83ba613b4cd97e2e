#!/usr/bin/env bash
# Boots the root from make-root.sh with its own systemd as PID 1 (systemd-nspawn -b), in the
# background, with a private loopback-only network (adapted from the project's shared
# systemd-container scripts). The cached root stays untouched: the container runs on an overlay
# whose upper layer lives in $RUN, so every run starts from the same fresh system and a reboot
# (shutdown.sh, then boot.sh with the same RUN) keeps what the run changed. BIND (a directory) is
# mounted read-only at /src inside. Waits until the container's systemd reports running or
# degraded. Writes the nspawn pid to $RUN/nspawn.pid and the console to $RUN/console.log.
#
#   ROOT=/var/tmp/ferryd-sd-root RUN=/var/tmp/ferryd-run.X NAME=ferryd-X BIND=dir boot.sh
set -euo pipefail
ROOT=${ROOT:-/var/tmp/ferryd-sd-root}
RUN=${RUN:?RUN must name a per-run directory}
BIND=${BIND:-$PWD}
NAME=${NAME:-ferryd-sd}
[[ -x $ROOT/lib/systemd/systemd ]] || { echo "boot.sh: no root at $ROOT (run make-root.sh)" >&2; exit 2; }
mkdir -p "$RUN/upper" "$RUN/work" "$RUN/merged"
if ! mountpoint -q "$RUN/merged"; then
  mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$RUN/upper,workdir=$RUN/work" "$RUN/merged"
fi
# This machine's PID 1 may not be systemd: give the container cgroups of its own.
for h in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do [[ -d $h ]] && mkdir -p "$h/$NAME"; done
setsid bash -c '
  for h in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do [[ -d $h/'"$NAME"' ]] && echo $$ > $h/'"$NAME"'/cgroup.procs; done
  exec env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 "$@"' _ \
  systemd-nspawn -D "$RUN/merged" -b --machine="$NAME" --register=no --keep-unit \
    --private-network --console=read-only --bind-ro="$BIND":/src \
  </dev/null >"$RUN/console.log" 2>&1 &
echo $! > "$RUN/nspawn.pid"
here=$(dirname "$0")
for _ in $(seq 1 600); do
  s=$(RUN=$RUN "$here/ct.sh" 'systemctl is-system-running' 2>/dev/null || true)
  case $s in running|degraded) echo "booted ($s), nspawn pid $(cat "$RUN/nspawn.pid")"; exit 0;; esac
  kill -0 "$(cat "$RUN/nspawn.pid")" 2>/dev/null || break
  sleep 0.1
done
echo "boot.sh: container did not boot in 60 s; console:" >&2; tail -20 "$RUN/console.log" >&2; exit 1
