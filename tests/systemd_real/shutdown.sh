#!/usr/bin/env bash
# Powers the container off cleanly (killing it if it takes over 30 s), unmounts its overlay and
# removes the cgroups boot.sh made. The cached root stays; $RUN/upper keeps what the run changed.
RUN=${RUN:?RUN must name the directory boot.sh used}
NAME=${NAME:-ferryd-sd}
npid=$(cat "$RUN/nspawn.pid" 2>/dev/null)
if [[ -n $npid ]] && kill -0 "$npid" 2>/dev/null; then
  RUN=$RUN "$(dirname "$0")/ct.sh" 'systemctl poweroff' >/dev/null 2>&1 || true
  for _ in $(seq 1 300); do kill -0 "$npid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$npid" 2>/dev/null && kill -KILL "$npid"
  for _ in $(seq 1 50); do kill -0 "$npid" 2>/dev/null || break; sleep 0.1; done
fi
rm -f "$RUN/nspawn.pid"
mountpoint -q "$RUN/merged" && umount "$RUN/merged"
for h in /sys/fs/cgroup/unified/$NAME /sys/fs/cgroup/systemd/$NAME; do
  [[ -d $h ]] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
done
rmdir /run/systemd/nspawn/locks /run/systemd/nspawn/propagate /run/systemd/nspawn 2>/dev/null || true
exit 0
