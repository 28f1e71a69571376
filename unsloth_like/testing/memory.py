"""Process memory readings for the benchmarks (Linux)."""

from __future__ import annotations


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (heap and tensors; not memory-mapped files)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only).")
