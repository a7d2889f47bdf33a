"""The QC gallery (issue 22): ``<output_dir>/qc/index.html`` opened in headless Chromium.

The page is loaded through the DevTools protocol (a websocket client talking to
``chromium --headless --remote-debugging-port``), so every console message,
uncaught exception and failed resource load (a missing picture) is seen, then
the cards are counted in the live DOM and a screenshot is taken.  Needs Debian's
``chromium`` (``.ci/run`` installs it) and ``websocket-client``; skips naming
what is missing.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from slide2vec_dask import ExecutionOptions, Model, Pipeline, testing
from slide2vec_dask.qc import QC_FOLDER, image_name

from conftest import SYN_RECTS, SYN_SHAPE

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def _model() -> Model:
    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                             name="mean-rgb", feature_dim=3, spacing_um=0.5, tile_size_px=224)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of two good slides and one missing one."""
    folder = tmp_path_factory.mktemp("qc")
    image = testing.tissue_image(*SYN_SHAPE, SYN_RECTS, seed=1)
    good = testing.write_svs(folder / "good.svs", image[:1792, :2240], mpp=0.5, downsamples=(1, 4), quality=90)
    slides = [{"image_path": str(good), "sample_id": "good-1"},
              {"image_path": str(folder / "missing.svs"), "sample_id": "missing"},
              {"image_path": str(good), "sample_id": "good-2"}]
    result = Pipeline(_model(), execution=ExecutionOptions(output_dir=folder / "out")).run(slides=slides)
    return folder / "out", result


def test_the_gallery_has_a_card_per_slide_failed_first(run):
    out, result = run
    page = out / QC_FOLDER / "index.html"
    text = page.read_text()
    assert text.count('<figure class="card') == 3
    assert text.index("missing") < text.index("good-1") and text.index("missing") < text.index("good-2")
    assert "FileNotFoundError" in text and 'http-equiv="refresh"' not in text   # (finished: no reload)
    for sid in ("good-1", "good-2"):
        picture = out / QC_FOLDER / image_name(sid)
        assert picture.is_file() and f'src="{image_name(sid)}"' in text
        from PIL import Image

        pixels = np.asarray(Image.open(picture))
        assert min(pixels.shape[:2]) >= 256 and pixels.std() > 5
        # the kept tiles are outlined in the tiles layer's red
        assert ((pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)).sum() > 100
    assert not (out / QC_FOLDER / image_name("missing")).exists()
    assert not list((out / QC_FOLDER).glob(".*.tmp"))   # atomic writes leave no temporaries


def test_the_page_is_written_while_the_run_goes_on(run, tmp_path):
    """During a run the page reloads itself; the first write happens before the run ends."""
    from slide2vec_dask.qc import QcGallery
    from slide2vec_dask.results import SlideOutcome

    rows = {"a": SlideOutcome("a", "/a.svs", status="running"), "b": SlideOutcome("b", "/b.svs")}
    gallery = QcGallery(tmp_path, rows, "r1", every=0.0)
    gallery.maybe_write()
    text = (tmp_path / QC_FOLDER / "index.html").read_text()
    assert 'http-equiv="refresh"' in text and "(running)" in text and text.count('<figure class="card') == 2
    rows["a"].status = "<script>alert(1)</script>"   # anything shown is escaped
    gallery.write()
    assert "<script>" not in (tmp_path / QC_FOLDER / "index.html").read_text()


class _DevTools:
    """The smallest DevTools-protocol client: send commands, collect events."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))


def _open_in_chromium(page: Path, tmp_path: Path):
    """``(errors, cards, first card's id, decoded picture widths, screenshot pixels)`` of ``page``."""
    from PIL import Image

    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        target = next(t for t in targets if t["type"] == "page")
        dt = _DevTools(target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.call(f"{domain}.enable")
        dt.call("Page.navigate", url=page.resolve().as_uri())
        dt.wait_for("Page.loadEventFired")
        # every picture decoded (lazy ones too: the window is tall enough for three cards); a failure is -1
        loaded = dt.call("Runtime.evaluate", returnByValue=True, awaitPromise=True, expression=(
            "Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth, () => -1)))"
        ))["result"]["value"]
        cards = dt.call("Runtime.evaluate", returnByValue=True,
                        expression="document.querySelectorAll('figure.card').length")["result"]["value"]
        first = dt.call("Runtime.evaluate", returnByValue=True,
                        expression="document.querySelector('figure.card .id')?.textContent")["result"]["value"]
        shot = base64.b64decode(dt.call("Page.captureScreenshot", format="png")["data"])
        errors = [e for e in dt.events
                  if e.get("method") in ("Runtime.exceptionThrown", "Network.loadingFailed")
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        dt.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return errors, cards, first, loaded, np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))


def test_the_gallery_opens_in_headless_chromium_without_errors(run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): the QC page is not opened")
    pytest.importorskip("websocket", reason="websocket-client is not installed: cannot talk to Chromium")
    out, _ = run
    errors, cards, first, loaded, pixels = _open_in_chromium(out / QC_FOLDER / "index.html", tmp_path / "ok")
    assert errors == [], errors
    assert cards == 3 and first == "missing"
    assert len(loaded) == 2 and all(w >= 256 for w in loaded)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 1000
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100   # not blank

    # ... and the same check sees a broken page: a script error and a picture that is not there
    broken = out / QC_FOLDER / "broken.html"
    broken.write_text((out / QC_FOLDER / "index.html").read_text().replace(
        "</body>", '<img src="nothing-here.jpg"><script>undefinedFunction()</script></body>'))
    try:
        errors, *_ = _open_in_chromium(broken, tmp_path / "broken")
    finally:
        broken.unlink()
    kinds = {e["method"] for e in errors}
    assert "Runtime.exceptionThrown" in kinds and ("Network.loadingFailed" in kinds or "Log.entryAdded" in kinds)
