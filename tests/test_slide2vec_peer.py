"""The same slide2vec config through slide2vec 7.1.4 itself and through our command line (issue 27).

slide2vec runs in its own venv (tests/peers/setup-slide2vec.sh) with a random-weight timm encoder
registered through its ``register_encoder``; we run the same YAML with the same class registered
through ours.  Same files, same sidecar keys, embeddings within 1e-5.  Until our tiling is
hs2p-exact (the tiling issue), our run reads slide2vec's own coordinates
(``tiling.read_coordinates_from``) so the embeddings are compared tile for tile.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = Path(os.environ.get("SLIDE2VEC_ENV", "/tmp/slide2vec-peer")) / "bin" / "python"
# What slide2vec writes that is its own bookkeeping, not what loaders read.
NOT_OURS = {"embedding_request.json", "logs/log.txt"}

ENCODER = '''
import sys
import torch
from {package}.encoders import TimmTileEncoder, register_encoder


@register_encoder("peer-tiny", encode_dim=192, input_size=224, supports_variable_input_size=False, patch_size=16,
                  supported_spacing_um=0.5, precision="fp32", source="random")
class PeerTiny(TimmTileEncoder):
    def __init__(self, *, output_variant=None):
        torch.manual_seed(0)
        super().__init__("vit_tiny_patch16_224", output_variant=output_variant, pretrained=False)


if __name__ == "__main__":
    from {package}.cli import {entry}
    sys.exit({entry}(sys.argv[1:]))
'''


def peer_available() -> bool:
    return PEER.exists() and subprocess.run([str(PEER), "-c", "import slide2vec"], capture_output=True).returncode == 0


pytestmark = [pytest.mark.skipif(not peer_available(), reason=f"slide2vec 7.1.4 not installed at {PEER}: run "
                                 "tests/peers/setup-slide2vec.sh"), pytest.mark.slow]


def run(python: str, script: Path, *args: str, env: dict | None = None) -> None:
    done = subprocess.run([python, str(script), *args], capture_output=True, text=True, timeout=900,
                          cwd=script.parent, env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "embeddings.zarr" not in p.parts
            and not p.name.startswith(".") and p.parts[len(folder.parts)] != "coordinates"}


def test_same_config_same_files_keys_and_embeddings(syn_svs, tmp_path):
    (tmp_path / "slides.csv").write_text(f"sample_id,image_path\nsyn,{syn_svs}\n")
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        csv: {tmp_path / 'slides.csv'}
        output_dir: {tmp_path / 'theirs'}
        model:
          name: peer-tiny
        tiling:
          backend: openslide
          preview:
            save_mask_preview: false
            save_tiling_preview: false
        """))
    theirs_script, ours_script = tmp_path / "theirs.py", tmp_path / "ours.py"
    theirs_script.write_text(ENCODER.format(package="slide2vec", entry="entrypoint"))
    ours_script.write_text(ENCODER.format(package="slide2vec_dask", entry="main"))
    run(str(PEER), theirs_script, str(config), "--skip-datetime", "--run-on-cpu")
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    run(sys.executable, ours_script, str(config), "--skip-datetime", "--run-on-cpu", f"output_dir={ours}",
        f"tiling.read_coordinates_from={theirs / 'tiles'}", env={"PYTHONPATH": str(ROOT)})

    assert files(theirs) - NOT_OURS <= files(ours), files(theirs) - files(ours)
    a, b = (json.loads((d / "tile_embeddings" / "syn.meta.json").read_text()) for d in (theirs, ours))
    assert set(b) - {"slide2vec_dask"} == set(a)
    assert set(b["compatibility"]) == set(a["compatibility"])
    for key in ("encoder_name", "encoder_level", "feature_dtype", "format", "num_tiles", "feature_dim",
                "requested_spacing_um", "requested_tile_size_px", "encoder_input_size_px", "tile_size_lv0"):
        assert a[key] == b[key], key
    for key in ("encoder_name", "output_variant", "precision", "feature_dtype", "requested_tile_size_px",
                "encoder_input_size_px", "transform"):
        assert a["compatibility"][key] == b["compatibility"][key], key
    with np.load(theirs / "tiles" / "syn.coordinates.npz") as ct, np.load(ours / "tiles" / "syn.coordinates.npz") as co:
        assert sorted(ct.files) == sorted(co.files)
        where = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(co["x"], co["y"]))}
        order = [where[(int(x), int(y))] for x, y in zip(ct["x"], ct["y"])]
    et = torch.load(theirs / "tile_embeddings" / "syn.pt", weights_only=True)
    eo = torch.load(ours / "tile_embeddings" / "syn.pt", weights_only=True)
    assert et.shape == eo.shape and len(order) == len(et) > 0
    assert float((et - eo[order]).abs().max()) <= 1e-5
    rows = {name: list(csv.DictReader((d / "process_list.csv").open())) for name, d in (("t", theirs), ("o", ours))}
    assert rows["t"][0]["feature_status"] == rows["o"][0]["feature_status"] == "success"
    for column in ("sample_id", "annotation", "tiling_status", "feature_status", "num_tiles"):
        assert rows["t"][0][column] == rows["o"][0][column], column
    assert (ours / "config.yaml").is_file()
