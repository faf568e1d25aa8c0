#!/usr/bin/env bash
# A Ray cluster of several nodes on one machine, for development: a head and N worker nodes
# (1 CPU each), then `--address 127.0.0.1:6379` in latentforge commands.
#   bash cluster/local-multinode.sh start [N]     bash cluster/local-multinode.sh stop
set -euo pipefail
cmd=${1:-start}
workers=${2:-2}
export RAY_USAGE_STATS_ENABLED=0
# token authentication on every node (Ray writes the token to ~/.ray/auth_token); export the same
# RAY_AUTH_MODE=token in the shell that runs `ray job submit` or `latentforge ... --address`
export RAY_AUTH_MODE=token
case "$cmd" in
  start)
    ray start --head --port=6379 --num-cpus=1 --dashboard-host=127.0.0.1 --metrics-export-port=8080 --disable-usage-stats
    for i in $(seq 1 "$workers"); do
      # separate temp dirs are not needed: each `ray start` on the same machine adds a raylet
      ray start --address=127.0.0.1:6379 --num-cpus=1 --metrics-export-port=$((8080 + i))
    done
    echo "cluster up: dashboard http://127.0.0.1:8265, address 127.0.0.1:6379 ($workers worker nodes);"
    echo "  export RAY_AUTH_MODE=token before submitting jobs to it"
    ;;
  stop)
    ray stop --force
    ;;
  *)
    echo "usage: $0 start [N] | stop" >&2
    exit 2
    ;;
esac
