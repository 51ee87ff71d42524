"""A local GCS server for the gs:// tests: ``gcp-storage-emulator`` (in memory) in a subprocess on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tests._helpers import stop_process, wait_until

STARTUP_TIMEOUT_SECS = 60.0
REQUEST_TIMEOUT_SECS = 10.0
# The environment of a gs:// test (its writer processes inherit it): gcsfs's experimental subclass would probe
# every bucket for 60 s, and google-auth would ask a metadata server outside this machine.
TEST_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}


@dataclass
class GCSServer:
    """A running emulator: its endpoint, and a few JSON API calls for the tests (standard library only)."""

    proc: subprocess.Popen
    endpoint: str

    def create_bucket(self, name: str) -> None:
        self._request("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode(),
                      {"Content-Type": "application/json"})

    def keys(self, bucket: str) -> list[str]:
        listing = json.loads(self._request("GET", f"/storage/v1/b/{bucket}/o"))
        return sorted(item["name"] for item in listing.get("items", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self._request("GET", f"/storage/v1/b/{bucket}/o/{_quote(key)}?alt=media")

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._request("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={_quote(key)}", data,
                      {"Content-Type": "application/octet-stream"})

    def answers(self) -> bool:
        try:
            self._request("GET", "/")
            return True
        except OSError:
            return False

    def _request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.endpoint + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECS) as response:
            return response.read()


def _quote(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable_reason() -> str | None:
    """Why the gs:// tests cannot run here, or None."""
    for module in ("gcsfs", "gcp_storage_emulator"):
        if importlib.util.find_spec(module) is None:
            return f"the gs:// tests need {module} (pip install -e '.[test]')"
    return None


def start_server() -> GCSServer:
    """Start the emulator and wait (bounded) until it answers.

    Raises:
        RuntimeError: it exited or did not answer in time (the message has the end of its output).
    """
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
         "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    server = GCSServer(proc, f"http://127.0.0.1:{port}")
    if not wait_until(lambda: proc.poll() is not None or server.answers(), STARTUP_TIMEOUT_SECS, 0.2) \
            or proc.poll() is not None:
        stop_server(server)
        error = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
        raise RuntimeError(f"gcp-storage-emulator did not start (exit {proc.poll()}): {error}")
    return server


def stop_server(server: GCSServer) -> None:
    stop_process(server.proc)
