"""Every kind of run dir the commands write exports to a HF directory transformers loads.

One spawn of 2 gloo processes writes, at TP=2, a trained teacher (with its optimizer state), a
pruned and a distilled model and an imported HF Llama, and exports each at TP=2
(workers.write_every_run_dir); one spawn of a single process trains a teacher at TP=1 too and
exports every run dir at TP=1, as `python -m minitron_megatron.convert load=RUN to_hf=DIR` does
without torchrun (workers.export_every_run_dir_alone). This process loads every export with
transformers and compares its logits with the run dir's own.
"""

import json
import shutil

import pytest
import torch

from tests.convert.hf_models import reference_logits
from tests.convert.workers import ALONE_KINDS, RUN_DIR_KINDS, export_every_run_dir_alone, write_every_run_dir
from tests.dist_utils import run_distributed

ATOL = 1e-4


@pytest.fixture(scope="module")
def written(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dirs")
    shutil.copy(hf_models["llama"].parent / "tokens.pt", root / "tokens.pt")
    run_distributed(write_every_run_dir, 2, str(root), str(hf_models["llama"]))
    return root


@pytest.fixture(scope="module")
def exported_alone(written):
    run_distributed(export_every_run_dir_alone, 1, str(written))
    return written


def _exported(root, kind: str, layout: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(root / f"hf-{kind}-{layout}"), output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _check_export(root, kind: str, layout: str) -> None:
    model = _exported(root, kind, layout)
    tokens = torch.load(root / "tokens.pt")  # [2, 64]
    ours = torch.load(root / f"logits-{kind}.pt")  # the run dir's GPTModel, loaded from its checkpoint
    got = reference_logits(model, tokens)
    assert got.shape == ours.shape == (*tokens.shape, model.config.vocab_size)
    diff = (got - ours).abs().max().item()
    assert diff <= ATOL, f"{kind} exported at {layout}: max |logits diff| {diff}"


@pytest.mark.parametrize("kind", RUN_DIR_KINDS)
def test_run_dir_exports_at_tp2(written, kind):
    """Catches an export that cannot read what a command wrote next to the model (a trained or
    distilled run's optimizer and RNG state, a pruned run's importance and plan), at TP=2 from a
    TP=2 checkpoint: transformers loads it cleanly and computes our logits."""
    _check_export(written, kind, "tp2")


@pytest.mark.parametrize("kind", ALONE_KINDS)
def test_run_dir_exports_in_one_process(exported_alone, kind):
    """Issue 18: catches a streamed export that asks one `dist_checkpointing.load` for some of a
    layer-stacked key's layers (`decoder.layers.*`, [num_layers, ...]) in a single-process
    world, where Megatron's regular-grid request placed the layers left out on this rank and
    failed ("Number of local shards (3) does not match ... (4)"). Every kind here has more
    decoder bytes than its largest parameter, so its layers span several loads."""
    _check_export(exported_alone, kind, "tp1")


def test_single_process_exports_read_layers_in_pieces(exported_alone):
    """The test above exercises the split it is for, and keeps the export's memory bound: each
    TP=1 export takes more loads than the embedding, the decoder and the output layer would
    (so some layer-stacked key was read in pieces), and no load asks for more bytes than the
    export's largest parameter."""
    for kind, calls in zip(ALONE_KINDS, json.loads((exported_alone / "loads-tp1-rank0.json").read_text())):
        assert len(calls) > 3, f"{kind}: the decoder fits one load, so nothing was read in pieces"
        assert max(c["bytes"] for c in calls) <= max(c["largest"] for c in calls), f"{kind}: a load asked for too much"
        assert max(c["alive"] for c in calls) == 0, f"{kind}: a tensor from an earlier load was still alive"
