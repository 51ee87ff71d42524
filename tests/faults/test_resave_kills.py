"""SIGKILL during a 2-rank re-save of one checkpoint directory: never a torn or lost checkpoint (real processes)."""

from __future__ import annotations

import pytest

from tests.faults._faults import fault_trials
from tests.faults._resave_trials import resave_kill_trial

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600), pytest.mark.stale_tmp_expected]


@pytest.mark.parametrize("mode, no_exchange, kill_step", [
    ("sync", True, 1),  # between the fallback's two renames: the path is empty until the next writer restores it
    ("sync", False, 1),  # right after the exchange, the replaced checkpoint still in the temp
    ("async", True, 2),  # in the writer process, after the new one is in place
])
def test_crash_between_renames_of_a_multi_rank_resave_keeps_a_complete_checkpoint(tmp_path, mode, no_exchange,
                                                                                    kill_step):
    result = resave_kill_trial(str(tmp_path / "t"), seed=7, mode=mode, how="rename", no_exchange=no_exchange,
                               kill_version=3, kill_step=kill_step)
    assert result.ok, result
    assert result.notes["gap"] == (no_exchange and kill_step == 1)


@pytest.mark.slow
def test_random_sigkills_during_multi_rank_resaves_never_tear_or_lose_a_checkpoint(tmp_path):
    for seed in range(fault_trials(3)):
        result = resave_kill_trial(str(tmp_path / f"t{seed}"), seed=seed)
        assert result.ok, (seed, result)
