"""The QC page: ``qc/index.html``, a card per slide, failed slides first, rewritten as slides finish."""

from __future__ import annotations

import html
import time
from pathlib import Path
from urllib.parse import quote

from slide2vec_dask.atomic import atomic
from slide2vec_dask.qc.images import QC_FOLDER, bag_colors, image_name

# failed first, then what is still going, then what is done
ORDER = {"failed": 0, "skipped": 3, "success": 2}
STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:0 0 4px} .sum{margin:0 0 12px;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px;align-items:start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow-wrap:anywhere}
.card.failed{border:2px solid #c62828;background:#fff5f5}
.card img{width:100%;height:auto;display:block;background:#eee}
.id{font-weight:600} .st{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e0e0e0}
.failed .st{background:#c62828;color:#fff} .success .st{background:#2e7d32;color:#fff}
.note{color:#555;font-size:12px} .err{color:#c62828;font-size:12px}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 8px;border:1px solid #888}
.noimg{height:120px;display:flex;align-items:center;justify-content:center;color:#999;background:#f0f0f0}
"""
LEGEND = '<p class="legend">drawn over each thumbnail:<span style="background:rgb(46,160,67)"></span>tissue ' \
         '(per-tile fraction the tiling saw)<span style="border:2px solid rgb(220,40,40)"></span>tiles kept</p>'


class QcGallery:
    """``<output_dir>/qc/index.html`` for a run's slides (`SlideOutcome` rows)."""

    def __init__(self, output_dir: str | Path, outcomes: dict, run_id: str, every: float = 5.0):
        self.folder = Path(output_dir) / QC_FOLDER
        self.path = self.folder / "index.html"
        self.outcomes, self.run_id, self.every = outcomes, run_id, every
        self.last, self.cost = 0.0, 0.0

    def maybe_write(self) -> None:
        """Rewrite the page when ``every`` seconds passed (and never more than ~10 % of the client's time)."""
        now = time.monotonic()
        if now - self.last >= max(self.every, 10 * self.cost):
            try:
                self.write(running=True)
            except OSError:   # (a full disk for a moment): the run goes on, the last write says
                self.last = now

    def write(self, running: bool = False) -> Path:
        start = time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)
        text = self.html(running)
        atomic(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.last = time.monotonic()
        self.cost = self.last - start
        return self.path

    def html(self, running: bool) -> str:
        rows = sorted(self.outcomes.values(), key=lambda o: ORDER.get(o.status, 1))
        counts = {k: sum(o.status == k for o in rows) for k in ("success", "failed", "skipped")}
        state = "running" if running else "finished"
        refresh = '<meta http-equiv="refresh" content="10">' if running else ""
        summary = (f"run {html.escape(self.run_id)} ({state}): {len(rows)} slides, {counts['success']} succeeded, "
                   f"{counts['failed']} failed, {counts['skipped']} skipped; "
                   f"{sum(o.num_tiles for o in rows)} tiles")
        cards = "\n".join(self._card(o) for o in rows)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
                f'<link rel="icon" href="data:,">'
                f"<title>QC: run {html.escape(self.run_id)}</title><style>{STYLE}</style></head>\n<body>"
                f'<h1>QC gallery</h1><p class="sum">{summary}</p>{LEGEND}\n<div class="grid">\n{cards}\n</div>'
                f"</body></html>\n")

    def _card(self, o) -> str:
        name = image_name(o.sample_id)
        if (self.folder / name).is_file():
            picture = (f'<img src="{quote(name)}" alt="{html.escape(o.sample_id)}: thumbnail, tissue and tiles" '
                       f'loading="lazy">')
        else:
            picture = '<div class="noimg">no picture</div>'
        status = html.escape(o.status)
        lines = [f'<div class="id">{html.escape(o.sample_id)}</div>',
                 f'<div><span class="st">{status}</span> {o.num_tiles} tiles'
                 + (f", {o.num_regions} regions" if o.num_regions else "")
                 + (f", planned in {o.plan_seconds:.1f} s" if o.plan_seconds else "") + "</div>"]
        if o.bags:   # annotation bags: each class's tiles, in the colour its outlines have
            colors = bag_colors(list(o.bags), o.bag_colors)
            lines.append('<div class="legend">' + "".join(
                f'<span style="border:2px solid rgb{colors[b]}"></span>{html.escape(b)}: {n}' for b, n in o.bags.items())
                + "</div>")
        if o.status == "failed":
            lines.append(f'<div class="err">{html.escape(o.error_type)}: {html.escape(o.error[:500])}</div>')
        if o.note:
            lines.append(f'<div class="note">{html.escape(o.note)}</div>')
        return f'<figure class="card {status}">{picture}<figcaption>{"".join(lines)}</figcaption></figure>'
