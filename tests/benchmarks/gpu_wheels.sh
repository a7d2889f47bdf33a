#!/usr/bin/env bash
# Prepare the GPU run (issue 25): what the GPU machine lacks, carried with the working tree.
#
# The GPU machine has Python 3.12, torch, torchvision, timm, tifffile, xarray, numpy and h5py, and
# no network.  This script (run here, with network) puts into bench-out/gpu-carry/ (ignored by git):
#   wheels/   py3.12 manylinux wheels of what it lacks: dask, distributed, zarr, numcodecs, imagecodecs,
#             nvidia-ml-py (NVML for the telemetry), pytest (the GPU tests) and their own dependencies
#             that are not there already (numpy, torch & co. are excluded: --no-deps, listed by hand);
#   CMU-1-Small-Region.svs   the real H&E slide bench_gpu.py builds its test slide from;
#   run.sh    the one command to run there.
# The folder must stay under 64 MiB (checked at the end).  Then, on the GPU machine (the device tool:
# carry=["bench-out/gpu-carry"]):
#   bash bench-out/gpu-carry/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=bench-out/gpu-carry
SLIDE=${CMU_SVS:-/work/shared/data/CMU-1-Small-Region.svs}
mkdir -p "$DEST/wheels"
# Wheels of the packages themselves and of their dependencies the GPU image does not ship.
# (numpy, packaging, pyyaml, jinja2, fsspec, typing-extensions come with torch / xarray there.)
# The versions this machine's environment runs (what the tests pass with), where it has them.
pinned() {
  for name in "$@"; do
    v=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
      && echo "$name==$v" || echo "$name"
  done
}
mapfile -t PKGS < <(pinned dask distributed zarr numcodecs imagecodecs nvidia-ml-py \
      cloudpickle toolz partd locket click msgpack psutil sortedcontainers tblib tornado zict urllib3 \
      donfig crc32c pytest pluggy iniconfig pytest-timeout)
rm -rf "$DEST/wheels"; mkdir -p "$DEST/wheels"
pip download --quiet --no-deps --only-binary=:all: --dest "$DEST/wheels" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${PKGS[@]}"
cp "$SLIDE" "$DEST/CMU-1-Small-Region.svs"
cat > "$DEST/run.sh" <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: install the carried wheels, run the GPU tests and the
# benchmark (under 8 minutes).  Results: $OUT/bench_gpu.json, $OUT/gpu_tests.txt, $OUT/run_report*.
set -uo pipefail
HERE=bench-out/gpu-carry
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install --quiet --no-index --no-deps --find-links "$HERE/wheels" "$HERE"/wheels/*.whl 2>&1 | tail -3
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 470 python tests/benchmarks/bench_gpu.py --source-svs "$HERE/CMU-1-Small-Region.svs" \
    --max-seconds 420 --json "$OUT/bench_gpu.json"
RUN
chmod +x "$DEST/run.sh"
size=$(du -sm "$DEST" | cut -f1)
ls -la "$DEST/wheels" | awk '{print $5, $9}' | sort -n | tail -8
echo "bench-out/gpu-carry: ${size} MiB (limit 64)"
[ "$size" -lt 64 ] || { echo "too big for the device tool's carry (64 MiB)"; exit 1; }
