#!/usr/bin/env bash
# Checks the systemd units in this directory (needs systemd-analyze, tested
# with systemd 252; no running systemd required).
#
#   systemd/check.sh [PATH_TO_FERRYD]     default: target/release/ferryd
#
# 1. systemd-analyze verify on copies of the units whose ExecStart= points at
#    the given binary (verify insists that ExecStart= is an executable).
#    Fails on any message about our units and on any message it cannot
#    attribute to some other unit; messages about other units are shown and
#    ignored.
# 2. The [Service] sections of ferryd.service and ferryd-activated.service
#    differ only in the network settings.
# 3. systemd-analyze security --offline=true (works on a unit file path, no
#    --root/--image needed): ferryd.service <= 1.2, ferryd-activated.service
#    <= 0.6. Socket units run no code, so they are not scored.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname -- "$here")

MAX_PLAIN=12      # tenths: 1.2
MAX_ACTIVATED=6   # tenths: 0.6
INSTALLED_BIN=/usr/local/bin/ferryd
UNITS=(ferryd.service ferryd-activated.service ferryd-activated.socket)

export SYSTEMD_PAGER=cat SYSTEMD_COLORS=0

die() { echo "check.sh: $*" >&2; exit 2; }

[[ $# -le 1 ]] || die "usage: $0 [PATH_TO_FERRYD]"
bin=${1:-$repo/target/release/ferryd}
[[ -f $bin && -x $bin ]] || die "no executable at '$bin' (build it first or pass a path)"
bin=$(realpath -- "$bin")
command -v systemd-analyze >/dev/null || die "systemd-analyze not found (apt-get install -y systemd)"

fail=0
# Scratch space under $TMPDIR (default /tmp), removed however the script ends.
tmp=$(mktemp -d -t ferryd-check.XXXXXXXX)
trap 'rm -rf -- "$tmp"' EXIT

# The binary path is written into ExecStart= unquoted: keep to characters
# systemd takes literally (no spaces, quotes, "%" specifiers or "$" variables).
# A checkout path with others (CI workspaces such as "build@2") gets a copy.
plain_path_re='^[A-Za-z0-9._/+-]+$'
if ! [[ $bin =~ $plain_path_re ]]; then
    cp -- "$bin" "$tmp/ferryd"
    bin=$tmp/ferryd
    [[ $bin =~ $plain_path_re ]] || die "temp dir '$tmp' has unsupported characters; set TMPDIR"
fi

# --- 1. verify -------------------------------------------------------------
# All units go into one directory: verify adds it to the unit search path, so
# the socket finds its service and the Conflicts=ferryd.service target.
for u in "${UNITS[@]}"; do
    src=$here/$u
    [[ -f $src ]] || die "missing $src"
    sed -E "s|^(Exec[A-Za-z]+=)$INSTALLED_BIN |\1$bin |" "$src" >"$tmp/$u"
    if [[ $u == *.service ]] && ! grep -q "^ExecStart=$bin " "$tmp/$u"; then
        echo "FAIL $u: no 'ExecStart=$INSTALLED_BIN ' line to rewrite" >&2
        fail=1
    fi
done

ours_re="$tmp|ferryd(-activated)?\.(service|socket)"
other_unit_re='[[:alnum:]@:._\\-]+\.(service|socket|target|mount|automount|swap|path|timer|slice|scope|device)\b'

for u in "${UNITS[@]}"; do
    rc=0
    out=$(systemd-analyze verify --no-pager "$tmp/$u" 2>&1) || rc=$?
    if [[ -z $out && $rc -eq 0 ]]; then
        echo "verify $u: OK (no output)"
        continue
    fi
    echo "verify $u: exit $rc, output:"
    printf '%s\n' "$out" | sed 's/^/    | /'
    [[ $rc -eq 0 ]] || { echo "FAIL verify $u: exit status $rc"; fail=1; }
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        if [[ $line =~ $ours_re ]]; then
            echo "FAIL verify $u: message about our units: $line"
            fail=1
        elif [[ $line =~ $other_unit_re ]]; then
            echo "ignored (other unit): $line"
        else
            echo "FAIL verify $u: unattributed message: $line"
            fail=1
        fi
    done <<<"$out"
done

# --- 2. plain and activated service stay in sync ---------------------------
# Settings of the [Service] section, one per line, comments dropped.
service_settings() {
    awk '/^\[/ { s = ($0 == "[Service]") } s && /^[A-Za-z]/' "$1" | sort
}
allowed_diff='^(PrivateNetwork|RestrictAddressFamilies|IPAddressDeny|IPAddressAllow)='
drift=$(diff <(service_settings "$here/ferryd.service" | grep -Ev "$allowed_diff" || true) \
             <(service_settings "$here/ferryd-activated.service" | grep -Ev "$allowed_diff" || true)) || true
if [[ -n $drift ]]; then
    echo "FAIL ferryd.service and ferryd-activated.service [Service] differ beyond network settings:"
    printf '%s\n' "$drift" | sed 's/^/    /'
    fail=1
else
    echo "sync: [Service] sections differ only in network settings"
fi

# --- 3. security exposure --------------------------------------------------
exposure() {   # prints the overall exposure in tenths, e.g. 11 for 1.1
    local unit=$1 out line
    out=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1) || {
        printf '%s\n' "$out" >&2
        return 1
    }
    line=$(grep -E 'Overall exposure level for [^:]+: [0-9]+\.[0-9]' <<<"$out") || {
        printf '%s\n' "$out" >&2
        echo "no 'Overall exposure level' line for $unit" >&2
        return 1
    }
    [[ $line =~ :\ ([0-9]+)\.([0-9]) ]]
    echo $((10#${BASH_REMATCH[1]} * 10 + 10#${BASH_REMATCH[2]}))
}

check_exposure() {
    local unit=$1 max=$2 e
    if ! e=$(exposure "$here/$unit"); then
        echo "FAIL security $unit: could not determine exposure"
        fail=1
        return
    fi
    local shown="$((e / 10)).$((e % 10))" limit="$((max / 10)).$((max % 10))"
    if ((e > max)); then
        echo "FAIL security $unit: exposure $shown > $limit"
        # Failed checks start with "✗", or "-" outside a UTF-8 locale.
        systemd-analyze security --offline=true --no-pager "$here/$unit" 2>&1 | grep -E '^(✗|-) ' | sed 's/^/    /' || true
        fail=1
    else
        echo "security $unit: exposure $shown (limit $limit)"
    fi
}

check_exposure ferryd.service "$MAX_PLAIN"
check_exposure ferryd-activated.service "$MAX_ACTIVATED"

if ((fail)); then
    echo "check.sh: FAILED"
    exit 1
fi
echo "check.sh: all checks passed"
