"""The commit primitive: atomic publish, no symlink followed, ownership-safe cleanup, short temp names."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from lightning_ckpt import commit as commit_mod
from lightning_ckpt import publish_lock
from lightning_ckpt.commit import Commit, CommitError, is_temp_name, remove_stale_temps

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_dir_checkpoint(c: Commit, tag: str) -> None:
    c.write_bytes("checkpoint_0.pt", tag.encode() * 100)
    c.write_bytes("MANIFEST.json", f'{{"tag": "{tag}"}}'.encode())


def _read_dir_checkpoint(path: str) -> str:
    with open(os.path.join(path, "MANIFEST.json")) as f:
        tag = re.search(r'"tag": "(\w+)"', f.read()).group(1)
    with open(os.path.join(path, "checkpoint_0.pt"), "rb") as f:
        assert f.read() == tag.encode() * 100, f"{path}: torn"
    return tag


def _temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if is_temp_name(n))


def test_file_appears_only_at_publish_and_temp_is_removed(tmp_path):
    final = tmp_path / "a.ckpt"
    with Commit.create(final) as c:
        fd = c.open_new()
        os.write(fd, b"hello")
        os.close(fd)
        assert not final.exists()
        assert is_temp_name(os.path.basename(os.path.dirname(c.path)))
        c.publish()
        assert final.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_replacing_a_file_keeps_old_blocks_until_close(tmp_path):
    final = tmp_path / "a.ckpt"
    final.write_bytes(b"old")
    with Commit.create(final) as c:
        c.write_bytes(None, b"new")
        c.publish()
        assert final.read_bytes() == b"new"
        replaced = os.path.join(os.path.dirname(c.path), commit_mod.REPLACED_NAME)
        with open(replaced, "rb") as f:
            assert f.read() == b"old"
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_exception_inside_the_block_leaves_nothing(tmp_path):
    final = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with Commit.create(final, directory=True) as c:
            c.write_bytes("x", b"1")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_replacing_a_directory_swaps_it_in_one_step(tmp_path):
    final = tmp_path / "ckpt"
    with Commit.create(final, directory=True) as c:
        _write_dir_checkpoint(c, "old")
        c.publish()
    with Commit.create(final, directory=True) as c:
        _write_dir_checkpoint(c, "new")
        c.publish()
        assert _read_dir_checkpoint(str(final)) == "new"
        # the replaced checkpoint waits, complete, in the temp until close
        assert _read_dir_checkpoint(os.path.join(os.path.dirname(c.path), commit_mod.REPLACED_NAME)) == "old"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_publish_over_a_directory_with_a_file_or_link(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / "last.ckpt" / "junk").write_bytes(b"x")
    (tmp_path / "target.ckpt").write_bytes(b"t")
    with Commit.create(tmp_path / "last.ckpt") as c:
        c.symlink("target.ckpt")
        c.publish()
    assert os.readlink(tmp_path / "last.ckpt") == "target.ckpt"
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "target.ckpt"]


@pytest.mark.parametrize("directory", [False, True])
def test_a_250_byte_final_name_works(tmp_path, directory):
    final = tmp_path / ("n" * 245 + ".ckpt")
    assert len(final.name.encode()) == 250
    with Commit.create(final, directory=directory) as c:
        c.write_bytes("f" if directory else None, b"ok")
        c.publish()
    assert final.exists()
    assert all(len(n) <= 26 for n in _temps(tmp_path)) and os.listdir(tmp_path) == [final.name]


def test_temp_names_are_not_taken_for_checkpoints_by_lightning(tmp_path):
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    c = Commit.create(tmp_path / "hpc_ckpt_33.ckpt")  # left behind, as by a killed job
    c.write_bytes(None, b"partial")
    name = os.path.basename(os.path.dirname(c.path))
    assert not any(p in name for p in ("hpc_ckpt_", "ckpt_", "epoch=", "step=", "last")) and not name.endswith(".ckpt")
    # Lightning's HPC resume scan sees no version; its next save name is hpc_ckpt_1
    assert _CheckpointConnector.hpc_save_path(str(tmp_path)).endswith("hpc_ckpt_1.ckpt")
    c.abort()


def test_planted_symlink_at_the_temp_name_is_never_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep")
    shared = tmp_path / "shared"
    shared.mkdir()
    tokens = iter(["0123456789abcdef", "fedcba9876543210"])
    monkeypatch.setattr(commit_mod.secrets, "token_hex", lambda n: next(tokens))
    os.symlink(victim, shared / commit_mod.temp_name("0123456789abcdef"))
    with Commit.create(shared / "ckpt", directory=True) as c:
        assert c.token == "fedcba9876543210"
        _write_dir_checkpoint(c, "new")
        c.publish()
    assert remove_stale_temps(str(shared)) == []  # the planted link is not ours: left alone
    assert os.listdir(victim) == ["precious"] and (victim / "precious").read_bytes() == b"keep"
    assert _read_dir_checkpoint(str(shared / "ckpt")) == "new"


def test_join_refuses_a_symlink_and_a_bad_token(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, tmp_path / commit_mod.temp_name("00000000000000aa"))
    with pytest.raises(CommitError):
        Commit.join(tmp_path / "ckpt", "00000000000000aa")
    with pytest.raises(ValueError):
        Commit.join(tmp_path / "ckpt", "../victim")
    assert os.listdir(victim) == []


def test_joined_rank_writes_into_the_creator_temp(tmp_path):
    final = tmp_path / "ckpt"
    with Commit.create(final, directory=True) as owner:
        with Commit.join(final, owner.token) as peer:
            peer.write_bytes("checkpoint_1.pt", b"rank1")
            with pytest.raises(CommitError):
                peer.publish()
        owner.write_bytes("checkpoint_0.pt", b"rank0")
        owner.publish()
    assert sorted(os.listdir(final)) == ["checkpoint_0.pt", "checkpoint_1.pt"]
    assert os.listdir(tmp_path) == ["ckpt"]


def test_temp_of_another_user_is_never_removed(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    other = tmp_path / commit_mod.temp_name("1111111111111111")
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    assert remove_stale_temps(str(tmp_path)) == [] and other.is_dir()


_HOLDER = """
import sys
from lightning_ckpt.commit import Commit
c = Commit.create(sys.argv[1], directory=True)
c.write_bytes("checkpoint_0.pt", b"partial")
print(c.token, flush=True)
sys.stdin.read()  # hold the temp until the test closes our stdin or kills us
"""


def _holder(final: str, prefix: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(prefix + [sys.executable, "-c", _HOLDER, final], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    token = proc.stdout.readline().strip()
    assert token, "holder did not start"
    return proc, token


@pytest.mark.parametrize("namespace", ["same", "other_pid_namespace"])
def test_live_temp_of_another_process_is_kept_and_removed_once_it_died(tmp_path, namespace):
    prefix = []
    if namespace == "other_pid_namespace":
        if subprocess.run(["unshare", "--fork", "--pid", "true"], capture_output=True).returncode != 0:
            pytest.skip("cannot create a PID namespace here")
        prefix = ["unshare", "--fork", "--pid", "--kill-child"]
    proc, token = _holder(str(tmp_path / "ckpt"), prefix)
    try:
        assert remove_stale_temps(str(tmp_path)) == []
        assert _temps(tmp_path) == [commit_mod.temp_name(token)]
    finally:
        proc.kill()
        proc.wait()
    if namespace == "other_pid_namespace":  # --kill-child: the holder dies with unshare; wait for its lock to go
        subprocess.run(["flock", "-x", "-w", "30", str(tmp_path / commit_mod.temp_name(token) / "lock"), "true"],
                       check=True)
    assert remove_stale_temps(str(tmp_path)) == [commit_mod.temp_name(token)]
    assert os.listdir(tmp_path) == []


_CRASHER = """
import os, signal, sys
from lightning_ckpt import commit as cm
final, mode, tag = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "fallback":
    cm._RENAMEAT2 = None  # a filesystem without RENAME_EXCHANGE: two renames
real_rename = os.rename
def rename(src, dst, **kw):
    real_rename(src, dst, **kw)
    if mode == "fallback" and dst == cm.ASIDE_NAME:
        os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
if mode == "exchange":
    real_exchange = cm._renameat2
    def exchange(*a):
        real_exchange(*a)
        os.kill(os.getpid(), signal.SIGKILL)  # swapped, the replaced checkpoint not yet removed
    cm._renameat2 = exchange
os.rename = rename
c = cm.Commit.create(final, directory=True)
c.write_bytes("checkpoint_0.pt", tag.encode() * 100)
c.write_bytes("MANIFEST.json", ('{"tag": "%s"}' % tag).encode())
c.publish()
"""


@pytest.mark.parametrize("mode", ["fallback", "exchange"])
def test_crash_between_renames_keeps_a_complete_checkpoint(tmp_path, mode):
    final = tmp_path / "ckpt"
    with Commit.create(final, directory=True) as c:
        _write_dir_checkpoint(c, "old")
        c.publish()
    proc = subprocess.run([sys.executable, "-c", _CRASHER, str(final), mode, "new"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(_temps(tmp_path)) == 1
    if mode == "exchange":
        assert _read_dir_checkpoint(str(final)) == "new"
    else:
        assert not final.exists()  # the instant the fallback cannot avoid; the committed one is in the temp
    # the next writer's cleanup never deletes the only complete checkpoint: it puts it back
    remove_stale_temps(str(tmp_path))
    assert os.listdir(tmp_path) == ["ckpt"]
    assert _read_dir_checkpoint(str(final)) == ("new" if mode == "exchange" else "old")


def test_cleanup_removes_half_made_temps_of_dead_writers(tmp_path):
    lockless = tmp_path / commit_mod.temp_name("2222222222222222")
    lockless.mkdir(mode=0o700)  # a writer died between mkdir and creating its lock
    dead = Commit.create(tmp_path / "x.ckpt")
    dead.write_bytes(None, b"half")
    name = commit_mod.temp_name(dead.token)
    os.close(dead._lock_fd)  # as if its process died: the lock is released
    dead._lock_fd = os.open(os.devnull, os.O_RDONLY)
    assert sorted(remove_stale_temps(str(tmp_path))) == sorted([lockless.name, name])
    dead._closed = True
    for fd in (dead._lock_fd, dead._tmp_fd, dead._parent_fd):
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_stale_cleanup_ignores_names_that_are_not_temps(tmp_path):
    for n in (".lckpt-zz.tmp", "a.ckpt", ".lckpt-0123456789abcdef.tmp.ckpt"):
        (tmp_path / n).mkdir()
    assert remove_stale_temps(str(tmp_path)) == []
    assert len(os.listdir(tmp_path)) == 3
    assert is_temp_name(".lckpt-0123456789abcdef.tmp") and not is_temp_name(".lckpt-0123456789ABCDEF.tmp")



def test_a_publish_cannot_fall_between_an_orphans_check_and_its_rename(tmp_path, monkeypatch):
    """``only_if_unchanged`` compares and renames as one step against every other publish into the directory.

    The newer save's publish is started right after the orphaned writer's comparison found the path unchanged:
    without the directory lock it lands first and the orphan's rename then replaces it with the older checkpoint.
    """
    import threading

    final = tmp_path / "last.ckpt"
    final.write_bytes(b"previous run")
    orphan = Commit.create(final)
    orphan.write_bytes(None, b"older save of the orphaned writer")
    newer = Commit.create(final)
    newer.write_bytes(None, b"newer save of the next run")
    racer = threading.Thread(target=newer.publish, daemon=True)
    real_identity = commit_mod._identity

    def identity_then_race(st):
        result = real_identity(st)
        if threading.current_thread() is threading.main_thread() and not racer.is_alive() and racer.ident is None:
            racer.start()
            racer.join(timeout=0.5)  # the newer publish gets every chance to land in the window
        return result

    monkeypatch.setattr(commit_mod, "_identity", identity_then_race)
    orphan.publish(only_if_unchanged=True)
    racer.join(timeout=10)
    assert not racer.is_alive()
    assert newer.published
    assert final.read_bytes() == b"newer save of the next run"
    orphan.close()
    newer.close()
    assert _temps(tmp_path) == []


def test_publish_goes_on_unlocked_where_the_filesystem_has_no_flock(tmp_path, monkeypatch):
    """A filesystem that refuses ``flock``: the publish still happens, and leaves no lock file."""
    def no_flock(fd, op):
        raise OSError(95, "Operation not supported")

    final = tmp_path / "a.ckpt"
    final.write_bytes(b"old")
    c = Commit.create(final)
    c.write_bytes(None, b"new")
    monkeypatch.setattr(commit_mod.fcntl, "flock", no_flock)
    c.publish(only_if_unchanged=True)
    monkeypatch.undo()
    c.close()
    assert final.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["a.ckpt", publish_lock.publish_lock_name()])  # only a holder
    # may unlink it; the next publish takes the same file


def test_a_lock_error_of_one_publish_never_removes_the_lock_another_holds(tmp_path, monkeypatch):
    """NFS lockd's ENOLCK (or a full lock table) in one publish: it goes on unlocked, and the lock file another
    publish holds stays, so a third publish still waits for that holder instead of locking a new file beside it."""
    import errno
    import threading

    parent_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    real_flock, failing = publish_lock.fcntl.flock, threading.local()

    def flock(fd, op):
        if getattr(failing, "on", False):
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, op)

    monkeypatch.setattr(publish_lock.fcntl, "flock", flock)
    monkeypatch.setattr(publish_lock, "PUBLISH_LOCK_SECS", 1.0)
    holder = publish_lock.PublishLock(parent_fd, str(tmp_path / "a.ckpt"))
    try:
        with holder:
            def unlucky():
                failing.on = True
                with publish_lock.PublishLock(parent_fd, str(tmp_path / "a.ckpt")) as lock:
                    assert lock._fd is None  # unlocked
            racer = threading.Thread(target=unlucky)
            racer.start()
            racer.join(timeout=10)
            assert os.path.exists(tmp_path / publish_lock.publish_lock_name())
            with publish_lock.PublishLock(parent_fd, str(tmp_path / "a.ckpt")) as third:
                assert third._fd is None, "two publishes held the lock at once"  # it waited 1 s, then gave up
    finally:
        os.close(parent_fd)


def test_an_error_after_locking_releases_the_lock(tmp_path, monkeypatch):
    """A stale handle (ESTALE) or an interrupt right after the flock: the descriptor is closed, so the lock is not
    held for the rest of the process (every later publish would wait ``PUBLISH_LOCK_SECS`` for it)."""
    import errno

    parent_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    real_still_named, calls = publish_lock.PublishLock._still_named, []

    def stale_once(self, fd):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_still_named(self, fd)

    try:
        monkeypatch.setattr(publish_lock.PublishLock, "_still_named", stale_once)
        with publish_lock.PublishLock(parent_fd, str(tmp_path / "a.ckpt")) as first:
            assert first._fd is None  # unlocked, not an error
        monkeypatch.undo()
        monkeypatch.setattr(publish_lock, "PUBLISH_LOCK_SECS", 60.0)
        with publish_lock.PublishLock(parent_fd, str(tmp_path / "a.ckpt")) as second:
            assert second._fd is not None  # at once: nothing holds it
        held = [f for f in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{f}").endswith(publish_lock.publish_lock_name())]
        assert held == []
    finally:
        os.close(parent_fd)


_HOLD_DIR_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "sh" else fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("kind", ["sh", "ex"])
def test_a_users_flock_on_the_checkpoint_directory_does_not_stall_publishes(tmp_path, caplog, monkeypatch, kind):
    """``flock ckpts/ python train.py`` (or any tool locking the directory) must not hold up a save's publish:
    the publish lock is a file of ours, never the user's directory."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_DIR_FLOCK, str(tmp_path), kind],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(publish_lock, "PUBLISH_LOCK_SECS", 2.0)  # a publish that waits gives up and warns
        final = tmp_path / "a.ckpt"
        with caplog.at_level("DEBUG", logger=commit_mod.__name__):
            for i in range(3):
                with Commit.create(final) as c:
                    c.write_bytes(None, b"v%d" % i)
                    c.publish(only_if_unchanged=i == 0)
        assert final.read_bytes() == b"v2"
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # never waited out
        assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_a_planted_lock_name_is_never_followed_or_used(tmp_path):
    """A symlink (or another user's file) at the lock name: the publish goes on unlocked and touches nothing else."""
    target = tmp_path / "elsewhere"
    os.symlink(target, tmp_path / publish_lock.publish_lock_name())
    final = tmp_path / "a.ckpt"
    with Commit.create(final) as c:
        c.write_bytes(None, b"new")
        c.publish()
    assert final.read_bytes() == b"new"
    assert not target.exists()
    assert os.path.islink(tmp_path / publish_lock.publish_lock_name())


def test_a_waiter_that_opened_the_lock_file_before_its_holder_removed_it_takes_the_current_one(tmp_path,
                                                                                                  monkeypatch):
    """The holder unlinks the lock file while holding it: a waiter that locks the unlinked file must not count it
    as held (a third publish could lock a new file of that name at the same time)."""
    parent_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    name = publish_lock.publish_lock_name()
    stale_fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600, dir_fd=parent_fd)
    os.unlink(name, dir_fd=parent_fd)  # as a holder does on leaving, after this waiter opened it
    lock = publish_lock.PublishLock(parent_fd, str(tmp_path / "a.ckpt"))
    real_open = lock._open
    opened = []

    def open_stale_first():
        opened.append(len(opened))
        return stale_fd if len(opened) == 1 else real_open()

    monkeypatch.setattr(lock, "_open", open_stale_first)
    try:
        with lock:
            assert len(opened) == 2
            held = os.fstat(lock._fd)
            named = os.stat(name, dir_fd=parent_fd)
            assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
        assert not os.path.exists(tmp_path / name)
    finally:
        os.close(parent_fd)


def test_cleanup_removes_a_publish_lock_left_by_a_killed_publish_but_not_a_held_one(tmp_path):
    name = publish_lock.publish_lock_name()
    (tmp_path / name).write_bytes(b"")  # its publish was killed between creating and removing it
    (tmp_path / "a.ckpt").write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys; f=open(sys.argv[1],'r+');"
                               "fcntl.flock(f,fcntl.LOCK_EX); print('held',flush=True); sys.stdin.read()",
                               str(tmp_path / name)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert remove_stale_temps(str(tmp_path)) == []  # a live publish holds it
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert remove_stale_temps(str(tmp_path)) == [name]
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_a_replaced_checkpoint_that_cannot_be_removed_yet_does_not_fail_the_publish(tmp_path, monkeypatch):
    """NFS: a reader holding the replaced directory's files keeps it non-empty; the commit already happened."""
    final = tmp_path / "ckpt"
    with Commit.create(final, directory=True) as c:
        _write_dir_checkpoint(c, "old")
        c.publish()
    real_rmtree = commit_mod.shutil.rmtree

    def busy_rmtree(*args, **kwargs):
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(commit_mod.shutil, "rmtree", busy_rmtree)
    c = Commit.create(final, directory=True)
    _write_dir_checkpoint(c, "new")
    c.publish()
    c.close()  # must not raise: the new checkpoint is published
    assert _read_dir_checkpoint(str(final)) == "new"
    assert len(_temps(tmp_path)) == 1  # the replaced one waits for a later cleanup
    monkeypatch.setattr(commit_mod.shutil, "rmtree", real_rmtree)
    assert len(remove_stale_temps(str(tmp_path))) == 1
    assert _temps(tmp_path) == []
    assert _read_dir_checkpoint(str(final)) == "new"
