"""Test-only helpers: state dicts, writer hooks the writer subprocess can import, and a wait with a deadline."""

from __future__ import annotations

import os
import subprocess
import time
from collections import OrderedDict
from typing import Any

import torch

from lightning_ckpt import WriterHook


def nested_state_dict(seed: int = 0) -> dict[str, Any]:
    """A Lightning-like nested state dict: several dtypes, a non-contiguous view, and non-tensor leaves."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=g)
    return {
        "state_dict": OrderedDict(
            w=torch.randn(16, 32, generator=g),
            b=torch.randn(32, generator=g).to(torch.float64),
            half=torch.randn(5, generator=g).half(),
            bf16=torch.randn(7, generator=g).bfloat16(),
            ids=torch.randint(-100, 100, (9,), generator=g, dtype=torch.int64),
            small=torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8),
            mask=torch.rand(4, generator=g) > 0.5,
            cplx=torch.randn(3, generator=g, dtype=torch.complex64),
            view=base.t()[1:5],
            scalar=torch.tensor(3.5),
            empty=torch.empty(0, 3),
        ),
        "optimizer_states": [{"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(16, 32, generator=g)}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "epoch": 2,
        "global_step": 17,
        "name": "run-α",
        "tags": ["a", "b"],
        "pair": (1, "two"),
        "nothing": None,
    }


def assert_equal_state(actual: Any, expected: Any, path: str = "") -> None:
    """Recursively compare values; tensors by dtype, shape and exact bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual)}"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{path}: dtype/shape differ"
        assert torch.equal(actual.cpu(), expected.cpu()), f"{path}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{path}: keys differ"
        for k in expected:
            assert_equal_state(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{path}: sequence differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal_state(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def wait_for(predicate, timeout_secs: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_secs
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_secs}s waiting for {what}")
        time.sleep(0.005)


class FailingHook(WriterHook):
    """Fails ``pre_commit`` for paths containing ``needle``."""

    def __init__(self, needle: str = "bad") -> None:
        self.needle = needle

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if self.needle in os.path.basename(path):
            raise OSError(28, f"injected failure for {path}")


class GateHook(WriterHook):
    """Blocks ``pre_commit`` until ``release_file`` exists (touching ``entered_file`` first), with a deadline."""

    def __init__(self, entered_file: str, release_file: str, timeout_secs: float = 60.0, only_rank: int | None = None):
        self.entered_file = entered_file
        self.release_file = release_file
        self.timeout_secs = timeout_secs
        self.only_rank = only_rank

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        rank_info = kwargs.get("rank_info")
        if self.only_rank is not None and rank_info is not None and rank_info.global_rank != self.only_rank:
            return
        with open(self.entered_file, "w"):
            pass
        wait_for(lambda: os.path.exists(self.release_file), self.timeout_secs, f"release file {self.release_file}")


def data_file(path: Any, rank: int = 0) -> Any:
    """The file holding ``rank``'s bytes: ``path`` itself (layout "file") or its rank file (layout "dir")."""
    import pathlib

    from lightning_ckpt.layout import rank_file_name

    path = pathlib.Path(path)
    return path / rank_file_name(rank) if path.is_dir() else path


def file_layout_config(**kwargs: Any) -> Any:
    """A ``CheckpointerConfig`` whose writer writes one file at the path (the Lightning layer's layout)."""
    import lightning_ckpt as lc

    return lc.CheckpointerConfig(writer_config=lc.CheckpointWriterConfig(layout="file"), **kwargs)


def wait_until(predicate: Any, timeout_secs: float, interval_secs: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_secs`` pass; returns whether it held."""
    deadline = time.monotonic() + timeout_secs
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_secs)
    return True


def stop_process(proc: subprocess.Popen, timeout_secs: float = 10.0) -> None:
    """Stop a server a test started: SIGTERM, then SIGKILL past ``timeout_secs``; its pipes are closed."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_secs)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_secs)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
