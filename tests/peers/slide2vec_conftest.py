"""conftest.py for slide2vec 7.1.4's tests run against slide2vec-dask (tests/peers/run-slide2vec-suite.sh).

slide2vec's own tests/conftest.py is not in its sdist, yet its public tests ask for one of its
fixtures: ``isolated_encoder_registry`` (the registry restored after a test that registers
encoders).  The runner copies this file in as the tests' conftest.py; the fixture is ours
(`slide2vec_dask.testing.registry`), not slide2vec's code.
"""

import pytest

from slide2vec_dask.testing.registry import isolated_encoder_registry as _isolated


@pytest.fixture
def isolated_encoder_registry():
    with _isolated():
        yield
