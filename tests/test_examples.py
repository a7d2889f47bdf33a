"""The examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_local_quickstart(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "local_quickstart.py"), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "synthetic: " in done.stdout and "embeddings (" in done.stdout
    assert (tmp_path / "preview" / "tiling" / "synthetic.png").exists()
    assert (tmp_path / "coordinates" / "synthetic.npz").exists()


def test_import_is_fast_and_light():
    code = ("import sys, time; t = time.perf_counter(); import slide2vec_dask; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'dask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 2.0
    assert out[1:] == ["False", "False"]  # heavy libraries load on first use, not at import
