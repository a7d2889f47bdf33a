"""A slide's tile archive written in hs2p's layout (``on_the_fly=False``), beside the store.

``<output_dir>/tiles/<id>.tiles.tar`` (+ ``.tiles.manifest.csv``) and
``<id>.coordinates.npz`` / ``.coordinates.meta.json``, which describe the
tiling as hs2p does, so hs2p and slide2vec read ours and we read theirs.  Each
file is written aside and renamed; the tar comes last, so a tar that exists
is a whole archive.  What a killed writer left is swept with the exports'.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from slide2vec_dask.store.output_dir import atomic
from slide2vec_dask.tiling.archive import archive_path
from slide2vec_dask.tiling.coordinate_files import write_coordinates


def write_archive(folder: Path, sample_id: str, plan, blobs, attrs: dict) -> Path:
    """The slide's archive, manifest and hs2p coordinates in ``folder``, each written aside and renamed.

    ``blobs`` yields each tile's JPEG bytes in the plan's (row-major) order.
    """
    rows = [(i, int(x), int(y)) for i, (x, y) in enumerate(zip(plan.x, plan.y))]

    def tar(tmp: Path) -> None:
        count = 0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, blob in enumerate(blobs):
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
                count += 1
        if count != plan.num_tiles:
            raise RuntimeError(f"{sample_id}: {count} tiles reached the archive, the plan has {plan.num_tiles}")

    folder = Path(folder)
    atomic(folder / f"{sample_id}.tiles.manifest.csv",
           lambda tmp: tmp.write_text("tile_index,x,y\n" + "".join(f"{i},{x},{y}\n" for i, x, y in rows)))
    write_coordinates(folder, sample_id, plan, attrs, order="y_then_x")   # (tile_index: the tar's members)
    tar_path = atomic(archive_path(folder, sample_id), tar)   # last: a tar that exists is a whole archive
    return tar_path
