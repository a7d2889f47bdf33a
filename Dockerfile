# slide2vec-dask for Kubernetes: the same image runs the Dask scheduler, the CPU and GPU
# workers and the driver Job (k8s/). Build from the repository root:
#   docker build -t registry.example.com/slide2vec-dask:0.1.0 .
#
# The CUDA runtime base brings the NVIDIA container-toolkit settings (driver libraries are
# injected at run time); torch's wheels carry their own CUDA libraries, so any host driver
# recent enough for them works. OpenSlide comes from the openslide-bin wheel (a dependency),
# so no system openslide packages are needed.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Unpinned apt packages: the base image's Ubuntu release already fixes their versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 slide2vec \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin slide2vec

WORKDIR /opt/slide2vec-dask
COPY pyproject.toml README.md ./
COPY slide2vec_dask ./slide2vec_dask
# The absolute path (not ".[k8s]") tells pip, and hadolint, that this is the local project.
RUN pip install --no-cache-dir "/opt/slide2vec-dask[k8s]" \
    && python -c "import openslide, slide2vec_dask, distributed; print(openslide.__library_version__)"

# Non-root; numeric so that Kubernetes' runAsNonRoot can verify it. Model weights are cached
# under HF_HOME (point it at a shared volume, as the k8s/ manifests do).
USER 10001:10001
ENV HOME=/home/slide2vec \
    HF_HOME=/home/slide2vec/.cache/huggingface
WORKDIR /home/slide2vec

# No ENTRYPOINT: the Dask operator passes `dask scheduler ...` / `dask worker ...` as the
# container's args, which must be the whole command line.
CMD ["slide2vec-dask", "--help"]
