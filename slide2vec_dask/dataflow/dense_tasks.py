"""Regions of slides and whole images as units of the one driver: plan -> blocks -> finalize.

A *unit* is what the driver calls a slide: one `SlideRegions` (its ROIs), or a run of
up to ``batch_size`` images.  Its plan task runs on a worker: it opens the slide or the
image headers, resolves the read (pyramid level, resize), checks every item (a region
outside the slide, an image without the spacing it needs, an image of the wrong size
fail here, naming the item) and skips the items already written for this same request
(resume per ROI / image).  Its blocks are up to ``batch_size`` items each: a block
reads its items (`RegionSource` / `ImageSource`: any worker) and encodes them on the
device (`dense_block`), writing each item's ``.pt`` and sidecar itself when there is an
output directory, else handing the arrays back.  Expected failures are returned, as in
`tasks`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.dataflow import worker
from slide2vec_dask.dataflow.blocks import EmbedSettings
from slide2vec_dask.dataflow.driver import Task
from slide2vec_dask.dataflow.sources import SlideRef, read_block
from slide2vec_dask.dataflow.tasks import EXPECTED, WRITE_EXPECTED
from slide2vec_dask.dense_options import ImageSpec, SlideRegions
from slide2vec_dask.encoders.dense import DensePlan, encode_dense
from slide2vec_dask.slide import MissingSpacingError, open_slide
from slide2vec_dask.store import dense_files
from slide2vec_dask.tiling.grid import choose_level

#: Largest image decoded whole (pixels): sizes are read from headers and checked before any decoding.
MAX_IMAGE_PIXELS = 1 << 28
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class DenseRequest:
    """What every task of one call needs besides its unit (small, picklable)."""

    kind: str                       # "regions" | "dense_images" | "images"
    plan: DensePlan | None          # None: pooled image embeddings
    spacing_um: float | None        # the spacing items are read at (None: as they are)
    tolerance: float
    backend: str
    output_dir: str | None
    compatibility: dict             # encoder and request: what a resumed item must match
    batch_size: int
    default_spacing_um: float | None = None   # images without a spacing asked: the encoder's, if they have one
    identity: dict | None = None    # the request-wide part of compatibility (`compat.identity.dense_identity`)


@dataclass(frozen=True)
class RegionUnit:
    sample_id: str                  # the unit's id in the driver (the slide, and its annotation)
    regions: SlideRegions

    @property
    def image_path(self) -> Path:
        return self.regions.image_path


@dataclass(frozen=True)
class ImageUnit:
    sample_id: str
    images: tuple[ImageSpec, ...]
    first: int                      # index of images[0] in the call's list

    image_path = ""


@dataclass
class PlannedUnit:
    """A unit's plan as the driver sees a `tasks.PlannedSlide`: blocks, and how to run each."""

    sample_id: str
    request: DenseRequest
    source: Any                     # RegionSource | ImageSource
    items: list                     # per block: the unit's item indices it holds
    done: list                      # (index, record) of items already written for this request
    records: dict                   # index -> what its sidecar says (before the grid is known)
    num_tiles: int
    seconds: float
    plan_path: str = ""
    empty_note: str = ""
    blocks: list = field(default_factory=list)

    def read_request(self, block) -> tuple:
        return (self.source, tuple(self.items[block[0]]))

    def embed_task(self, pixels, block, spec, settings: EmbedSettings) -> Task:
        indices = self.items[block[0]]
        return Task(dense_block, (pixels, [self.records[i] for i in indices], indices),
                    dict(spec=spec, settings=settings, request=self.request), gpu=True)


# -- regions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionSource:
    """A slide's ROIs read at one level: ``read_tile`` pixels there, area-resized to ``target`` when different."""

    slide: SlideRef
    level: int
    downsample: float
    read_tile: int
    target: int
    xy: np.ndarray

    def read(self, indices: tuple[int, ...]) -> np.ndarray:
        slide = self.slide.open()
        out = np.empty((len(indices), self.target, self.target, 3), np.uint8)
        for n, i in enumerate(indices):
            x, y = self.xy[i]
            pixels = slide.read_level(self.level, int(round(y / self.downsample)), int(round(x / self.downsample)),
                                      self.read_tile, self.read_tile)
            out[n] = area_resize(pixels, (self.target, self.target))
        return out


def plan_regions(unit: RegionUnit, spec, request: DenseRequest):
    start = time.perf_counter()
    regions, sid = unit.regions, unit.regions.sample_id
    target = request.plan.geometry.target_size[0]
    try:
        slide = open_slide(regions.image_path, request.backend, regions.spacing_at_level_0)
        choice = choose_level(slide.level_spacings, slide.level_downsamples, request.spacing_um, target,
                              request.tolerance, sid)
    except EXPECTED as exc:
        return exc
    h0, w0 = slide.level_shapes[0]
    xy, lv0 = regions.coordinates, choice.tile_size_lv0
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] + lv0 > w0) | (xy[:, 1] + lv0 > h0)
    if outside.any():
        x, y = (int(v) for v in xy[np.argmax(outside)])
        return ValueError(
            f"{sid}: region at level-0 (x, y) = ({x}, {y}) lies outside the slide {regions.image_path} "
            f"({int(outside.sum())} of {len(xy)} regions do): the slide is {w0} x {h0} px at level 0 and a region "
            f"({target} px at {request.spacing_um} µm/px) spans {lv0} px there; give top-left corners in "
            f"[0, {w0 - lv0}] x [0, {h0 - lv0}]")
    read = {"read_level": int(choice.level), "read_spacing_um": float(choice.read_spacing_um),
            "read_tile_size_px": int(choice.read_tile_size_px), "tile_size_lv0": int(lv0),
            "slide_spacing_um": float(slide.spacing), "spacing_um": request.spacing_um}
    compatibility = {**request.compatibility, "image_path": str(Path(regions.image_path).resolve()),
                     "spacing_at_level_0": regions.spacing_at_level_0, "read": read}
    geometry = request.plan.record()
    records, done, todo = {}, [], []
    for i, (x, y) in enumerate(xy):
        records[i] = {"artifact_type": "dense_embeddings", "sample_id": sid, "annotation": regions.annotation,
                      "x": int(x), "y": int(y), "format": "pt", "feature_dim": request.plan.channels,
                      "image_path": str(regions.image_path), **geometry, **read, "compatibility": compatibility}
        if request.output_dir is not None:
            paths = dense_files.region_paths(request.output_dir, sid, regions.annotation, x, y)
            made = dense_files.finished(paths, compatibility)
            if made is not None:
                done.append((i, made))
                continue
        todo.append(i)
    source = RegionSource(SlideRef.of(slide), choice.level, float(slide.level_downsamples[choice.level]),
                          choice.read_tile_size_px, target, xy)
    return _planned(unit.sample_id, request, source, todo, done, records, start, len(xy))


def _planned(uid, request, source, todo, done, records, start, total) -> PlannedUnit:
    size = max(1, request.batch_size)
    items = [todo[i : i + size] for i in range(0, len(todo), size)]
    return PlannedUnit(uid, request, source, items, done, records, total, time.perf_counter() - start,
                       empty_note="" if total else "no items", blocks=[(k, 0) for k in range(len(items))])


# -- images ----------------------------------------------------------------------------------------
def as_rgb(value, what: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 from a numpy array / torch tensor (HWC or CHW; uint8, or floats in [0, 1]) or PIL image."""
    if hasattr(value, "getbands"):   # PIL
        return np.asarray(value.convert("RGB"))
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"{what}: an image must be (H, W, 3) or (3, H, W) RGB pixels, got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            array = np.round(array * 255.0)
        elif not (np.issubdtype(array.dtype, np.integer) and (not array.size or
                                                             (array.min() >= 0 and array.max() <= 255))):
            raise ValueError(f"{what}: pixels must be uint8, or floats in [0, 1]; got {array.dtype}")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def area_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area (box-average) resize of ``(H, W, 3)`` uint8 to ``size`` = (height, width); unchanged when equal."""
    if pixels.shape[:2] == tuple(size):
        return pixels
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
    out = F.interpolate(x, size=tuple(size), mode="area")
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@dataclass(frozen=True)
class ImageRead:
    """How one image is read: ``how`` = pixels | pil | slide (one pyramid level), then resized to ``size``."""

    how: str
    size: tuple[int, int]
    level: int = 0
    backend: str = "auto"
    spacing: float | None = None      # the ImageSpec's spacing_at_level_0 (opening a slide)
    spacing_um: float | None = None   # what it is read at (None: as it is)


@dataclass(frozen=True)
class ImageSource:
    images: tuple[ImageSpec, ...]
    reads: tuple[ImageRead, ...]
    stack: bool                     # dense: every image has one size, read as one array

    def read(self, indices: tuple[int, ...]):
        out = [self._read(self.images[i], self.reads[i]) for i in indices]
        return np.stack(out) if self.stack and out else out

    @staticmethod
    def _read(image: ImageSpec, how: ImageRead) -> np.ndarray:
        if how.how == "pixels":
            pixels = as_rgb(image.image_path, image.sample_id)
        elif how.how == "pil":
            from PIL import Image

            with Image.open(image.image_path) as im:
                pixels = np.asarray(im.convert("RGB"))
        else:
            slide = open_slide(image.image_path, how.backend, how.spacing)
            h, w = slide.level_shapes[how.level]
            pixels = slide.read_level(how.level, 0, 0, h, w)
        return area_resize(pixels, how.size)


def _identity(image: ImageSpec) -> dict:
    """What names an image's content for resume: a file's path, size and time; an array's digest."""
    if image.in_memory:
        pixels = as_rgb(image.image_path, image.sample_id)
        return {"image_path": "<in memory>", "shape": list(pixels.shape),
                "digest": hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()}
    stat = Path(image.image_path).stat()
    return {"image_path": str(Path(image.image_path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _header(image: ImageSpec, backend: str):
    """``(height, width, spacing or None, slide or None)`` without decoding pixels; bounded in size."""
    if image.in_memory:
        shape = as_rgb(image.image_path, image.sample_id).shape
        return shape[0], shape[1], image.spacing_at_level_0, None
    path = Path(image.image_path)
    if not path.exists():
        raise FileNotFoundError(f"{image.sample_id}: image not found: {path}")
    if path.suffix.lower() in RASTER_SUFFIXES or backend == "pil":
        return (*_pil_size(image), image.spacing_at_level_0, None)
    try:
        slide = open_slide(path, "auto" if backend == "pil" else backend, image.spacing_at_level_0)
    except MissingSpacingError:
        return (*_pil_size(image), None, None)
    except EXPECTED:
        return (*_pil_size(image), image.spacing_at_level_0, None)
    h, w = slide.level_shapes[0]
    return h, w, slide.spacing, slide


def _pil_size(image: ImageSpec) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image.image_path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{image.sample_id}: {image.image_path} is not an image PIL can read ({exc})") from None
    return h, w


def _resolve_read(image: ImageSpec, request: DenseRequest) -> ImageRead:
    """An image's read: for dense grids at ``request.spacing_um`` (down-sampled, never up-sampled) and
    checked against ``target_size``; for pooled embeddings as it is (the encoder resizes)."""
    h, w, spacing, slide = _header(image, request.backend)
    if h * w > MAX_IMAGE_PIXELS:
        raise ValueError(f"{image.sample_id}: {w} x {h} px is larger than an image read whole may be "
                         f"({MAX_IMAGE_PIXELS} px); use Model.embed_regions_dense with SlideRegions instead")
    how = "pixels" if image.in_memory else ("slide" if slide is not None else "pil")
    backend = "auto" if slide is None else slide.backend
    wanted = request.spacing_um
    if wanted is None and spacing is not None and request.plan is not None:
        wanted = request.default_spacing_um   # the encoder's, when the image knows its own
    if request.plan is None or wanted is None:
        size, level = (h, w), 0
    else:
        if spacing is None:
            raise ValueError(
                f"{image.sample_id}: the image records no pixel spacing, and its grid is asked at {wanted} µm/px "
                "(DenseImageOptions.spacing_um): give ImageSpec(spacing_at_level_0=...), or leave spacing_um "
                "unset to take the image as it is")
        level, level_spacing = 0, spacing
        if slide is not None:   # the coarsest level no coarser than asked (within tolerance)
            fits = [i for i, s in enumerate(slide.level_spacings) if s <= wanted * (1 + request.tolerance)]
            level = max(fits, key=lambda i: slide.level_spacings[i]) if fits else 0
            level_spacing = slide.level_spacings[level]
            h, w = slide.level_shapes[level]
        if level_spacing > wanted * (1 + request.tolerance):
            raise ValueError(f"{image.sample_id}: the image is {level_spacing:g} µm/px, coarser than the "
                             f"{wanted:g} µm/px asked; images are down-sampled, never up-sampled")
        if abs(level_spacing - wanted) <= request.tolerance * wanted:
            size = (h, w)
        else:
            size = (max(1, round(h * level_spacing / wanted)), max(1, round(w * level_spacing / wanted)))
    if request.plan is not None and size != request.plan.geometry.target_size:
        raise ValueError(f"{image.sample_id}: the image is {size[1]} x {size[0]} px (width x height) once read at "
                         f"{wanted if wanted is not None else 'its own'} µm/px, but DenseImageOptions.target_size is "
                         f"{request.plan.geometry.target_size} (height, width): target_size is a check, not a "
                         "resize; crop the image or change target_size")
    return ImageRead(how, size, level, backend, image.spacing_at_level_0, wanted)


def plan_images(unit: ImageUnit, spec, request: DenseRequest):
    start = time.perf_counter()
    dense = request.plan is not None
    reads, records, done, todo = [], {}, [], []
    try:
        for i, image in enumerate(unit.images):
            if not dense and image.spacing_at_level_0 is not None:
                raise ValueError(f"{image.sample_id}: embed_images resizes each image to the encoder's tile, so "
                                 "spacing_at_level_0 has no use there; leave it unset (embed_images_dense reads it)")
            read = _resolve_read(image, request)
            reads.append(read)
            compatibility = {**request.compatibility, "image": _identity(image)}
            record = {"artifact_type": "dense_image_embeddings" if dense else "image_embeddings",
                      "sample_id": image.sample_id, "format": "pt",
                      "image_path": compatibility["image"]["image_path"], "image_size": list(read.size),
                      "compatibility": compatibility}
            if dense:
                record.update({"feature_dim": request.plan.channels, **request.plan.record(),
                               "spacing_um": read.spacing_um, "read_level": read.level})
            else:
                record.update({"feature_dim": int(spec.feature_dim), "encoder": spec.name})
            records[i] = record
            if request.output_dir is not None:
                made = dense_files.finished(dense_files.image_paths(request.output_dir, image.sample_id, dense),
                                            compatibility)
                if made is not None:
                    done.append((i, made))
                    continue
            todo.append(i)
    except EXPECTED as exc:
        return exc
    source = ImageSource(unit.images, tuple(reads), stack=dense)
    return _planned(unit.sample_id, request, source, todo, done, records, start, len(unit.images))


# -- the block: encode, and write when there is somewhere to ---------------------------------------
def dense_block(pixels, records: list[dict], indices: list[int], *, spec, settings: EmbedSettings,
                request: DenseRequest):
    """Read (``pixels`` = ``(source, indices)``) and encode a block; ``[(index, record, array or None)]``."""
    if isinstance(pixels, BaseException):
        return pixels
    if isinstance(pixels, tuple):
        try:
            pixels = read_block(*pixels)
        except EXPECTED as exc:
            return exc
    plan = request.plan

    def run(device):
        encoder = worker.get_encoder(spec, device, settings.precision, settings.channels_last)
        if plan is not None:
            return list(encode_dense(encoder, pixels, plan, settings.batch_size))
        out: list = [None] * len(pixels)
        by_shape: dict = {}
        for n, p in enumerate(pixels):
            by_shape.setdefault(p.shape, []).append(n)
        for members in by_shape.values():
            embedded = encoder.embed(np.stack([pixels[n] for n in members]), settings.batch_size)
            for n, row in zip(members, embedded):
                out[n] = row
        return out

    arrays = worker.run_on_device(settings.num_gpus, run)
    results = []
    try:
        for index, record, array in zip(indices, records, arrays):
            if plan is not None:
                record = {**record, "feature_dim": int(array.shape[0]), "grid_shape": list(array.shape[1:]),
                          "dtype": str(array.dtype)}
            else:
                record = {**record, "dtype": str(array.dtype)}
            if request.output_dir is None:
                results.append((index, record, array))
                continue
            dense_files.write_unit(array, _paths(request, record), record)
            results.append((index, record, None))
    except WRITE_EXPECTED as exc:
        return exc
    return results


def _paths(request: DenseRequest, record: dict) -> tuple[Path, Path]:
    if request.kind == "regions":
        return dense_files.region_paths(request.output_dir, record["sample_id"], record["annotation"],
                                        record["x"], record["y"])
    return dense_files.image_paths(request.output_dir, record["sample_id"], request.kind == "dense_images")


def artifact(request: DenseRequest, record: dict, data=None):
    """The artifact of one item: written (``data`` None, paths from the record) or held in memory."""
    paths = None if request.output_dir is None else _paths(request, record)
    if data is not None:
        import torch

        data = torch.from_numpy(np.asarray(data))
    make = {"regions": dense_files.region_artifact, "dense_images": dense_files.dense_image_artifact,
            "images": dense_files.image_artifact}[request.kind]
    return make(record, paths, data)
