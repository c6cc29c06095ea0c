"""Drop-in knowledge distillation for Megatron-LM `pretrain_gpt.py`-style recipes.

Three changes to an existing recipe (see docs/distill.md for the full snippet):

    from minitron_megatron.config.distill import DistillConfig
    from minitron_megatron.distill.api import distillation_loss_func, distillation_model_provider

    kd = DistillConfig(logit_loss="forward_kl", temperature=1.0)
    provider = distillation_model_provider(
        model_provider,                      # builds the student, as before
        teacher_provider=teacher_provider,   # same signature, builds the teacher architecture
        teacher_checkpoint="/ckpt/teacher",  # a Megatron-LM torch_dist --save dir
        settings=kd, true_vocab_size=tokenizer.vocab_size,
    )
    loss = distillation_loss_func(kd)
    # in forward_step:  return model(tokens, position_ids, attention_mask, labels=labels), partial(loss, loss_mask)
    pretrain(datasets_provider, provider, ModelType.encoder_or_decoder, forward_step, ...)

The provider returns a `DistillationModel`: the student with its frozen teacher
attached (same pipeline stage, same ranks). Megatron-LM wraps it in Float16Module
and DDP as usual; only the student's parameters reach the optimizer and the
checkpoint, and the saved checkpoint loads as a plain student GPTModel. At
PP > 1 the model's `config.hidden_size` is the student + teacher width of the
tensor sent between stages, so Megatron-LM's schedule needs no patch.
Not supported: virtual (interleaved) pipeline stages, intermediate losses at PP > 1.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch

from minitron_megatron.config.distill import DistillConfig
from minitron_megatron.distill.intermediate import build_projection, resolve_layer_map
from minitron_megatron.distill.model import DistillationModel
from minitron_megatron.distill.objective import DistillLoss
from minitron_megatron.model.build import DTYPES


def load_teacher(teacher: torch.nn.Module, checkpoint_root: str) -> None:
    """Load a Megatron dist checkpoint (`ROOT/latest_checkpointed_iteration.txt` +
    `iter_*/`, as Megatron-LM's --save writes it) into this rank's teacher shard."""
    from minitron_megatron.checkpoint import dist as ckpt

    ckpt.load_checkpoint(checkpoint_root, teacher, ctx=None)  # a model-only load uses no context


def attach_teacher(student, teacher, settings: DistillConfig, *, true_vocab_size: int,
                   teacher_dtype: Optional[str] = None, seed: int = 1234) -> DistillationModel:
    """The student with a frozen `teacher` attached; an intermediate loss (PP=1 only) adds
    the learned projection when the hidden sizes differ."""
    if teacher_dtype is not None:
        teacher = teacher.to(DTYPES[teacher_dtype])
    pairs = _layer_pairs(student, teacher, settings)
    projection = None
    h_s, h_t = student.config.hidden_size, teacher.config.hidden_size
    if pairs and h_s != h_t:
        if not settings.projection:
            raise ValueError(f"student hidden size {h_s} != teacher {h_t}: intermediate losses need "
                             "settings.projection=True")
        device = next(student.parameters()).device
        projection = build_projection(h_s, h_t, student.config.params_dtype, device, seed,
                                      student.config.sequence_parallel)
    return DistillationModel(student, teacher, settings, true_vocab_size=true_vocab_size,
                             layer_pairs=pairs, projection=projection)


def _layer_pairs(student, teacher, settings: DistillConfig) -> Sequence[Tuple[int, int]]:
    if settings.intermediate_loss is None:
        return []
    return resolve_layer_map(settings.layer_map, student.config.num_layers, teacher.config.num_layers)


def distillation_model_provider(student_provider: Callable, *, teacher_provider: Callable,
                                teacher_checkpoint: str, settings: DistillConfig, true_vocab_size: int,
                                teacher_dtype: Optional[str] = None) -> Callable:
    """Wrap a Megatron-LM model provider so that it returns the student with its teacher.

    Both providers are called with the same arguments (`pre_process`, `post_process`,
    and whatever else Megatron-LM passes), so teacher and student get the same stage.
    """

    def provider(*args, **kwargs):
        if kwargs.get("vp_stage") is not None:
            raise ValueError("distillation does not support virtual pipeline stages")
        student = student_provider(*args, **kwargs)
        teacher = teacher_provider(*args, **kwargs)
        load_teacher(teacher, teacher_checkpoint)
        return attach_teacher(student, teacher, settings, true_vocab_size=true_vocab_size,
                              teacher_dtype=teacher_dtype)

    return provider


def distillation_loss_func(settings: DistillConfig) -> DistillLoss:
    """The replacement for pretrain_gpt's `loss_func(loss_mask, output_tensor)`.

    Returns Megatron-LM's 3-tuple (loss sum, tokens, {"loss", "kd loss", "lm loss",
    ["is loss", "alpha"]: [sum, count]}); Megatron-LM logs every reported key.
    """
    return DistillLoss(settings, has_state_loss=settings.intermediate_loss is not None)
