"""Learned tissue and artefact masks (HEST, GrandQC, SAM2): weights, geometry, plumbing, peers.

Checkpoints are random but laid out as each publisher's file (slide2vec_dask.testing.masks);
where the answer must be known, a one-layer stand-in in the official layout says "tissue where
the pixel is dark", so the learned mask must be the slide's known tissue, pixel for pixel, and
its tiles those a label file of that tissue gives.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from slide2vec_dask import testing
from slide2vec_dask.config import PreprocessingConfig
from slide2vec_dask.slide import open_slide
from slide2vec_dask.tiling.plan import plan_slide, tissue_mask
from slide2vec_dask.tissue import geometry, models
from slide2vec_dask.tissue.catalog import ARTIFACTS, GRANDQC, HEST, SAM2
from slide2vec_dask.tissue.run import learned_tissue_mask

torch = pytest.importorskip("torch")
masks = pytest.importorskip("slide2vec_dask.testing.masks")

DARK, GLASS = 60, 240


def has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_smp = pytest.mark.skipif(not has("segmentation_models_pytorch"), reason="the masks extra is not installed")
needs_sam2 = pytest.mark.skipif(not has("sam2"), reason="the sam2 extra is not installed")


def seg(method: str, **kw) -> dict:
    return PreprocessingConfig(segmentation={"method": method, "close": 0, "downsample": 16, "device": "cpu",
                                             **kw}).segmentation


FILTERING = PreprocessingConfig().filtering


def mask_of(slide, segmentation: dict, **kw) -> np.ndarray:
    """`tissue_mask` as planning calls it (224 px tiles at 0.5 µm/px): the mask on the segmentation level."""
    return tissue_mask(slide, segmentation, FILTERING, spacing_um=0.5, tile_size_px=224, **kw)[1]


def known_mask(shape: tuple[int, int], level0: tuple[int, int], rects) -> np.ndarray:
    """Which pixels of a ``shape`` grid over the slide have their centre inside one of ``rects``."""
    ys = (np.arange(shape[0]) + 0.5) * level0[0] / shape[0]
    xs = (np.arange(shape[1]) + 0.5) * level0[1] / shape[1]
    out = np.zeros(shape, bool)
    for y0, x0, y1, x1, *_ in rects:
        out |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return out


def write_slide(path: Path, height: int, width: int, rects, *, spacing: float = 0.5, colour=DARK,
                downsamples=(1, 2, 4)) -> Path:
    """Glass with flat dark rectangles (level-0 y0, x0, y1, x1): a slide whose tissue is known exactly."""
    image = np.full((height, width, 3), GLASS, np.uint8)
    for y0, x0, y1, x1, *grey in rects:
        image[y0:y1, x0:x1] = grey[0] if grey else colour
    return testing.write_tiff(path, image, spacing_um=spacing, downsamples=downsamples, compression="zlib")


@pytest.fixture(autouse=True)
def _fresh_models():
    yield
    models.release_models()


# -- weights: the publishers' layouts, strict, counted, refused by name ------------------------------
# torchvision's published count for deeplabv3_resnet50 (21 classes, with the auxiliary head)
DEEPLABV3_RESNET50_PUBLISHED = 42_004_074


def test_hest_checkpoint_loads_strictly_with_the_published_count(tmp_path):
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

    assert DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["num_params"] == DEEPLABV3_RESNET50_PUBLISHED
    published = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    aux = sum(p.numel() for n, p in published.named_parameters() if n.startswith("aux_classifier"))
    head21, head2 = 256 * 21 + 21, 256 * 2 + 2
    path = masks.hest_checkpoint(tmp_path / "deeplabv3_seg_v4.ckpt", seed=1)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("model.") for k in raw["state_dict"]) and any("aux" in k for k in raw["state_dict"])
    loaded = models.Loaded(HEST, "cpu", path)
    assert loaded.num_params == DEEPLABV3_RESNET50_PUBLISHED - aux - head21 + head2 == 39_633_986
    state = loaded.module.state_dict()
    key = "backbone.layer4.2.conv3.weight"
    assert torch.equal(state[key], raw["state_dict"]["model." + key])


@needs_smp
@pytest.mark.parametrize("which, count", [("grandqc", 6_569_726), ("artifacts", 6_252_484)])
def test_grandqc_checkpoints_load_strictly(tmp_path, which, count):
    spec = GRANDQC if which == "grandqc" else ARTIFACTS[1.0]
    writer = masks.grandqc_checkpoint if which == "grandqc" else masks.grandqc_artifact_checkpoint
    path = writer(tmp_path / spec.weights.files[0], seed=2)
    raw = torch.load(path, weights_only=True)
    loaded = models.Loaded(spec, "cpu", path)
    assert loaded.num_params == count
    key = "encoder.conv_stem.weight"
    assert torch.equal(loaded.module.state_dict()[key], raw[key])


@needs_smp
def test_wrong_files_are_refused_by_name(tmp_path):
    hest = masks.hest_checkpoint(tmp_path / "deeplabv3_seg_v4.ckpt")
    tissue = masks.grandqc_checkpoint(tmp_path / "Tissue_Detection_MPP10.pth")
    artefacts = masks.grandqc_artifact_checkpoint(tmp_path / "GrandQC_MPP1_state_dict.pth")
    cases = [(HEST, tissue, "deeplabv3_seg_v4.ckpt"), (GRANDQC, hest, "Tissue_Detection_MPP10.pth"),
             (GRANDQC, artefacts, "Tissue_Detection_MPP10.pth"), (ARTIFACTS[1.0], tissue, "GrandQC_MPP1")]
    for spec, path, expected in cases:
        with pytest.raises(ValueError) as info:
            models.Loaded(spec, "cpu", path)
        assert str(path) in str(info.value) and expected in str(info.value), info.value
    pickled = tmp_path / "GrandQC_MPP1.pth"   # GrandQC's original release pickles the whole model
    torch.save(torch.nn.Conv2d(3, 8, 1), pickled)
    with pytest.raises(ValueError, match="state_dict"):
        models.Loaded(ARTIFACTS[1.0], "cpu", pickled)


@needs_sam2
@pytest.mark.slow
def test_sam2_checkpoint_loads_strictly_and_matches_hs2p(tmp_path):
    """AtlasPatch's layout ({"model": ...}), SAM2.1 Hiera-tiny's 38.9 M parameters, and hs2p's own
    predictor on the same random weights and image gives the same mask."""
    path = masks.sam2_checkpoint(tmp_path / "model.pth", seed=3)
    loaded = models.Loaded(SAM2, "cpu", path, masks.sam2_config())
    assert loaded.num_params == 38_962_498
    with pytest.raises(ValueError, match="model.pth"):
        plain = tmp_path / "plain.pth"
        torch.save(torch.load(path, weights_only=True)["model"], plain)
        models.Loaded(SAM2, "cpu", plain, masks.sam2_config())
    image = np.random.default_rng(0).integers(0, 255, (240, 380, 3), dtype=np.uint8)
    image[60:180, 80:300] = DARK
    ours = loaded.sam2_scores(image) > 0.5
    site = Path("/tmp/slide2vec-hs2p/lib/python3.11/site-packages")
    if not (site / "hs2p").is_dir():
        pytest.skip("hs2p's environment is not set up (tests/peers/setup-hs2p.sh)")
    sys.path.append(str(site))
    try:
        from hs2p.segmentation import _Sam2Predictor
    except ImportError as exc:
        pytest.skip(f"hs2p's SAM2 predictor does not import here: {exc}")
    finally:
        sys.path.remove(str(site))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _Sam2Predictor(checkpoint_path=path, config_path=masks.sam2_config(), device="cpu").predict_mask(image)
    assert theirs.shape == ours.shape and 0 < ours.sum() < ours.size
    assert np.array_equal(theirs.astype(bool), ours)

    # the whole slide, as hs2p resolves a sam2 tissue mask (its reader, its 8 µm/px thumbnail, its padding)
    sys.path.append(str(site))
    try:
        from hs2p.configs import SegmentationConfig
        from hs2p.tiling.mask import resolve_tissue_mask
        from hs2p.wsi.reader import open_slide as hs2p_open_slide
    finally:
        sys.path.remove(str(site))
    svs = testing.write_svs(tmp_path / "s.svs", testing.tissue_image(4096, 5120, [(600, 800, 3000, 4000)], seed=1),
                            mpp=0.5, downsamples=(1, 4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = resolve_tissue_mask(slide=hs2p_open_slide(svs), segmentation=SegmentationConfig(
            method="sam2", close=0, sam2_checkpoint_path=path, sam2_config_path=masks.sam2_config()))
    theirs = resolved.tissue_mask > 0
    ours = learned_tissue_mask(open_slide(svs), seg("sam2", sam2_checkpoint_path=str(path),
                                                    sam2_config_path=str(masks.sam2_config())), theirs.shape)
    assert resolved.seg_spacing_um == 8.0 and 0 < theirs.sum() < theirs.size
    assert np.array_equal(ours, theirs)


TIATOOLBOX_SRC = Path(os.environ.get("TIATOOLBOX_SRC", "/tmp/tiatoolbox-grandqc"))


@pytest.mark.slow
@needs_smp
def test_grandqc_matches_tiatoolbox_own_model(tmp_path, monkeypatch):
    """TIAToolbox's own GrandQC code (its UNet++ and encoder, its JPEG q80 + ImageNet preprocessing, its
    argmin postprocessing) loads our random file in GrandQC's layout strictly and, on a patch read at
    10 µm/px from a slide, gives our probabilities and our tissue mask."""
    if not (TIATOOLBOX_SRC / "tiatoolbox/models/architecture/grandqc.py").exists():
        pytest.skip("TIAToolbox's GrandQC files are not unpacked (tests/peers/setup-tiatoolbox-grandqc.sh)")
    import logging
    import types

    package = types.ModuleType("tiatoolbox")   # the files only, not TIAToolbox's package (torch < 2.13, GBs)
    package.__path__, package.logger = [str(TIATOOLBOX_SRC / "tiatoolbox")], logging.getLogger("tiatoolbox")
    monkeypatch.setitem(sys.modules, "tiatoolbox", package)
    for name in ("skimage", "skimage.feature", "skimage.measure"):   # used by helpers the model does not call
        stub = types.ModuleType(name)
        stub.peak_local_max = stub.label = stub.regionprops = None
        monkeypatch.setitem(sys.modules, name, stub)
    for name in [m for m in sys.modules if m.startswith("tiatoolbox.")]:
        monkeypatch.delitem(sys.modules, name)
    grandqc = importlib.import_module("tiatoolbox.models.architecture.grandqc")

    path = masks.grandqc_checkpoint(tmp_path / "Tissue_Detection_MPP10.pth", seed=4)
    theirs = grandqc.GrandQCModel()
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ours = models.Loaded(GRANDQC, "cpu", path)
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params

    image = testing.tissue_image(4000, 4000, [(800, 600, 3200, 3400)], seed=2)
    slide = open_slide(testing.write_tiff(tmp_path / "s.tif", image, spacing_um=0.5, downsamples=(1, 4, 16)))
    grid = geometry.model_grid(slide, GRANDQC.spacing_um)
    patch = geometry.read_band(slide, grid, 0, 512)[:, :512]
    patch = np.pad(patch, ((0, 0), (0, 512 - patch.shape[1]), (0, 0)), constant_values=255)
    batch = torch.from_numpy(grandqc.GrandQCModel.preproc(patch)[None])
    probs = grandqc.GrandQCModel.infer_batch(theirs, batch, device="cpu")[0]
    their_tissue = grandqc.GrandQCModel.postproc(probs) == 1      # argmin: 1 where class 0 wins
    score = ours.scores(patch[None])[0]
    assert np.abs(score - probs[..., 0]).max() < 1e-4
    assert 0 < their_tissue.sum() < their_tissue.size
    assert np.array_equal(score >= 0.5, their_tissue)


def test_missing_extra_is_named(tmp_path, monkeypatch):
    """A method whose package is missing fails its slide (a ValueError, as planning expects) naming the extra."""
    from slide2vec_dask.tissue import catalog

    monkeypatch.setitem(catalog.TISSUE, "grandqc", dataclasses.replace(GRANDQC, package="no_such_package_for_masks"))
    slide = open_slide(write_slide(tmp_path / "s.tif", 512, 512, []))
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pip install 'slide2vec-dask\[masks\]'"):
        mask_of(slide, seg("grandqc", checkpoint_path=str(tmp_path / "w.pth")))


@needs_smp
def test_weights_from_a_prefilled_offline_cache(tmp_path, offline_hf):
    slide = open_slide(write_slide(tmp_path / "s.tif", 1600, 1600, [(320, 320, 1280, 1280)]))
    stand = lambda: masks.DarkIsTissue(tissue_class=0)   # noqa: E731 (GrandQC: class 0 is tissue)
    src = masks.stand_in_checkpoint("grandqc", tmp_path / "w.pth", stand())
    with masks.stand_in("grandqc", stand):
        with pytest.raises(OSError, match="hf download MahmoodLab/hest-tissue-seg Tissue_Detection_MPP10.pth"):
            mask_of(slide, seg("grandqc"))
        testing.checkpoints.fill_hf_cache(offline_hf, "MahmoodLab/hest-tissue-seg", "Tissue_Detection_MPP10.pth", src)
        mask = mask_of(slide, seg("grandqc"))
    assert 0 < mask.sum() < mask.size


# -- geometry: read at the model's µm/px, exactly, with no shift ---------------------------------
def test_read_band_resamples_exactly_without_shift(tmp_path):
    """0.3 µm/px slide, model at 1 µm/px: level 0 is read and shrunk by 3.33; the dark block's edges
    land where level-0 geometry puts them, to the pixel, at both ends (no drift, no offset)."""
    y0, x0, y1, x1 = 999, 1501, 2299, 2851
    slide = open_slide(write_slide(tmp_path / "s.tif", 3001, 3337, [(y0, x0, y1, x1)], spacing=0.3,
                                   downsamples=(1, 4)))
    grid = geometry.model_grid(slide, 1.0)
    assert grid.level == 0 and abs(grid.scale - 10 / 3) < 1e-9 and grid.shape == (901, 1002)
    band = geometry.read_band(slide, grid, 0, grid.shape[0])
    dark = band.mean(axis=-1) < (DARK + GLASS) / 2
    rows, cols = np.nonzero(dark.any(axis=1))[0], np.nonzero(dark.any(axis=0))[0]
    assert np.array_equal(geometry.read_band(slide, grid, 0, grid.shape[0], chunk=97), band)   # chunks: same pixels
    r = grid.r   # a model pixel is dark when its level-0 box is mostly inside the block
    assert abs(rows[0] - y0 / r) <= 1 and abs(rows[-1] + 1 - y1 / r) <= 1
    assert abs(cols[0] - x0 / r) <= 1 and abs(cols[-1] + 1 - x1 / r) <= 1


@pytest.mark.parametrize("method", ["hest", pytest.param("grandqc", marks=needs_smp)])
def test_stand_in_gives_the_known_mask_with_no_shift(tmp_path, method):
    """Level-0 4112 x 3104 (not a multiple of the 512-px patch at the model's µm/px); tissue reaching
    into the last, partial patch.  The learned mask is the known tissue, pixel for pixel, on the
    segmentation level, and its tiles are those a label file of that tissue gives: at HEST's
    1 µm/px (finer than the mask) and GrandQC's 10 µm/px (coarser)."""
    rects = [(160, 160, 960, 1200), (1680, 3360, 3040, 4080), (2400, 400, 2880, 1600)]   # multiples of 80
    path = write_slide(tmp_path / "s.tif", 3104, 4112, rects)
    slide = open_slide(path)
    tissue_class = 1 if method == "hest" else 0
    stand = lambda: masks.DarkIsTissue(tissue_class=tissue_class, hest_output=method == "hest")  # noqa: E731
    ckpt = masks.stand_in_checkpoint(method, tmp_path / "w.ckpt", stand())
    learned = PreprocessingConfig(segmentation={**seg(method), "checkpoint_path": str(ckpt)}, tissue_threshold=0.5,
                                  grid="slide")
    with masks.stand_in(method, stand):
        ours = mask_of(slide, learned.segmentation)
        plan = plan_slide(slide, learned, spacing_um=0.5, tile_size_px=224, sample_id="s")
    expected = known_mask(ours.shape, (3104, 4112), rects)
    assert expected.sum() > 0 and np.array_equal(ours, expected)
    label = testing.write_label_mask(tmp_path / "label.tif", known_mask((3104, 4112), (3104, 4112), rects))
    reference = plan_slide(slide, PreprocessingConfig(segmentation=seg("hsv"), tissue_threshold=0.5, grid="slide"),
                           spacing_um=0.5, tile_size_px=224, sample_id="s", mask_path=label)
    assert np.array_equal(plan.grid.keep, reference.grid.keep) and plan.grid.num_tiles > 0
    # the last rectangle's bottom-right tile, in the partial patch, is there
    assert plan.grid.keep[(3040 // 224) - 1, (4080 // 224) - 1]


def test_overlapping_patches_give_the_same_mask(tmp_path):
    path = write_slide(tmp_path / "s.tif", 2208, 2720, [(160, 320, 1760, 2400)])
    slide = open_slide(path)
    stand = lambda: masks.DarkIsTissue(hest_output=True)   # noqa: E731
    ckpt = masks.stand_in_checkpoint("hest", tmp_path / "w.ckpt", stand())
    with masks.stand_in("hest", stand):
        plain = mask_of(slide, seg("hest", checkpoint_path=str(ckpt), patch_size=256))
        overlapped = mask_of(slide, seg("hest", checkpoint_path=str(ckpt), patch_size=256, overlap=64))
    assert plain.sum() > 0 and np.array_equal(plain, overlapped)


def test_all_glass_slide_gives_no_tiles(tmp_path, tiny):
    path = write_slide(tmp_path / "glass.tif", 2048, 2048, [])
    stand = lambda: masks.DarkIsTissue(hest_output=True)   # noqa: E731
    ckpt = masks.stand_in_checkpoint("hest", tmp_path / "w.ckpt", stand())
    with masks.stand_in("hest", stand):
        emb = tiny.embed_slide(path, preprocessing=PreprocessingConfig(
            requested_spacing_um=0.5, requested_tile_size_px=224, segmentation=seg("hest", checkpoint_path=str(ckpt))))
    assert emb.num_tiles == 0


@needs_smp
def test_grandqc_sees_each_patch_after_a_jpeg_q80_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)   # 10 µm/px at 0.5 µm/px level 0 -> 52 px
    path = testing.write_tiff(tmp_path / "noise.tif", image, spacing_um=0.5, downsamples=(1,), compression="zlib")
    slide = open_slide(path)
    built = []

    def stand():
        built.append(masks.DarkIsTissue(tissue_class=0))
        return built[-1]

    ckpt = masks.stand_in_checkpoint("grandqc", tmp_path / "w.pth", stand())
    with masks.stand_in("grandqc", stand):
        mask_of(slide, seg("grandqc", checkpoint_path=str(ckpt)))
    seen = built[-1].inputs[0][0]                      # the normalised patch the model got
    grid = geometry.model_grid(slide, 10.0)
    band = geometry.read_band(slide, grid, 0, 512)
    patch = np.pad(band, ((0, 0), (0, 512 - band.shape[1]), (0, 0)), constant_values=255)
    mean = torch.tensor(masks.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(masks.IMAGENET_STD).view(3, 1, 1)
    pixels = (seen * std + mean) * 255
    expected = torch.from_numpy(models.jpeg_round_trip(patch, 80)).permute(2, 0, 1).float()
    assert torch.allclose(pixels, expected, atol=1e-3)
    assert not torch.allclose(pixels, torch.from_numpy(patch).permute(2, 0, 1).float(), atol=1.0)


@needs_smp
@pytest.mark.parametrize("label, mode, removed", [(4, "pen", True), (4, "all", True), (2, "all", True),
                                                  (2, "pen", False)])
def test_artifact_pass_drops_exactly_the_tiles_under_an_artifact_label(tmp_path, label, mode, removed):
    """A user's mask says tissue everywhere; the slide is grey 120 but for a block of 2 x 3 tiles of very
    dark 'artefact' (grey 20); the stand-in artefact model labels grey < 60 as ``label``, the rest normal
    tissue (class 1)."""
    tile = 224
    blocked = (slice(2, 4), slice(4, 7))
    rects = [(0, 0, 8 * tile, 10 * tile, 120),
             (2 * tile, 4 * tile, 4 * tile, 7 * tile, 20)]
    slide = open_slide(write_slide(tmp_path / "s.tif", 8 * tile, 10 * tile, rects))
    stand = lambda: masks.DarkIsTissue(classes=8, tissue_class=label, other_class=1, grey=60)   # noqa: E731
    ckpt = masks.stand_in_checkpoint("grandqc-artifacts", tmp_path / "a.pth", stand())
    user_mask = testing.write_label_mask(tmp_path / "label.tif", np.ones((8 * tile, 10 * tile), np.uint8))
    config = PreprocessingConfig(segmentation=seg("hsv", artifacts=mode, artifacts_checkpoint_path=str(ckpt)),
                                 tissue_threshold=0.5, grid="slide")   # after a user's mask: all tissue
    with masks.stand_in("grandqc-artifacts", stand):
        keep = plan_slide(slide, config, spacing_um=0.5, tile_size_px=tile, sample_id="s", mask_path=user_mask).grid.keep
    expected = np.ones((8, 10), bool)
    if removed:
        expected[blocked] = False
    assert np.array_equal(keep, expected)


# -- the stream: plan saved with its mask, previews, the CLI --------------------------------------
def test_pipeline_saves_the_learned_mask_with_the_plan_and_previews_it(tmp_path, tiny):
    from slide2vec_dask.config import ExecutionOptions
    from slide2vec_dask.tissue.run import load_mask, mask_file

    path = write_slide(tmp_path / "s.tif", 2048, 2048, [(512, 512, 1536, 1536)])
    stand = lambda: masks.DarkIsTissue(hest_output=True)   # noqa: E731
    ckpt = masks.stand_in_checkpoint("hest", tmp_path / "w.ckpt", stand())
    config = PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=224,
                                 segmentation=seg("hest", checkpoint_path=str(ckpt)),
                                 preview={"save_mask_preview": True})
    with masks.stand_in("hest", stand):
        emb = tiny.embed_slide(path, sample_id="s", preprocessing=config,
                               execution=ExecutionOptions(output_dir=tmp_path / "out"))
    assert emb.num_tiles > 0 and emb.mask_preview_path.exists()
    saved = load_mask(mask_file(tmp_path / "out" / "coordinates" / "s.npz"))
    assert saved.shape == (512, 512) and saved[128:384, 128:384].all() and saved.sum() == 256 * 256
    # the QuPath export draws that mask; the model (its stand-in and weights now gone) is not run again
    from slide2vec_dask.exporters import geojson
    from slide2vec_dask.tiling.tile_list import load_plan

    ckpt.unlink()
    grid = load_plan(tmp_path / "out" / "coordinates" / "s.npz")
    drawn, shape = geojson._plan_mask(grid, "s", mask_file(tmp_path / "out" / "coordinates" / "s.npz"))
    assert np.array_equal(drawn, saved) and tuple(shape) == (2048, 2048)


@needs_smp
@pytest.mark.slow
def test_segmentation_runs_on_gpu_workers_once_per_worker(tmp_path, tiny):
    """With a learned method, plan tasks ask for resources={"GPU": 1} like the embedding tasks: the
    model is built on the (fake) GPU worker only, once for all its slides."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from slide2vec_dask.config import ExecutionOptions

    ckpt = masks.grandqc_checkpoint(tmp_path / "Tissue_Detection_MPP10.pth")
    slides = [{"image_path": write_slide(tmp_path / f"s{i}.tif", 1024, 1024, [(256, 256, 768, 768)]),
               "sample_id": f"s{i}"} for i in range(3)]
    workers = {"cpu": {"cls": Nanny, "options": {"nthreads": 1}},
               "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    config = PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=224, tissue_threshold=0.0,
                                 segmentation={"method": "grandqc", "checkpoint_path": str(ckpt)})
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        tiny.embed_slides(slides, preprocessing=config, execution=ExecutionOptions(num_gpus=1))
        loaded = client.run(models.loaded_model_keys)
        names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
    by_name = {names[addr]: keys for addr, keys in loaded.items()}
    assert by_name["gpu"] == [("grandqc", "cpu")] and by_name["cpu"] == []


def test_cli_and_yaml_accept_the_new_methods(tmp_path):
    import subprocess

    import yaml

    cfg = {"manifest": "m.csv", "model": {"timm": "vit_tiny_patch16_224"},
           "preprocessing": {"segmentation": {"method": "sam2", "sam2_device": "cpu", "sam2_num_workers": 1,
                                              "sam2_checkpoint_path": None, "artifacts": "pen",
                                              "artifacts_spacing_um": 1.5}},
           "execution": {"output_dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "m.csv").write_text("sample_id,image_path\n")
    run = subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", "run", str(tmp_path / "c.yaml"),
                          "preprocessing.segmentation.method=grandqc", "--print-config"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = yaml.safe_load(run.stdout)
    segmentation = printed["preprocessing"]["segmentation"]
    assert segmentation["method"] == "grandqc" and segmentation["artifacts"] == "pen"
    assert segmentation["artifacts_spacing_um"] == 1.5
    bad = subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", "run", str(tmp_path / "c.yaml"),
                          "preprocessing.segmentation.artifacts_spacing_um=3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "artifacts_spacing_um" in bad.stderr
