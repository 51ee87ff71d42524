"""The many-small-tensors and partial-load rows of ``benchmarks.run``: run them, compute their ratios, table and plot."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from benchmarks.small_tensors import IMPLS

# Targets (issue 14), as ratios in the same run.
SMALL_TARGETS = {
    "stall_vs_torch_save": 0.5,  # ours async stall <= 0.5x torch.save of the same state
    "load_vs_torch_load": 1.0,  # our load <= torch.load of the same state
    "writer_rss_vs_file": 2.0,  # writer peak RSS <= 2x the file size + its baseline
}
TORCH = "anchor.torch_save"


def add_args(ap: argparse.ArgumentParser) -> None:
    """The CLI options of these rows."""
    ap.add_argument("--skip-small", action="store_true", help="skip the many-small-tensors and partial-load rows (--skip-micro skips them too)")
    ap.add_argument("--small-count", type=int, default=None,
                    help="tensors in the small-tensor row (default 100000; 20000 when --size-gib < 1)")
    ap.add_argument("--small-base-count", type=int, default=10_000,
                    help="the second, smaller count: per-tensor constants are the slope between the two")
    ap.add_argument("--small-impls", default=",".join(IMPLS), help="comma list of implementations")


def counts(a: argparse.Namespace) -> list[int]:
    n = a.small_count if a.small_count is not None else (100_000 if a.size_gib >= 1 else 20_000)
    return sorted({min(a.small_base_count, n), n})


def run_small(a: argparse.Namespace, scratch: str, logs: str, run_child: Callable, progress: Callable) -> dict:
    """Every implementation at every count, then the partial-load row, each in its own process."""
    rows = []
    for impl in a.small_impls.split(","):
        for count in counts(a):
            tag = f"small-{impl}-{count}"
            out, facts = run_child("benchmarks.small_tensors",
                                   ["--impl", impl, "--count", str(count), "--reps", str(a.reps), "--scratch", scratch],
                                   os.path.join(logs, tag + ".json"), os.path.join(logs, tag + ".log"), a.row_timeout)
            out.setdefault("name", impl)
            out.setdefault("count", count)
            out["machine"] = facts
            rows.append(out)
            progress(f"  small {impl} x{count}: " + ("ERROR" if out.get("error") else "skipped" if out.get("skipped")
                                                     else "ok") + f" (wall {facts['wall_s']:.0f}s)")
    partial, facts = run_child("benchmarks.small_tensors",
                               ["--impl", "partial", "--size-gib", str(a.size_gib), "--reps", str(a.reps),
                                "--scratch", scratch],
                               os.path.join(logs, "partial.json"), os.path.join(logs, "partial.log"), a.row_timeout)
    partial["machine"] = facts
    progress("  partial load: " + ("ERROR" if partial.get("error") else "ok"))
    result = {"counts": counts(a), "rows": rows, "partial": partial}
    evaluate(result)
    return result


def _med(row: dict | None, key: str) -> float | None:
    v = (row or {}).get(key)
    return v["median"] if isinstance(v, dict) else None


def _check(value: float | None, limit: float) -> dict | None:
    return None if value is None else {"value": value, "limit": limit, "pass": value <= limit}


def evaluate(result: dict) -> None:
    """Ratios against torch.save/torch.load at the largest count, per-tensor constants, the writer RSS check."""
    n_lo, n_hi = result["counts"][0], result["counts"][-1]
    ok = [r for r in result["rows"] if not r.get("error") and not r.get("skipped")]
    at = {(r["name"], r["count"]): r for r in ok}
    torch_hi = at.get((TORCH, n_hi))
    for r in ok:
        if r["count"] != n_hi:
            continue
        t: dict[str, Any] = {}
        if r["name"] != TORCH and torch_hi:
            ratio = _med(r, "stall_s") / _med(torch_hi, "stall_s")
            t["stall_vs_torch_save"] = _check(ratio, SMALL_TARGETS["stall_vs_torch_save"])
            t["load_vs_torch_load"] = _check(_med(r, "load_s") / _med(torch_hi, "load_s"),
                                             SMALL_TARGETS["load_vs_torch_load"])
        end, base = r.get("writer_end"), r.get("writer_base")
        if end and base:
            file_mib = r["state_bytes"] / 2**20
            t["writer_rss_vs_file"] = _check((end["peak_mib"] - base["rss_mib"]) / file_mib,
                                             SMALL_TARGETS["writer_rss_vs_file"])
        lo = at.get((r["name"], n_lo))
        if lo is not None and n_hi > n_lo:
            r["per_tensor_us"] = {k: (_med(r, k) - _med(lo, k)) / (n_hi - n_lo) * 1e6
                                  for k in ("stall_s", "durable_s", "load_s") if _med(r, k) and _med(lo, k)}
        r["targets"] = t
    p = result["partial"]
    if p.get("full_load_s") and p.get("partial_load_s"):
        p["time_vs_full"] = _med(p, "partial_load_s") / _med(p, "full_load_s")
        if p.get("partial_bytes_read") and p.get("requested_bytes"):
            p["read_vs_requested"] = p["partial_bytes_read"] / p["requested_bytes"]


def _fmt(summary: dict | None) -> str:
    return "-" if not summary else f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def _fmt_check(c: dict | None) -> str:
    return "-" if not c else f"{c['value']:.2f} {'ok' if c['pass'] else 'FAIL'}"


def table(result: dict, render: Callable[[list[str], list[list[str]]], str]) -> str:
    """The small-tensor table (largest count; per-tensor constants from both counts) and the partial-load line."""
    header = ["row", "tensors", "stall s", "durable s", "load s (cold)", "writer peak/base MiB", "us/tensor stall",
              "us/tensor load", "stall/torch.save", "load/torch.load", "rss/file"]
    body, notes = [], []
    for r in result["rows"]:
        if r["count"] != result["counts"][-1]:
            continue
        if r.get("error") or r.get("skipped"):
            body.append([r["name"], str(r["count"]), "ERROR" if r.get("error") else "skipped"] + ["-"] * 8)
            notes.append(f"{r['name']}: {(r.get('skipped') or r['error']).strip().splitlines()[-1]}")
            continue
        t, per = r.get("targets") or {}, r.get("per_tensor_us") or {}
        end, base = r.get("writer_end"), r.get("writer_base")
        body.append([r["name"], str(r["count"]), _fmt(r.get("stall_s")), _fmt(r.get("durable_s")), _fmt(r.get("load_s")),
                     f"{end['peak_mib']:.0f}/{base['rss_mib']:.0f}" if end and base else "-",
                     f"{per['stall_s']:.1f}" if "stall_s" in per else "-",
                     f"{per['load_s']:.1f}" if "load_s" in per else "-",
                     *(_fmt_check(t.get(k)) for k in ("stall_vs_torch_save", "load_vs_torch_load", "writer_rss_vs_file"))])
    text = render(header, body) + "".join(f"\nnote: {n}" for n in notes)
    p = result["partial"]
    if p.get("error"):
        return text + f"\npartial load: ERROR {p['error'].strip().splitlines()[-1]}"
    mib = 2**20
    return text + (
        f"\npartial load (state_dict only of a {p['file_bytes'] / mib:.0f} MiB checkpoint): "
        f"{_fmt(p.get('partial_load_s'))} s vs full {_fmt(p.get('full_load_s'))} s "
        f"(= {p.get('time_vs_full', float('nan')):.2f}x); read {p['partial_bytes_read'] / mib:.1f} MiB for "
        f"{p['requested_bytes'] / mib:.1f} MiB requested (full read {p['full_bytes_read'] / mib:.1f} MiB; "
        f"disk read_bytes partial {(p.get('partial_disk_read_bytes') or 0) / mib:.1f} MiB, "
        f"full {(p.get('full_disk_read_bytes') or 0) / mib:.1f} MiB)")


def plot_panel(ax: Any, result: dict) -> None:
    """Stall, durable and load per implementation at the largest count, with torch.save/torch.load as lines."""
    rows = [r for r in result["rows"] if r["count"] == result["counts"][-1] and not r.get("error")
            and not r.get("skipped")]
    for j, (key, colour) in enumerate((("stall_s", "tab:blue"), ("durable_s", "tab:orange"), ("load_s", "tab:green"))):
        meds = [_med(r, key) or 0 for r in rows]
        ax.barh([i + (j - 1) * 0.27 for i in range(len(rows))], meds, height=0.25, color=colour,
                label=key.replace("_s", ""))
    torch_row = next((r for r in rows if r["name"] == TORCH), None)
    if torch_row:
        ax.axvline(_med(torch_row, "stall_s"), color="tab:blue", linestyle="--", label="torch.save")
        ax.axvline(_med(torch_row, "load_s"), color="tab:green", linestyle=":", label="torch.load")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"{result['counts'][-1]} small tensors (per-parameter optimizer state)")
    ax.legend(loc="lower right", fontsize=8)
