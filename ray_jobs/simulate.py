"""`ray job submit -- python -m ray_jobs.simulate SPEC`: run a SimulateJob spec on the cluster."""

import sys

from ray_jobs._entry import run

if __name__ == "__main__":
    sys.exit(run("simulate"))
