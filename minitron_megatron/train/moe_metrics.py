"""The MoE router's auxiliary losses as step metrics, logged apart from the LM / KD loss.

Megatron adds a MoE student's load-balancing (and z-) loss to its gradients by itself (the
router attaches them to its activations with `MoEAuxLossAutoScaler`, weighted by
`model.moe_aux_loss_coeff` / `moe_z_loss_coeff`), whatever loss the step's forward returns: a
distillation objective keeps them with their own weights. What Megatron leaves to its caller is
the logging: each router adds its unweighted loss into a per-layer tracker every microbatch.
`step_metrics` reads that tracker after an optimizer step (reduced across ranks with
Megatron's own `reduce_aux_losses_tracker_across_ranks`), as Megatron-LM's `track_moe_metrics`
does: the sum over layers / the number of layers, per microbatch, then clears it.
"""

from typing import Dict

# Megatron's tracker names -> our metric names.
TRACKED = {"load_balancing_loss": "moe_load_balancing_loss", "seq_load_balancing_loss": "moe_seq_load_balancing_loss",
           "global_load_balancing_loss": "moe_global_load_balancing_loss", "z_loss": "moe_z_loss"}


def _tracker() -> dict:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return get_moe_layer_wise_logging_tracker()


def clear() -> None:
    """Forget whatever an earlier stage of this process left in the tracker."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def step_metrics(num_microbatches: int) -> Dict[str, float]:
    """{metric: value} for the step just taken ({} for a dense model). Collective over every
    rank when the model has MoE layers (all ranks of a run build the same kind of model)."""
    from megatron.core.transformer.moe.moe_utils import reduce_aux_losses_tracker_across_ranks

    tracker = _tracker()
    names = [name for name in tracker if name in TRACKED]
    if not names:
        return {}
    reduce_aux_losses_tracker_across_ranks(track_names=names)
    out = {}
    for name in names:
        values = tracker[name]["values"]  # [num_layers]: this step's sum over its microbatches
        out[TRACKED[name]] = float(values.sum() / values.numel() / num_microbatches)
    clear()
    return out
