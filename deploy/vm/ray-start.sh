#!/bin/sh
# A Ray cluster on bare machines (one VM or a few), no Kubernetes, with Ray's token auth on every
# node: nothing reaches the GCS (6379) or the other control-plane ports without the cluster's token.
#   head IP                 on the head: creates the token (once; ~/.ray/auth_token, mode 600),
#                           then starts the head on IP (the private interface the workers reach);
#                           runs the drivers; dashboard (Jobs API) on localhost only: SSH tunnel
#   trainer HEAD IP         a training machine; trials ask for resources.custom: {trainer: 1}
#   target HEAD IP LABEL    a target-hardware machine; measurements select it with
#                           target.label_selector: {hw: LABEL} and target.resources: {target_LABEL: 1}
# Workers need the head's token first, at the same path (never on a command line):
#   scp -p HEAD:.ray/auth_token ~/.ray/auth_token && chmod 600 ~/.ray/auth_token
# Extra arguments go to `ray start` (e.g. --block). The token path: RAY_AUTH_TOKEN_PATH, default
# ~/.ray/auth_token. Clients (`prunesearch submit`, `ray job`) export RAY_AUTH_MODE=token and
# read the same file (or RAY_AUTH_TOKEN).
# Then: prunesearch submit search.yaml --address http://127.0.0.1:8265 --wait
set -eu
TOKEN="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
usage() { echo "usage: $0 head IP | trainer HEAD IP | target HEAD IP LABEL  [ray start args...]" >&2; exit 2; }
need_token() {
  [ -s "$TOKEN" ] || { echo "$0: no token at $TOKEN: copy the head's (see the top of this script)" >&2; exit 1; }
}
role="${1:-}"
[ $# -gt 0 ] && shift
case "$role" in
  head)
    [ $# -ge 1 ] || usage
    ip="$1"; shift
    if [ ! -s "$TOKEN" ]; then
      (umask 077 && mkdir -p "$(dirname "$TOKEN")" && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$TOKEN")
    fi
    chmod 600 "$TOKEN"
    exec ray start --head --node-ip-address="$ip" --port=6379 --dashboard-host=127.0.0.1 --num-cpus=0 "$@" ;;
  trainer)
    [ $# -ge 2 ] || usage
    head="$1" ip="$2"; shift 2
    need_token
    exec ray start --address="$head:6379" --node-ip-address="$ip" --resources='{"trainer": 1}' "$@" ;;
  target)
    [ $# -ge 3 ] || usage
    head="$1" ip="$2" label="$3"; shift 3
    need_token
    exec ray start --address="$head:6379" --node-ip-address="$ip" --labels="hw=$label" --resources="{\"target_$label\": 1}" "$@" ;;
  *) usage ;;
esac
