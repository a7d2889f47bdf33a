"""The encoder registry, restored after a test that registers encoders.

``@register_encoder`` and providers add names to one process-wide registry (as in slide2vec,
where a name registered twice is refused): a test that registers its own encoders runs inside
`isolated_encoder_registry`, so the next test sees the package's presets only, as a fresh
process does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from slide2vec_dask.encoders import registry

_TABLES = ("_PRESETS", "_LEVEL", "_ABOUT")


@contextlib.contextmanager
def isolated_encoder_registry() -> Iterator[None]:
    """Snapshot the registry's tables (presets loaded first), and restore them on exit."""
    registry.list_models()   # load the presets and providers now: a restore must not drop them
    saved = {name: dict(getattr(registry, name)) for name in _TABLES}
    try:
        yield
    finally:
        for name, table in saved.items():
            live = getattr(registry, name)
            live.clear()
            live.update(table)
