# facegen runtime image for Ray clusters (cluster launcher and KubeRay): CUDA, pinned torch / Ray /
# faiss-gpu, and the `facegen` CLI as entrypoint. Build from the repository root:
#   docker build -t facegen:0.1.0 .
#   docker run --gpus all -v $PWD:/work facegen:0.1.0 generate /work/job.yaml
# Ray requires the same Ray version on every node and on the submitting machine: keep RAY_VERSION
# equal to the pin in pyproject.toml (tests/cluster/test_launch_configs.py checks it). The launchers
# run their own commands (`ray start …`) in the container: they override the entrypoint.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG PYTHON=python3.12
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
ARG FAISS_GPU_VERSION=1.15.1

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# tini reaps the processes Ray starts; rsync and an ssh client are what the cluster launcher uses.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv python3-pip ca-certificates \
      libgl1 libglib2.0-0 tini rsync openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && ${PYTHON} -m venv /opt/venv

# CUDA build of torch (the default PyPI wheel) and the cluster's Ray.
RUN pip install "torch==${TORCH_VERSION}" "ray[default,train]==${RAY_VERSION}"

WORKDIR /opt/facegen
COPY pyproject.toml setup.py README.md ./
COPY models ./models
COPY engine ./engine
COPY cluster ./cluster
COPY jobs ./jobs
# faiss-cpu (a dependency) and faiss-gpu ship the same `faiss` module: swap in the GPU build, which
# has Hopper kernels (faiss-gpu-cu12 lacks them; faiss-gpu 1.15.1 has them).
RUN pip install ".[onnx,s3,quality]" \
 && pip uninstall -y faiss-cpu \
 && pip install --no-deps "faiss-gpu==${FAISS_GPU_VERSION}" \
 && facegen --help >/dev/null \
 && python -c "import ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

ENTRYPOINT ["/usr/bin/tini", "--", "facegen"]
CMD ["--help"]
