#!/usr/bin/env bash
# TIAToolbox's own GrandQC tissue model (tiatoolbox/models/architecture/grandqc.py: its UNet++ and
# EfficientNet encoder, its JPEG q80 + ImageNet preprocessing, its argmin postprocessing), for
# tests/test_learned_masks.py. The whole of TIAToolbox pins torch < 2.13 and pulls jupyterlab, bokeh,
# numba, transformers and more (several GB), so only its wheel is fetched (--no-deps, ~4 MB) and the
# four files the model needs are unpacked; the test imports them with stand-ins for the rest.
#
# Usage: tests/peers/setup-tiatoolbox-grandqc.sh   (TIATOOLBOX_SRC=/somewhere to choose the folder)
# Idempotent. Without it the comparison test skips, naming this script.
set -euo pipefail
DEST=${TIATOOLBOX_SRC:-/tmp/tiatoolbox-grandqc}
VERSION=2.1.3
if [ -f "$DEST/tiatoolbox/models/architecture/grandqc.py" ]; then
    echo "TIAToolbox's GrandQC model already in $DEST"
    exit 0
fi
mkdir -p "$DEST"
python -m pip download -q --no-deps "tiatoolbox==$VERSION" -d "$DEST/wheel"
python - "$DEST" <<'PY'
import sys, zipfile, glob
dest = sys.argv[1]
wheel = glob.glob(f"{dest}/wheel/tiatoolbox-*.whl")[0]
names = ["tiatoolbox/models/architecture/grandqc.py", "tiatoolbox/models/architecture/timm_efficientnet.py",
         "tiatoolbox/models/architecture/utils.py", "tiatoolbox/models/models_abc.py"]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        z.extract(name, dest)
print("TIAToolbox GrandQC model files in", dest)
PY
