"""Benchmark CLI: runs the micro rows and the end-to-end fits (each in a fresh process), prints tables, writes JSON + PNG.

    python -m benchmarks.run --size-gib 1 --reps 3 --out benchmarks/results          # full run
    python -m benchmarks.run --size-gib 0.25 --reps 2 --skip-e2e                     # quick mode (1-2 minutes)

See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import MiB, fs_type, make_scratch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Targets (DESIGN.md section 4), as ratios measured in the same run.
TARGETS = {
    "stall_vs_copy_cpu": 1.5,  # stall median <= 1.5x memcpy floor
    "stall_vs_copy_gpu": 1.2,  # stall median <= 1.2x pinned D2H floor
    "stall_vs_dcp": 0.8,  # stall median <= 0.8x DCP async_save (PROCESS) stall
    "durable_vs_write": 1.3,  # durable <= 1.3x raw write + fsync
    "load_vs_read": 1.3,  # cold load <= 1.3x cold raw read
    "mem_vs_state": 1.1,  # steady extra host memory <= 1.1x state size
    "mem_growth_vs_state": 0.05,  # flat: growth over consecutive saves <= 5% of state size
    "e2e_overhead": 0.05,  # fit with checkpoints <= 5% slower than without
    "e2e_per_save_vs_copy": 2.0,  # loop overhead per save <= 2x the memcpy floor of the checkpoint's bytes
}

DEFAULT_CONSECUTIVE_ROWS = "ours.async,ours.plugin_async"


# ----------------------------------------------------------------------------------------------------------------------
# Running rows in fresh processes
# ----------------------------------------------------------------------------------------------------------------------


def _busy_ticks() -> int | None:
    """System-wide busy CPU time in clock ticks (user+nice+system+irq+softirq+steal) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    except (OSError, ValueError):
        return None


def _children_cpu_s() -> float:
    """CPU seconds used by waited-for descendants of this process."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(module: str, args: list[str], json_path: str, log_path: str, timeout_s: float) -> tuple[Any, dict]:
    """Run ``python -m module args`` from the repo root.

    Returns ``(JSON it wrote or an error dict, machine facts)``; the facts include ``foreign_cpu``: the share of the
    machine's CPU time used by processes other than this benchmark while the child ran (noise from other work).
    """
    cmd = [sys.executable, "-m", module, *args, "--json", json_path]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0, busy0, own0 = time.perf_counter(), _busy_ticks(), _children_cpu_s()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    busy1, own = _busy_ticks(), _children_cpu_s() - own0
    facts: dict[str, Any] = {"wall_s": wall, "foreign_cpu": None}
    if busy0 is not None and busy1 is not None:
        total = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
        facts["foreign_cpu"] = max(0.0, total - own) / (wall * (os.cpu_count() or 1))
    if os.path.exists(json_path):
        with open(json_path) as f:
            return json.load(f), facts
    with open(log_path) as f:
        tail = f.read()[-3000:]
    return {"error": f"{module} exited with {rc} after {wall:.0f}s; log {log_path}:\n{tail}"}, facts


def run_micro(device: str, a: argparse.Namespace, scratch: str, logs: str) -> list[dict[str, Any]]:
    """All selected micro rows for one device, each in its own process."""
    from benchmarks.micro import ROW_NAMES

    rows: list[dict[str, Any]] = []
    selected = [r for r in ROW_NAMES if r == "floors" or a.rows == "all" or r in a.rows.split(",")]
    consecutive_rows = DEFAULT_CONSECUTIVE_ROWS if a.consecutive_rows == "ours" else a.consecutive_rows
    for name in selected:
        n_consec = a.consecutive if (consecutive_rows == "all" or name in consecutive_rows.split(",")) else 0
        args = ["--row", name, "--size-gib", str(a.size_gib), "--reps", str(a.reps), "--device", device,
                "--scratch", scratch, "--consecutive", str(n_consec)]
        tag = f"micro-{device}-{name}"
        out, facts = run_child("benchmarks.micro", args, os.path.join(logs, tag + ".json"),
                               os.path.join(logs, tag + ".log"), a.row_timeout)
        if isinstance(out, dict):
            out = [{"name": name, "kind": "floor" if name == "floors" else name.split(".")[0], "label": name,
                    "error": out["error"]}]
        for r in out:
            r["machine"] = facts
        rows += out
        _progress(f"  micro[{device}] {name}: " + ", ".join(_status(r) for r in out) + _noise(facts))
    return rows


def run_e2e(a: argparse.Namespace, scratch: str, logs: str) -> list[dict[str, Any]]:
    """All end-to-end configurations, each fit in its own process; with ``--e2e-reps`` N, N rounds through all
    configurations (interleaved, so a slow spell of the machine hits every configuration alike), and each
    configuration is represented by its fit with the median loop time."""
    from benchmarks.e2e import CONFIGS

    configs = [c for c in CONFIGS if a.e2e_configs is None or c in a.e2e_configs.split(",") or c == "none"]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for rep in range(a.e2e_reps):
        for config in configs:
            args = ["--config", config, "--param-mib", str(a.e2e_param_mib), "--steps", str(a.e2e_steps),
                    "--every", str(a.e2e_every), "--anchor-fsync", str(int(not a.e2e_no_anchor_fsync)),
                    "--scratch", scratch]
            tag = f"e2e-{config}" + (f"-{rep}" if a.e2e_reps > 1 else "")
            res, facts = run_child("benchmarks.e2e", args, os.path.join(logs, tag + ".json"),
                                   os.path.join(logs, tag + ".log"), a.row_timeout)
            res.setdefault("config", config)
            res["machine"] = facts
            runs[config].append(res)
            _progress(f"  e2e {config}{f' (round {rep + 1})' if a.e2e_reps > 1 else ''}: " + _status(res)
                      + _noise(facts))
    return [_median_fit(results) for results in runs.values()]


def _median_fit(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The fit with the median loop time (the lower one of an even count), with every fit's loop time kept."""
    ok = sorted((r for r in results if "loop_s" in r), key=lambda r: r["loop_s"])
    if not ok:
        return results[0]
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["loop_s_all"] = [r["loop_s"] for r in results if "loop_s" in r]
    chosen["foreign_cpu_all"] = [(r.get("machine") or {}).get("foreign_cpu") for r in results]
    return chosen


def run_sharded(a: argparse.Namespace, scratch: str, logs: str) -> list[dict[str, Any]] | dict[str, Any]:
    """The sharded (DCP) rows on 2 gloo ranks, in their own processes (``benchmarks.sharded``)."""
    args = ["--size-mib", str(a.sharded_mib), "--reps", str(a.reps), "--scratch", scratch]
    out, facts = run_child("benchmarks.sharded", args, os.path.join(logs, "sharded.json"),
                           os.path.join(logs, "sharded.log"), 2 * a.row_timeout)
    for r in out if isinstance(out, list) else []:
        r["machine"] = facts
    return out


def _status(r: dict[str, Any]) -> str:
    """One word about a row: ok, skipped or error."""
    return "skipped" if r.get("skipped") else "ERROR" if r.get("error") else "ok"


NOISY = 0.10  # foreign CPU share above which a row is flagged as measured on a busy machine


def _noise(facts: dict[str, Any]) -> str:
    """A warning suffix when other processes used a noticeable share of the CPU during a row."""
    f = facts.get("foreign_cpu")
    return f" (wall {facts['wall_s']:.0f}s" + (f"; NOISY: other processes used {f:.0%} of the CPU)" if f and f > NOISY
                                                else ")")


def _progress(msg: str) -> None:
    """Progress line on stderr (the CLI is the only place that prints)."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Ratios and pass/fail
# ----------------------------------------------------------------------------------------------------------------------


def _med(row: dict[str, Any] | None, key: str) -> float | None:
    """Median of a summary field of a row, or None."""
    v = (row or {}).get(key)
    return v["median"] if isinstance(v, dict) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _check(value: float | None, limit: float) -> dict[str, Any] | None:
    return None if value is None else {"value": value, "limit": limit, "pass": value <= limit}


def evaluate_micro(rows: list[dict[str, Any]], device: str, state_bytes: int) -> None:
    """Add a ``targets`` dict (ratios against floors and the DCP anchor, each with pass/fail) to every non-floor row."""
    by = {r["name"]: r for r in rows}
    gpu = device.startswith("cuda")
    copy = _med(by.get("floor.d2h_pinned" if gpu else "floor.memcpy"), "stall_s")
    write = _med(by.get("floor.write_fsync"), "durable_s")
    read = _med(by.get("floor.read_cold"), "load_s")
    read_fresh = _med(by.get("floor.read_cold_fresh"), "load_s")
    dcp = _med(by.get("anchor.dcp_async_process"), "stall_s")
    state_mib = state_bytes / MiB
    for r in rows:
        if r["kind"] == "floor" or r.get("skipped") or r.get("error"):
            continue
        stall = _med(r, "stall_s")
        t = {
            "stall_vs_copy": _check(_ratio(stall, copy), TARGETS["stall_vs_copy_gpu" if gpu else "stall_vs_copy_cpu"]),
            "stall_vs_dcp": None if r["name"] == "anchor.dcp_async_process"
            else _check(_ratio(stall, dcp), TARGETS["stall_vs_dcp"]),
            "durable_vs_write": _check(_ratio(_med(r, "durable_s"), write), TARGETS["durable_vs_write"]),
            "load_vs_read": _check(_ratio(_med(r, "load_s"), read), TARGETS["load_vs_read"]),
            "load_vs_read_fresh": _check(_ratio(_med(r, "load_s"), read_fresh), TARGETS["load_vs_read"]),
            "mem_vs_state": _check(_ratio(r.get("extra_host_mib"), state_mib), TARGETS["mem_vs_state"]),
            "mem_flat": None,
        }
        consec = r.get("consecutive")
        if consec and all(v is not None for v in consec["extra_host_mib"]):
            t["mem_flat"] = _check(_growth(consec["extra_host_mib"]) / state_mib, TARGETS["mem_growth_vs_state"])
            t["mem_vs_state_consecutive"] = _check(max(consec["extra_host_mib"]) / state_mib, TARGETS["mem_vs_state"])
        r["targets"] = t


def _growth(peaks: list[float]) -> float:
    """Growth of per-save peak memory: max of the second half minus max of the first half (0 if fewer than 2)."""
    if len(peaks) < 2:
        return 0.0
    half = len(peaks) // 2
    return max(0.0, max(peaks[half:]) - max(peaks[:half]))


def evaluate_e2e(results: list[dict[str, Any]]) -> None:
    """Add overhead ratios against the ``none`` configuration (and pass/fail) to every e2e result."""
    base = next((r for r in results if r.get("config") == "none" and "loop_s" in r), None)
    for r in results:
        if base is None or "loop_s" not in r or r is base:
            continue
        r["overhead_loop"] = r["loop_s"] / base["loop_s"] - 1
        r["overhead_fit"] = r["fit_s"] / base["fit_s"] - 1
        r["targets"] = {"e2e_overhead": _check(r["overhead_loop"], TARGETS["e2e_overhead"])}
        if r.get("saves") and base.get("memcpy_floor_s"):
            r["overhead_per_save_s"] = (r["loop_s"] - base["loop_s"]) / r["saves"]
            r["targets"]["e2e_per_save_vs_copy"] = _check(r["overhead_per_save_s"] / base["memcpy_floor_s"],
                                                          TARGETS["e2e_per_save_vs_copy"])
            if r.get("step_s") and base.get("step_s"):
                # Without the first step, which pays each process's one-time costs (the staging buffer, Adam's
                # state, a new writer): what every further save costs, the figure a long run converges to.
                later = (r["loop_s"] - r["step_s"][0]) - (base["loop_s"] - base["step_s"][0])
                r["overhead_per_later_save_s"] = later / r["saves"]


# ----------------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------------


def _fmt_s(summary: dict[str, Any] | None) -> str:
    """``median (min-max)`` in seconds, or ``-``."""
    if not summary:
        return "-"
    return f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def _fmt_check(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    return f"{c['value']:.2f} {'ok' if c['pass'] else 'FAIL'}"


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def micro_table(rows: list[dict[str, Any]]) -> str:
    """The micro table: times as median (min-max) seconds, memory in MiB, ratios with ok/FAIL."""
    header = ["row", "stall s", "done s", "durable s", "load s (cold)", "GB/s", "extra MiB",
              "stall/copy", "stall/dcp", "dur/write", "load/read", "mem/state", "flat"]
    body, notes = [], []
    for r in rows:
        if r.get("skipped") or r.get("error"):
            body.append([r["name"], "skipped" if r.get("skipped") else "ERROR"] + ["-"] * 11)
            notes.append(f"{r['name']}: {r.get('skipped') or r['error'].strip().splitlines()[-1]}")
            continue
        t = r.get("targets") or {}
        extra = r.get("extra_host_mib")
        noisy = ((r.get("machine") or {}).get("foreign_cpu") or 0) > NOISY
        body.append([
            r["name"] + (" *" if noisy else ""), _fmt_s(r["stall_s"]), _fmt_s(r["done_s"]), _fmt_s(r["durable_s"]), _fmt_s(r["load_s"]),
            f"{r['gbps']:.2f}" if r.get("gbps") else "-", f"{extra:.0f}" if extra is not None else "-",
            *(_fmt_check(t.get(k)) for k in ("stall_vs_copy", "stall_vs_dcp", "durable_vs_write", "load_vs_read",
                                             "mem_vs_state", "mem_flat")),
        ])
    text = _render(header, body)
    if any(((r.get("machine") or {}).get("foreign_cpu") or 0) > NOISY for r in rows):
        text += f"\n* other processes used more than {NOISY:.0%} of the CPU while this row ran: treat it as noisy"
    fresh = [f"{r['name']} {r['targets']['load_vs_read_fresh']['value']:.2f}" for r in rows
             if (r.get("targets") or {}).get("load_vs_read_fresh")]
    if fresh:
        text += "\nload / floor.read_cold_fresh (a cold read into newly allocated memory): " + ", ".join(fresh)
    consec = [r for r in rows if r.get("consecutive")]
    for r in consec:
        peaks = " ".join(f"{v:.0f}" for v in r["consecutive"]["extra_host_mib"])
        text += f"\n{r['name']}: extra MiB after each of {r['consecutive']['n']} consecutive saves: {peaks}"
    return text + "".join(f"\nnote: {n}" for n in notes)


def _fmt_loops(r: dict[str, Any]) -> str:
    """The loop time; with several fits, the median one and then every fit's, in the order they ran."""
    every = r.get("loop_s_all") or []
    return f"{r['loop_s']:.2f}" + (f" ({' '.join(f'{x:.2f}' for x in every)})" if len(every) > 1 else "")


def e2e_table(results: list[dict[str, Any]]) -> str:
    """The end-to-end table."""
    header = ["config", "fit s", "loop s", "overhead", "drain s", "saves", "stall/save s", "save calls s", "<=5%",
              "ovh/save s", "ovh/save/copy", "step 1 s", "later/copy"]
    body = []
    floor = next((r["memcpy_floor_s"] for r in results if r.get("memcpy_floor_s")), None)
    for r in results:
        if "loop_s" not in r:
            body.append([r["config"], "skipped" if r.get("skipped") else "ERROR"] + ["-"] * 11)
            continue
        ov = r.get("overhead_loop")
        calls = " ".join(f"{x:.2f}" for x in r.get("save_call_s", []))
        noisy = ((r.get("machine") or {}).get("foreign_cpu") or 0) > NOISY
        body.append([
            r["config"] + (" *" if noisy else ""), f"{r['fit_s']:.2f}", _fmt_loops(r), f"{ov * 100:+.1f}%" if ov is not None else "-",
            f"{r['drain_s']:.2f}", str(r["saves"]),
            f"{r['stall_per_save_s']:.3f}" if r.get("stall_per_save_s") is not None else "-", calls or "-",
            _fmt_check((r.get("targets") or {}).get("e2e_overhead")),
            f"{r['overhead_per_save_s']:.3f}" if r.get("overhead_per_save_s") is not None else "-",
            _fmt_check((r.get("targets") or {}).get("e2e_per_save_vs_copy")),
            f"{r['step_s'][0]:.2f}" if r.get("step_s") else "-",
            f"{r['overhead_per_later_save_s'] / floor:.2f}" if r.get("overhead_per_later_save_s") is not None
            and floor else "-",
        ])
    text = _render(header, body)
    base = next((r for r in results if r.get("memcpy_floor_s")), None)
    if base:
        text += (f"\nmemcpy floor of one checkpoint ({base['checkpoint_bytes'] / 2**30:.2f} GiB into a reused buffer): "
                 f"{base['memcpy_floor_s']:.3f} s; ovh/save = (loop s - loop s of none) / saves; step 1 s = the first "
                 "step (one-time costs: memory first touched, the writer's start); later/copy = the same overhead "
                 "without the first step, per save, / the memcpy floor")
    if any(((r.get("machine") or {}).get("foreign_cpu") or 0) > NOISY for r in results):
        text += f"\n* other processes used more than {NOISY:.0%} of the CPU while this fit ran: treat it as noisy"
    for r in results:
        if r.get("skipped") or r.get("error"):
            text += f"\nnote: {r['config']}: {(r.get('skipped') or r['error']).strip().splitlines()[-1]}"
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: str) -> str | None:
    """Write a PNG summary; returns None on success or the reason it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: plot skipped"
    tables = result["micro"]
    panels = len(tables) + (1 if result.get("consecutive_plot") else 0) + (1 if result.get("e2e") else 0)
    panels += 1 if result.get("small") else 0
    if not panels:
        return "nothing to plot (no micro or e2e rows)"
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4.2 * panels), squeeze=False)
    axes = list(axes[:, 0])
    for device, table in tables.items():
        ax = axes.pop(0)
        rows = [r for r in table["rows"] if not r.get("skipped") and not r.get("error")]
        names = [r["name"] for r in rows]
        for j, (key, colour) in enumerate((("stall_s", "tab:blue"), ("durable_s", "tab:orange"),
                                           ("load_s", "tab:green"))):
            meds = [(r.get(key) or {}).get("median", 0) for r in rows]
            lo = [m - (r.get(key) or {}).get("min", m) for m, r in zip(meds, rows)]
            hi = [(r.get(key) or {}).get("max", m) - m for m, r in zip(meds, rows)]
            ys = [i + (j - 1) * 0.27 for i in range(len(rows))]
            ax.barh(ys, meds, height=0.25, xerr=[lo, hi], color=colour, label=key.replace("_s", ""))
        floors = {r["name"]: r for r in table["rows"] if r.get("kind") == "floor"}
        for floor, key, colour in (("floor.d2h_pinned" if device.startswith("cuda") else "floor.memcpy", "stall_s",
                                    "tab:blue"), ("floor.write_fsync", "durable_s", "tab:orange"),
                                   ("floor.read_cold", "load_s", "tab:green")):
            value = ((floors.get(floor) or {}).get(key) or {}).get("median")
            if value:
                ax.axvline(value, color=colour, linestyle="--", linewidth=1, label=f"{floor} ({key[:-2]})")
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds (median, min-max)")
        ax.set_title(f"micro, {device}, state {table['state']['bytes'] / 2**30:.2f} GiB")
        ax.legend(loc="lower right", fontsize=8)
    if result.get("consecutive_plot"):
        ax = axes.pop(0)
        for name, peaks in result["consecutive_plot"].items():
            ax.plot(range(1, len(peaks) + 1), peaks, marker="o", label=name)
        ax.set_xlabel("consecutive save")
        ax.set_ylabel("peak extra host MiB")
        ax.set_title("memory over consecutive saves")
        ax.legend()
    if result.get("e2e"):
        ax = axes.pop(0)
        ok = [r for r in result["e2e"] if "loop_s" in r]
        ax.bar([r["config"] for r in ok], [r["loop_s"] for r in ok], color="tab:purple", label="loop")
        ax.bar([r["config"] for r in ok], [r["drain_s"] for r in ok], bottom=[r["loop_s"] for r in ok],
               color="tab:gray", label="final drain")
        ax.set_ylabel("seconds")
        ax.set_title("end to end fit")
        ax.legend()
    if result.get("small"):
        from benchmarks import small_rows

        small_rows.plot_panel(axes.pop(0), result["small"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="lightning_ckpt benchmarks (micro + end to end)")
    ap.add_argument("--size-gib", type=float, default=1.0, help="micro: tensor bytes of the synthetic checkpoint")
    ap.add_argument("--reps", type=int, default=3, help="micro: timed repetitions per row (after one warm-up)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="results directory")
    ap.add_argument("--scratch-dir", default=None,
                    help="where checkpoints are written (default: <out>/scratch-*; must not be tmpfs)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CPU table, plus a GPU table when CUDA is available")
    ap.add_argument("--rows", default="all", help="comma list of micro rows (floors always run)")
    ap.add_argument("--consecutive", type=int, default=10, help="back-to-back saves for the flat-memory mode (0: off)")
    ap.add_argument("--consecutive-rows", default="ours",
                    help=f"rows that run the flat-memory mode: 'ours' ({DEFAULT_CONSECUTIVE_ROWS}), 'all' or a list")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-param-mib", type=float, default=768, help="e2e: fp32 parameter MiB (Adam adds 2x)")
    ap.add_argument("--e2e-steps", type=int, default=40)
    ap.add_argument("--e2e-every", type=int, default=10)
    ap.add_argument("--e2e-no-anchor-fsync", action="store_true", help="e2e: run the anchors as shipped (no fsync)")
    ap.add_argument("--e2e-reps", type=int, default=1,
                    help="e2e: rounds through the configurations (interleaved); each is reported by its median fit")
    ap.add_argument("--e2e-configs", default=None,
                    help="e2e: comma list of configurations (none always runs: it is the baseline)")
    ap.add_argument("--row-timeout", type=float, default=600, help="seconds before one row's process is killed")
    ap.add_argument("--keep-scratch", action="store_true")
    from benchmarks import small_rows

    small_rows.add_args(ap)
    ap.add_argument("--sharded", action="store_true", help="also run the sharded (DCP) rows on 2 gloo ranks")
    ap.add_argument("--sharded-mib", type=float, default=256, help="sharded: tensor MiB per rank")
    ap.add_argument("--remote", action="store_true",
                    help="also the remote row (an S3 server on 127.0.0.1; benchmarks.remote)")
    ap.add_argument("--remote-size-mib", type=float, default=128, help="remote: tensor MiB of the checkpoint")
    return ap.parse_args(argv)


def devices(choice: str) -> list[str]:
    """The devices to run micro tables on."""
    import torch

    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: CUDA is not available")
    return {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu", "cuda"] if has_cuda else ["cpu"]}[choice]


def meta(a: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    import lightning
    import torch

    info = {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "scratch": scratch,
        "scratch_fs": fs_type(scratch),
        "targets": TARGETS,
    }
    try:
        import lightning_ckpt

        info["lightning_ckpt"] = getattr(lightning_ckpt, "__version__", "unknown")
    except Exception as e:
        info["lightning_ckpt"] = f"unavailable: {type(e).__name__}"
    return info


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = os.path.join(a.out, f"logs-{stamp}")
    os.makedirs(logs)
    scratch = make_scratch(a.scratch_dir or a.out)
    if fs_type(scratch) in ("tmpfs", "ramfs"):
        _progress(f"warning: scratch {scratch} is on {fs_type(scratch)}: write/read figures will not reflect a disk")
    from benchmarks.micro import state_info

    result: dict[str, Any] = {"meta": meta(a, scratch), "micro": {}, "e2e": None}
    t0 = time.perf_counter()
    try:
        if not a.skip_micro:
            for device in devices(a.device):
                info = state_info(a.size_gib)
                _progress(f"micro[{device}]: {info['bytes'] / MiB:.0f} MiB in {info['tensors']} tensors, reps={a.reps}")
                rows = run_micro(device, a, scratch, logs)
                evaluate_micro(rows, device, info["bytes"])
                result["micro"][device] = {"state": info, "rows": rows}
        if not a.skip_e2e:
            _progress(f"e2e: {a.e2e_param_mib:.0f} MiB params + Adam, {a.e2e_steps} steps, save every {a.e2e_every}")
            result["e2e"] = run_e2e(a, scratch, logs)
            evaluate_e2e(result["e2e"])
        if not a.skip_small and not a.skip_micro:  # part of the micro suite
            from benchmarks import small_rows

            _progress(f"small tensors: counts {small_rows.counts(a)}; partial load of the {a.size_gib} GiB state")
            result["small"] = small_rows.run_small(a, scratch, logs, run_child, _progress)
        if a.sharded:
            _progress(f"sharded: 2 gloo ranks, {a.sharded_mib:.0f} MiB per rank, reps={a.reps}")
            result["sharded"] = run_sharded(a, scratch, logs)
    finally:
        if not a.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if a.remote:
        remote_args = ["--size-mib", str(a.remote_size_mib), "--reps", str(a.reps)]
        result["remote"], _ = run_child("benchmarks.remote", remote_args, os.path.join(logs, "remote.json"),
                                        os.path.join(logs, "remote.log"), a.row_timeout)
    result["meta"]["wall_s"] = time.perf_counter() - t0
    result["consecutive_plot"] = {
        f"{d}:{r['name']}": r["consecutive"]["extra_host_mib"]
        for d, t in result["micro"].items() for r in t["rows"] if r.get("consecutive")
    }

    for device, table in result["micro"].items():
        print(f"\n== micro [{device}]  state {table['state']['bytes'] / MiB:.0f} MiB, "
              f"{table['state']['tensors']} tensors, reps {a.reps} (times: median (min-max) s) ==")
        print(micro_table(table["rows"]))
    if result["e2e"]:
        print(f"\n== end to end (loop overhead vs 'none'; target <= {TARGETS['e2e_overhead']:.0%}) ==")
        print(e2e_table(result["e2e"]))
    if result.get("small"):
        from benchmarks import small_rows

        print(f"\n== many small tensors (largest count; targets vs {small_rows.TORCH}) and partial load ==")
        print(small_rows.table(result["small"], _render))
    if result.get("sharded"):
        from benchmarks.sharded import table as sharded_table

        print(f"\n== sharded [2 gloo ranks, {a.sharded_mib:.0f} MiB per rank] "
              "(times: slowest rank, median (min-max) s) ==")
        rows = result["sharded"]
        print(sharded_table(rows) if isinstance(rows, list) else f"ERROR: {rows['error']}")
    if result.get("remote"):
        from benchmarks.remote import table as remote_table

        print("\n" + (remote_table(result["remote"]) if "rows" in result["remote"] else f"remote: {result['remote']}"))
    json_path = os.path.join(a.out, f"bench-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    png_path = os.path.join(a.out, f"bench-{stamp}.png")
    why = plot(result, png_path)
    print(f"\nwrote {json_path}" + (f"\n{why}" if why else f"\nwrote {png_path}") + f"\nlogs in {logs}"
          f"\ntotal {result['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
