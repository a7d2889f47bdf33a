"""Import shim for the slide2vec 7.1.4 compatibility runner: ``import slide2vec`` is slide2vec_dask.

Only slide2vec's public modules resolve — ``slide2vec`` itself (its ``__all__``),
``slide2vec.api`` (the module behind it), ``slide2vec.encoders`` (the plug-in API) and
``slide2vec.artifacts`` (the artifact records) — each to the slide2vec_dask module that holds
the same names.  Importing any other ``slide2vec.*`` module (``runtime``, ``inference``,
``distributed``, ``data``, ``utils``, ``encoders.models.*``, ...) raises an ImportError naming it as a
slide2vec internal: a test that needs one tests slide2vec's implementation, not its API.

Put this folder first on ``PYTHONPATH`` (tests/peers/run-slide2vec-suite.sh does); never installed.
"""

import importlib
import importlib.abc
import importlib.util
import sys

import slide2vec_dask as _target

PUBLIC = {
    "slide2vec.api": "slide2vec_dask",
    "slide2vec.encoders": "slide2vec_dask.encoders",
    "slide2vec.artifacts": "slide2vec_dask.results",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in ("slide2vec", "slide2vec.__main__") or not name.startswith("slide2vec."):
            return None   # (python -m slide2vec: slide2vec_dask/__main__.py, the command line)
        if name not in PUBLIC:
            raise ImportError(f"{name} is a slide2vec internal; slide2vec-dask provides slide2vec's public API "
                              f"only (slide2vec, {', '.join(sorted(PUBLIC))})", name=name)
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return importlib.import_module(PUBLIC[spec.name])

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Alias())
# ``import slide2vec`` gives slide2vec_dask itself (its lazy names included)
sys.modules[__name__] = _target
