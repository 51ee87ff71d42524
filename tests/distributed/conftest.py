"""Fixtures for multi-rank tests: a pool of 2 gloo ranks started once per module (starting ranks costs seconds).

The launcher (multiprocessing) is imported only when ranks are started, not when tests are collected.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ranks2():
    """Two spawned ranks with the default gloo group; ``ranks2.run(fn, *args)`` runs ``fn(rank, 2, *args)``."""
    from tests.distributed.launcher import RankPool

    with RankPool(2) as pool:
        yield pool
