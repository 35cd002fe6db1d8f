# The cluster image: Ray 2.60 + mtorl (CPU torch). Used by cluster/kuberay/*.yaml as ${IMAGE}.
#   docker build -t REGISTRY/mtorl:0.1.0 . && docker push REGISTRY/mtorl:0.1.0
# The image runs `ray start` through KubeRay; job entrypoints are `python -m ray_jobs.<kind> SPEC`.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1 WANDB_MODE=offline

# KubeRay probes and `ray start` need a shell, wget/curl-free health checks use python; ray needs procps.
RUN apt-get update && apt-get install -y --no-install-recommends procps && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 ray

WORKDIR /home/ray/mtorl
# CPU torch from the PyTorch CPU index first, so `pip install .` doesn't pull the CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY mtorl ./mtorl
COPY ray_jobs ./ray_jobs
RUN pip install . && python -c "import mtorl, ray_jobs.train, ray; print('mtorl', mtorl.__version__, 'ray', ray.__version__)"

USER 1000
# Job specs shipped in the image: ray_jobs/specs/*.yaml (RayJob entrypoints refer to them by this path).
WORKDIR /home/ray/mtorl
