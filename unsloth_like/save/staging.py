"""Hidden work-in-progress names next to a save's target, and removing what killed saves left.

Saves write beside their target under a hidden name and rename into place when complete, so an
interrupted save never leaves something that looks finished. A save killed outright (SIGKILL,
the OOM killer) cannot clean up after itself, and a merged 8B model is 16 GB of hidden shards.
The name therefore records the host and the process: the next save to the same target removes
the leftovers of processes that no longer run on this host, and never touches a save still
running, here or on another machine sharing the filesystem.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

_LEADING_PID = re.compile(r"(\d+)")


def staging_prefix(target: Path) -> str:
    """The start of every staging name for ``target``, by any process of this host."""
    return f".{target.name}.staging-{socket.gethostname()}-"


def staging_name(target: Path, suffix: str = "") -> str:
    """A staging name for ``target`` owned by this process (``suffix`` e.g. ``.partial``)."""
    return f"{staging_prefix(target)}{os.getpid()}{suffix}"


def remove_abandoned(target: Path) -> None:
    """Delete staging files and directories for ``target`` whose process, on this host, is gone."""
    prefix = staging_prefix(target)
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(glob.escape(prefix) + "*"):
        owner = _LEADING_PID.match(path.name[len(prefix):])
        if owner is None or _process_alive(int(owner.group(1))):
            continue
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.warning("Removed %s (%.1f MB), left behind by an earlier save of %s that was killed.",
                       path, size / 1e6, target.name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
