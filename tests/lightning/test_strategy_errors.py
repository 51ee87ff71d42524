"""What a sharded load raises names the user's checkpoint path, not the ``/proc/self/fd`` pin it reads through,
and is otherwise the same error (type, fields, message)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lightning_ckpt import CorruptCheckpointError
from lightning_ckpt.lightning.strategies import _errors_naming

pytestmark = pytest.mark.timeout(30)
USER = Path("/ckpts/step=100.ckpt")
PIN = Path("/proc/self/fd/12")


def _raised(error: BaseException) -> BaseException:
    with pytest.raises(type(error)) as caught:
        with _errors_naming(USER, PIN):
            raise error
    return caught.value


def test_this_ranks_pin_and_another_ranks_directory_pin_become_the_users_path():
    error = _raised(CorruptCheckpointError("corrupt checkpoint /proc/self/fd/12/__0_0.distcp: checksum mismatch "
                                           "(rank 1 read /proc/self/fd/31/__1_0.distcp)",
                                           path="/proc/self/fd/12/__0_0.distcp", key="w"))
    assert str(error) == (f"corrupt checkpoint {USER}/__0_0.distcp: checksum mismatch (rank 1 read "
                          f"{USER}/__1_0.distcp)")
    assert error.path == f"{USER}/__0_0.distcp" and error.key == "w"


def test_a_descriptor_path_of_a_file_and_other_numbers_stay():
    error = _raised(ValueError("read /proc/self/fd/7 and /proc/self/fd/123 at /proc/self/fd/120"))
    assert str(error) == "read /proc/self/fd/7 and /proc/self/fd/123 at /proc/self/fd/120"


def test_an_os_error_keeps_its_form():
    error = _raised(FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/self/fd/12/meta.pt"))
    assert str(error) == f"[Errno 2] No such file or directory: '{USER}/meta.pt'"
    assert error.filename2 is None


def test_the_cause_is_renamed_too_and_an_interrupt_passes_unchanged():
    try:
        try:
            raise OSError(errno.EIO, "Input/output error", "/proc/self/fd/12/__0_0.distcp")
        except OSError as inner:
            raise RuntimeError("loading /proc/self/fd/12 failed") from inner
    except RuntimeError as outer:
        error = _raised(outer)
    assert str(error) == f"loading {USER} failed" and str(USER) in str(error.__cause__)
    assert isinstance(_raised(KeyboardInterrupt()), KeyboardInterrupt)
