"""`python -m minitron_megatron.run recipe=quick`: the whole recipe end to end, as CI's smoke run,
and the two claims that are robust at its size, asserted on that run's own numbers."""

import re
import struct

import pytest

from tests.commands import run_command, summary

pytestmark = pytest.mark.slow  # minutes: run first (tests/conftest.py)

MODELS = {"teacher", "pruned", "search", "student", "scratch", "ce"}


def _png_size(path):
    """(width, height) from the PNG header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_quick_recipe_end_to_end_claims_and_rerun_reuses(tmp_path):
    """Catches any stage hand-off breaking (teacher -> importance -> search -> distil -> scratch
    and CE baselines -> report), a baseline that does not see the student's tokens or shape, a
    table that is not the last output before the JSON line, a missing report or plot, KD losing
    to either baseline, and a rerun that redoes finished stages instead of reusing them."""
    save = tmp_path / "recipe"
    proc = run_command("run", "recipe=quick", f"save={save}", "device=cpu", timeout=1800)
    first = summary(proc)
    assert set(first) == MODELS | {"report"}
    lines = proc.stdout.strip().splitlines()
    table = lines[-3 - len(MODELS):-1]  # header, separator, one row per model, then the JSON line
    assert table[0].startswith("| model |") and table[1].startswith("|---")
    assert [row.split("|")[1].strip() for row in table[2:]] == list(first)[:len(MODELS)]
    for name in MODELS:
        assert {"val_loss", "params", "seconds", "reused"} <= set(first[name]), name
        assert first[name]["reused"] is False, name

    m = first
    assert 0.45 < m["pruned"]["params"] / m["teacher"]["params"] < 0.55  # quick's budget 0.5 +- 5%
    assert len({m[k]["params"] for k in ("pruned", "search", "student", "scratch", "ce")}) == 1
    assert m["student"]["tokens"] == m["scratch"]["tokens"] == m["ce"]["tokens"] > 0
    assert m["student"]["val_loss"] < m["pruned"]["val_loss"]
    # The claims, from this run's numbers (margins seen at quick size in the commit message).
    assert m["student"]["val_loss"] < m["scratch"]["val_loss"], (m["student"], m["scratch"])
    assert m["student"]["val_loss"] < m["ce"]["val_loss"], (m["student"], m["ce"])

    report = save / "report.md"
    assert str(report) == m["report"]
    text = report.read_text()
    assert f"{m['student']['val_loss']:.4f}" in text and f"{m['ce']['val_loss']:.4f}" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert {"loss_curves.png", "importance_width.png", "search_ranking.png"} <= set(images)
    for image in images:
        width, height = _png_size(save / image)
        assert width > 100 and height > 100, image

    again = summary(run_command("run", "recipe=quick", f"save={save}", "device=cpu"))
    assert all(again[name]["reused"] for name in MODELS)
    assert {k: v["val_loss"] for k, v in again.items() if k in MODELS} == \
        {k: v["val_loss"] for k, v in first.items() if k in MODELS}
