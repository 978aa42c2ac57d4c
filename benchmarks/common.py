"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name, as ``lscpu`` shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
