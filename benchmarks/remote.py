"""Remote row: saving one checkpoint to an S3 server on 127.0.0.1 (moto, started here), ours against Lightning's.

    python -m benchmarks.remote --size-mib 128 --reps 2            # prints a table; --json PATH writes the rows

Rows (same state, same server, one fresh object key per save):

* ``floor.s3_put``            one PutObject of the state's bytes (already serialized): what the server ingests.
* ``anchor.torch_io``         Lightning ``TorchCheckpointIO().save_checkpoint(state, "s3://...")``: ``torch.save``
                              into memory on the caller thread, then ``fs.pipe`` through s3fs; stall = durable.
* ``anchor.lightning_async``  Lightning ``AsyncCheckpointIO(TorchCheckpointIO())``: stall = the same-device clone;
                              durable = ``teardown()`` (its only drain).
* ``ours.plugin_async``       ``lightning_ckpt.lightning.AsyncCheckpointIO``: stall = ``save_checkpoint`` returns;
                              durable = ``wait_for_saves()`` returns (the multipart upload is complete).

Ratios are of medians in this run: ours / anchor for stall and durable, and durable / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any, Callable

from benchmarks.common import MiB, make_state, summarize, tensor_bytes

STARTUP_TIMEOUT_SECS = 60.0
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a subprocess on 127.0.0.1 (its own process: it does not share this one's GIL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECS
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"moto did not start within {STARTUP_TIMEOUT_SECS:.0f} s (exit {proc.poll()})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Rows:
    """The rows above over one bucket; every ``run_*`` returns ``(stall_s, durable_s)`` of one save."""

    def __init__(self, endpoint: str, bucket: str, state: dict[str, Any], blob: bytes) -> None:
        import boto3

        self.endpoint, self.bucket, self.state, self.blob = endpoint, bucket, state, blob
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}/{uuid.uuid4().hex[:8]}.ckpt"

    def floor(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.client.put_object(Bucket=self.bucket, Key=f"floor/{uuid.uuid4().hex[:8]}", Body=self.blob)
        took = time.perf_counter() - t0
        return took, took

    def torch_io(self) -> tuple[float, float]:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        t0 = time.perf_counter()
        TorchCheckpointIO().save_checkpoint(self.state, self.url("torch_io"))
        took = time.perf_counter() - t0
        return took, took

    def lightning_async(self) -> tuple[float, float]:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        io = AsyncCheckpointIO(TorchCheckpointIO())
        t0 = time.perf_counter()
        io.save_checkpoint(self.state, self.url("lightning_async"))
        stall = time.perf_counter() - t0
        io.teardown()
        return stall, time.perf_counter() - t0

    def ours(self, io: Any) -> tuple[float, float]:
        # A new step each save: the plugin turns a save of the previous step's unchanged weights (ModelCheckpoint's
        # save_last=True) into a server-side copy, which is not what this row measures.
        self.state["global_step"] += 1
        t0 = time.perf_counter()
        io.save_checkpoint(self.state, self.url("ours"))
        stall = time.perf_counter() - t0
        io.wait_for_saves()
        return stall, time.perf_counter() - t0

    def clear(self) -> None:
        """Delete the objects written so far (moto holds them in memory)."""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=item["Key"])


def measure(fn: Callable[[], tuple[float, float]], reps: int, clear: Callable[[], None]) -> dict[str, Any]:
    """One warm-up save, then ``reps`` timed ones (the bucket emptied before each)."""
    stalls, durables = [], []
    for i in range(reps + 1):
        clear()
        stall, durable = fn()
        if i:
            stalls.append(stall)
            durables.append(durable)
    return {"stall_s": summarize(stalls), "durable_s": summarize(durables)}


def run(size_mib: float, reps: int) -> dict[str, Any]:
    import io as _io

    import torch

    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    state = make_state(int(size_mib * MiB))
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    proc, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # s3fs (the anchors) and our writer process read it
    cache = tempfile.mkdtemp(prefix="lightning_ckpt-bench-cache-")
    os.environ["LIGHTNING_CKPT_CACHE_DIR"] = cache
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        rows = Rows(endpoint, bucket, state, buffer.getvalue())
        rows.client.create_bucket(Bucket=bucket)
        from lightning_ckpt.lightning import AsyncCheckpointIO

        ours_io = AsyncCheckpointIO()
        try:
            results = {
                "floor.s3_put": measure(rows.floor, reps, rows.clear),
                "anchor.torch_io": measure(rows.torch_io, reps, rows.clear),
                "anchor.lightning_async": measure(rows.lightning_async, reps, rows.clear),
                "ours.plugin_async": measure(lambda: rows.ours(ours_io), reps, rows.clear),
            }
        finally:
            ours_io.teardown()
        rows.clear()
    finally:
        stop(proc)
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    return {"state_bytes": tensor_bytes(state), "file_bytes": len(buffer.getvalue()), "reps": reps,
            "server": "moto (127.0.0.1)", "rows": results, "ratios": ratios(results)}


def _median(results: dict[str, Any], row: str, key: str) -> float | None:
    summary = results.get(row, {}).get(key)
    return summary["median"] if summary else None


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ours_stall, ours_durable = _median(results, "ours.plugin_async", "stall_s"), \
        _median(results, "ours.plugin_async", "durable_s")
    return {
        "stall_vs_torch_io": ratio(ours_stall, _median(results, "anchor.torch_io", "stall_s")),
        "stall_vs_lightning_async": ratio(ours_stall, _median(results, "anchor.lightning_async", "stall_s")),
        "durable_vs_torch_io": ratio(ours_durable, _median(results, "anchor.torch_io", "durable_s")),
        "durable_vs_lightning_async": ratio(ours_durable, _median(results, "anchor.lightning_async", "durable_s")),
        "durable_vs_put_floor": ratio(ours_durable, _median(results, "floor.s3_put", "durable_s")),
    }


def table(result: dict[str, Any]) -> str:
    def fmt(summary: dict[str, Any] | None) -> str:
        return "-" if not summary else f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"

    lines = [f"== remote [S3, {result['server']}]  state {result['state_bytes'] / MiB:.0f} MiB, reps {result['reps']} "
             "(median (min-max) s) ==", f"{'row':<24} {'stall':<24} {'durable':<24}"]
    for name, row in result["rows"].items():
        lines.append(f"{name:<24} {fmt(row['stall_s']):<24} {fmt(row['durable_s']):<24}")
    lines += [f"{k}: {v:.3f}" if v is not None else f"{k}: -" for k, v in result["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=128, help="tensor bytes of the synthetic checkpoint")
    ap.add_argument("--reps", type=int, default=2, help="timed saves per row (after one warm-up)")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    result = run(a.size_mib, a.reps)
    print(table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
