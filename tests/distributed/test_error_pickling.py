"""Every error of ``lightning_ckpt.errors`` survives pickling (how torch.distributed gathers them from the ranks)."""

from __future__ import annotations

import inspect
import pickle

import pytest

from lightning_ckpt import errors


def _error_classes() -> list[type]:
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, BaseException) and obj.__module__ == errors.__name__]


def _make(cls: type) -> BaseException:
    """An instance with every constructor parameter filled (keyword-only fields included)."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no __init__ of its own: a builtin exception's (message) signature
        params = []
    kwargs = {p.name: f"{p.name}-value" for p in params if p.kind is p.KEYWORD_ONLY}
    return cls(f"{cls.__name__} happened", **kwargs)


def test_the_hierarchy_is_found():
    names = {cls.__name__ for cls in _error_classes()}
    assert {"CheckpointError", "CorruptCheckpointError", "BarrierTimeoutError", "WriterProcessDiedError"} <= names


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_error_survives_pickling_with_its_fields(cls):
    exc = _make(cls)
    exc.failed_ranks = [1]  # attributes added after construction travel too
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)


def test_corrupt_checkpoint_error_keeps_path_key_and_checksums():
    exc = errors.CorruptCheckpointError("bad chunk", path="/ckpt/__1_0.distcp", key="w", expected="aa", actual="bb")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.path, back.key, back.expected, back.actual) == ("/ckpt/__1_0.distcp", "w", "aa", "bb")


def test_restated_error_keeps_type_and_fields():
    exc = errors.CorruptCheckpointError("bad chunk", path="p", key="k", expected="a", actual="b")
    again = errors.restated(exc, "rank 1: bad chunk")
    assert type(again) is errors.CorruptCheckpointError and str(again) == "rank 1: bad chunk"
    assert (again.path, again.key, again.expected, again.actual) == ("p", "k", "a", "b")
    assert isinstance(errors.restated(errors.BarrierTimeoutError("t"), "rank 0: t"), TimeoutError)
