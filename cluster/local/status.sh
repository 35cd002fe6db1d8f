#!/usr/bin/env bash
# cluster/local/status.sh: the local cluster's dashboard, alive nodes and node processes.
set -euo pipefail
PY="${PYTHON:-python}"
exec "$PY" -c 'import sys; from mtorl.cli import local_cluster_main; sys.exit(local_cluster_main(["status", *sys.argv[1:]]))' "$@"
