"""Progress of long stages (training, calibration, evaluation, export), shown by rank 0.

On a terminal it is a tqdm bar. In a log (stderr not a terminal) a redrawn bar is useless,
so plain lines are printed instead: one every `PERCENT_STEP` percent (at most one per
`MIN_GAP_S`) or every `INTERVAL_S` seconds, whichever comes first, and one when the stage
ends, each with the rate and the ETA:

    [importance calibration] 128/256 (50%)  3.1 microbatch/s  elapsed 0:41  ETA 0:41

MINITRON_NO_PROGRESS=1 shows nothing at all (the tests set it).
"""

import math
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO

NO_PROGRESS_ENV = "MINITRON_NO_PROGRESS"
PERCENT_STEP = 10
MIN_GAP_S = 2.0
"""Percent lines of a fast stage (an evaluation inside training) come no closer than this."""
INTERVAL_S = 30.0
"""A slow stage still prints this often, whatever its percentage."""


def progress_mode(stream: Optional[TextIO] = None) -> str:
    """off (MINITRON_NO_PROGRESS=1), bar (stderr is a terminal) or lines."""
    if os.environ.get(NO_PROGRESS_ENV) == "1":
        return "off"
    stream = stream or sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"


def format_seconds(seconds: float) -> str:
    """0:41, 12:03 or 1:02:03."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(per_second: float, unit: str) -> str:
    """`3.1 step/s`, or `12.4 s/step` below one per second."""
    if per_second <= 0:
        return f"? {unit}/s"
    return f"{per_second:.3g} {unit}/s" if per_second >= 1 else f"{1 / per_second:.3g} s/{unit}"


class Progress:
    """`update(n)` as work is done, `close()` at the end (or use it as a context manager).
    `enabled=False` (ranks other than 0) makes every call a no-op; `leave=False` clears the bar
    when done (a stage inside another, such as an evaluation during training)."""

    def __init__(self, desc: str, total: int, unit: str = "it", initial: int = 0, enabled: bool = True,
                 leave: bool = True, stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit, self.done = desc, max(int(total), 0), unit, initial
        self.stream = stream or sys.stderr
        self.mode = progress_mode(self.stream) if enabled else "off"
        self.postfix = ""
        self._clock, self._start, self._initial = clock, clock(), initial
        self._last_line, self._last_done = self._start, initial
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                             file=self.stream, leave=leave)

    def update(self, n: int = 1) -> None:
        if self.mode == "off":
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._line_due():
            self._print_line()

    def set_postfix(self, **values) -> None:
        """Shown after the counts (e.g. the training loss)."""
        if self.mode == "off":
            return
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.done > self._last_done:
            self._print_line()  # every stage in a log ends with its totals
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line_due(self) -> bool:
        now = self._clock()
        if now - self._last_line >= INTERVAL_S:
            return True
        bucket = lambda done: int(100 * done / self.total) // PERCENT_STEP if self.total else 0
        return bucket(self.done) > bucket(self._last_done) and now - self._last_line >= MIN_GAP_S

    def line(self) -> str:
        """The plain progress line as of now."""
        elapsed = self._clock() - self._start
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = (f"[{self.desc}] {self.done}/{self.total}{percent}  {format_rate(rate, self.unit)}  "
                f"elapsed {format_seconds(elapsed)}  ETA {format_seconds(left)}")
        return f"{text}  {self.postfix}" if self.postfix else text

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_line, self._last_done = self._clock(), self.done


def track(items: Iterable, progress: Progress) -> Iterator:
    """`items`, counting each one as it is handed out (a microbatch the schedule takes) on
    `progress`. The caller closes `progress`: a schedule takes exactly its microbatches and
    never exhausts the iterator."""
    for item in items:
        progress.update()
        yield item
