"""``python -m slide2vec_dask``: the command line (`slide2vec_dask.cli`)."""

import sys

from slide2vec_dask.cli import main

sys.exit(main())
