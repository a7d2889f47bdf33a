"""Shared fixtures: slides the tests write themselves, the real H&E slide when present,
and a small timm model with a checkpoint on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slide2vec_dask import testing

REPO = Path(__file__).resolve().parents[1]
CMU_SVS = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"

# A 4480 x 3584 slide, 0.5 µm/px, levels 1/4/16, with tissue exactly in two
# rectangles aligned to 448 px (a multiple of both the 224 px tile and the 64x
# segmentation downsample), so tissue fractions and kept tiles are known.
SYN_SHAPE = (3584, 4480)
SYN_RECTS = [(448, 448, 1344, 1792), (2240, 2240, 3136, 3136)]
SYN_TILES = {(r, c) for y0, x0, y1, x1 in SYN_RECTS for r in range(y0 // 224, y1 // 224)
             for c in range(x0 // 224, x1 // 224)}


@pytest.fixture(autouse=True)
def _cli_environment():
    """`cli.main()` quiets Dask for its own process through the environment; a test that calls
    it in-process must not leave that setting to the tests after it."""
    import os

    value = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    yield
    if value is None:
        os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
    else:
        os.environ["DASK_LOGGING__DISTRIBUTED"] = value


@pytest.fixture(scope="session")
def syn_image() -> np.ndarray:
    return testing.tissue_image(*SYN_SHAPE, SYN_RECTS, seed=1)


@pytest.fixture(scope="session")
def syn_svs(tmp_path_factory, syn_image) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synthetic.svs"
    return testing.write_svs(path, syn_image, mpp=0.5, downsamples=(1, 4, 16), quality=92)


@pytest.fixture(scope="session")
def syn_tiff_nospacing(tmp_path_factory, syn_image) -> Path:
    path = tmp_path_factory.mktemp("slides") / "nospacing.tif"
    return testing.write_tiff(path, syn_image[:1792, :2240], spacing_um=None)


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    if not CMU_SVS.exists():
        pytest.skip(f"real H&E slide not present at {CMU_SVS}")
    return CMU_SVS


@pytest.fixture(scope="session")
def vit_tiny_checkpoint(tmp_path_factory) -> Path:
    """Random ViT-Ti/16 weights saved as safetensors (no download)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def reference_embeddings(checkpoint: Path, tiles: np.ndarray, mean, std, size: int = 224, resize: str = "uint8"):
    """The bare timm model on independently read tiles: what embed_slide must reproduce.

    Tiles of another size are resized (antialiased bilinear) by torch in uint8, as our CPU path
    does (README: within one grey level of the float resize slide2vec runs); ``resize="float"``
    is slide2vec's, to bound the difference."""
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(checkpoint)))
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = x if resize == "uint8" else x.float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.float()
    x = (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


def openslide_tiles(path: Path, xs, ys, size_lv0: int, level: int = 0, read_size: int | None = None) -> np.ndarray:
    """Tiles read with OpenSlide itself at level-0 coordinates, composited over white: a tile overhanging
    the slide (as hs2p's per-contour grids plan them) is glass out there, as hs2p and our readers pad it."""
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        size = read_size or size_lv0
        out = []
        for x, y in zip(xs, ys):
            rgba = np.asarray(osr.read_region((int(x), int(y)), level, (size, size))).astype(np.uint32)
            rgb, alpha = rgba[..., :3], rgba[..., 3:]
            out.append(((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
        return np.stack(out)


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """An empty Hugging Face home, offline: what a machine without cached weights sees."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny(vit_tiny_checkpoint):
    """The random ViT-Ti/16 as a tile-level `Model` (192-d)."""
    from slide2vec_dask import Model

    return Model.from_timm("vit_tiny_patch16_224", checkpoint_path=vit_tiny_checkpoint)
