"""The writer subprocess: started once and reused, replaced after SIGKILL, never re-runs the user's script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

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


# ---------------------------------------------------------------- PyTorch's constructor: init functions in the writer


def record_pid(path: str) -> None:
    """A ``subprocess_init_fn``: proves where it ran."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def refuse_to_start() -> None:
    raise RuntimeError("init refused: no scratch space")


class EchoWriter:
    """A writer built by ``make_echo_writer`` in the writer process: records what ``write`` received."""

    def __init__(self, marker: str, rank_info: lc.RankInfo) -> None:
        self.marker, self.rank_info = marker, rank_info

    def write(self, path: str, state_dict: dict, **kwargs) -> None:
        with open(path, "w") as f:
            json.dump({"keys": sorted(state_dict), "kwargs": kwargs, "pid": os.getpid(), "marker": self.marker,
                       "rank": self.rank_info.global_rank}, f)


def make_echo_writer(**kwargs) -> EchoWriter:
    return EchoWriter(**kwargs)


def test_init_functions_run_in_the_writer_process_and_build_its_writer(tmp_path):
    process = lc.CheckpointProcess(lc.RankInfo(0, 1), lc.CheckpointProcessConfig(), record_pid,
                                   (str(tmp_path / "pid"),), make_echo_writer, {"marker": "m"})
    try:
        assert process.process_creation_future.result(timeout=120) is None
        assert int((tmp_path / "pid").read_text()) == process.pid != os.getpid()
        assert process.write({"b": 2, "a": 1}, tmp_path / "out.json", step=3).result(timeout=60) is None
        echoed = json.loads((tmp_path / "out.json").read_text())
        assert echoed == {"keys": ["a", "b"], "kwargs": {"step": 3}, "pid": process.pid, "marker": "m", "rank": 0}
    finally:
        process.close()
    assert not process.process.processes[0].is_alive()


def test_a_failing_init_function_is_raised_with_the_writers_traceback(tmp_path):
    process = lc.CheckpointProcess(lc.RankInfo(0, 1), None, refuse_to_start)
    try:
        with pytest.raises(lc.CheckpointWriteError, match=r"(?s)Traceback.*init refused: no scratch space"):
            process.process_creation_future.result(timeout=120)
        with pytest.raises(lc.CheckpointWriteError, match="init refused"):
            process.write({"a": 1}, tmp_path / "never")
    finally:
        process.close()


def test_unknown_request_is_refused_and_the_writer_keeps_serving(tmp_path):
    from lightning_ckpt.worker_protocol import RequestType, WorkerRequest

    bogus = WorkerRequest(RequestType.PING, {}, 10_000)
    bogus.request_type = "bogus-from-a-newer-trainer"
    with lc.make_async_checkpointer() as ck:
        ck.start()
        answer = ck.process._link.submit(bogus, "a bogus request", 60, "test", interpret=lambda response: response)
        response = answer.result(timeout=60)
        assert not response.success and "unknown request 'bogus-from-a-newer-trainer'" in response.error_msg
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})[1].result(timeout=60)
        assert ck.process.starts == 1


@pytest.mark.parametrize("field", ["subprocess_init_timeout_secs", "subprocess_shutdown_timeout_secs",
                                   "write_timeout_secs", "stall_timeout_secs", "wait_log_interval_secs"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "30", True])
def test_process_config_refuses_bad_timeouts_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        lc.CheckpointProcessConfig(**{field: value})


# ---------------------------------------------------------------- Ctrl-C, mapping errors, unkillable writers


def _interrupt_main_thread_once_it_waits() -> threading.Thread:
    """SIGINT once the main thread blocks in ``Future.result`` or in a socket send."""
    main = threading.main_thread().ident

    def blocked() -> bool:
        frame = sys._current_frames()[main]
        while frame is not None:
            code = frame.f_code
            if (code.co_name == "result" and "concurrent" in code.co_filename) or code.co_name in ("_send", "send_bytes"):
                return True
            frame = frame.f_back
        return False

    def interrupt() -> None:
        wait_for(blocked, 60, "the main thread to block")
        signal.pthread_kill(main, signal.SIGINT)  # to the main thread itself, so that its wait is interrupted

    thread = threading.Thread(target=interrupt, name="test-interrupt")
    thread.start()
    return thread


@pytest.mark.timeout(300)
def test_ctrl_c_during_send_does_not_desynchronise_the_writer(tmp_path):
    """A 64 MiB request is stuck in the socket behind a busy writer; Ctrl-C on the caller's thread is raised there
    as KeyboardInterrupt, the request still arrives whole, and later writes work."""
    # The gate outlasts every wait of the test before the release (entered, the interrupt, its join: 60 s each),
    # so a slow machine fails one of those, by name, rather than the gated write.
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"), timeout_secs=200)
    # Ctrl-C as Python delivers it by default, whatever the process-wide disposition is when the test starts: an
    # ignored SIGINT would never interrupt the wait below. (In two whole-suite runs the interrupt never arrived; in
    # every run since, with this line, it has. What had changed the disposition was not found: no test leaves a
    # handler or the signal mask changed now, which conftest checks after every test.)
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    process = lc.CheckpointProcess(lc.RankInfo(0, 1), commit_hook=gate)
    try:
        first = process.write({"w": 1}, tmp_path / "a.ckpt")
        wait_for(lambda: (tmp_path / "entered").exists(), 60, "the writer to hold in pre_commit")
        big = process.write({"blob": b"x" * (64 << 20)}, tmp_path / "b.ckpt")
        interrupter = _interrupt_main_thread_once_it_waits()
        with pytest.raises(KeyboardInterrupt):
            big.result(timeout=60)
        interrupter.join(timeout=60)
        (tmp_path / "release").touch()
        assert first.result(timeout=60) is None and big.result(timeout=120) is None
        assert process.write({"w": 3}, tmp_path / "c.ckpt").result(timeout=60) is None
        assert process.starts == 1
    finally:
        process.close()
        signal.signal(signal.SIGINT, previous_handler)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".ckpt")) == ["a.ckpt", "b.ckpt", "c.ckpt"]


def test_writer_mapping_failure_reaches_the_trainer_with_its_cause(tmp_path):
    """EMFILE while the writer receives a staging buffer fails that save with the cause's text; the writer
    lives on, and the buffer is sent again with the next save."""
    import resource

    with lc.make_async_checkpointer() as ck:
        ck.start()
        pid = ck.process.pid
        open_fds = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            _, write_future = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(1000)})
            with pytest.raises(lc.CheckpointWriteError, match=r"ancdata|Too many open files") as caught:
                write_future.result(timeout=60)
            assert not isinstance(caught.value, lc.WriterProcessDiedError)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        ck.save(tmp_path / "b.ckpt", {"w": torch.ones(1000)})[1].result(timeout=60)
        assert ck.process.pid == pid and ck.process.starts == 1
    assert not (tmp_path / "a.ckpt").exists() and (tmp_path / "b.ckpt").exists()


def test_unkillable_writer_is_signalled_rarely_and_close_raises_a_checkpoint_error(tmp_path, caplog, monkeypatch):
    """A writer that survives SIGKILL (stuck in the kernel: simulated by a kill that does nothing) is signalled a
    bounded number of times, and ``close`` raises ``CheckpointTimeoutError`` after releasing its socket and
    threads."""
    from lightning_ckpt.writer_spawn import WriterProcessHandle

    config = lc.CheckpointProcessConfig(stall_timeout_secs=0.5, wait_log_interval_secs=0.2,
                                        subprocess_shutdown_timeout_secs=1.0)
    process = lc.CheckpointProcess(lc.RankInfo(0, 1), config)
    process.start()
    pid = process.pid
    kills = []
    monkeypatch.setattr(WriterProcessHandle, "kill", lambda self: kills.append(time.monotonic()))
    os.kill(pid, signal.SIGSTOP)
    try:
        with caplog.at_level("WARNING", logger="lightning_ckpt"):
            with pytest.raises(lc.CheckpointTimeoutError, match="no progress"):
                process.write({"w": 1}, tmp_path / "a.ckpt").result(timeout=60)
            with pytest.raises(lc.CheckpointTimeoutError, match=f"{pid} did not exit"):
                process.close()
        assert 1 <= len(kills) <= 2, kills
        assert sum(r.levelname == "ERROR" for r in caplog.records) <= 2
        assert process._link is None
        process.close()  # idempotent, nothing left to raise
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_drain_reports_a_write_still_held_and_returns_once_it_committed(tmp_path, caplog):
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    process = lc.CheckpointProcess(lc.RankInfo(0, 1), commit_hook=gate)
    try:
        assert process.drain(1.0)  # nothing sent yet
        held = process.write({"w": 1}, tmp_path / "a.ckpt")
        wait_for(lambda: (tmp_path / "entered").exists(), 60, "the writer to hold in pre_commit")
        with caplog.at_level("WARNING", logger="lightning_ckpt"):
            assert not process.drain(0.2)
        assert any("still pending" in r.getMessage() and "a.ckpt" in r.getMessage() for r in caplog.records)
        (tmp_path / "release").touch()
        assert process.drain(60) and held.done() and held.exception() is None
    finally:
        process.close()
    assert (tmp_path / "a.ckpt").exists()
