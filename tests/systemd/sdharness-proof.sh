#!/usr/bin/env bash
# sdharness-proof.sh - prove that systemd/whatsappd.{service,socket} work under a real systemd.
#
# Boots a Debian 12 container (systemd 252) with sdharness (its own rootfs; systemd is never
# booted on this machine's root filesystem), installs whatsappd from wheels built here into a
# venv at /opt/whatsappd, installs the units, sysusers and tmpfiles, and checks: the
# systemd-analyze security score, Type=notify start, STATUS=, the journal, the control socket
# (and who may use it), neonize workers inside the sandbox (reload; a company behind a refusing
# SOCKS5 listener goes reconnecting with backoff), the zygote (a forked worker's parent is
# MainPID; kill -9 of the zygote leaves workers running and the next start works), a
# simulator company that pairs, connects and is restored after a restart, a message sent and
# the event journal, exit 78 (bad config) and 65 (damaged store) without restart loop,
# watchdog kill + restart, clean stop, and socket activation. Every neonize company dials
# through a SOCKS5 listener or closed port on the container's 127.0.0.1. Stops the container at
# the end whatever happens.
#
# Usage (as root):  tests/systemd/sdharness-proof.sh
# Environment:
#   WHATSAPPD_SDHARNESS=PATH   the harness (default: shared/tools/sdharness beside the
#                         repository, i.e. ../shared/tools/sdharness from its root)
#   WHATSAPPD_PROOF_CACHE=DIR  keep the container's Debian rootfs (about 520 MB) in DIR, below
#                         /var/tmp, so that later runs skip debootstrap. Without it the rootfs
#                         is built in a fresh directory below /var/tmp, removed at the end.
#   SDH_NAME=proof        container instance name
#   WHATSAPPD_PROJECT=DIR the project to install (default: this repository)
#   PYTHON=python3        a host Python with pip, used to build/download the wheels
#   KEEP=1                leave the container running at the end (then: sdharness stop)
#   MAX_SCORE=2.0         highest acceptable systemd-analyze exposure score
# Exit status: 0 if every check passed, 1 otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PROJECT=${WHATSAPPD_PROJECT:-$REPO}
UNITS=$REPO/systemd
SDHARNESS=${WHATSAPPD_SDHARNESS:-$REPO/../shared/tools/sdharness}
# The harness keeps its rootfs, tools and containers in SDH_DIR: a cache if asked for, else a
# directory of this run's own (created in preflight, removed by cleanup).
SDH_DIR=${WHATSAPPD_PROOF_CACHE:-}
OWN_SDH_DIR=""
export SDH_DIR
export SDH_NAME=${SDH_NAME:-proof}
export SDH_EXTRA_PACKAGES=${SDH_EXTRA_PACKAGES:-"libmagic1 curl"}
PYTHON=${PYTHON:-python3}
MAX_SCORE=${MAX_SCORE:-2.0}
SOCK=/run/whatsappd/control.sock
# Debian 12's own Python: the offline wheelhouse must be resolved for it, not for the host's.
TARGET_PY=3.11.2

T0=$SECONDS
FAILS=0
PASSES=0
WARNS=0
STEP=0
WORK=""

step() { STEP=$((STEP + 1)); printf '\n== [%3ds] %d. %s\n' $((SECONDS - T0)) "$STEP" "$*"; }
info() { printf '   %s\n' "$*"; }
pass() { PASSES=$((PASSES + 1)); printf '   ok: %s\n' "$*"; }
fail() { FAILS=$((FAILS + 1)); printf '   FAIL: %s\n' "$*"; }
warn() { WARNS=$((WARNS + 1)); printf '   WARN: %s\n' "$*"; }   # a finding that does not fail the proof
die()  { printf '\nFAIL: %s (after %ds)\n' "$*" $((SECONDS - T0)); exit 1; }
# check DESCRIPTION CMD...: pass or fail on CMD's exit status
check() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }
H() { "$SDHARNESS" "$@"; }
X() { "$SDHARNESS" exec "$@"; }
# wait_until SECONDS CMD...: poll CMD every 0.5 s until it succeeds
wait_until() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < end )) || return 1
    sleep 0.5
  done
}
prop() { X systemctl show -P "$2" "$1"; }   # prop UNIT PROPERTY
not() { ! "$@"; }
has() { grep -qiE "$1" <<<"$2"; }             # has REGEX TEXT (case-insensitive)
# serves_passed_socket PID: PID listens on the very socket whatsappd.socket holds (fd 3)
serves_passed_socket() { local l; l=$(X ss -xlpn src "$SOCK"); [[ $l == *'"systemd"'* && $l == *"pid=$1,"* ]]; }
active() { [[ $(X systemctl is-active "$1" 2>/dev/null) == active ]]; }
inactive() { [[ $(X systemctl is-active "$1" 2>/dev/null) == inactive ]]; }
cursor() { X journalctl --show-cursor -n 0 -q 2>/dev/null | sed -n 's/^-- cursor: //p'; }
# journal_since CURSOR [FIELD=VALUE...]: messages logged after CURSOR whose fields match all of
# FIELD=VALUE; unit=NAME matches the unit's own processes and systemd's lines about it
# (like journalctl -u). Filtered here because journalctl 252 drops the first match when
# --after-cursor is combined with matches.
journal_since() {
  local c=$1; shift
  X journalctl --no-pager -o json --after-cursor="$c" | python3 -c '
import json, sys
want = [a.split("=", 1) for a in sys.argv[1:]]
def text(v):
    return bytes(v).decode("utf-8", "replace") if isinstance(v, list) else str(v)
for line in sys.stdin:
    e = json.loads(line)
    ok = True
    for k, v in want:
        if k == "unit":
            ok = ok and v in (e.get("_SYSTEMD_UNIT"), e.get("UNIT") if e.get("_PID") == "1" else None)
        else:
            ok = ok and text(e.get(k, "")) == v
    if ok:
        print(text(e.get("MESSAGE", "")))
' "$@"
}
# http [--as USER] PATH [curl args...]: sets CODE (HTTP status, 000 if no connection) and BODY
CODE="" BODY=""
http() {
  local -a as=()
  if [[ $1 == --as ]]; then as=(runuser -u "$2" --); shift 2; fi
  local path=$1 out; shift
  out=$(X "${as[@]}" curl -sS --max-time 20 --unix-socket "$SOCK" -w '\n%{http_code}' \
    "$@" "http://localhost$path" 2>/dev/null) || true
  CODE=${out##*$'\n'}
  BODY=${out%$'\n'*}
  [[ $out == *$'\n'* ]] || BODY=""
}
# json EXPR: evaluate a Python expression over BODY (as `d`)
json() { python3 -c 'import json,sys; d=json.loads(sys.argv[2]); print(eval(sys.argv[1]))' "$1" "$BODY"; }
json_true() { [[ $(json "bool($1)" 2>/dev/null) == True ]]; }   # json_true EXPR
# company_matches ID EXPR: GET /v1/companies/ID answers 200 and EXPR is true of its snapshot
# (`d`); leaves the snapshot in BODY
company_matches() { http "/v1/companies/$1"; [[ $CODE == 200 ]] && json_true "$2"; }
JSON=(-H 'Content-Type: application/json')

cleanup() {
  local rc=$? stopped=0
  if [[ -n $WORK && -d $WORK ]]; then rm -rf -- "$WORK"; fi
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "KEEP=1: container left running (SDH_DIR=$SDH_DIR SDH_NAME=$SDH_NAME $SDHARNESS stop);" \
         "remove $SDH_DIR yourself afterwards"
  elif [[ -n $SDH_DIR && -d $SDH_DIR ]]; then
    echo "== stopping the container"
    if H stop >/dev/null 2>&1 || H stop --kill; then stopped=1; fi
  fi
  if [[ -n $OWN_SDH_DIR && ${KEEP:-0} != 1 ]]; then
    # Only once the harness has verified that nothing runs and nothing is mounted below it.
    if (( stopped )) && ! grep -qE " $OWN_SDH_DIR(/| )" /proc/self/mountinfo; then
      echo "== removing $OWN_SDH_DIR ($(du -sh "$OWN_SDH_DIR" 2>/dev/null | cut -f1); set WHATSAPPD_PROOF_CACHE to keep it)"
      rm -rf --one-file-system -- "$OWN_SDH_DIR"
    else
      echo "NOT removing $OWN_SDH_DIR: the container did not stop cleanly; run: SDH_DIR=$OWN_SDH_DIR $SDHARNESS stop"
      rc=1
    fi
  fi
  exit "$rc"
}

# --------------------------------------------------------------------------------- setup
step "preflight"
[[ $(id -u) == 0 ]] || die "must run as root (sdharness needs it)"
[[ -f $SDHARNESS ]] || die "sdharness not found at $SDHARNESS; set WHATSAPPD_SDHARNESS=/path/to/sdharness"
for f in whatsappd.service whatsappd.socket whatsappd.sysusers.conf whatsappd.tmpfiles.conf; do
  [[ -f $UNITS/$f ]] || die "missing $UNITS/$f"
done
[[ -f $PROJECT/pyproject.toml ]] || die "no pyproject.toml in $PROJECT"
"$PYTHON" -m pip --version >/dev/null || die "$PYTHON has no pip"
trap cleanup EXIT
trap 'exit 130' INT TERM
if [[ -z $SDH_DIR ]]; then
  SDH_DIR=$(mktemp -d /var/tmp/whatsappd-proof.XXXXXX)
  OWN_SDH_DIR=$SDH_DIR
fi
WORK=$(mktemp -d /var/tmp/whatsappd-proof-wheels.XXXXXX)
info "project $PROJECT, harness $SDHARNESS, SDH_DIR=$SDH_DIR${OWN_SDH_DIR:+ (removed at the end)}" \
     "SDH_NAME=$SDH_NAME"

step "wheelhouse for Debian 12's Python $TARGET_PY (the container has no network)"
SRC=$WORK/src WHEELS=$WORK/wheels
mkdir -p "$SRC" "$WHEELS"
# build from a copy: an in-tree build would leave build/ and *.egg-info in the work tree
tar -C "$PROJECT" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist \
  --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -
pip_q() { "$PYTHON" -m pip "$@" 2>&1 | grep -v -e 'is ignored: it is neither' -e '^$' || true; }
pip_q wheel -q --no-deps -w "$WHEELS" "$SRC"
PROJECT_WHEEL=$(ls "$WHEELS"/whatsappd-*.whl 2>/dev/null | head -1)
[[ -n $PROJECT_WHEEL ]] || die "building the whatsappd wheel failed"
info "built $(basename "$PROJECT_WHEEL")"
# 1) wheels for every dependency as the host resolves them: this turns sdist-only packages
#    (e.g. sdnotify) into pure-Python wheels;
pip_q wheel -q -w "$WHEELS" --find-links "$WHEELS" "$PROJECT_WHEEL"
# 2) then the binary wheels resolved for the container's interpreter and glibc (2.36).
pip_q download -q -d "$WHEELS" --find-links "$WHEELS" --only-binary=:all: \
  --python-version "$TARGET_PY" --implementation cp --abi cp311 \
  --platform manylinux_2_36_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform linux_x86_64 "$PROJECT_WHEEL"
ls "$WHEELS"/neonize-*.whl >/dev/null 2>&1 || die "no neonize wheel in the wheelhouse"
info "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"

step "container rootfs (Debian 12 + $SDH_EXTRA_PACKAGES; ${OWN_SDH_DIR:+not }cached for later runs)"
H stop >/dev/null 2>&1 || true   # a container left over by an interrupted run
H build || die "sdharness build failed"

step "boot a fresh container"
H boot --fresh || die "sdharness boot failed"
info "$(X systemctl --version | head -1)"

step "install whatsappd into a venv at /opt/whatsappd (offline, from the wheelhouse)"
H copy-in "$WHEELS" /opt/wheels
X python3 -m venv /opt/whatsappd
X /opt/whatsappd/bin/pip install -q --no-index --find-links /opt/wheels whatsappd \
  || die "pip install in the container failed"
check "whatsappd run --help works" X /opt/whatsappd/bin/whatsappd run --help >/dev/null
check "neonize imports in the container (libmagic1 present)" \
  X /opt/whatsappd/bin/python -c 'import logging; logging.disable(); import neonize'

step "install the units, sysusers and tmpfiles"
H copy-in "$UNITS/whatsappd.service" /etc/systemd/system/whatsappd.service
H copy-in "$UNITS/whatsappd.socket" /etc/systemd/system/whatsappd.socket
H copy-in "$UNITS/whatsappd.sysusers.conf" /usr/lib/sysusers.d/whatsappd.conf
H copy-in "$UNITS/whatsappd.tmpfiles.conf" /usr/lib/tmpfiles.d/whatsappd.conf
X systemd-sysusers
X systemd-tmpfiles --create whatsappd.conf
X systemctl daemon-reload
check "user and group whatsappd exist ($(X id whatsappd 2>&1))" X id whatsappd
check "/run/whatsappd is 0750 whatsappd:whatsappd" \
  test "$(X stat -c '%a %U:%G' /run/whatsappd)" == "750 whatsappd:whatsappd"
out=$(X systemd-analyze verify whatsappd.service whatsappd.socket 2>&1) && rc=0 || rc=$?
[[ -z $out ]] || info "$out"
check "systemd-analyze verify: no warnings" test "$rc:$out" == "0:"
X systemctl enable --quiet whatsappd.service whatsappd.socket   # WantedBy + Also=

step "systemd-analyze security (exposure must be <= $MAX_SCORE)"
score_ok() { awk -v s="$1" -v m="$MAX_SCORE" 'BEGIN { exit !(s != "" && s + 0 <= m + 0) }'; }
H copy-in "$UNITS/whatsappd.service" /tmp/whatsappd.service
out=$(X systemd-analyze security --no-pager --offline=true /tmp/whatsappd.service 2>&1 || true)
offline=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
echo "$out" | grep -E '^✗' | sed 's/^/   /' || true
check "offline score of systemd/whatsappd.service: ${offline:-?}" score_ok "$offline"
out=$(X systemd-analyze security --no-pager whatsappd.service 2>&1 || true)
online=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
check "score of the loaded whatsappd.service: ${online:-?}" score_ok "$online"

# --------------------------------------------------------------------------------- start
step "systemctl start whatsappd (Type=notify: returns after READY=1)"
t=$SECONDS
check "systemctl start whatsappd succeeded" X systemctl start whatsappd.service
info "took $((SECONDS - t))s"
check "whatsappd.service is active" active whatsappd.service
check "whatsappd.socket was pulled in and is active" active whatsappd.socket
PID=$(prop whatsappd.service MainPID)
info "MainPID $PID"
check "the daemon runs as user whatsappd" test "$(X ps -o user= -p "$PID" | tr -d ' ')" == whatsappd
check "socket file is 0660 whatsappd:whatsappd" \
  test "$(X stat -c '%a %U:%G %F' "$SOCK")" == "660 whatsappd:whatsappd socket"
# the daemon serves the socket systemd passed (fd 3), it did not bind its own
check "the daemon listens on the socket passed by systemd (LISTEN_FDS)" \
  serves_passed_socket "$PID"

step "systemctl status shows the daemon's STATUS= line"
st=$(X systemctl status whatsappd.service --no-pager 2>&1 || true)
echo "$st" | head -12 | sed 's/^/   | /'
check "Status: line present" grep -q '^ *Status: "' <<<"$st"
check "StatusText is set: $(prop whatsappd.service StatusText)" test -n "$(prop whatsappd.service StatusText)"

step "journalctl -u whatsappd has the daemon's log lines"
jl=$(X journalctl -u whatsappd.service --no-pager -o cat _PID="$PID" 2>&1 || true)
echo "$jl" | head -5 | sed 's/^/   | /'
check "the daemon's own lines are in the journal" test -n "$jl"
check "the ready line is there" grep -qi 'ready' <<<"$jl"
check "no raw <N> priority prefixes (journald parsed them)" not has '^<[0-7]>' "$jl"
check "priorities were parsed (info lines at PRIORITY=6)" \
  test -n "$(X journalctl -u whatsappd.service --no-pager -o cat _PID="$PID" PRIORITY=6 2>/dev/null)"
modes=$(X journalctl -u whatsappd.service --no-pager -o cat 2>&1 | grep 'mode is different' || true)
check "no directory mode conflicts between the units and tmpfiles${modes:+: $modes}" test -z "$modes"


step "GET /v1/health over $SOCK, and who may connect"
http /v1/health
info "${BODY:0:400}"
check "root: HTTP $CODE" test "$CODE" == 200
check "health reports this pid" test "$(json 'd["pid"]' 2>/dev/null)" == "$PID"
X sh -c 'id crm >/dev/null 2>&1 || useradd --create-home crm; usermod -aG whatsappd crm
         id outsider >/dev/null 2>&1 || useradd --create-home outsider'
http --as crm /v1/health
check "a member of group whatsappd (crm): HTTP $CODE" test "$CODE" == 200
http --as outsider /v1/health
check "a user outside group whatsappd cannot connect (got '$CODE')" test "$CODE" == 000
check "whatsappctl health (root)" X /opt/whatsappd/bin/whatsappctl health
out=$(X runuser -u crm -- /opt/whatsappd/bin/whatsappctl health 2>&1) && rc=0 || rc=$?
if (( rc == 0 )); then pass "whatsappctl health as crm (group whatsappd, no --socket)"
else warn "whatsappctl health as crm without --socket: $(head -1 <<<"$out")"; fi
check "whatsappctl --socket $SOCK health as crm" \
  X runuser -u crm -- /opt/whatsappd/bin/whatsappctl --socket "$SOCK" health

step "state directory: private"
info "$(X stat -c '%a %U:%G %n' /var/lib/whatsappd)"
check "/var/lib/whatsappd is 0700 whatsappd" \
  test "$(X stat -c '%a %U' /var/lib/whatsappd)" == "700 whatsappd"
loose=$(X find /var/lib/whatsappd -perm /077 -printf '%m %p\n' 2>&1)
check "nothing under it is group/other accessible${loose:+: $loose}" test -z "$loose"

# ---------------------------------------------------------------- reload + neonize workers
step "systemctl reload whatsappd adds two companies: real neonize workers inside the sandbox"
# Both companies go through a SOCKS5 proxy on 127.0.0.1, so nothing leaves the container
# (which has loopback only anyway): "acme" through a closed port (the dial is refused at
# once), "stuck" through a peer that accepts and never answers (the dial hangs: the worst
# case for stopping a worker). The workers load neonize (Go via ctypes) under
# MemoryDenyWriteExecute=, the syscall filter and UMask=0077.
X systemd-run --quiet --unit=silent-socks5 -p DynamicUser=yes /usr/bin/python3 -c '
import socket
s = socket.create_server(("127.0.0.1", 1080), backlog=64)
held = []
while True:
    held.append(s.accept()[0])  # accept, never answer
'
X sh -c 'printf "%s\n" "[[companies]]" "id = \"acme\"" "proxy = \"socks5://127.0.0.1:9\"" "" \
                     "[[companies]]" "id = \"stuck\"" "proxy = \"socks5://127.0.0.1:1080\"" \
           > /etc/whatsappd/whatsappd.toml
         chgrp whatsappd /etc/whatsappd/whatsappd.toml; chmod 0640 /etc/whatsappd/whatsappd.toml'
c=$(cursor)
reload_logged() { journal_since "$c" _PID="$PID" | grep -qi reloaded; }
check "systemctl reload whatsappd succeeded" X systemctl reload whatsappd.service
check "the daemon logged the reload" wait_until 15 reload_logged
journal_since "$c" unit=whatsappd.service | head -6 | sed 's/^/   | /'
check "still active after the reload" active whatsappd.service
check "same MainPID after the reload" test "$(prop whatsappd.service MainPID)" == "$PID"
http /v1/companies
check "GET /v1/companies lists acme and stuck (HTTP $CODE)" has '"acme".*"stuck"|"stuck".*"acme"' "$BODY"
# a session-less company starts pairing on connect: the worker dials through the proxy
http /v1/companies/acme/connect -X POST
info "POST /v1/companies/acme/connect: HTTP $CODE ${BODY:0:200}"
http /v1/companies/stuck/connect -X POST
info "POST /v1/companies/stuck/connect: HTTP $CODE ${BODY:0:200}"
acme_failed() { journal_since "$c" unit=whatsappd.service | grep -q 'company=acme.*exit_name=TRANSIENT'; }
wait_until 30 acme_failed || true
# worker_pid ID: prints the pid of the company's live worker (fails if it has none)
worker_pid() {
  http "/v1/companies/$1"
  local p; p=$(json '(d.get("worker") or {}).get("pid") or ""' 2>/dev/null) || return 1
  [[ -n $p ]] && X kill -0 "$p" 2>/dev/null && echo "$p"
}
check "the stuck company has a live worker (dial hanging)" wait_until 30 worker_pid stuck
http /v1/companies/acme
info "GET /v1/companies/acme: HTTP $CODE ${BODY:0:400}"
wj=$(journal_since "$c" unit=whatsappd.service 2>&1)
grep -E 'dialing|connect_failed|exit_decided|worker (started|exited)' <<<"$wj" | head -8 | cut -c1-300 | sed 's/^/   | /'
check "no worker killed by the sandbox (SIGSYS / bad system call / core dump)" \
  not has 'SIGSYS|bad system call|core dump|signal 31|status=31|MemoryDenyWriteExecute' "$wj"
# The dial goes through the worker's own connect-gate relay, so the error names the relay's
# 127.0.0.1 address; the refusal is the company proxy's (127.0.0.1:9, nothing listens there).
check "acme's neonize dial reached the proxy and was refused (a transient failure, not a crash)" \
  has 'event=connect_failed company=acme .*127\.0\.0\.1:[0-9]+->web\.whatsapp\.com:443.*connection refused' "$wj"
store=$(X find /var/lib/whatsappd/sessions -type f -printf '%m %u %p\n' 2>/dev/null || true)
sed 's/^/   session file: /' <<<"$store"
check "neonize created the session stores" has 'session-acme/' "$store"
loose=$(X find /var/lib/whatsappd -perm /077 -printf '%m %p\n' 2>&1)
check "the stores are private (UMask=0077)${loose:+: $loose}" test -z "$loose"
check "still active" active whatsappd.service

# ---------------------------------------------------------------- the zygote (issue 9)
step "the neonize zygote under systemd: its workers are the daemon's children; kill -9 of it"
# The default launcher forks workers from one zygote per engine (a child of the daemon); each
# worker is reparented to the daemon (a child subreaper), so systemd's MainPID is its parent.
# The zygote: MainPID's child with the zygote's command line and one thread (a forked worker
# shows the same command line, but runs threads).
zygote_pid() {
  X ps -o pid=,nlwp=,args= --ppid "$PID" | awk '$2 == 1 && /whatsappd\.worker\.zygote --engine neonize/ { print $1; exit }'
}
ppid_of() { X ps -o ppid= -p "$1" | tr -d ' '; }
zp=$(zygote_pid || true)
check "a neonize zygote runs as a child of MainPID $PID (pid ${zp:-none})" test -n "$zp"
wp=$(worker_pid stuck || true)
info "stuck's worker: pid ${wp:-none}, parent $(ppid_of "${wp:-0}" 2>/dev/null), $(X ps -o args= -p "${wp:-0}" | cut -c1-80)"
check "stuck's worker was forked by the zygote (its command line)" \
  has 'whatsappd\.worker\.zygote' "$(X ps -o args= -p "${wp:-0}" 2>/dev/null)"
check "stuck's worker's parent is MainPID, not the zygote" test -n "$wp" -a "$(ppid_of "${wp:-0}")" == "$PID"
c=$(cursor)
[[ -n $zp ]] && X kill -9 "$zp" || true
zygote_gone() { ! X kill -0 "${zp:-0}" 2>/dev/null; }
check "kill -9 of the zygote (pid ${zp:-none}) ended it" wait_until 10 zygote_gone
zygote_logged() { journal_since "$c" unit=whatsappd.service | grep -q 'zygote exited; its workers run on'; }
check "the daemon noticed: 'zygote exited; its workers run on'" wait_until 15 zygote_logged
check "stuck's worker still runs, still a child of MainPID" \
  test -n "$wp" -a "$(ppid_of "${wp:-0}" 2>/dev/null)" == "$PID"
check "the daemon is still active, same MainPID" test "$(prop whatsappd.service MainPID)" == "$PID"
check "stuck is still connecting on that worker" \
  company_matches stuck "d['state'] == 'connecting' and (d.get('worker') or {}).get('pid') == ${wp:-0}"
zygote_ready() { journal_since "$c" unit=whatsappd.service | grep 'zygote started' | grep -q 'engine=neonize'; }
check "a new zygote replaces it (backoff 1s) and is ready" wait_until 30 zygote_ready
zp2=$(zygote_pid || true)
http /v1/companies/stuck/restart -X POST
check "the next start works: POST /v1/companies/stuck/restart: HTTP $CODE" test "$CODE" == 202
new_worker() { local p; p=$(worker_pid stuck) && [[ $p != "$wp" ]]; }
check "stuck has a new live worker" wait_until 30 new_worker
wp2=$(worker_pid stuck || true)
check "the old worker ended" not X kill -0 "${wp:-0}" 2>/dev/null
check "the new zygote (pid ${zp2:-none}) is not the old one" test -n "$zp2" -a "$zp2" != "$zp"
check "the new worker (pid ${wp2:-none}) is MainPID's child" test -n "$wp2" -a "$(ppid_of "${wp2:-0}" 2>/dev/null)" == "$PID"
check "... and was forked by the new zygote (its command line is the zygote's)" \
  has 'whatsappd\.worker\.zygote' "$(X ps -o args= -p "${wp2:-0}" 2>/dev/null)"
check "still active" active whatsappd.service

# ------------------------------------------------ neonize behind a refusing SOCKS5 listener
step "a neonize company behind a refusing SOCKS5 listener goes reconnecting, with backoff"
# The project's own fault-injecting listener (whatsappd.testing.socks5, installed with the
# wheel) on the container's loopback, in mode "refuse": it answers the SOCKS5 greeting, reads
# and logs the CONNECT request, replies "connection refused" (REP=5) and closes. Nothing is
# forwarded anywhere. The company is added at run time (PUT), so companies.json is written
# under the sandbox too.
X systemd-run --quiet --unit=refusing-socks5 -p DynamicUser=yes /opt/whatsappd/bin/python -u -c '
import time
from whatsappd.testing.socks5 import Socks5FaultProxy
proxy = Socks5FaultProxy(mode="refuse", port=1081).start()
print("listening on", proxy.url, flush=True)
seen = 0
while True:
    asked = proxy.requests
    for host, port in asked[seen:]:
        print(f"CONNECT {host}:{port} refused", flush=True)
    seen = len(asked)
    time.sleep(0.2)
'
listening_1081() { [[ $(X ss -Hltn 'sport = :1081') == *LISTEN* ]]; }
check "the refusing SOCKS5 listener is up on 127.0.0.1:1081" wait_until 15 listening_1081
c=$(cursor)
http /v1/companies/refused -X PUT "${JSON[@]}" -d '{"proxy": "socks5://127.0.0.1:1081"}'
check "PUT /v1/companies/refused {\"proxy\": \"socks5://127.0.0.1:1081\"}: HTTP $CODE, engine $(json 'd["engine"]' 2>/dev/null)" \
  test "$CODE:$(json 'd["engine"]' 2>/dev/null)" == 201:neonize
http /v1/companies/refused/connect -X POST
info "POST /v1/companies/refused/connect: HTTP $CODE, state $(json 'd["state"]' 2>/dev/null)"
waiting='d["state"] == "reconnecting" and d["reconnect"]["attempt"] >= 1 and d["reconnect"]["next_retry_at"]'
check "state reconnecting with reconnect.attempt >= 1 and next_retry_at set" \
  wait_until 30 company_matches refused "$waiting"
info "${BODY:0:700}"
a1=$(json 'd["reconnect"]["attempt"]' 2>/dev/null || echo 0)
check "last_error says the connection failed: $(json 'd["last_error"]' 2>/dev/null)" \
  json_true '(d["last_error"] or {}).get("code") == "connection_failed" and "connection failed" in d["last_error"]["message"]'
t=$SECONDS
if wait_until 40 company_matches refused "d['reconnect']['attempt'] >= $a1 + 2"; then
  pass "reconnect.attempt grows (backoff, never giving up): $a1 -> $(json 'd["reconnect"]["attempt"]') in $((SECONDS - t))s"
else
  fail "reconnect.attempt did not grow from $a1 by 2 within 40s: ${BODY:0:300}"
fi
rj=$(journal_since "$c" unit=whatsappd.service 2>&1)
delays=$(grep -E 'company=refused .*new=reconnecting' <<<"$rj" \
  | sed -n 's/.* attempt=\([0-9]*\) retry_in_seconds=\([0-9.]*\).*/\1:\2/p' | tr '\n' ' ')
info "attempt:delay(s) $delays"
# full jitter: the delay after failure n is uniform(0, min(max_delay, initial_delay * 2^(n-1)))
capped() {
  local ad
  [[ -n $delays ]] || return 1
  for ad in $delays; do
    awk -v a="${ad%%:*}" -v d="${ad#*:}" 'BEGIN { c = 2 ^ (a - 1); if (c > 300) c = 300; exit !(d <= c) }' || return 1
  done
}
check "every delay within its cap min(5m, 1s * 2^(attempt-1))" capped
grep -E 'event=connect_failed company=refused ' <<<"$rj" | head -1 | cut -c1-330 | sed 's/^/   | /'
check "neonize dialed through the listener and its CONNECT was refused" \
  has 'event=connect_failed company=refused .*connection refused' "$rj"
# the listener's log of what it was asked (it writes every 0.2 s; journald adds its own delay)
listener_log() {
  lj=$(X journalctl -u refusing-socks5.service --no-pager -o cat 2>/dev/null | grep '^CONNECT ' || true)
  n=$(grep -c . <<<"$lj" || true)
  (( n >= 3 ))
}
wait_until 10 listener_log || true
others=$(grep -v '^CONNECT web\.whatsapp\.com:443 refused$' <<<"$lj" | sort -u | head -3 || true)
check "the listener refused $n CONNECT requests, every one for web.whatsapp.com:443${others:+; also: $others}" \
  test "$n" -ge 3 -a -z "$others"
check "no worker killed by the sandbox" not has 'SIGSYS|bad system call|core dump|signal 31|status=31' "$rj"
check "still active" active whatsappd.service

# ----------------------------------------------------------- simulator: pair and connect
step "a simulator company pairs and connects (PUT engine=simulator, connect, QR, simulate scan)"
http /v1/companies/sim -X PUT "${JSON[@]}" -d '{"engine": "simulator"}'
check "PUT /v1/companies/sim {\"engine\": \"simulator\"}: HTTP $CODE, engine $(json 'd["engine"]' 2>/dev/null)" \
  test "$CODE:$(json 'd["engine"]' 2>/dev/null)" == 201:simulator
http /v1/companies/sim/connect -X POST
info "POST /v1/companies/sim/connect: HTTP $CODE, state $(json 'd["state"]' 2>/dev/null)"
check "connect accepted (HTTP $CODE)" test "$CODE" == 202
check "state pairing, with a QR code available" wait_until 15 company_matches sim 'd["state"] == "pairing" and d["qr_available"]'
http /v1/companies/sim/qr
qr=$(json 'd["code"]' 2>/dev/null || true)
check "GET /v1/companies/sim/qr: HTTP $CODE, code ${qr:0:20}..., expires_at $(json 'd["expires_at"]' 2>/dev/null)" \
  test "$CODE" == 200 -a -n "$qr"
http /v1/companies/sim/simulate -X POST "${JSON[@]}" -d '{"action": "scan"}'
sim_jid=$(json 'd["jid"]' 2>/dev/null || true)
check "POST /v1/companies/sim/simulate {\"action\": \"scan\"}: HTTP $CODE, jid $sim_jid" \
  test "$CODE" == 200 -a -n "$sim_jid"
check "state connected as $sim_jid, session stored" \
  wait_until 15 company_matches sim "d['state'] == 'connected' and d['jid'] == '$sim_jid' and d['has_session']"
http /v1/companies/sim/qr
check "no QR once connected (HTTP $CODE)" test "$CODE" == 409
http /v1/companies/refused/simulate -X POST "${JSON[@]}" -d '{"action": "scan"}'
check "simulate on a neonize company is 404 (HTTP $CODE)" test "$CODE" == 404

# ------------------------------------------------------- restart under load (socket held)
step "systemctl restart while a client keeps calling: requests queue on the socket, none fails"
# requests back to back from inside the container; the restart includes stopping the worker
# stuck in its dial
X sh -c 'n=0 bad=""; end=$(( $(date +%s) + 12 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    c=$(curl -s -o /dev/null -w "%{http_code}" --max-time 40 --unix-socket "$1" http://localhost/v1/health)
    n=$((n + 1)); [ "$c" = 200 ] || bad="$bad $c"
  done
  echo "$n${bad:+ failed:$bad}"' sh "$SOCK" > "$WORK/load.out" 2>&1 &
LOAD=$!
sleep 2
old=$PID
c=$(cursor)
c_restart=$c
t=$SECONDS
check "systemctl restart whatsappd succeeded" X systemctl restart whatsappd.service
info "restart took $((SECONDS - t))s"
wait "$LOAD" || true
load=$(cat "$WORK/load.out")
info "client: $load requests"
check "every request during the restart got HTTP 200 ($load)" test -n "$load" -a "$load" == "${load%% *}"
PID=$(prop whatsappd.service MainPID)
check "a new daemon runs (MainPID $old -> $PID)" test "$PID" != "$old" -a "$PID" != 0
sysd=$(journal_since "$c" UNIT=whatsappd.service _PID=1 2>&1 || true)
check "systemd had to kill nothing during the stop" not has 'SIGKILL|Killing process|timed out|Failed with result' "$sysd"

step "after the restart: the simulator company is restored from /var/lib/whatsappd, no QR"
check "sim is connected again as $sim_jid" \
  wait_until 20 company_matches sim "d['state'] == 'connected' and d['jid'] == '$sim_jid'"
info "${BODY:0:300}"
sj=$(journal_since "$c_restart" unit=whatsappd.service 2>&1 | grep 'company=sim ' || true)
grep -E 'worker started|state changed' <<<"$sj" | cut -c1-200 | sed 's/^/   | /'
restored() { has 'restoring the stored session at daemon start' "$sj" && has 'worker started.*mode=restore' "$sj"; }
check "restored at daemon start by a worker in restore mode" restored
check "no pairing after the restart (no QR shown)" not has 'new=pairing|mode=pairing|company\.pairing' "$sj"
http /v1/companies/sim/qr
check "GET /v1/companies/sim/qr: no QR code (HTTP $CODE)" test "$CODE" == 409
wp=$(worker_pid sim || true)
check "its worker (pid ${wp:-none}) runs as whatsappd" \
  test -n "$wp" -a "$(X ps -o user= -p "${wp:-0}" | tr -d ' ')" == whatsappd
perms=$(X find /var/lib/whatsappd/sessions/session-sim -printf '%y %m %u:%g %p\n' 2>&1)
sed 's/^/   /' <<<"$perms"
bad=$(awk '!(($1 == "d" && $2 == "700") || ($1 == "f" && $2 == "600")) || $3 != "whatsappd:whatsappd"' <<<"$perms")
check "session dir 0700 and its files 0600, all owned by whatsappd${bad:+: $bad}" \
  test -n "$perms" -a -z "$bad"
http /v1/companies/refused
info "refused (no session to restore): state $(json 'd["state"]' 2>/dev/null), worker $(json 'd["worker"]["pid"]' 2>/dev/null)"

# ------------------------------------------------------------ messages + events (issue 4)
step "a text message through the simulator company, and the event journal (issue 4 preview)"
http /v1/companies/sim/messages -X POST "${JSON[@]}" -d '{"to": "+5511988887777", "text": "hi"}'
mid=$(json 'd["id"]' 2>/dev/null || true)
check "POST /v1/companies/sim/messages: HTTP $CODE, id ${mid:-none}, status $(json 'd["status"]' 2>/dev/null)" \
  test "$CODE" == 202 -a -n "$mid"
sent() { http "/v1/companies/sim/messages/$mid"; [[ $(json 'd["status"]' 2>/dev/null) =~ ^(sent|delivered|read)$ ]]; }
check "the message is sent" wait_until 20 sent
info "${BODY:0:300}"
check "it has a WhatsApp id ($(json 'd["wa_id"]' 2>/dev/null))" json_true 'd["wa_id"]'
# the stream stays open (heartbeats), so curl ends on its --max-time with what it got
ev=$(X curl -sS -N --max-time 2 --unix-socket "$SOCK" 'http://localhost/v1/events?since=0' 2>/dev/null || true)
evs=$(python3 -c '
import json, sys
mid = sys.argv[1]
seqs, sent, bad = [], False, 0
for line in sys.stdin:
    if not line.strip():
        continue
    try:
        e = json.loads(line)
    except ValueError:
        bad += 1
        continue
    if e.get("type") == "heartbeat":
        continue
    if not isinstance(e.get("seq"), int):
        bad += 1
        continue
    seqs.append(e["seq"])
    sent = sent or (e.get("type") == "message.status" and e.get("message_id") == mid and e.get("status") == "sent")
increasing = all(a < b for a, b in zip(seqs, seqs[1:]))
print(len(seqs), seqs[0] if seqs else "-", seqs[-1] if seqs else "-", bad, increasing, sent)
' "$mid" <<<"$ev")
read -r ev_n ev_first ev_last ev_bad ev_inc ev_sent <<<"$evs"
info "GET /v1/events?since=0 (--max-time 2): $ev_n events, seq $ev_first..$ev_last"
check "every event line is JSON with a seq ($ev_bad without)" test "$ev_n" -ge 1 -a "$ev_bad" == 0
check "seqs strictly increasing" test "$ev_inc" == True
check "the journal has the message's status 'sent' event" test "$ev_sent" == True

# --------------------------------------------------------------------- exit 78, no restart loop
step "a bad config: exit 78 and no restart loop (RestartPreventExitStatus=78)"
X sh -c 'cp /etc/whatsappd/whatsappd.toml /tmp/good.toml
         printf "[daemon]\nshutdown_timeout = \"forever\"\n" > /etc/whatsappd/whatsappd.toml'
X systemctl stop whatsappd.service 2>/dev/null
n0=$(prop whatsappd.service NRestarts)
if X systemctl start whatsappd.service 2>/dev/null; then fail "start with a bad config should fail"; else pass "start with a bad config failed"; fi
sleep 4   # > RestartSec=2s: a restart would have happened by now
check "ExecMainStatus=78 ($(prop whatsappd.service ExecMainStatus))" test "$(prop whatsappd.service ExecMainStatus)" == 78
check "not restarted (NRestarts $n0 -> $(prop whatsappd.service NRestarts))" test "$(prop whatsappd.service NRestarts)" == "$n0"
check "unit is failed ($(X systemctl is-active whatsappd.service))" test "$(X systemctl is-active whatsappd.service)" == failed
X journalctl -u whatsappd.service --no-pager -o cat -n 4 | sed 's/^/   | /'
X sh -c 'cp /tmp/good.toml /etc/whatsappd/whatsappd.toml'
X systemctl reset-failed whatsappd.service
check "starts again with the good config" X systemctl start whatsappd.service

# ---------------------------------------------------------- exit 65 (damaged store), no restart
step "a damaged store: exit 65, the file and the fix in the journal, no restart loop"
STORE=/var/lib/whatsappd/whatsappd.sqlite
X systemctl stop whatsappd.service
X sh -c "mv $STORE /tmp/good.sqlite && rm -f $STORE-wal $STORE-shm && head -c 16384 /dev/urandom > $STORE \
         && chown whatsappd:whatsappd $STORE && chmod 600 $STORE"
n0=$(prop whatsappd.service NRestarts)
c=$(cursor)
if X systemctl start whatsappd.service 2>/dev/null; then fail "start with a damaged store should fail"; else pass "start with a damaged store failed"; fi
sleep 4   # > RestartSec=2s
check "ExecMainStatus=65 ($(prop whatsappd.service ExecMainStatus))" test "$(prop whatsappd.service ExecMainStatus)" == 65
check "not restarted (NRestarts $n0 -> $(prop whatsappd.service NRestarts))" test "$(prop whatsappd.service NRestarts)" == "$n0"
dmg=$(journal_since "$c" unit=whatsappd.service 2>&1 || true)
grep -F 'store is damaged' <<<"$dmg" | cut -c1-300 | sed 's/^/   | /'
check "one journal line names the file and the fix" has "store is damaged.*path=$STORE.*backup.*check-store" "$dmg"
check "no traceback in the journal" not has 'Traceback' "$dmg"
out=$(X /opt/whatsappd/bin/whatsappd check-store 2>&1) && rc=0 || rc=$?
info "whatsappd check-store: exit $rc; $(tail -1 <<<"$out" | cut -c1-160)"
check "whatsappd check-store finds the damage (exit 1, DAMAGED)" test "$rc" == 1 -a -n "$(grep -F "$STORE: DAMAGED" <<<"$out")"
X sh -c "mv /tmp/good.sqlite $STORE"
X systemctl reset-failed whatsappd.service
check "starts again with the store restored" X systemctl start whatsappd.service
check "whatsappd check-store: ok while it runs (exit 0)" X /opt/whatsappd/bin/whatsappd check-store >/dev/null
PID=$(prop whatsappd.service MainPID)

# ------------------------------------------------------------------------------- watchdog
step "watchdog: a hung event loop is killed and restarted (WatchdogSec=30s)"
check "WatchdogUSec=30s ($(prop whatsappd.service WatchdogUSec))" test "$(prop whatsappd.service WatchdogUSec)" == 30s
http /v1/companies/stuck/connect -X POST
wait_until 30 worker_pid stuck || true
wpid=$(worker_pid stuck || true)
info "MainPID $PID, worker of stuck: ${wpid:-none}"
n0=$(prop whatsappd.service NRestarts)
c=$(cursor)
X kill -STOP "$PID"
info "SIGSTOP sent to MainPID $PID at $((SECONDS - T0))s; waiting for systemd"
t=$SECONDS
restarted() { [[ $(prop whatsappd.service NRestarts) -gt $n0 ]] && active whatsappd.service \
              && [[ $(prop whatsappd.service MainPID) != "$PID" ]]; }
check "restarted within 90 s" wait_until 90 restarted
info "took $((SECONDS - t))s"
journal_since "$c" unit=whatsappd.service | grep -E 'Watchdog|Killing|Main process|Failed|Scheduled|Started|ready' \
  | head -8 | cut -c1-250 | sed 's/^/   | /'
sysd=$(journal_since "$c" UNIT=whatsappd.service _PID=1 2>&1 || true)
check "systemd logged the watchdog timeout" has 'Watchdog timeout' "$sysd"
PID=$(prop whatsappd.service MainPID)
info "NRestarts $(prop whatsappd.service NRestarts), new MainPID $PID"
if [[ -n $wpid ]]; then check "the hung daemon's worker $wpid is gone" not X kill -0 "$wpid" 2>/dev/null; fi
http /v1/health
check "the restarted daemon answers /v1/health (HTTP $CODE)" test "$CODE" == 200

# ------------------------------------------------------------------------------- stop
step "systemctl stop whatsappd with a worker stuck in its dial: clean exit"
http /v1/companies/stuck/connect -X POST
check "the stuck company has a live worker" wait_until 30 worker_pid stuck
c=$(cursor)
t=$SECONDS
check "systemctl stop whatsappd succeeded" X systemctl stop whatsappd.service
took=$((SECONDS - t))
check "stopped in ${took}s, within the daemon's 20 s budget" test "$took" -le 21
check "Result=success ($(prop whatsappd.service Result))" test "$(prop whatsappd.service Result)" == success
check "exit status 0 ($(prop whatsappd.service ExecMainCode)/$(prop whatsappd.service ExecMainStatus))" \
  test "$(prop whatsappd.service ExecMainCode):$(prop whatsappd.service ExecMainStatus)" == "1:0"
journal_since "$c" unit=whatsappd.service | grep -vE 'dialing|connect_failed|exit_decided' | head -8 \
  | cut -c1-250 | sed 's/^/   | /'
sysd=$(journal_since "$c" UNIT=whatsappd.service _PID=1 2>&1 || true)
check "systemd had to kill nothing" not has 'SIGKILL|Killing process|timed out|Failed with result' "$sysd"
check "no whatsappd process left" not X pgrep -u whatsappd
check "whatsappd.socket stays active" active whatsappd.socket
check "the socket file survived the stop (RuntimeDirectoryPreserve=yes)" X test -S "$SOCK"

# ------------------------------------------------------------------------ socket activation
step "socket activation: a client connect starts the daemon"
check "service is inactive before the connect" inactive whatsappd.service
t=$SECONDS
http --as crm /v1/health
check "crm's request through whatsappd.socket: HTTP $CODE (took $((SECONDS - t))s)" test "$CODE" == 200
check "whatsappd.service was activated" active whatsappd.service
PID=$(prop whatsappd.service MainPID)
check "the activated daemon serves the passed socket" serves_passed_socket "$PID"
check "health reports the activated pid $PID" test "$(json 'd["pid"]' 2>/dev/null)" == "$PID"

step "systemctl stop whatsappd.socket stops both"
check "systemctl stop whatsappd.socket succeeded" X systemctl stop whatsappd.socket
check "whatsappd.service stopped with it (Requires=)" wait_until 30 inactive whatsappd.service
check "socket file removed (RemoveOnStop=yes)" not X test -e "$SOCK"
failed=$(X systemctl list-units --failed --no-legend --plain 2>&1 | grep whatsappd || true)
check "no failed whatsappd unit${failed:+: $failed}" test -z "$failed"

# ---------------------------------------------------------------------------- summary
echo
echo "== $PASSES checks passed, $FAILS failed, $WARNS warnings, in $((SECONDS - T0))s" \
     "(systemd-analyze security: offline ${offline:-?}, loaded unit ${online:-?})"
if (( FAILS )); then echo "FAIL"; exit 1; fi
echo "PASS"
