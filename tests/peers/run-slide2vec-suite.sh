#!/usr/bin/env bash
# slide2vec 7.1.4's own public-API tests and README snippets against slide2vec-dask (issue 27).
#
# The tests come from slide2vec's sdist (fetched with pip at run time, never committed); they run
# in the slide2vec peer venv (tests/peers/setup-slide2vec.sh: hs2p, omegaconf, pandas) with the
# import shim first on PYTHONPATH, so `import slide2vec` is slide2vec_dask and slide2vec's
# internals do not import.  Which tests are public and runnable: slide2vec-public-tests.txt (why:
# slide2vec-test-classification.md).  The README snippets run as plain scripts with the import
# renamed (run-slide2vec-snippets.py).  Any failure fails the script.
#
# Usage: tests/peers/run-slide2vec-suite.sh     (SLIDE2VEC_ENV=/somewhere, default /tmp/slide2vec-peer)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ENV=${SLIDE2VEC_ENV:-/tmp/slide2vec-peer}
VERSION=7.1.4
tests/peers/setup-slide2vec.sh >/dev/null
SDIST="$ENV/sdist/slide2vec-$VERSION"
if [ ! -d "$SDIST/tests" ]; then
    mkdir -p "$ENV/sdist"
    "$ENV/bin/pip" download -q --no-deps --no-binary :all: "slide2vec==$VERSION" -d "$ENV/sdist"
    tar xzf "$ENV/sdist/slide2vec-$VERSION.tar.gz" -C "$ENV/sdist"
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$SDIST/tests" "$WORK/tests"
# slide2vec's conftest (its isolated_encoder_registry fixture) is not in the sdist: ours stands in
cp tests/peers/slide2vec_conftest.py "$WORK/tests/conftest.py"
mapfile -t IDS < <(grep -v '^\s*#' tests/peers/slide2vec-public-tests.txt | sed '/^\s*$/d')
export PYTHONPATH="$ROOT/tests/peers/slide2vec_shim:$ROOT"
(cd "$WORK" && "$ENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 "${IDS[@]}")
"$ENV/bin/python" tests/peers/run-slide2vec-snippets.py "$SDIST/README.md"
echo "slide2vec $VERSION public tests and README snippets: all passed"
