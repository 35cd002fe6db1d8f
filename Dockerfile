# syntax=docker/dockerfile:1
# The cluster image: Ray 2.60 + mtorl, for the KubeRay manifests (IMAGE / GPU_IMAGE in cluster/kuberay/values.env).
#   CPU torch:  docker build -t REGISTRY/mtorl:0.1.0 .
#   CUDA torch: docker build --build-arg TORCH_VARIANT=cu128 -t REGISTRY/mtorl:0.1.0-cuda .
#               (TORCH_VARIANT: a CUDA build the PyTorch wheel index has for TORCH_VERSION, no newer than the
#               GPU nodes' driver supports; the wheels bring the CUDA libraries, the node brings the driver)
# KubeRay runs `ray start` in it; RayJob entrypoints are `python -m ray_jobs.<kind> /home/ray/mtorl/ray_jobs/specs/...`.
# Layers, slowest-changing first: system packages, torch, the dependencies of pyproject.toml, then mtorl itself
# (a code change re-runs only the last `pip install --no-deps .`). No SeaweedFS: the embedded object store is
# the `store` extra, for one machine; on Kubernetes the pods use an S3 store (the mtorl-object-store Secret).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS requirements
# pyproject.toml's [project] dependencies alone: this file changes only when they do, so the dependency layer
# of the final stage stays cached across version bumps and other edits of pyproject.toml.
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/requirements.txt', 'w').write('\n'.join(deps) + '\n')"

FROM ${PYTHON_IMAGE}
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1 WANDB_MODE=offline

# wget: KubeRay's exec probes call it (RayService worker readiness: `bash -c "wget ... | grep success"`,
# ray-operator pod.go); bash and grep come with the Debian base. procps: `ray stop` and Ray's process tools.
# uid/gid 1000: the manifests' securityContext (runAsNonRoot, runAsUser 1000, runAsGroup 1000).
RUN apt-get update && apt-get install -y --no-install-recommends procps wget && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group ray

# torch from the PyTorch index first (CPU or a CUDA build), so the dependencies below don't pull another build.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

WORKDIR /home/ray/mtorl
COPY pyproject.toml README.md ./
COPY mtorl ./mtorl
COPY ray_jobs ./ray_jobs
RUN pip install --no-deps . \
    && python -c "import mtorl, ray_jobs.train, ray, torch; print('mtorl', mtorl.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# Job specs shipped in the image: /home/ray/mtorl/ray_jobs/specs/*.yaml (the RayJob entrypoints name them by that path).
USER 1000:1000
