"""The ``lightning-ckpt`` command line: verify, inspect and find the newest checkpoint after a crash."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_REMOTE_HELP = ("Paths may be remote URLs (s3://bucket/key, gs://bucket/key) or file:// URLs. A remote store is "
                "reached as the plugins reach it, through the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE (any S3-compatible store); GOOGLE_APPLICATION_CREDENTIALS, "
                "STORAGE_EMULATOR_HOST (GCS). A remote checkpoint is downloaded to check it (into "
                "$LIGHTNING_CKPT_CACHE_DIR, removed afterwards), also with --quick.")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0: all good, 1: a check failed or nothing found)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-ckpt", description="Check lightning_ckpt checkpoints without loading them into a model.",
        epilog=_REMOTE_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="check checksums and manifests; exit 0 only when every path verifies")
    verify.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or directories, or their URLs")
    verify.add_argument("--quick", action="store_true", help="check structure, manifest and pickle only, not tensors")
    verify.set_defaults(run=_verify)

    inspect = sub.add_parser("inspect", help="keys, shapes, dtypes, bytes, epoch/step, versions, checksum status")
    inspect.add_argument("path", metavar="PATH", help="a checkpoint file or directory, or its URL")
    inspect.add_argument("--rank", type=_rank, default=0,
                         help="which rank's file of a directory (default 0; one the checkpoint lacks is an error)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=_inspect)

    latest = sub.add_parser("latest", help="print the newest complete checkpoint in DIR (as find_latest)")
    latest.add_argument("dir", metavar="DIR", help="a directory, or a remote prefix (s3://bucket/run)")
    latest.add_argument("--filename", type=_filename_pattern, default="step={step}",
                        help="the name pattern, with {step} and/or {epoch} (default: step={step}; .ckpt optional)")
    latest.add_argument("--verify", action="store_true", help="also hash every tensor of the candidate")
    latest.set_defaults(run=_latest)
    return parser


def _rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rank is an integer >= 0, got {text!r}") from None
    if rank < 0:
        raise argparse.ArgumentTypeError(f"a rank is an integer >= 0, got {rank}")
    return rank


def _filename_pattern(text: str) -> str:
    """``text`` if ``latest`` can find the checkpoints it names (``latest.check_pattern``)."""
    from lightning_ckpt.latest import check_pattern

    try:
        check_pattern(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _verify(args: argparse.Namespace) -> int:
    from lightning_ckpt.integrity import check_checkpoint

    failed = 0
    for path in args.paths:
        result = check_checkpoint(path, deep=not args.quick)
        failed += not result.ok
        detail = f"  {result.detail}" if result.detail else ""
        size = f"  ({result.hashed_bytes} bytes hashed)" if result.hashed_bytes else ""
        print(f"{result.status.upper():<11} {path}{size}{detail}")
    return EXIT_FAILED if failed else EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from lightning_ckpt.integrity import describe_checkpoint

    try:
        info = describe_checkpoint(args.path, rank=args.rank)
    except ValueError as e:  # a rank the checkpoint lacks
        print(f"lightning-ckpt inspect: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print(_format(info))
    return EXIT_OK if info["status"] in ("verified", "complete", "unverified") else EXIT_FAILED


def _format(info: dict[str, Any]) -> str:
    lines = [f"path:     {info['path']}", f"status:   {info['status']}" + (f" ({info['detail']})" if info["detail"] else "")]
    lines.append(f"bytes:    {info['bytes']} in {len(info['files'])} file(s)")
    if "chunks" in info:
        lines.append(f"chunks:   {info['chunks']} ({info['chunk_bytes']} bytes; a sharded DCP checkpoint)")
    for key in ("world_size", "epoch", "global_step", "step"):
        if key in info:
            lines.append(f"{key + ':':<9} {info[key]}")
    if info.get("versions"):
        lines.append("versions: " + ", ".join(f"{k}={v}" for k, v in info["versions"].items() if v is not None))
    if "structure" in info:
        lines.append(f"structure {info['structure']}")
    tensors = info.get("tensors", [])
    if tensors:
        lines.append(f"tensors:  {len(tensors)}")
        width = max(len(t["key"]) for t in tensors)
        for t in tensors:
            shape = "x".join(map(str, t["shape"])) if "shape" in t else "?"
            dtype = t.get("dtype", "?")
            nbytes = t.get("bytes", t.get("storage_bytes"))
            lines.append(f"  {t['key']:<{width}}  {dtype:<10} {shape:<16} {nbytes} bytes")
    return "\n".join(lines)


def _latest(args: argparse.Namespace) -> int:
    from lightning_ckpt.errors import CheckpointError
    from lightning_ckpt.latest import find_latest_checkpoint

    filename = args.filename[: -len(".ckpt")] if args.filename.endswith(".ckpt") else args.filename
    try:
        path = find_latest_checkpoint(args.dir, filename, verify=args.verify)
    except (OSError, CheckpointError) as e:
        print(f"{args.dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if path is None:
        missing = "://" not in args.dir and not os.path.isdir(args.dir)
        print(f"{args.dir} is not a directory" if missing else
              f"no complete checkpoint named {args.filename!r} in {args.dir}", file=sys.stderr)
        return EXIT_FAILED
    print(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
