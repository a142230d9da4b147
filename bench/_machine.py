"""What the machine is and how busy it was: shared by bench/api.py and bench/smtp.py (Linux /proc)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from pathlib import Path


def machine_cpu() -> tuple[float, float]:
    """CPU seconds so far: the machine's processes (user + nice + system), and steal.

    irq and softirq are left out: they are mostly the benchmark's own loopback traffic.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    # /proc/stat "cpu": user nice system idle iowait irq softirq steal
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system) / ticks, steal / ticks


def process_cpu(pid: int) -> float:
    """CPU seconds of a process, all its threads (exited ones included); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid``: the workers of ``poweremail serve --workers N``."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def own_cpu() -> float:
    """CPU seconds of this process and its waited children (load generators once they end)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
