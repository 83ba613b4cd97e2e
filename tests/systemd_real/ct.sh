#!/usr/bin/env bash
# Runs a shell command inside the booted container (all namespaces of its systemd), e.g.
#   RUN=/var/tmp/ferryd-run.X ct.sh 'systemctl status ferryd'
set -euo pipefail
RUN=${RUN:?RUN must name the directory boot.sh used}
npid=$(cat "$RUN/nspawn.pid")
leader=$(pgrep -P "$npid" | head -1)
[[ -n $leader ]] || { echo "ct.sh: no container under nspawn pid $npid" >&2; exit 3; }
exec nsenter -t "$leader" -a -- /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  TERM=dumb SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 LANG=C.UTF-8 HOME=/root /bin/bash -c "$1"
