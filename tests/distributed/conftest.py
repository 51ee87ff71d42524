"""Fixtures for multi-rank tests: a pool of 2 gloo ranks started once per module (starting ranks costs seconds)."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import RankPool


@pytest.fixture(scope="module")
def ranks2():
    """Two spawned ranks with the default gloo group; ``ranks2.run(fn, *args)`` runs ``fn(rank, 2, *args)``."""
    with RankPool(2) as pool:
        yield pool
