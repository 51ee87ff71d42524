"""The messages between a trainer and its writer process, and how one crosses the socket whole."""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

# A request frame is one length-prefixed ``send_bytes`` record: the request id, then the pickled WorkerRequest.
# The id stays readable when the pickle does not (a class the writer cannot import), so the failure reaches the
# future it belongs to instead of ending the writer.
_ID = struct.Struct("!Q")


class RequestType(Enum):
    """What a request asks of the writer (the first three are the names PyTorch's design uses)."""

    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"  # a state dict, written by the writer that checkpoint_writer_init_fn built
    TERMINATE_PROCESS = "exit"
    INIT = "init"  # the first request: run the init functions, build the writer
    ADD_BUFFER = "add_buffer"  # a staging memfd follows on the socket (SCM_RIGHTS); no response
    DROP_BUFFER = "drop_buffer"  # unmap a staging buffer the stager freed; no response
    WRITE_PREPARED = "write_prepared"  # an already pickled checkpoint whose tensor bytes are in a staging buffer
    PROGRESS = "progress"  # writer -> trainer only: a phase change within a request (e.g. waiting at a barrier)
    WRITE_SHARDS = "write_shards"  # files of staged DCP chunks into another process's directory temp; their xxh3


# Payload keys each request must carry; extra keys are allowed (PyTorch's design puts free-form data there).
PAYLOAD_KEYS: dict[RequestType, tuple[str, ...]] = {
    RequestType.PING: (),
    RequestType.WRITE_CHECKPOINT: ("state_dict", "path", "kwargs"),
    RequestType.TERMINATE_PROCESS: (),
    RequestType.INIT: ("rank_info", "niceness", "log_level", "authkey", "subprocess_init_fn", "subprocess_init_args",
                       "checkpoint_writer_init_fn", "checkpoint_writer_init_args"),
    RequestType.ADD_BUFFER: ("buffer_id", "nbytes"),
    RequestType.DROP_BUFFER: ("buffer_id",),
    RequestType.WRITE_PREPARED: ("path", "prepared", "buffer_id", "save_key", "after_commit"),
    RequestType.PROGRESS: ("phase",),
    RequestType.WRITE_SHARDS: ("path", "token", "items", "buffer_id", "fsync"),
}

# Requests the writer answers with exactly one WorkerResponse carrying the same request_id.
ANSWERED = frozenset({RequestType.PING, RequestType.WRITE_CHECKPOINT, RequestType.TERMINATE_PROCESS,
                      RequestType.INIT, RequestType.WRITE_PREPARED, RequestType.WRITE_SHARDS})

# error_type of a failed write whose staging buffer the writer could not map: the trainer sends it again.
BUFFER_MAP_ERROR = "StagingBufferMapError"


@dataclass
class WorkerRequest:
    """One request to the writer process.

    Args:
        request_type: what is asked.
        payload: the request's fields (``PAYLOAD_KEYS`` lists the required ones per type).
        request_id: matches the response; 0 for requests nobody waits for.
    """

    request_type: RequestType
    payload: dict[str, Any]
    request_id: int = 0

    def __post_init__(self) -> None:
        missing = [k for k in PAYLOAD_KEYS.get(self.request_type, ()) if k not in self.payload]
        if missing:
            raise ValueError(f"WorkerRequest({self.request_type}) payload lacks {missing}")


class SendTime:
    """A payload value computed by the link's sending thread just before the request is encoded: work that the
    thread queueing the request need not wait for (pickling a staged state dict off the training thread, waiting
    for a state dict still being staged)."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute = compute


@dataclass
class WorkerResponse:
    """The writer's answer to one request (or a ``PROGRESS`` note while it works on it).

    Args:
        request_type: the type of the request answered.
        success: whether it succeeded.
        error_msg: the writer's ``traceback.format_exc()`` text when it failed.
        payload: results (``WRITE_PREPARED``: ``{"stats": WriteStats}``; ``WRITE_SHARDS``: ``{"files": [...]}``;
            ``PROGRESS``: ``{"phase": ...}``).
        request_id: the request answered.
        error_type: the exception class name when it failed.
    """

    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: dict[str, Any] | None = None
    request_id: int = 0
    error_type: str | None = None


def encode_request(request: WorkerRequest, pickler: type[pickle.Pickler] = pickle.Pickler) -> memoryview:
    """One frame for ``Connection.send_bytes``, pickled by ``pickler`` (multiprocessing's ``ForkingPickler``
    shares torch tensors through shared memory)."""
    buf = io.BytesIO()
    buf.write(_ID.pack(request.request_id))
    pickler(buf, pickle.HIGHEST_PROTOCOL).dump(request)
    return buf.getbuffer()


def frame_request_id(frame: bytes) -> int:
    """The request id at the head of a frame.

    Raises:
        ValueError: the frame is too short to hold one.
    """
    if len(frame) < _ID.size:
        raise ValueError(f"request frame of {len(frame)} bytes holds no request id")
    return _ID.unpack_from(frame)[0]


def decode_request(frame: bytes) -> Any:
    """The object a frame carries (a ``WorkerRequest`` unless the sender is not ours); unpickling errors propagate,
    e.g. ``ModuleNotFoundError`` for an init function the writer cannot import."""
    return pickle.loads(memoryview(frame)[_ID.size:])
