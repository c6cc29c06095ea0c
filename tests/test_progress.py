"""The progress helper every long stage uses (runtime/progress.py): plain lines with rate and
ETA when stderr is not a terminal, nothing with MINITRON_NO_PROGRESS=1. The command-level
check is in test_run_settings.py (an `evaluate` with stderr to a pipe)."""

import io

from minitron_megatron.runtime import progress as P


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_every_few_percent_or_thirty_seconds():
    """Catches a log flooded by fast stages or silent through slow ones: percent lines come at
    most every MIN_GAP_S, a slow stage prints every INTERVAL_S, the end always prints."""
    clock, stream = _Clock(), io.StringIO()  # StringIO is not a terminal: plain lines
    with P.Progress("calibration", 100, unit="microbatch", stream=stream, clock=clock) as progress:
        for _ in range(10):  # 10% done in no time: no line yet
            progress.update()
        clock.now = P.MIN_GAP_S
        progress.update()  # 11%, past the gap: a line
        clock.now += P.INTERVAL_S
        progress.update()  # same 10% bucket, but 30 s later: a line
        progress.update(88)  # the last bucket within the gap: none until the end
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("[calibration] 11/100 (11%)  5.5 microbatch/s  elapsed 0:02  ETA 0:16")
    assert lines[1].startswith("[calibration] 12/100 (12%)  2.67 s/microbatch  elapsed 0:32")
    assert lines[2].startswith("[calibration] 100/100 (100%)") and lines[2].endswith("ETA 0:00")


def test_no_progress_at_all_with_minitron_no_progress(monkeypatch):
    monkeypatch.setenv(P.NO_PROGRESS_ENV, "1")
    stream = io.StringIO()
    with P.Progress("evaluate", 4, stream=stream) as progress:
        progress.update(4)
    assert stream.getvalue() == ""
