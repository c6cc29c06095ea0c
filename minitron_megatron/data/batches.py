"""Deterministic, resumable micro-batches over a (GPT)Dataset, split across DP ranks.

The global sample order is simply 0, 1, 2, ... (GPTDataset has already
shuffled). Each step takes the next `micro_batch_size * dp_size` samples and
gives rank r the contiguous slice [r * mbs, (r + 1) * mbs), as Megatron-LM's
MegatronPretrainingSampler does, so a run resumed at `consumed_samples`
continues exactly and DP=2 sees the same samples as DP=1.
"""

from typing import Dict, Iterator, Sequence

import torch


def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample tensors: {key: [micro_batch_size, ...]}.

    Non-tensor entries (BlendedDataset's numpy `dataset_id`) are dropped.
    """
    keys = [k for k, v in samples[0].items() if isinstance(v, torch.Tensor)]
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}: "
                         "need micro_batch_size >= 1 and 0 <= dp_rank < dp_size")


class MicroBatchIterator:
    """This DP rank's micro-batches: dicts of tensors shaped [micro_batch_size, seq].

    `consumed_samples` counts global samples (all DP ranks) and advances by
    `micro_batch_size * dp_size` per micro-batch. Iteration stops before a step
    that would run past the end of the dataset.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        _check_layout(micro_batch_size, dp_rank, dp_size)
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed by one micro-batch on every DP rank."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro-batches left before the dataset runs out."""
        return max(0, (len(self.dataset) - self.consumed_samples) // self.samples_per_step)

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self.consumed_samples + self.samples_per_step > len(self.dataset):
            raise StopIteration
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batch = collate([self.dataset[i] for i in range(start, start + self.micro_batch_size)])
        self.consumed_samples += self.samples_per_step
        return batch


def calibration_batches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """The first `num_samples` global samples as this rank's micro-batches (finite).

    `num_samples` is rounded down to a multiple of `micro_batch_size * dp_size`;
    together the DP ranks see exactly the samples one rank would. For forward-only
    passes (importance scoring, validation).
    """
    _check_layout(micro_batch_size, dp_rank, dp_size)
    per_step = micro_batch_size * dp_size
    if not per_step <= num_samples <= len(dataset):
        raise ValueError(f"num_samples={num_samples}: need micro_batch_size*dp_size={per_step} "
                         f"<= num_samples <= dataset size {len(dataset)}")
    iterator = MicroBatchIterator(dataset, micro_batch_size, dp_rank, dp_size)
    steps = num_samples // per_step
    return (next(iterator) for _ in range(steps))

