from __future__ import annotations

import pytest

from tests.helpers import cluster, start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A three-worker stack of different GPU types, shared by a test module."""
    s = start_stack(cluster("A100-80G", "L40S", "A10"), tmp_path_factory.mktemp("logs"))
    try:
        yield s
    finally:
        s.stop()
