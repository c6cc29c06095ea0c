"""Teacher and student co-located on the same ranks, as one module for Megatron's schedules.

Design (PP > 1). Teacher and student are split into the same number of pipeline
stages on the same ranks. `DistillationModel.forward` runs the frozen teacher's
stage, then the student's stage, on the same microbatch:

    first/middle stage:  send cat([student_out, teacher_out], -1)      # [s, b, h_s + h_t]
    later stage:         set_input_tensor splits the received tensor again
    last stage:          return per-token (kd, lm, is, router) losses [b, s, 4]

Last stage, `kd_impl="fused_linear"` (the default): both models stop at their final
hidden states (after the final norm) and the loss takes those and the output-layer
weight shards (`fused_linear.py`), so neither `[tokens, V/tp]` logits tensor is ever
built. The output weight is the one GPTModel's own `_postprocess` would use:
`output_layer.weight`, or with tied embeddings `shared_embedding_or_output_weight()`
(the embedding itself at PP=1; at PP>1 the last stage's copy, whose gradient
Megatron's `finalize_model_grads` all-reduces with the first stage's embedding, as
for the logits path). Configurations whose output layer does more than a
vocab-parallel matmul fall back to the chunked logits loss (`fused_linear_unsupported`).

Megatron's p2p allocates receive buffers from `config.hidden_size` (see
`schedules.get_tensor_shapes`), so the wrapper's `config` is a copy of the
student's TransformerConfig whose `hidden_size` is the width of the tensor that
travels between stages (h_s + h_t at PP > 1; the models keep their own configs).
Whatever calls the schedule with `get_model_config(model)` - our loop, or
Megatron-LM's `train_step` - then sizes the buffers right without an
`adjust_tensor_shapes_fn`. The tensor travels in the wider of the two models'
dtypes (`pipeline_dtype`: a float32 teacher beside a bf16 student is not rounded to
bf16 between stages; each side gets its own dtype back); the teacher's part carries no gradient:
the backward of `cat` hands the teacher's slice a zero gradient that is dropped.
This is ModelOpt's scheme for Megatron-core, without a schedule patch.

Frozen teacher: eval mode, `requires_grad=False`, and not a registered submodule
(kept in `__dict__`), so it is invisible to `parameters()`, DDP, the optimizer,
`train()`/`eval()` toggles and the checkpoint.

Checkpoint: `sharded_state_dict()` is the student's own (same keys as a plain
GPTModel, so `evaluate` and Megatron-LM load the result as a normal run) plus
`kd_projection.weight` when a learned projection exists; loaders that ask only
for the GPT keys ignore it.
"""

import contextlib
import copy
import warnings
from typing import Optional, Sequence, Tuple

import torch

from minitron_megatron.config.distill import DistillConfig
from minitron_megatron.distill.intermediate import capture_hidden_states, intermediate_loss
from minitron_megatron.distill.router_kd import RouterPair, capture_router_logits, router_kd_loss
from minitron_megatron.distill.objective import fused_per_token_components, per_token_components

PROJECTION = "kd_projection."


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the teacher never trains."""
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def fused_linear_unsupported(gpt) -> Optional[str]:
    """Why `kd_impl=fused_linear` cannot replace this GPTModel's output layer, or None.

    The fused loss does exactly `hidden @ weight.T` on the vocab-parallel shard, with
    hidden states replicated over TP; anything else the output layer or `_postprocess`
    would do must keep the logits path.
    """
    cfg = gpt.config
    if getattr(cfg, "mtp_num_layers", None):
        return "multi-token prediction adds its own output-layer losses in GPTModel._postprocess"
    if getattr(cfg, "defer_embedding_wgrad_compute", False):
        return "defer_embedding_wgrad_compute: the schedule computes the output layer's weight gradient later"
    if cfg.sequence_parallel:
        # Needs a gather of the hidden states with a split backward before the loss; not
        # done yet, because sequence parallelism needs Transformer Engine, absent on CPU,
        # so it could not be tested here.
        return "sequence_parallel: hidden states are split over TP ranks (not yet supported by fused_linear)"
    if not getattr(gpt, "parallel_output", True):
        return "parallel_output=False: the output layer gathers the whole vocabulary"
    return None


def output_weight(gpt) -> torch.Tensor:
    """The output-layer weight shard [v_padded/tp, h] that GPTModel._postprocess multiplies by."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def final_hidden_states(gpt):
    """GPTModel.forward returns the decoder's output [s, b, h] instead of logits.

    `_postprocess` returns early when `post_process` is False; the decoder was built
    with its final norm, which still runs, so the states are post-norm.
    """
    post_process = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = post_process


def pipeline_config(student_config, teacher_hidden: int, pp_size: int,
                    teacher_dtype: Optional[torch.dtype] = None):
    """A copy of the student's TransformerConfig describing the inter-stage tensor:
    [s, b, h_s + h_t] in the wider of the student's and the teacher's dtypes."""
    config = copy.copy(student_config)  # shallow: no __post_init__ re-validation
    if pp_size > 1:
        config.hidden_size = student_config.hidden_size + teacher_hidden
        if teacher_dtype is not None:
            config.pipeline_dtype = torch.promote_types(student_config.pipeline_dtype, teacher_dtype)
    return config


class DistillationModel(torch.nn.Module):
    """Student (`self.module`, trained) + frozen teacher (`self.teacher`) on this rank's stage.

    Named `module` so that Megatron's `get_attr_wrapped_model` finds the student's
    attributes (`pre_process`, `decoder`, `shared_embedding_or_output_weight`, ...)
    through this wrapper as it does through DDP and Float16Module.
    """

    def __init__(self, student, teacher, settings: DistillConfig, *, true_vocab_size: int, tp_group=None,
                 pp_size: Optional[int] = None, layer_pairs: Sequence[Tuple[int, int]] = (),
                 projection: Optional[torch.nn.Module] = None, router_pairs: Sequence[RouterPair] = ()):
        """tp_group / pp_size default to the student GPTModel's own groups; router_pairs: the
        paired MoE layers of a router-logit loss (router_kd.py), PP=1 only."""
        super().__init__()
        tp_group = tp_group if tp_group is not None else getattr(student, "tp_group", None)
        if pp_size is None:
            pp_group = getattr(student, "pp_group", None)
            pp_size = pp_group.size() if pp_group is not None else 1
        if (layer_pairs or router_pairs) and pp_size > 1:
            raise ValueError("intermediate-state and router-logit losses need pipeline parallel size 1")
        self.module = student
        self.kd_projection = projection
        self.__dict__["teacher"] = freeze(teacher)  # not a submodule: see the module docstring
        self.settings = settings
        self.true_vocab_size = true_vocab_size
        self.tp_group = tp_group
        self.layer_pairs = [tuple(p) for p in layer_pairs]
        self.embedding_loss = bool(layer_pairs) and settings.embedding_loss
        self.router_pairs = [(s, t, list(e)) for s, t, e in router_pairs]
        # The teacher's actual dtype (teacher.precision casts it after its build; fp8: bf16 activations).
        teacher_dtype = next(teacher.parameters()).dtype
        self.config = pipeline_config(student.config, teacher.config.hidden_size, pp_size, teacher_dtype)
        self.kd_impl = self._resolve_impl(settings.kd_impl)
        self._teacher_rows_cache = {}  # fused_linear at mismatched padding: the teacher's re-sliced weight

    def _resolve_impl(self, impl: str) -> str:
        """fused_linear, unless an output layer needs the logits path: then the chunked loss."""
        if impl != "fused_linear":
            return impl
        for name, gpt in (("student", self.module), ("teacher", self.teacher)):
            reason = fused_linear_unsupported(gpt)
            if reason is not None:
                warnings.warn(f"distill.kd_impl=fused_linear: the {name}'s {reason}; using the chunked "
                              "logits loss (kd_impl=torch)")
                return "torch"
        return impl

    def _apply(self, fn, *args, **kwargs):
        """`.cuda()`, `.to()`, `.bfloat16()` (Megatron-LM's get_model, Float16Module) reach the
        hidden teacher too, so it always sits on the student's device."""
        self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ pipeline plumbing

    def set_input_tensor(self, input_tensor) -> None:
        """Split the received [s, b, h_s + h_t] tensor between student and teacher."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.module.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        h_s = self.module.config.hidden_size
        # A view, or a cast when the pipeline dtype is wider: either keeps the graph to the received buffer.
        self.module.set_input_tensor(input_tensor[..., :h_s].to(self.module.config.params_dtype))
        # The teacher's actual dtype: a wrapper such as Float16Module may have cast it.
        teacher_dtype = next(self.teacher.parameters()).dtype
        self.teacher.set_input_tensor(input_tensor[..., h_s:].detach().to(teacher_dtype).contiguous())

    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None, **kwargs):
        """Non-last stage: [s, b, h_s + h_t]. Last stage: per-token (kd, lm, is, router) [b, s, 4]
        with `labels`, else the student's vocab-parallel logits [b, s, v_s/tp].

        loss_mask [b, s], optional: the mask the loss function will apply. With
        kd_impl=fused_linear, the tokens it masks then cost no gradient work (without it,
        the loss's backward recomputes their logits); the results are the same."""
        s_layers = [s for s, _ in self.layer_pairs]
        t_layers = [t for _, t in self.layer_pairs]
        fused = self.kd_impl == "fused_linear" and labels is not None and self.module.post_process
        hidden_only = final_hidden_states if fused else lambda _: contextlib.nullcontext()
        with capture_hidden_states(self.module, s_layers, self.embedding_loss) as s_states, \
                capture_hidden_states(self.teacher, t_layers, self.embedding_loss) as t_states, \
                capture_router_logits(self.module, [s for s, _, _ in self.router_pairs]) as s_routes, \
                capture_router_logits(self.teacher, [t for _, t, _ in self.router_pairs]) as t_routes:
            with torch.no_grad(), hidden_only(self.teacher):
                teacher_out = self.teacher(input_ids, position_ids, attention_mask, **kwargs)
            with hidden_only(self.module):
                student_out = self.module(input_ids, position_ids, attention_mask, **kwargs)
        if not self.module.post_process:
            dtype = self.config.pipeline_dtype
            return torch.cat([student_out.to(dtype), teacher_out.to(dtype)], dim=-1)  # [s, b, h_s + h_t]
        if labels is None:
            return student_out
        state_loss = self._state_loss(s_states, t_states) if self.layer_pairs else None
        router_loss = None
        if self.router_pairs:
            router_loss = router_kd_loss(s_routes, t_routes, self.router_pairs, batch=input_ids.shape[0])  # [b, s]
        tp_group = self.tp_group if torch.distributed.is_initialized() and self._tp_size() > 1 else None
        if fused:  # student_out, teacher_out: [s, b, h] final hidden states
            return fused_per_token_components(
                student_out, output_weight(self.module), teacher_out, output_weight(self.teacher), labels,
                self.settings, tp_group=tp_group, true_vocab_size=self.true_vocab_size, state_loss=state_loss,
                teacher_weight_cache=self._teacher_rows_cache, loss_mask=loss_mask, router_loss=router_loss,
            )
        return per_token_components(student_out, teacher_out, labels, self.settings, tp_group=tp_group,
                                    true_vocab_size=self.true_vocab_size, state_loss=state_loss,
                                    impl=self.kd_impl, router_loss=router_loss)

    def _tp_size(self) -> int:
        return torch.distributed.get_world_size(self.tp_group) if self.tp_group is not None else 1

    def _state_loss(self, s_states, t_states) -> torch.Tensor:
        return intermediate_loss(
            s_states, t_states, self.layer_pairs, self.embedding_loss,
            student_norm=self.module.decoder.final_layernorm, teacher_norm=self.teacher.decoder.final_layernorm,
            projection=self.kd_projection, kind=self.settings.intermediate_loss,
            sequence_parallel=self.module.config.sequence_parallel,
        )  # [b, s]

    # ------------------------------------------------------------------ checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The student's own sharded state (plain GPTModel keys) + the projection, if any."""
        state = self.module.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        if self.kd_projection is not None:
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            # Replicated over TP and DP (replica ids from Megatron's parallel state).
            local = self.kd_projection.state_dict(prefix="", keep_vars=True)
            state.update(make_sharded_tensors_for_checkpoint(state_dict=local, prefix=f"{prefix}{PROJECTION}",
                                                             sharded_offsets=sharded_offsets))
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        """Inverse of `sharded_state_dict`: student keys to the student, the rest to the projection.

        A state with no projection at all is a plain student's (a pruned run dir: the start of
        KD, e.g. Megatron-LM's `--load` of it): the projection keeps its initialisation, also
        under `strict`. Resuming a KD run finds it in the checkpoint and loads it.
        """
        projection = {k[len(PROJECTION):]: v for k, v in state_dict.items() if k.startswith(PROJECTION)}
        student = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTION)}
        result = self.module.load_state_dict(student, strict=strict)
        if self.kd_projection is not None and projection:
            self.kd_projection.load_state_dict(projection, strict=strict)
        elif projection and strict:
            raise RuntimeError(f"unexpected projection weights {sorted(projection)} for a model without one")
        return result
