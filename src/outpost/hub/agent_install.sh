#!/bin/sh
# Install the Outpost agent into a venv of its own, register this machine with the hub and
# set up the agent's service. Served by the hub at /v1/agent/install.sh and run by the line
# 'outpost hub init' and 'outpost machine install-line' print, which has already checked the
# hub's CA against its pinned fingerprint (--ca-file is that CA).
#
# As root: venv /opt/outpost-agent, state /var/lib/outpost, a systemd unit when systemd runs.
# Otherwise: venv ~/.local/share/outpost-agent, state ~/.local/state/outpost, a systemd user
# unit when a user manager answers. OUTPOST_AGENT_VENV and OUTPOST_STATE_DIR (or --venv,
# --state-dir) put them elsewhere. The account key comes from OUTPOST_ACCOUNT_KEY, never from
# the command line. Running it again upgrades the agent and leaves the registration alone.
set -eu

WHEEL='@WHEEL@'
me=outpost-install

say() { printf '%s: %s\n' "$me" "$*"; }
fail() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

usage() {
    cat <<EOF
Usage: install.sh --hub URL --ca-file FILE --ca-fingerprint SHA256 --account-id ID --group G
                  [--name NAME] [--label KEY=VALUE]... [--wheelhouse DIR] [--python PYTHON]
                  [--venv DIR] [--state-dir DIR] [--no-service] [--start]

  --wheelhouse DIR  take the agent's dependencies from DIR (pip --no-index --find-links DIR)
                    instead of the package index
  --no-service      set up no systemd unit
  --start           with no systemd unit, start the agent in the background (restart it if
                    it runs)
The account key is read from the environment variable OUTPOST_ACCOUNT_KEY.
EOF
}

hub='' ca_file='' fingerprint='' account_id='' group='' name='' labels='' wheelhouse=''
python="${PYTHON:-python3}" service=yes start=no
if [ "$(id -u)" = 0 ]; then
    venv="${OUTPOST_AGENT_VENV:-/opt/outpost-agent}"
    state="${OUTPOST_STATE_DIR:-/var/lib/outpost}"
else
    venv="${OUTPOST_AGENT_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/outpost-agent}"
    state="${OUTPOST_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/outpost}"
fi

need_value() { [ $# -ge 2 ] || fail "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --hub) need_value "$@"; hub=$2; shift ;;
        --ca-file) need_value "$@"; ca_file=$2; shift ;;
        --ca-fingerprint) need_value "$@"; fingerprint=$2; shift ;;
        --account-id) need_value "$@"; account_id=$2; shift ;;
        --group) need_value "$@"; group=$2; shift ;;
        --name) need_value "$@"; name=$2; shift ;;
        --label) need_value "$@"; labels="$labels --label $(quote "$2")"; shift ;;
        --wheelhouse) need_value "$@"; wheelhouse=$2; shift ;;
        --python) need_value "$@"; python=$2; shift ;;
        --venv) need_value "$@"; venv=$2; shift ;;
        --state-dir) need_value "$@"; state=$2; shift ;;
        --no-service) service=no ;;
        --start) start=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; fail "unknown option '$1'" ;;
    esac
    shift
done
for pair in "hub:--hub" "ca_file:--ca-file" "fingerprint:--ca-fingerprint" \
            "account_id:--account-id" "group:--group"; do
    eval "value=\${${pair%%:*}}"
    [ -n "$value" ] || fail "${pair#*:} is required (see --help)"
done
[ -r "$ca_file" ] || fail "cannot read the hub's CA certificate $ca_file"
command -v curl >/dev/null 2>&1 || fail "curl is not installed"

# 1. Python 3.11 or newer, and a venv of the agent's own.
command -v "$python" >/dev/null 2>&1 \
    || fail "$python is not installed; the agent needs Python 3.11 or newer (--python PATH)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$python is $("$python" -V 2>&1); the agent needs Python 3.11 or newer (--python PATH)"
if [ ! -x "$venv/bin/python" ]; then
    say "creating the venv $venv"
    mkdir -p "$(dirname "$venv")" || fail "cannot create $(dirname "$venv")"
    "$python" -m venv "$venv" \
        || fail "'$python -m venv $venv' failed (Debian and Ubuntu: apt-get install python3-venv)"
fi

# 2. The agent's wheel from the hub, over TLS verified against the pinned CA.
tmp=$(mktemp -d) || fail "mktemp failed"
trap 'rm -rf "$tmp"' EXIT
say "downloading $WHEEL from $hub"
curl -fsS --cacert "$ca_file" "$hub/v1/agent/$WHEEL" -o "$tmp/$WHEEL" \
    || fail "could not download the agent from $hub/v1/agent/$WHEEL"
if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || fail "the wheelhouse $wheelhouse is not a directory"
    set -- --no-index --find-links "$wheelhouse"
    say "installing it into $venv (dependencies from $wheelhouse)"
else
    set --
    say "installing it into $venv (dependencies from the package index)"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$@" \
        "$tmp/$WHEEL" \
    || fail "pip could not install the agent into $venv (see pip's message above)"
"$venv/bin/outpost" --version >/dev/null || fail "the installed agent does not run"
say "installed $("$venv/bin/outpost" --version)"

# 3. Registration, once: a machine registered here keeps its identity.
outpost="$venv/bin/outpost"
if [ -f "$state/identity.json" ] || [ -f "$state/registration.json" ]; then
    say "this machine is already registered (state $state); registration left as it is"
else
    [ -n "${OUTPOST_ACCOUNT_KEY:-}" ] \
        || fail "set OUTPOST_ACCOUNT_KEY to the account's key (the line from the hub does)"
    say "registering with $hub in group '$group'"
    eval "set -- ${name:+--name $(quote "$name")} $labels"
    "$outpost" agent register --hub "$hub" --account-id "$account_id" --group "$group" \
            --ca-fingerprint "$fingerprint" --state-dir "$state" --json "$@" >"$tmp/reg.json" \
        || fail "registration failed (see the message above); the agent is installed, run this line again once it is fixed"
    say "$("$venv/bin/python" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print("registered %r in group %r (machine %s)" % (r["name"], r["group"], r["machine_id"]))' \
        "$tmp/reg.json")"
fi
unset OUTPOST_ACCOUNT_KEY
run_command="$(quote "$outpost") agent run --state-dir $(quote "$state")"

# 4. The service.
unit=''
write_unit() {  # $1: path, $2: WantedBy target
    mkdir -p "$(dirname "$1")" || fail "cannot create $(dirname "$1")"
    cat >"$1" <<EOF || fail "cannot write $1"
[Unit]
Description=Outpost agent (outbound-only connection to the Outpost hub)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=$run_command
KillSignal=SIGTERM
# Only the agent: its modules outlive it and the next agent adopts them (docs/modules.md).
KillMode=process
TimeoutStopSec=30
Restart=always
RestartSec=5
# Exit code 2 is a configuration error: restarting will not fix it.
RestartPreventExitStatus=2

[Install]
WantedBy=$2
EOF
}
if [ "$service" = yes ] && [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then
    unit=/etc/systemd/system/outpost-agent.service
    write_unit "$unit" multi-user.target
    systemctl daemon-reload && systemctl enable --quiet outpost-agent \
        && systemctl restart outpost-agent \
        || fail "systemctl could not start outpost-agent; see: journalctl -u outpost-agent"
    say "the agent runs as the systemd unit outpost-agent (systemctl status outpost-agent)"
elif [ "$service" = yes ] && [ "$(id -u)" != 0 ] \
        && systemctl --user show-environment >/dev/null 2>&1; then
    unit="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/outpost-agent.service"
    write_unit "$unit" default.target
    systemctl --user daemon-reload && systemctl --user enable --quiet outpost-agent \
        && systemctl --user restart outpost-agent \
        || fail "systemctl --user could not start outpost-agent; see: journalctl --user -u outpost-agent"
    say "the agent runs as the systemd user unit outpost-agent; to keep it running after"
    say "you log out: loginctl enable-linger $(id -un)"
fi
if [ -z "$unit" ] && [ "$start" = yes ]; then
    pid=$("$outpost" agent status --state-dir "$state" --json 2>/dev/null \
          | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin).get("pid") or "")' \
          2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping the running agent (pid $pid) to start the new one"
        kill "$pid"
        i=0
        while kill -0 "$pid" 2>/dev/null; do
            i=$((i + 1)); [ $i -le 300 ] || fail "the agent (pid $pid) did not stop within 30 s"
            sleep 0.1
        done
    fi
    nohup "$outpost" agent run --state-dir "$state" >>"$state/agent.out" 2>&1 </dev/null &
    i=0
    until "$outpost" agent status --state-dir "$state" >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -le 100 ] || fail "the agent did not start within 20 s; see $state/agent.out and $state/agent.log"
        sleep 0.2
    done
    say "the agent runs in the background (log: $state/agent.log)"
elif [ -z "$unit" ]; then
    say "no service was set up; start the agent with:"
    say "  $run_command"
fi
say "done"
