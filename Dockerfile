# The facegen image: CUDA runtime, pinned torch / Ray / faiss-gpu, and the `facegen` command as entrypoint.
# The Ray cluster launcher configs and the KubeRay manifests in cluster/launch/ run this image.
#
#   docker build -t facegen:0.1.0 .
#   docker run --gpus all -v $PWD:/work facegen:0.1.0 generate /work/job.yaml --executor local
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/facegen \
    PATH=/opt/facegen/bin:$PATH

# Python 3.12 (Ubuntu 24.04's), plus what the Ray cluster launcher expects inside a container
# (rsync, an ssh client, sudo) and tini to reap the processes Ray starts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
        rsync openssh-client sudo ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# The pinned stack. torch's Linux wheel on PyPI is the CUDA 12.8 build (CUDA libraries as wheels);
# faiss-gpu replaces the faiss-cpu of pyproject's dependencies (both provide the `faiss` module).
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
ARG FAISS_GPU_VERSION=1.15.1
RUN pip install \
        "torch==${TORCH_VERSION}" \
        "ray[default,train]==${RAY_VERSION}" \
        "faiss-gpu==${FAISS_GPU_VERSION}" \
        "numpy>=1.24" "pillow>=10" "webdataset==1.0.2" "pyarrow>=14" "fsspec>=2024.2" "pydantic>=2.5" \
        "safetensors>=0.4" "pyyaml>=6" "tqdm>=4.66" \
        "s3fs>=2024.2" "gcsfs>=2024.2" "onnxruntime>=1.17" "onnx>=1.15"

# facegen itself, without dependencies (they are the pinned ones above).
WORKDIR /opt/src/facegen
COPY pyproject.toml README.md ./
COPY models ./models
COPY engine ./engine
COPY cluster ./cluster
COPY jobs ./jobs
RUN pip install --no-deps . \
    && facegen --help > /dev/null \
    && python -c "import faiss, ray, torch; print(ray.__version__, torch.__version__, faiss.__version__)"

COPY cluster/launch/docker-entrypoint.sh /usr/local/bin/facegen-entrypoint
RUN chmod +x /usr/local/bin/facegen-entrypoint \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray
USER ray
WORKDIR /home/ray

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/facegen-entrypoint"]
CMD ["--help"]
