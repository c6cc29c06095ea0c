"""Fault injection at the commit points of a run, for crash-safety tests.

`MINITRON_FAULT=POINT` (or `POINT:N`, the N-th time the point is reached in this
process) makes the process die there with `os._exit`, as a SIGKILL of the job or a
node failure would: no `finally`, no atexit, no flush of Python buffers, and its
child processes (the checkpoint writer's multiprocessing helpers) killed with it,
as a scheduler kills the whole job. The points:

- `checkpoint.write`   inside a checkpoint save: shards written to the temporary dir, not renamed
                       (with `async_save`: the background write done on every rank, training
                       went on meanwhile, the commit about to start)
- `checkpoint.commit`  the new `iter_` dir renamed into place, the tracker file not yet updated
- `summary.write`      summary.json's temporary file written, not renamed (the run's last write)
- `log.append`         half of a train_log.jsonl line written
- `trim.save`          the pruned model's checkpoint committed, summary.json not yet written

Unset (the normal case) every call is one dictionary lookup.
"""

import os

FAULT_ENV = "MINITRON_FAULT"
FAULT_EXIT = 86
"""Exit status of an injected fault (distinct from errors 1-3 and preemption 75)."""

POINTS = ("checkpoint.write", "checkpoint.commit", "summary.write", "log.append", "trim.save")

_hits = {}


def _armed(point: str) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    name, _, count = spec.partition(":")
    if name != point:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    return _hits[point] == int(count or 1)


def fault_point(point: str, before_exit=None) -> None:
    """Die here if `MINITRON_FAULT` names this point (and its hit count is reached).

    `before_exit` runs first: e.g. writing half a line, to leave the torn state a
    crash in the middle of a write would leave.
    """
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {list(POINTS)}")
    if _armed(point):
        if before_exit is not None:
            before_exit()
        _kill_children()
        os._exit(FAULT_EXIT)


def _kill_children() -> None:
    import signal

    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
