"""A Jupyter cell runs `Pipeline.run` on the embedded local default, in a real kernel."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_pipeline_runs_in_a_notebook_cell(tmp_path, slides_dir):
    cells = [
        "import torch\n"
        "from slide2vec_dask import ExecutionOptions, Model, Pipeline, open_embeddings\n"
        "model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),\n"
        "                          name='mean-rgb', feature_dim=3)",
        f"result = Pipeline(model, execution=ExecutionOptions(output_dir={str(tmp_path / 'out')!r}))"
        f".run(manifest_path={str(slides_dir / 'slides.csv')!r})",
        "print([(o.sample_id, o.status) for o in result.outcomes])\n"
        f"print(sorted(open_embeddings({str(tmp_path / 'out')!r})['tiles'].children))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = [o for cell in nb.cells for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert "[('a', 'success'), ('b', 'success')]" in text and "['a', 'b']" in text
    assert " - INFO - " not in text


@pytest.fixture
def slides_dir(tmp_path):
    from slide2vec_dask import testing

    folder = tmp_path / "slides"
    folder.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        testing.write_svs(folder / f"{name}.svs", testing.tissue_image(896, 1344, [(224, 224, 672, 1120)], seed=seed),
                          downsamples=(1, 4))
    (folder / "slides.csv").write_text("sample_id,image_path\na,a.svs\nb,b.svs\n")
    return folder
