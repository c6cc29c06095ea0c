"""Our checkpoints as Megatron-LM's `load_checkpoint` reads them (megatron/training/checkpointing.py
at tags core_v0.16.1 and core_v0.19.0, which are not on the package index: their expectations
are encoded here, and `test_expectations_hold_at_each_tag` re-reads them from each tag's source).

- `args`: an argparse Namespace; `check_checkpoint_args` compares num_layers, hidden_size,
  num_attention_heads, add_position_embedding, max_position_embeddings,
  make_vocab_size_divisible_by and tokenizer_type with the command line, and a resume reads
  consumed_train_samples from it.
- `rng_state`: a ShardedObject over (pp, tp) holding [{random_rng_state, np_rng_state,
  torch_rng_state, cuda_rng_state, rng_tracker_states}] (cuda only where CUDA is).
- `opt_param_scheduler`: counts samples (Megatron-LM calls `step(increment=global_batch_size)`).
- `deallocate_pipeline_outputs=True`, which Megatron-LM always sets.
"""

import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.model_utils import small_model

# The compatibility tier (Python 3.12, megatron-core 0.19.2, Megatron-LM core_v0.19.0) runs this file too.
pytestmark = pytest.mark.compat

MEGATRON_LM_RNG_KEYS = {"random_rng_state", "np_rng_state", "torch_rng_state", "rng_tracker_states"}
CHECKED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                "max_position_embeddings", "make_vocab_size_divisible_by", "tokenizer_type")


def _flags_as_args(flags):
    """`--num-layers 4 --swiglu ...` -> {"num_layers": "4", "swiglu": True}, as argparse names them."""
    args, i = {}, 0
    while i < len(flags):
        name = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            args[name], i = flags[i + 1], i + 2
        else:
            args[name], i = True, i + 1
    return args


def _megatron_lm_padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding` (megatron/training/tokenizer/tokenizer.py)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def _worker(rank, world, root):
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from minitron_megatron.checkpoint.dist import iteration_dir, load_common, save_checkpoint
    from minitron_megatron.checkpoint.megatron_lm import checkpoint_args, pretrain_gpt_args
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.train import OptimConfig
    from minitron_megatron.model import build_gpt_model, padded_vocab_size
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.train.optimizer import build_optimizer, wrap_ddp
    from minitron_megatron.train.step import train_step

    root = Path(root)
    ctx = init_runtime(device="cpu", seed=5)
    cfg = small_model(num_layers=2)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    model = build_gpt_model(cfg, ctx, ParallelConfig(), padded)
    # Megatron-LM always frees sent activations (and asserts they are not views); so do our loops,
    # so that a loss or p2p tensor that is a view fails in our PP tests, not in Megatron-LM.
    assert model.config.deallocate_pipeline_outputs
    ddp = wrap_ddp(model, model.config)
    optimizer, scheduler = build_optimizer([ddp], OptimConfig(warmup_steps=1), model.config, 4, global_batch_size=4)
    gen = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 250, (2, 32), generator=gen), "labels": torch.randint(0, 250, (2, 32)),
                "loss_mask": torch.ones(2, 32), "position_ids": torch.arange(32).expand(2, -1)} for _ in range(4)]
    it = iter(batches)
    for _ in range(2):
        train_step([ddp], optimizer, scheduler, it, ctx, 2, 2, 32)  # 2 microbatches x 2 = 4 samples a step
    args = checkpoint_args(cfg, padded, 1, 1, global_batch_size=4, consumed_train_samples=8, iteration=2)
    save_checkpoint(root, 2, model, ctx, optimizer, scheduler, args=args)

    common = load_common(root)
    saved = common["args"]
    emitted = _flags_as_args(pretrain_gpt_args(cfg, padded, root.parent, tp=1))
    for name in CHECKED_ARGS:
        if name in emitted:  # check_checkpoint_args' comparisons, with the arguments we tell users to pass
            assert str(getattr(saved, name)) == str(emitted[name]), (name, getattr(saved, name), emitted[name])
    # Megatron-LM's own rope runs save add_position_embedding=True (the flag's default), and
    # check_checkpoint_args asserts it equals the command line's on every resume.
    assert saved.add_position_embedding and "position_embedding_type" in emitted
    assert saved.consumed_train_samples == 8 and saved.tensor_model_parallel_size == 1
    assert _megatron_lm_padded_vocab(cfg.vocab_size, int(emitted["make_vocab_size_divisible_by"]), 1) == padded
    assert emitted["tokenizer_type"] == "GPTSentencePieceTokenizer"  # adds no tokens: same padded vocab

    sched = common["opt_param_scheduler"]
    assert sched["num_steps"] == 8 and sched["lr_warmup_steps"] == 4 and sched["lr_decay_steps"] == 16, sched

    request = {"rng_state": ShardedObject("rng_state", None, (1, 1), (0, 0), replica_id=0)}
    rng = dist_checkpointing.load(request, str(iteration_dir(root, 2)))["rng_state"]
    assert isinstance(rng, list) and len(rng) == 1
    expected = MEGATRON_LM_RNG_KEYS | ({"cuda_rng_state"} if torch.cuda.is_available() else set())
    assert set(rng[0]) == expected, set(rng[0])


def test_checkpoint_carries_megatron_lm_args_rng_layout_and_sample_scheduler(tmp_path):
    """Catches the Megatron-LM interop gaps found by running its pretrain_gpt.py on our
    checkpoints: no `args` (no size checks, consumed samples guessed), our own rng_state
    layout (Megatron-LM exits "Unable to load rng state"), a scheduler counting steps where
    Megatron-LM counts samples, and a tokenizer type that pads the vocab differently."""
    run_distributed(_worker, 1, str(tmp_path / "ckpt"))


TAGS = ("core_v0.16.1", "core_v0.19.0")
DIST_CKPT_SKIPS = {"padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                   "data_parallel_random_init", "global_batch_size"}
"""check_checkpoint_args fields never compared for our checkpoints: the first three only for
non-dist (or pre-3.0) checkpoints, the last two only when those features are switched on."""


def _tag_source(tag: str, path: str) -> str:
    from tests.megatron_lm_parser import DEFAULT_GIT

    proc = subprocess.run(["git", "--git-dir", DEFAULT_GIT, "show", f"{tag}:{path}"], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"no Megatron-LM git dir with tag {tag} at {DEFAULT_GIT}")
    return proc.stdout


def _function(source: str, name: str) -> str:
    return re.search(rf"^def {name}\(.*?(?=^def )", source, flags=re.S | re.M).group(0)


@pytest.mark.parametrize("tag", TAGS)
def test_expectations_hold_at_each_tag(tag):
    """Catches Megatron-LM changing what a resume of our checkpoints relies on: the fields
    check_checkpoint_args compares, the rng_state dict's keys and its (pp, tp) sharding, and the
    scheduler stepped in samples (`increment=` a global batch)."""
    checkpointing = _tag_source(tag, "megatron/training/checkpointing.py")
    compared = set(re.findall(r"_compare\(\s*'(\w+)'", _function(checkpointing, "check_checkpoint_args")))
    assert compared - DIST_CKPT_SKIPS == set(CHECKED_ARGS), compared
    rng = _function(checkpointing, "get_rng_state")
    assert set(re.findall(r"'(\w+_rng_state|rng_tracker_states)':", rng)) == MEGATRON_LM_RNG_KEYS | {"cuda_rng_state"}
    assert re.search(r"ShardedObject\(\s*f?'(\{key_prefix\})?rng_state',\s*rng_state_list,\s*\(pp_size, tp_size\)", rng)
    training = _tag_source(tag, "megatron/training/training.py")
    # increment = num_microbatches * micro_batch_size * data_parallel_size (x gtp_weight_remat_size,
    # 1 by default, at core_v0.19.0): one global batch of samples per step.
    increment = re.search(r"increment = \(?\s*(get_num_microbatches\(\)[^)]*?)\)?\s*opt_param_scheduler\.step\(increment=increment\)",
                          training, flags=re.S)
    assert increment and "args.micro_batch_size" in increment.group(1) and "args.data_parallel_size" in increment.group(1)
