#!/usr/bin/env bash
# slide2vec 7.1.4 (https://pypi.org/project/slide2vec/) in its own virtual environment, layered
# over the project's .venv (torch, torchvision, timm come from there through a .pth file), for the
# peer tests and benchmarks that compare with slide2vec itself. Installed --no-deps plus what its
# import and CPU path need: its declared hs2p[cucim,...] would pull several GB of CUDA wheels.
# Its sdist (tests, docs, default.yaml) is unpacked next to the venv for the compatibility runner.
#
# Usage: tests/peers/setup-slide2vec.sh      (SLIDE2VEC_ENV=/somewhere to choose the folder)
# Idempotent: a venv whose python already imports slide2vec is left as it is.
# Without it the tests that need it skip, naming this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
ENV=${SLIDE2VEC_ENV:-/tmp/slide2vec-peer}
VERSION=7.1.4
if [ -x "$ENV/bin/python" ] && "$ENV/bin/python" -c 'import slide2vec' >/dev/null 2>&1; then
    echo "slide2vec already in $ENV"
    exit 0
fi
project_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m venv "$ENV"
env_site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$project_site" > "$env_site/zz_project.pth"
"$ENV/bin/pip" install -q --no-deps "slide2vec==$VERSION" "hs2p==6.1.0"
# what slide2vec and hs2p import on the CPU path (no cuCIM, no wandb run, no SAM2)
"$ENV/bin/pip" install -q omegaconf matplotlib pandas rich einops einops-exts huggingface_hub packaging \
    "transformers>=4.47,<5" wandb opencv-python-headless openslide-python openslide-bin tifffile \
    imagecodecs pyvips tqdm
mkdir -p "$ENV/sdist"
if [ ! -d "$ENV/sdist/slide2vec-$VERSION" ]; then
    "$ENV/bin/pip" download -q --no-deps --no-binary :all: "slide2vec==$VERSION" -d "$ENV/sdist"
    tar xzf "$ENV/sdist/slide2vec-$VERSION.tar.gz" -C "$ENV/sdist"
fi
"$ENV/bin/python" -c 'import slide2vec, hs2p; from importlib.metadata import version; print("slide2vec", version("slide2vec"), "hs2p", version("hs2p"), "in", __import__("sys").prefix)'
