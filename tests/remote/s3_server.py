"""A local S3 server for the tests: moto's WSGI app under werkzeug on 127.0.0.1, behind a fault-injecting middleware.

Run as a script (``python s3_server.py``); it prints ``PORT <n>`` once it listens. Control endpoints:
``POST /__faults__`` with ``{"rules": [...]}`` replaces the fault rules; ``GET /__log__`` returns the operations
seen since the last ``DELETE /__log__``. A rule: ``{"op": "UploadPart", "key": "substring", "part": 2,
"skip": 0, "times": 1, "action": "error"|"delay"|"hang"|"drop", "status": 503, "code": "SlowDown", "secs": 1.0}``.
"hang" (or "delay") waits ``secs`` before reading the request's body: a body larger than the socket buffers then
stalls its sender on a full TCP window, as a store or proxy that stops reading would. "drop" reads the whole body,
then closes the connection unanswered. "stallbody" answers with the headers and the first half of the response
body, waits ``secs``, then sends the rest (a store that pauses mid-download).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from urllib.parse import parse_qs

HANG_MAX_SECS = 60.0  # a "hang" ends by itself eventually, so no handler thread outlives a test run for long


def operation(environ: dict) -> tuple[str, str, int | None]:
    """(S3 operation name, key, part number) of a path-style request."""
    method = environ["REQUEST_METHOD"]
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    parts = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 else ""
    part = int(query["partNumber"][0]) if "partNumber" in query else None
    if not key:
        if method == "GET":
            return ("ListMultipartUploads" if "uploads" in query else "ListObjects"), key, None
        return f"{method}Bucket", key, None
    if method == "PUT":
        if "uploadId" in query:
            return ("UploadPartCopy" if "HTTP_X_AMZ_COPY_SOURCE" in environ else "UploadPart"), key, part
        return ("CopyObject" if "HTTP_X_AMZ_COPY_SOURCE" in environ else "PutObject"), key, None
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload", key, None
        if "uploadId" in query:
            return "CompleteMultipartUpload", key, None
        return "PostObject", key, None
    if method == "DELETE":
        return ("AbortMultipartUpload" if "uploadId" in query else "DeleteObject"), key, None
    return {"GET": "GetObject", "HEAD": "HeadObject"}.get(method, method), key, None


class FaultInjector:
    """WSGI middleware: records every operation and applies the first matching fault rule."""

    def __init__(self, app) -> None:
        self.app = app
        self.rules: list[dict] = []
        self.log: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/__faults__", "/__log__"):
            return self._control(path, environ, start_response)
        op, key, part = operation(environ)
        with self.lock:
            self.log.append({"op": op, "key": key, "part": part, "range": environ.get("HTTP_RANGE")})
            rule = self._match(op, key, part)
        if rule is not None:
            action = rule.get("action", "error")
            if action == "error":
                return _error(start_response, rule.get("status", 500), rule.get("code", "InternalError"))
            if action == "drop":
                return _drop(environ)
            if action == "stallbody":
                return _stall_body(self.app(environ, start_response), float(rule.get("secs", HANG_MAX_SECS)))
            time.sleep(min(float(rule.get("secs", HANG_MAX_SECS)), HANG_MAX_SECS))
        return self.app(environ, start_response)

    def _match(self, op: str, key: str, part: int | None) -> dict | None:
        for rule in self.rules:
            if rule.get("op") not in (None, op) or rule.get("key", "") not in key:
                continue
            if rule.get("part") is not None and rule["part"] != part:
                continue
            if rule.get("skip", 0) > 0:
                rule["skip"] -= 1
                continue
            times = rule.get("times")
            if times is not None:
                if times <= 0:
                    continue
                rule["times"] = times - 1
            return rule
        return None

    def _control(self, path: str, environ: dict, start_response):
        method = environ["REQUEST_METHOD"]
        body = b"{}"
        with self.lock:
            if path == "/__faults__" and method == "POST":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                self.rules = json.loads(environ["wsgi.input"].read(length) or b"{}").get("rules", [])
            elif path == "/__log__" and method == "GET":
                body = json.dumps(self.log).encode()
            elif path == "/__log__" and method == "DELETE":
                self.log = []
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def _error(start_response, status: int, code: str):
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected by the test server</Message></Error>").encode()
    start_response(f"{status} Injected", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def _stall_body(chunks, secs: float):
    body = b"".join(chunks)
    yield body[:len(body) // 2]
    time.sleep(min(secs, HANG_MAX_SECS))
    yield body[len(body) // 2:]


def _drop(environ: dict):
    """Close the connection without an answer (as a crashed proxy would), once the whole body has arrived: a client
    still sending into a half-closed connection would stall on its window instead (that is what "hang" tests)."""
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    while remaining > 0:
        chunk = environ["wsgi.input"].read(min(remaining, 1 << 20))
        if not chunk:
            break
        remaining -= len(chunk)
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
    return []


def main() -> None:
    import logging

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    app = FaultInjector(create_backend_app("s3"))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
