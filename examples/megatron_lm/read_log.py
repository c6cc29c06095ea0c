"""The losses of a Megatron-LM training log, as one JSON line (our commands' summary convention).

    python read_log.py LOG   ->  {"iterations": [1, 2, ...], "loss": [...], "kd loss": [...],
                                  "lm loss": [...], "validation": {"kd loss": ..., ...}}

Megatron-LM (training.py `training_log`) prints `iteration N/ M | ... | kd loss: 1.2E-01 | ...`
for every key our loss function reports, and `validation loss at iteration N ... | kd loss value: ...`.
"""

import json
import re
import sys

ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
VALIDATION = re.compile(r"validation loss at iteration \d+ on validation set \|(.*)")
KEYS = ("loss", "kd loss", "lm loss", "is loss", "alpha")


def read_log(text: str) -> dict:
    summary = {"iterations": []}
    for line in text.splitlines():
        if (match := ITERATION.search(line)) is not None:
            fields = dict(_fields(match.group(2)))
            summary["iterations"].append(int(match.group(1)))
            for key in KEYS:
                if key in fields:
                    summary.setdefault(key, []).append(float(fields[key]))
        elif (match := VALIDATION.search(line)) is not None:
            fields = dict(_fields(match.group(1)))
            summary["validation"] = {k: float(fields[f"{k} value"]) for k in KEYS if f"{k} value" in fields}
    return summary


def _fields(text: str):
    for part in text.split("|"):
        key, sep, value = part.rpartition(":")
        if sep:
            yield key.strip(), value.strip()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8", errors="replace") as handle:
        print(json.dumps(read_log(handle.read())))
