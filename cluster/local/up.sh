#!/usr/bin/env bash
# cluster/local/up.sh [WORKERS]: a Ray cluster on this machine (loopback only): a head and WORKERS
# worker nodes (default 1), 1 CPU each, every node its own `ray start --block` process group and temp dir.
# PIDs and the dashboard address go to $MTORL_CLUSTER_DIR/cluster.json (default ~/.mtorl/cluster);
# `mtorl submit` finds the dashboard there. Stop it with cluster/local/down.sh (never `ray stop`, which
# would stop every Ray on the machine).
#
# Run it from the project's virtualenv: job entrypoints run a bare `python`, resolved through the
# raylet's PATH. RAY_AUTH_MODE is taken from the environment (default: token, with the token in
# ~/.ray/auth_token); clients must use the same mode (export RAY_AUTH_MODE=token).
#   Options: --cpus-per-node N  --object-store-mb MB  --state-dir DIR
set -euo pipefail
PY="${PYTHON:-python}"
exec "$PY" -c 'import sys; from mtorl.cli import local_cluster_main; sys.exit(local_cluster_main(["up", *sys.argv[1:]]))' "$@"
