"""runtime/cpu_support.py: what enable() redirects to the CPU, disable() puts back."""

import pytest
import torch

from minitron_megatron.runtime import cpu_support

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat


def test_disable_restores_every_cuda_and_moe_patch():
    """Catches a patch that outlives the runtime (a later CUDA run in the same process would get
    host streams, or Megatron's alltoall dispatcher would keep converting host tensors)."""
    from megatron.core.transformer.moe import token_dispatcher

    originals = (torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream, torch.cuda.current_device,
                 token_dispatcher.maybe_move_tensor_to_cpu)
    cpu_support.enable()
    try:
        stream = torch.cuda.Stream(device="cuda", priority=-1)  # as the alltoall dispatcher creates it
        with torch.cuda.stream(stream):
            stream.record_event().synchronize()
        assert torch.cuda.current_stream() != stream  # the dispatcher's "side stream" test: waits are no-ops
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert splits.tolist() == [3, 1] and not torch.is_tensor(splits)  # all_to_all_single takes it
    finally:
        cpu_support.disable()
    assert (torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream, torch.cuda.current_device,
            token_dispatcher.maybe_move_tensor_to_cpu) == originals
