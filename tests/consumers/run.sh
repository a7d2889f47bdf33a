#!/usr/bin/env bash
# The exports read by their real consumers: spatialdata, wsidata, lazyslide.
# They pin an older Dask than ours, so they get their own environment layered
# over the project's (.venv): their packages first, the project's after, via a
# .pth file written before the install so pip finds torch and the rest there.
# Usage: tests/consumers/run.sh   (after `pip install -e ".[test]"` into .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
ENV=${CONSUMERS_ENV:-/tmp/slide2vec-consumers}
project_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m venv "$ENV"
env_site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$project_site" > "$env_site/zz_project.pth"
"$ENV/bin/pip" install -q "spatialdata==0.7.3" "wsidata==0.12.0" "lazyslide==0.13.0"
PYTHONPATH=$PWD "$ENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_exporters.py \
    -k "spatialdata_wsidata_and_lazyslide" -o addopts="-ra"
