"""Peak private host memory (RssAnon) of a child process, sampled from outside while it runs.

Linux keeps a high-water mark of the whole resident set only (VmHWM), which also counts file pages
mapped into the process, such as mmap-ed checkpoint shards. Private memory is what loading must keep
small, so the parent reads the child's /proc/<pid>/status every few milliseconds instead; a spike
shorter than the interval can be missed.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RSS_ANON = re.compile(rb"RssAnon:\s+(\d+) kB")


def rss_anon_bytes(pid: int | str = "self") -> int:
    """The private resident memory of a process now (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    m = RSS_ANON.search(status)
    return int(m.group(1)) * 1024 if m else 0


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_anon: int  # bytes, sampled
    seconds: float

    def last_json(self) -> dict:
        """The JSON object the child printed on its last stdout line."""
        lines = self.stdout.strip().splitlines()
        if self.returncode != 0 or not lines:
            raise RuntimeError(f"child failed (exit {self.returncode}):\n{self.stderr[-3000:]}")
        return json.loads(lines[-1])


def run_sampled(cmd: list[str], interval_s: float = 0.002, timeout_s: float | None = None,
                env: dict | None = None, cwd: str | Path | None = None) -> ChildRun:
    """Run cmd to completion, sampling its RssAnon every interval_s; output is captured in files so
    that a chatty child never blocks on a full pipe."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, rss_anon_bytes(proc.pid))
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                proc.kill()
                proc.wait()
                break
            time.sleep(interval_s)
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        peak, time.perf_counter() - start)

