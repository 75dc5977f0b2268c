"""Helpers shared by the benchmark scripts: child processes, RSS, timing, tables."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def rss_bytes() -> int:
    """Current resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last ``reset_peak_rss``.

    (``getrusage``'s maximum is inherited across exec from the forking parent, so a child
    started by a parent holding a large model would report the parent's size.)
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start measuring the peak resident set size from the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; return (seconds, result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_child(script: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter and parse the JSON object it prints last."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def median(values: Sequence[float]) -> float:
    """The median of a few timings."""
    return statistics.median(values)


def warm_page_cache(folder: Path) -> None:
    """Read every file once so both libraries start from a warm page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                while handle.read(1 << 24):
                    pass


def print_table(title: str, rows: Sequence[tuple[str, str, str, str, str]]) -> None:
    """Print rows of (measure, diffcaps, diffusers, ratio, goal)."""
    header = ("measure", "diffcaps", "diffusers", "ratio", "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    print(title)
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
