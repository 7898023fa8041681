#!/bin/sh
# A Ray cluster on bare machines (one VM or a few), no Kubernetes.
#   head               runs the drivers; dashboard (Jobs API) on localhost only: use an SSH tunnel
#   trainer HEAD       a training machine; trials ask for resources.custom: {trainer: 1}
#   target HEAD LABEL  a target-hardware machine; measurements select it with
#                      target.label_selector: {hw: LABEL} and target.resources: {target_LABEL: 1}
# Then: prunesearch submit search.yaml --address http://127.0.0.1:8265 --wait
set -eu
case "${1:-}" in
  head)    exec ray start --head --port=6379 --dashboard-host=127.0.0.1 --num-cpus=0 ;;
  trainer) exec ray start --address="$2:6379" --resources='{"trainer": 1}' ;;
  target)  exec ray start --address="$2:6379" --labels="hw=$3" --resources="{\"target_$3\": 1}" ;;
  *) echo "usage: $0 head | trainer HEAD | target HEAD LABEL" >&2; exit 2 ;;
esac
