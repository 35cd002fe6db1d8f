"""`ray job submit -- python -m ray_jobs.serve SPEC`: run a ServeJob spec on the cluster (blocks while serving)."""

import sys

from ray_jobs._entry import run

if __name__ == "__main__":
    sys.exit(run("serve"))
