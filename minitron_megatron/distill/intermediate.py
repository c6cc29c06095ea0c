"""Intermediate-state KD losses: post-norm hidden states of mapped student/teacher layers.

The paper (PAPER.md section 3) adds to the logit loss a loss between hidden states
of mapped layers (cosine best, or MSE), a shared learned linear map when the
hidden sizes differ, and an embedding-output loss; the total is
`L = L_logits + alpha * L_is` with `alpha = L_logits / L_is` recomputed every step.

Here:
- "post-norm hidden state" of layer k = the model's own final norm
  (`decoder.final_layernorm`) applied to layer k's output: for the last layer
  this is exactly the hidden state the output layer sees, and earlier layers
  are read through the same lens. The embedding output goes through the same norm.
- Hidden states are captured with forward hooks that exist only during one
  forward call (`capture_hidden_states`), so the student carries no hooks
  outside distillation.
- Losses are per token ([s, b]), summed over the mapped pairs; alpha and the
  masking happen in the loss function (`objective.py`).

TP: without sequence parallelism, hidden states are replicated over TP ranks,
so every rank computes the same loss, as Megatron does for its replicated norms;
the gradient into the student's hidden state adds to the TP-all-reduced
gradient of the next column-parallel layer, which is the correct total. With
sequence parallelism, each rank holds [s/tp, b, h]: it computes its own
tokens' losses and gathers them along the sequence with a backward that only
splits (no reduce-scatter: the loss is not a TP partial sum); the projection's
gradient is then a partial sum over tokens, marked `sequence_parallel` so that
Megatron's `finalize_model_grads` all-reduces it over TP like a norm weight's.
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from minitron_megatron.model import modules

IS_KINDS = ("cosine", "mse")
EMBEDDING = "embedding"  # capture key of the embedding output


def default_layer_map(student_layers: int, teacher_layers: int) -> List[Tuple[int, int]]:
    """[(student, teacher)]: every student layer, spread evenly over the teacher's depth
    and ending on its last layer (identity when the depths are equal)."""
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


def resolve_layer_map(layer_map: Optional[Sequence[Sequence[int]]], student_layers: int,
                      teacher_layers: int) -> List[Tuple[int, int]]:
    """The configured map as tuples, or the default one; range checks are in `setup`."""
    if layer_map is None:
        return default_layer_map(student_layers, teacher_layers)
    return [(int(s), int(t)) for s, t in layer_map]


def layer_map_problems(layer_map, student_layers: int, teacher_layers: int) -> List[str]:
    """Why `layer_map` (the configured value, possibly None) is unusable, as messages."""
    if layer_map is None:
        return []
    problems = []
    for pair in layer_map:
        if len(pair) != 2:
            problems.append(f"distill.layer_map entry {list(pair)} must be [student_layer, teacher_layer]")
            continue
        s, t = pair
        if not 0 <= s < student_layers:
            problems.append(f"distill.layer_map entry {list(pair)}: student layer {s} is out of range "
                            f"[0, {student_layers}) (the student has {student_layers} layers)")
        if not 0 <= t < teacher_layers:
            problems.append(f"distill.layer_map entry {list(pair)}: teacher layer {t} is out of range "
                            f"[0, {teacher_layers}) (the teacher has {teacher_layers} layers)")
    if not layer_map:
        problems.append("distill.layer_map is empty; leave it unset (null) for the default mapping")
    return problems


@contextlib.contextmanager
def capture_hidden_states(gpt_model, layers: Sequence[int], embedding: bool):
    """Within the block, forward calls of `gpt_model` fill the yielded dict with
    {layer index: output [s, b, h]} (local == global layer index at PP=1) and
    {EMBEDDING: embedding output [s, b, h]} ([s/tp, b, h] with sequence parallelism)."""
    store: Dict = {}
    handles = []

    def keep(key):
        def hook(_module, _inputs, output):
            store[key] = output[0] if isinstance(output, tuple) else output

        return hook

    for index in sorted(set(layers)):
        handles.append(modules.decoder_layer(gpt_model, index).register_forward_hook(keep(index)))
    if embedding:
        handles.append(modules.embedding(gpt_model).register_forward_hook(keep(EMBEDDING)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def per_token_state_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, kind: str) -> torch.Tensor:
    """[s, b] loss between two [s, b, h] states (float32): 1 - cosine, or mean squared error."""
    s, t = student_h.float(), teacher_h.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    return (s - t).pow(2).mean(dim=-1)


def intermediate_loss(student_states: Dict, teacher_states: Dict, pairs: Sequence[Tuple[int, int]],
                      embedding: bool, student_norm, teacher_norm, projection, kind: str,
                      sequence_parallel: bool) -> torch.Tensor:
    """Per-token L_is [b, s]: the sum over mapped pairs (and the embedding output) of the
    loss between post-norm states, the student's mapped to the teacher's width."""
    keys = [(s, t) for s, t in pairs] + ([(EMBEDDING, EMBEDDING)] if embedding else [])
    total = None
    for s_key, t_key in keys:
        student_h = student_norm(student_states[s_key])  # [s(/tp), b, h_s]
        if projection is not None:
            student_h = projection(student_h)  # [s(/tp), b, h_t]
        with torch.no_grad():
            teacher_h = teacher_norm(teacher_states[t_key])  # [s(/tp), b, h_t]
        loss = per_token_state_loss(student_h, teacher_h, kind)  # [s(/tp), b]
        total = loss if total is None else total + loss
    if sequence_parallel:
        from megatron.core import tensor_parallel

        # Forward all-gather, backward split: each rank's tokens get their own gradient.
        total = tensor_parallel.gather_from_sequence_parallel_region(input_=total, tensor_parallel_output_grad=False)
    return total.transpose(0, 1)  # [b, s]


def build_projection(student_hidden: int, teacher_hidden: int, dtype: torch.dtype, device,
                     seed: int, sequence_parallel: bool) -> torch.nn.Linear:
    """The shared student->teacher hidden map (no bias), replicated on every TP rank.

    Initialised N(0, 1/h_s) (norm-preserving on average) from its own generator, so
    every rank and every TP size gets the same weights whatever else used the global RNG.
    """
    init_std = student_hidden ** -0.5
    proj = torch.nn.Linear(student_hidden, teacher_hidden, bias=False, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        weight = torch.empty(teacher_hidden, student_hidden, dtype=torch.float32).normal_(0.0, init_std, generator=gen)
        proj.weight.copy_(weight)
    # Megatron's finalize_model_grads all-reduces over TP the grads of params flagged so.
    proj.weight.sequence_parallel = sequence_parallel
    return proj
