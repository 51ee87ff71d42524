"""Fault-suite fixtures: besides the global hygiene checks, no temp file of ours may outlive a test's clean path."""

from __future__ import annotations

import os

import pytest

from lightning_ckpt.layout import TMP_MARKER


@pytest.fixture(autouse=True)
def _no_temp_leftovers(request, tmp_path):
    """Fails a test that leaves ``.lckpt-tmp`` names under its ``tmp_path`` (mark ``stale_tmp_expected`` when the
    scenario ends on a crash that no later writer cleans up)."""
    yield
    if request.node.get_closest_marker("stale_tmp_expected"):
        return
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files if TMP_MARKER in n]
    assert leftovers == [], f"temp files left behind: {leftovers}"


def pytest_configure(config):
    config.addinivalue_line("markers", "stale_tmp_expected: the test ends on a crash nobody cleans up after")
