"""What every benchmark shares: the machine it ran on, a Markdown table, and --json output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence

import torch


def machine_description() -> str:
    """One line naming the machine, so figures are never read without it."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 1024**3:.0f} GiB), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, CPU only, torch {torch.__version__}"


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def format_cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def report(title: str, rows: Sequence[dict], as_json: bool, extra: dict | None = None) -> None:
    """Print rows as a Markdown table under a title naming the machine, or as one JSON object."""
    if as_json:
        print(json.dumps({"benchmark": title, "machine": machine_description(), **(extra or {}), "rows": list(rows)},
                         indent=2))
        return
    print(f"## {title}\n\nMachine: {machine_description()}\n")
    print(markdown_table(rows))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> float:
    """Median wall time of fn over runs, after warm-up, with the device synchronized around each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
