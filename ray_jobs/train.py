"""`ray job submit -- python -m ray_jobs.train SPEC`: run a TrainJob spec on the cluster."""

import sys

from ray_jobs._entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
