"""`convert from_gguf=`: SmolLM2-135M-Instruct (a Q4_1 Llama GGUF) against transformers' own load of
the same file, at TP=3 and TP=1; unsupported architectures and a missing `gguf` package refused.

TP=3, not 2: SmolLM2 has 9 heads in 3 query groups, and Megatron splits whole query groups
(TP=2 is refused, as for any run dir). One import per session (one process: every rank of an
import loads the whole GGUF through transformers, so a TP=3 import would load it 3 times),
reloaded at TP=3 (3 gloo processes) and TP=1; transformers' reference computed once. The
per-rank slicing of the loaded tensors is the from_hf import's (tests/convert/test_roundtrip.py
imports at TP=2), through StateDictReader (test_state_dict_reader_reads_like_hf_files)."""

import json
import sys

import pytest
import torch

from minitron_megatron.config.commands import ConvertCommand
from minitron_megatron.convert import GGUF_ARCHITECTURES, convert
from minitron_megatron.data.tokenizer import load_tokenizer
from minitron_megatron.errors import ConfigError
from tests.convert.gguf_models import SEQ, TEXTS, TP, import_smollm2, score_run_dir, reference, smollm2_gguf, write_gguf
from tests.convert.test_errors import _ctx
from tests.dist_utils import run_distributed

# Not in the compatibility tier: the GGUF side is transformers' (the same on both tiers), and the
# run dir it writes is the HF import's, which tests/convert/test_roundtrip.py checks there.
pytestmark = pytest.mark.slow

ATOL = 1e-4


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """root/: tokens.pt, reference_logits.pt, tokenizer.pt (transformers), run/ (our import at
    TP=1, seq_length=64), logits-tp3.pt and logits-tp1.pt (the run dir loaded at each TP)."""
    root = tmp_path_factory.mktemp("smollm2")
    gguf = smollm2_gguf()
    reference(gguf, root)
    run_distributed(import_smollm2, 1, str(root), str(gguf))
    run_distributed(score_run_dir, TP, str(root))
    return root


@pytest.mark.parametrize("layout", [f"tp{TP}", "tp1"])
def test_logits_match_transformers_on_the_same_gguf(smollm2, layout):
    """Catches anything the GGUF path adds to the HF import: a tied lm_head counted as an extra
    tensor, Q/K rows left in llama.cpp's RoPE permutation, a config field transformers fills
    differently from config.json (rope theta 1e5, eps, head_dim, 3 query groups of 3 heads), the
    dequantised weights saved in the wrong layout: float32 logits of the run dir (loaded at TP=3
    and TP=1) must equal transformers' within 1e-4."""
    ref = torch.load(smollm2 / "reference_logits.pt")
    got = torch.load(smollm2 / f"logits-{layout}.pt")
    assert got.shape == ref.shape == (2, SEQ, 49152)
    diff = (got - ref).abs().max().item()
    assert diff <= ATOL, f"max |logits diff| {diff} at {layout}"


def test_run_dir_is_complete_and_carries_the_gguf_tokenizer(smollm2):
    """Catches a run dir without the file's tokenizer (or with another EOS), a seq_length not
    recorded, or a summary that does not say what was imported."""
    summary = torch.load(smollm2 / "summary.pt")
    assert summary["direction"] == "from_gguf" and summary["gguf_architecture"] == "llama"
    assert summary["architecture"] == "LlamaForCausalLM" and summary["params"] == 134_515_008
    run = smollm2 / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    hf_config = json.loads((run / "hf_config.json").read_text())
    assert "quantization_config" not in hf_config and hf_config["tie_word_embeddings"]
    expected = torch.load(smollm2 / "tokenizer.pt")
    ours = load_tokenizer(str(run / "tokenizer.model"))
    assert [ours.tokenize(t) for t in TEXTS] == expected["ids"]
    assert (ours.eod, ours.bos) == (expected["eos"], expected["bos"])
    assert "seq_length: 64" in (run / "model.yaml").read_text()


def test_state_dict_reader_reads_like_hf_files(hf_models):
    """Catches a row/column slice of the in-memory reader (what each TP rank of a GGUF import
    reads) that differs from HFReader's on the same tensors, or a tied lm_head kept as a tensor
    of its own (the HF files, like save_pretrained, have it once)."""
    from transformers import AutoModelForCausalLM

    from minitron_megatron.convert.hf_io import HFReader, StateDictReader

    files = HFReader(hf_models["qwen2"])  # tied embeddings
    model = AutoModelForCausalLM.from_pretrained(str(hf_models["qwen2"]), dtype=torch.float32)
    memory = StateDictReader(model.state_dict())
    assert memory.shapes() == files.shapes() and memory.missing_files() == []
    for name, shape in files.shapes().items():
        for dim in range(len(shape)):
            stop = shape[dim] // 2 + 1
            assert torch.equal(memory.read(name, dim, 1, stop), files.read(name, dim, 1, stop)), (name, dim)


@pytest.mark.parametrize("architecture", ["mamba", "gpt2"])
def test_unsupported_architecture_is_refused_before_loading(tmp_path, monkeypatch, architecture):
    """Catches an architecture check that runs after transformers has loaded (minutes and GBs for a
    large file) or that lets another architecture through: the refusal names the file's
    architecture and the supported ones, loads nothing and writes nothing."""
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("transformers was asked to load a GGUF that should have been refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    gguf = write_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture)
    save = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        convert(ConvertCommand(from_gguf=str(gguf), save=str(save)), _ctx())
    msg = str(err.value)
    assert f"general.architecture={architecture!r}" in msg and str(sorted(GGUF_ARCHITECTURES)) in msg, msg
    assert not save.exists()


def test_missing_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    """Catches an ImportError (or transformers' own message) deep in a load instead of one
    ConfigError naming the pip install to run."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # importlib.util.find_spec("gguf") -> None
    with pytest.raises(ConfigError, match=r"needs the Python packages gguf.*pip install gguf accelerate"):
        convert(ConvertCommand(from_gguf=str(gguf), save=str(tmp_path / "run")), _ctx())
    assert not (tmp_path / "run").exists()


def test_bad_inputs(tmp_path):
    """Catches a missing file reaching transformers, or two import sources at once accepted."""
    with pytest.raises(ConfigError, match="from_gguf=.*file not found"):
        convert(ConvertCommand(from_gguf=str(tmp_path / "nope.gguf"), save=str(tmp_path / "run")), _ctx())
    with pytest.raises(ConfigError, match="exactly one of from_hf"):
        convert(ConvertCommand(from_gguf="a.gguf", from_hf="hf", save=str(tmp_path / "run")), _ctx())
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        convert(ConvertCommand(from_gguf=str(garbage), save=str(tmp_path / "run")), _ctx())
    assert not (tmp_path / "run").exists()
