"""slide2vec's README snippets as plain scripts against slide2vec-dask, the import renamed (issue 27).

Usage: python tests/peers/run-slide2vec-snippets.py path/to/slide2vec/README.md

Every ```python block of the README runs, in order, in one script (the second snippet uses the
first one's ``preprocessing``, as the README says), with ``slide2vec`` renamed ``slide2vec_dask``.
What a snippet cannot have here is replaced, and only that: its placeholder paths
(``/path/to/slide.svs``, ``/path/to/slides.csv``, ``outputs/...``) by a synthetic slide and a
manifest written for the run, and preset names whose weights only the Hugging Face hub has (no
network here) by a random-weight encoder registered under another name with the same input
contract (224 px at 0.5 µm/px).  Exit status 0 when the script ran to its end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HUB_ONLY = ("virchow2",)
STAND_IN = '''
import torch
from slide2vec_dask.encoders import TimmTileEncoder, register_encoder


@register_encoder("hub-stand-in", encode_dim=192, input_size=224, supported_spacing_um=0.5, precision="fp16")
class HubStandIn(TimmTileEncoder):
    """Random weights with the contract of the preset the snippet names (no hub access here)."""

    def __init__(self, *, output_variant=None):
        torch.manual_seed(0)
        super().__init__("vit_tiny_patch16_224", output_variant=output_variant, pretrained=False)
'''


def snippets(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def renamed(code: str) -> str:
    return re.sub(r"\b(from|import) slide2vec\b", r"\1 slide2vec_dask", code)


def main(readme_path: str) -> int:
    blocks = snippets(Path(readme_path).read_text(encoding="utf-8"))
    if not blocks:
        print(f"no python snippets in {readme_path}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(ROOT))
        from slide2vec_dask import testing

        image = testing.tissue_image(1792, 2240, [(448, 448, 1344, 1792)], seed=1)
        slide = testing.write_svs(tmp / "slide.svs", image, mpp=0.5, downsamples=(1, 4), quality=92)
        (tmp / "slides.csv").write_text(f"sample_id,image_path\nslide,{slide}\n")
        code = renamed("\n".join(blocks))
        code = code.replace("/path/to/slide.svs", str(slide)).replace("/path/to/slides.csv", str(tmp / "slides.csv"))
        code = re.sub(r'"outputs/', f'"{tmp}/outputs/', code)
        for name in HUB_ONLY:
            code = code.replace(f'"{name}"', '"hub-stand-in"')
        script = tmp / "snippets.py"
        script.write_text(STAND_IN + "\n\ndef main():\n" + textwrap.indent(code, "    ")
                          + "\n    print('snippets ran to the end')\n\n\nif __name__ == '__main__':\n    main()\n")
        done = subprocess.run([sys.executable, str(script)], cwd=tmp, capture_output=True, text=True, timeout=900,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        print(done.stdout[-2000:])
        if done.returncode != 0:
            print(f"README snippets failed ({len(blocks)} blocks):\n{code}\n{done.stderr[-4000:]}", file=sys.stderr)
            return 1
        print(f"{len(blocks)} README snippet(s) ran with the import renamed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
