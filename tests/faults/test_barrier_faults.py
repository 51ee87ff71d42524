"""Two real CPU ranks; one dies, fails or stalls before the barrier: the other fails in time, naming it, and
nothing is committed."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from lightning_ckpt.layout import MANIFEST_NAME
from tests._helpers import wait_for
from tests.faults._faults import child_env, module_cmd, stop

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess, pytest.mark.stale_tmp_expected]

TIMEOUT_SECS = 3.0
SLACK_SECS = 20.0  # process and writer startup on a loaded 2-core machine; far below any default timeout


def _run_pair(tmp_path, port, scenario):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    out = str(tmp_path / "outcome")
    procs = []
    logs = [open(tmp_path / f"rank{r}.log", "wb") for r in range(2)]
    try:
        for rank in range(2):
            procs.append(subprocess.Popen(
                module_cmd("tests.faults.rank_worker", rank, port, ckpts, scenario, TIMEOUT_SECS, out),
                env=child_env(), stdin=subprocess.DEVNULL, stdout=logs[rank], stderr=logs[rank]))
        wait_for(lambda: os.path.exists(f"{out}.0") or procs[0].poll() is not None, 120, "rank 0's outcome")
        assert os.path.exists(f"{out}.0"), (tmp_path / "rank0.log").read_text()
        with open(f"{out}.0") as f:
            outcome = json.load(f)
        procs[0].wait(timeout=60)
    finally:
        for proc in procs:
            stop(proc)
        for log in logs:
            log.close()
    # No commit marker anywhere, no final checkpoint; only (stale) temp names may remain.
    for root, _dirs, files in os.walk(ckpts):
        assert MANIFEST_NAME not in files, f"commit marker written in {root}"
    assert not os.path.exists(ckpts / "ckpt")
    return outcome


@pytest.mark.parametrize("scenario", ["tcp_die", "dist_die", "dist_stall"])
def test_missing_peer_times_out_or_fails_naming_it(scenario, tmp_path, free_port):
    outcome = _run_pair(tmp_path, free_port, scenario)
    assert outcome["error_type"] is not None, "rank 0 committed without its peer"
    message = outcome["message"]
    assert "Barrier" in outcome["error_type"] or "(Barrier" in message, message
    assert "ranks [1] of 2 never arrived" in message, message
    assert outcome["elapsed"] < TIMEOUT_SECS + SLACK_SECS, outcome
    if scenario != "dist_die":  # a stalled or silent peer is waited for exactly the barrier timeout
        assert "timed out" in message and outcome["elapsed"] >= TIMEOUT_SECS, outcome


def test_failing_peer_releases_the_other_rank_at_once_naming_it(tmp_path, free_port):
    outcome = _run_pair(tmp_path, free_port, "tcp_fail")
    assert "BarrierPeerError" in outcome["message"], outcome
    assert "rank 1 failed" in outcome["message"] and "injected I/O error on rank 1" in outcome["message"]
    assert outcome["elapsed"] < TIMEOUT_SECS + SLACK_SECS, outcome
