"""The writer subprocess: started once and reused, replaced after SIGKILL, never re-runs the user's script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning_ckpt as lc
from tests._helpers import GateHook, data_file, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_writer_process_is_started_once_and_reused(tmp_path):
    with lc.make_async_checkpointer() as ck:
        assert ck.process.pid is None  # lazy: nothing runs before the first save
        for i in range(3):
            ck.save(tmp_path / f"{i}.ckpt", {"w": torch.ones(8) * i})[1].result(timeout=60)
        assert ck.process.starts == 1 and ck.process.is_alive()
        pid = ck.process.pid
    assert not _alive(pid)


def test_sigkilled_writer_fails_the_pending_save_then_is_replaced(tmp_path):
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    with lc.make_async_checkpointer(commit_hook=gate) as ck:
        _, write_f = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})
        wait_for(lambda: os.path.exists(tmp_path / "entered"), what="the writer to hold in pre_commit")
        os.kill(ck.process.pid, signal.SIGKILL)
        with pytest.raises(lc.WriterProcessDiedError, match="SIGKILL"):
            write_f.result(timeout=60)
        assert not (tmp_path / "a.ckpt").exists()
        (tmp_path / "release").touch()
        # The next save starts a new writer, which also removes the dead writer's temp file.
        ck.save(tmp_path / "b.ckpt", {"w": torch.zeros(8)})[1].result(timeout=60)
        assert ck.process.starts == 2
        assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".ckpt")) == ["b.ckpt"]
        assert not [n for n in os.listdir(tmp_path) if ".lckpt-tmp" in n]


def test_writer_ignores_sigint_and_is_in_its_own_session(tmp_path):
    with lc.make_async_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})[1].result(timeout=60)
        pid = ck.process.pid
        assert os.getsid(pid) != os.getsid(0)  # a terminal's Ctrl-C does not reach it
        os.kill(pid, signal.SIGINT)
        ck.save(tmp_path / "b.ckpt", {"w": torch.ones(8)})[1].result(timeout=60)
        assert ck.process.pid == pid and ck.process.starts == 1


def test_unguarded_user_script_runs_once(tmp_path):
    # A training script without `if __name__ == "__main__":` would run twice under multiprocessing's spawn.
    script = tmp_path / "train_unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import torch, lightning_ckpt as lc
        print("SCRIPT-BODY-RAN", flush=True)
        ck = lc.make_async_checkpointer()
        ck.save({str(tmp_path / 'x.ckpt')!r}, {{"w": torch.ones(4)}})[1].result(timeout=60)
        ck.close()
        print("DONE", flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("SCRIPT-BODY-RAN") == 1 and "DONE" in out.stdout
    assert torch.equal(torch.load(data_file(tmp_path / "x.ckpt"))["w"], torch.ones(4))


def test_hook_defined_in_main_is_refused_with_a_clear_error():
    hook_cls = type("MainHook", (lc.WriterHook,), {"__module__": "__main__"})
    with pytest.raises(ValueError, match="__main__"):
        lc.make_async_checkpointer(commit_hook=hook_cls())


def test_dist_barrier_is_refused_for_the_writer_process():
    config = lc.CheckpointerConfig(barrier_config=lc.BarrierConfig("dist"))
    with pytest.raises(ValueError, match="tcp_store"):
        lc.make_async_checkpointer(config, rank_info=lc.RankInfo(0, 2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_ahead_of_the_first_save(tmp_path):
    with lc.make_async_checkpointer() as ck:
        ck.start(block=False)
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})[1].result(timeout=60)
        ck.start()  # already running: nothing new
        assert ck.process.starts == 1 and ck.process.is_alive()
