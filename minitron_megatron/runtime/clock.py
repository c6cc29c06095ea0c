"""The wall clock behind every summary's `seconds`.

`seconds` is the wall time of the command from its process start (imports,
start-up, data and model building included: what a user waits for). `run`, which
executes several stages in one process, restarts the clock at each stage, so each
stage's run dir reports its own wall time; its own summary adds the total.
"""

import time
from typing import Optional

_origin: Optional[float] = None


def process_start() -> float:
    """When this process started (psutil), or when this module was imported as a fallback."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil or no /proc: the import time is the closest we have
        return _IMPORTED


def restart() -> None:
    """Measure from now on (the start of a stage inside a longer process)."""
    global _origin
    _origin = time.time()


def elapsed() -> float:
    """Seconds since the process start, or since the last `restart()`."""
    return round(time.time() - (_origin if _origin is not None else process_start()), 1)


_IMPORTED = time.time()
