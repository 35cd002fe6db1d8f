#!/usr/bin/env bash
# cluster/local/down.sh: stop the nodes recorded by up.sh, by process group (SIGTERM, then SIGKILL
# after 5 s), and remove their temp dirs. Other Ray clusters on the machine are left alone.
#   Options: --state-dir DIR
set -euo pipefail
PY="${PYTHON:-python}"
exec "$PY" -c 'import sys; from mtorl.cli import local_cluster_main; sys.exit(local_cluster_main(["down", *sys.argv[1:]]))' "$@"
