"""Careless stores (issue 26, round 3): a store of another layout is refused, never half-read.

Every test here was watched failing on the code before its fix (the failure is
in its docstring).  The old store is built by hand, zarr groups and JSON, as a
user upgrading from a release before staging-per-run would have it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from slide2vec_dask import (ExecutionOptions, Pipeline, PreprocessingConfig, StoreLayoutError, export,
                            open_embeddings, testing)
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.store.schema import LAYOUT_ATTR, LAYOUT_VERSION

# a_t 0: the slide's tissue is exactly 4 tiles, which hs2p's default a_t = 4 (strictly more) drops
PREP = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5, "filtering": {"a_t": 0}}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_store")
    return testing.write_svs(folder / "s.svs", testing.tissue_image(896, 896, [(224, 224, 672, 672)], seed=3),
                             downsamples=(1, 4))


@pytest.fixture(scope="module")
def finished(tiny, slide, tmp_path_factory) -> Path:
    """A run of today's code: its root attributes are what an old store of the same settings had."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = run(tiny, out, slide)
    assert result.outcomes[0].status == "success"
    return out


def run(model, out: Path, slide: Path, **options):
    return Pipeline(model, PreprocessingConfig(**PREP), ExecutionOptions(output_dir=out, **options)).run(
        slides=[{"sample_id": "s", "image_path": slide}])


def old_layout_store(out: Path, run_attrs: dict) -> Path:
    """The layout before staging-per-run, crashed mid-finalize: ``tiles/s`` holds ``embedding`` only
    (``complete`` and ``tile_size_lv0`` were written last, and never were); ``_staging/s`` is still
    inside the store."""
    store = out / "embeddings.zarr"
    root = zarr.open_group(str(store), mode="w", zarr_format=3)
    root.attrs["run"] = run_attrs
    tiles = root.create_group("tiles").create_group("s")
    tiles.create_array("embedding", data=np.zeros((4, run_attrs["feature_dim"]), np.float32),
                       dimension_names=["tile", "feature"])
    root.create_group("_staging").create_array("s", shape=(2, 2, run_attrs["feature_dim"]), dtype="float32",
                                               chunks=(1, 1, run_attrs["feature_dim"]), fill_value=np.nan,
                                               dimension_names=["row", "col", "feature"])
    return store


def root_attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def test_an_old_layout_store_is_refused_by_every_reader(tiny, slide, finished, tmp_path):
    """Before: the rerun said ``skipped, already complete, 0 tiles``; export failed with
    ``KeyError: 'tile_size_lv0'``; ``_staging/`` stayed in the store."""
    out = tmp_path / "old"
    store = old_layout_store(out, root_attrs(finished / "embeddings.zarr")["run"])
    for attempt in (lambda: run(tiny, out, slide), lambda: export(out, "npz"), lambda: open_embeddings(out)):
        with pytest.raises(StoreLayoutError, match=f"{store}.*layout.*overwrite=True") as info:
            attempt()
        assert "output_dir" in str(info.value)
    assert (store / "_staging").is_dir()            # refused, not touched


def test_overwrite_replaces_an_old_layout_store(tiny, slide, finished, tmp_path):
    """The command the refusal names works: a clean store of today's layout, no ``_staging/`` left."""
    out = tmp_path / "old"
    store = old_layout_store(out, root_attrs(finished / "embeddings.zarr")["run"])
    result = run(tiny, out, slide, overwrite=True)
    assert result.outcomes[0].status == "success" and result.outcomes[0].num_tiles > 0
    assert not (store / "_staging").exists()
    assert root_attrs(store)[LAYOUT_ATTR] == LAYOUT_VERSION
    assert EmbeddingStore(out).tile_attrs("s")["tile_size_lv0"] > 0


def test_a_store_records_its_layout_and_a_future_one_is_refused(tiny, slide, finished, tmp_path):
    """A store says which layout it has; a layout this release does not know (a newer one) is refused."""
    assert root_attrs(finished / "embeddings.zarr")[LAYOUT_ATTR] == LAYOUT_VERSION
    out = tmp_path / "future"
    store = out / "embeddings.zarr"
    root = zarr.open_group(str(store), mode="w", zarr_format=3)
    root.attrs.update({"run": root_attrs(finished / "embeddings.zarr")["run"], LAYOUT_ATTR: LAYOUT_VERSION + 1})
    with pytest.raises(StoreLayoutError, match=f"layout {LAYOUT_VERSION + 1}"):
        open_embeddings(out)


def test_a_group_missing_what_the_writer_writes_is_not_complete(tiny, slide, finished, tmp_path):
    """A ``tiles/<id>`` group is complete only with every attribute its writer writes and ``complete``
    true; one without them (damaged, hand-edited) is redone, never skipped.
    Before: skipped as complete (being there was the whole rule)."""
    out = tmp_path / "damaged"
    run(tiny, out, slide)
    meta = out / "embeddings.zarr" / "tiles" / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    for key in ("complete", "tile_size_lv0"):
        doc["attributes"].pop(key)
    meta.write_text(json.dumps(doc))
    again = run(tiny, out, slide)
    assert again.outcomes[0].status == "success", again.outcomes[0]
    attrs = EmbeddingStore(out).tile_attrs("s")
    assert attrs["complete"] is True and attrs["tile_size_lv0"] > 0


def test_an_unrecorded_store_of_todays_layout_is_read_and_recorded(tiny, slide, finished, tmp_path):
    """A store of the release just before layouts were recorded (today's layout, no ``layout``
    attribute) is read as it is, and the next run records its layout instead of redoing it."""
    out = tmp_path / "unrecorded"
    shutil.copytree(finished, out)
    meta = out / "embeddings.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].pop(LAYOUT_ATTR)
    meta.write_text(json.dumps(doc))
    assert set(open_embeddings(out)["tiles"].children) == {"s"}
    again = run(tiny, out, slide, output_format=["npz"])   # (an export to write: the run writes, so records)
    assert again.outcomes[0].status == "skipped"
    assert root_attrs(out / "embeddings.zarr")[LAYOUT_ATTR] == LAYOUT_VERSION
