#!/usr/bin/env bash
# hs2p (https://pypi.org/project/hs2p/) in its own virtual environment, for tests/test_peers.py:
# the tests run hs2p itself (tests/peers/make_hs2p.py) to write the coordinates and tile tars
# that read_coordinates_from / read_tiles_from take, and to read back what on_the_fly=False writes.
# hs2p pulls OpenCV, wandb and matplotlib (no torch), so it stays out of the project's .venv.
#
# Usage: tests/peers/setup-hs2p.sh      (HS2P_ENV=/somewhere to choose the folder)
# Idempotent: a venv whose python already imports hs2p is left as it is.
# Without it (or with HS2P_PYTHON pointing nowhere) the peer tests skip, naming this script.
set -euo pipefail
ENV=${HS2P_ENV:-/tmp/slide2vec-hs2p}
HS2P_VERSION=6.1.0
PYTHON=${HS2P_BASE_PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3   # hs2p needs Python >= 3.10

if [ -x "$ENV/bin/python" ] && "$ENV/bin/python" -c 'import hs2p, tifffile' >/dev/null 2>&1; then
    echo "hs2p already in $ENV ($("$ENV/bin/python" -c 'from importlib.metadata import version; print(version("hs2p"))'))"
    exit 0
fi
[ -x "$ENV/bin/python" ] || "$PYTHON" -m venv "$ENV"
# tifffile: hs2p's tifffile backend reads the SubIFD pyramids tifffile writes (OpenSlide sees level 0 only)
"$ENV/bin/python" -m pip install -q "hs2p[openslide,tifffile]==$HS2P_VERSION"
"$ENV/bin/python" -c 'import hs2p, openslide; from importlib.metadata import version; print("hs2p", version("hs2p"), "installed in", __import__("sys").prefix)'
