"""Process memory readings for the benchmarks (Linux)."""

from __future__ import annotations


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (heap and tensors; not memory-mapped files)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only).")


def rss_bytes() -> int:
    """This process's resident memory now."""
    import resource

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss`` is in kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
