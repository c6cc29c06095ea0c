"""Bad input to convert: one clear ConfigError naming the setting, before anything is written.

All checks run in `plan_import` / `plan_export` ahead of any model build or collective,
so a plain (non-distributed) context of the requested TP/PP is enough to reach them.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from minitron_megatron.config.commands import ConvertCommand
from minitron_megatron.config.convert import ConvertConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.convert import convert, plan_import
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext


def _ctx(tp=1, pp=1) -> ParallelContext:
    return ParallelContext(device=torch.device("cpu"), world_size=tp * pp, rank=0, tp_size=tp, tp_rank=0,
                           pp_size=pp, pp_rank=0, dp_size=1, dp_rank=0)


def _copy(src: Path, dst: Path, config=None, index=None) -> Path:
    """A copy of a HF dir (weights symlinked) with config.json / index entries edited."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    for name, edit in (("config.json", config), ("model.safetensors.index.json", index)):
        if edit:
            body = json.loads((dst / name).read_text())
            edit(body)
            (dst / name).write_text(json.dumps(body))
    return dst


def _import_error(hf_dir, tmp_path, tp=1, pp=1, seq_length=None, **options) -> str:
    save = tmp_path / "run"
    cmd = ConvertCommand(from_hf=str(hf_dir), save=str(save), parallel=ParallelConfig(tp=tp, pp=pp),
                         seq_length=seq_length, convert=ConvertConfig(**options))
    with pytest.raises(ConfigError) as err:
        convert(cmd, _ctx(tp, pp))
    assert not save.exists(), "a rejected import must write nothing"
    return str(err.value)


def _set(**values):
    return lambda body: body.update(values)


def test_unsupported_architecture_lists_supported(hf_models, tmp_path):
    bad = _copy(hf_models["llama"], tmp_path / "hf", config=_set(architectures=["GPT2LMHeadModel"]))
    msg = _import_error(bad, tmp_path)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "NemotronForCausalLM" in msg


@pytest.mark.parametrize("rope, needle", [
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, "rope_type='yarn'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
      "original_max_position_embeddings": 8192, "rope_theta": 10000.0}, "high_freq_factor"),
])
def test_unrepresentable_rope_scaling(hf_models, tmp_path, rope, needle):
    """Megatron-core 0.16.1 has only llama3 scaling with fixed low/high factors: anything else
    would compute other positions than the original, so it must be refused."""
    bad = _copy(hf_models["llama"], tmp_path / "hf", config=_set(rope_parameters=rope))
    assert needle in _import_error(bad, tmp_path)


def test_sliding_window_that_bites_is_refused(hf_models, tmp_path):
    """Megatron's local attention has no sliding window that matches HF's, so sequences longer
    than the window must be refused: the position limit is capped at the window (exact there),
    and so is the sequence length recorded by default."""
    bad = _copy(hf_models["mistral"], tmp_path / "hf", config=_set(sliding_window=32))
    msg = _import_error(bad, tmp_path, seq_length=64)
    assert "seq_length=64" in msg and "max_position_embeddings=32" in msg and "sliding_window=32" in msg, msg
    plan = plan_import(str(bad), str(tmp_path / "run"), ConvertConfig(), ParallelConfig())
    assert plan.model_cfg.max_position_embeddings == 32 and plan.seq_length == 32


def test_missing_and_extra_tensors(hf_models, tmp_path):
    def edit(index):
        index["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
        index["weight_map"]["model.layers.1.self_attn.rotary_emb.inv_freq"] = index["weight_map"]["lm_head.weight"]

    bad = _copy(hf_models["llama"], tmp_path / "hf", index=edit)
    msg = _import_error(bad, tmp_path)
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg and "rotary_emb.inv_freq" in msg


def test_tp_that_does_not_divide(hf_models, tmp_path):
    msg = _import_error(hf_models["qwen2"], tmp_path, tp=3)
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in msg


def test_tokenizer_larger_than_embedding(hf_models, tmp_path):
    bad = _copy(hf_models["qwen2"], tmp_path / "hf", config=_set(vocab_size=100))
    assert "does not fit the embedding" in _import_error(bad, tmp_path)


def test_bad_dtype_and_existing_target(hf_models, tmp_path):
    assert "convert.dtype='int8'" in _import_error(hf_models["nemotron"], tmp_path, dtype="int8")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    cmd = ConvertCommand(from_hf=str(hf_models["nemotron"]), save=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="save=.* already exists"):
        convert(cmd, _ctx())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]
    (tmp_path / "run" / "keep.txt").unlink()
    (tmp_path / "run" / "model.yaml").write_text("crashed import: no summary.json")
    plan_import(str(hf_models["nemotron"]), str(tmp_path / "run"), ConvertConfig(), ParallelConfig())  # may redo


def test_direction_and_export_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of from_hf"):
        convert(ConvertCommand(save=str(tmp_path / "x")), _ctx())
    with pytest.raises(ConfigError, match="load=.*directory not found"):
        convert(ConvertCommand(load=str(tmp_path / "nope"), to_hf=str(tmp_path / "out")), _ctx())
    assert not (tmp_path / "out").exists()


def test_single_file_checkpoint_and_tensor_shapes(hf_models, tmp_path):
    """An unsharded model.safetensors (no index) is read like a sharded one, and a tensor whose
    shape disagrees with config.json is named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = hf_models["qwen2"]
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, single / name)
    save_file(tensors, str(single / "model.safetensors"))
    plan = plan_import(str(single), str(tmp_path / "run"), ConvertConfig(), ParallelConfig(tp=2))
    assert plan.model_cfg.share_embeddings_and_output_weights and plan.model_cfg.add_qkv_bias
    tensors["model.layers.0.self_attn.k_proj.bias"] = tensors["model.layers.0.self_attn.k_proj.bias"][:8]
    save_file(tensors, str(single / "model.safetensors"))
    assert "tensor model.layers.0.self_attn.k_proj.bias has shape [8]" in _import_error(single, tmp_path)
