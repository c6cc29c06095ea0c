"""Teardown between in-process stages (the search runs trim, distil, trim, ... in one process).

Everything a stage built (its model, Megatron DDP, optimizer, datasets) is garbage once the
stage returns, but not all of it is freed then: Megatron's DDP sits in reference cycles (its
backward hooks, the TransformerConfig's `no_sync_func` and `grad_scale_func` bound to DDP and the
optimizer, each parameter's `main_grad` a view of DDP's grad buffer), which reference counting
never frees; only the cycle collector does, whenever its allocation thresholds next say so.
Until then the previous candidate's weights, gradient buffer and Adam state stay resident
next to the next candidate's. `release_stage` runs the collector at the stage boundary.
"""

import gc

import torch


def release_stage() -> int:
    """Free what the finished stage left in cycles; returns how many objects were collected."""
    collected = gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the freed blocks back to the driver: the next stage is another shape
    return collected
