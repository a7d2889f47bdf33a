"""The QC gallery: ``<output_dir>/qc/index.html``, one page for the run.

* `images`: each slide's picture -- its thumbnail with layers drawn over it
  (the tissue the tiling saw, the tiles kept) -- made by the plan task on the
  worker, where the slide is open, and written atomically as
  ``qc/<slide>.jpg``.  A layer is a name, a colour and what to draw, so a
  run with annotation classes adds a layer per class.
* `page`: the page itself, rewritten atomically on the client as slides
  finish (at most every few seconds, and at the end): a card per slide with
  its picture, tile count, status and notes, failed slides first.  Static
  HTML and CSS, no script, no server: open the file in a browser, during the
  run too (it reloads itself every 10 s until the run ends).
"""

from slide2vec_dask.qc.images import QC_FOLDER, image_name, write_slide_image
from slide2vec_dask.qc.page import QcGallery

__all__ = ["QC_FOLDER", "QcGallery", "image_name", "write_slide_image"]
