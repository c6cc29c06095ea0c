"""MicroBatchIterator / calibration_batches: DP split and resume are exact."""

import pytest
import torch

from minitron_megatron.data import MicroBatchIterator, build_gpt_datasets, calibration_batches

SEQ = 8


class CountingDataset:
    """Sample i holds the value i everywhere, so batches show which samples they got."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        return {"tokens": torch.full((SEQ,), idx), "labels": torch.full((SEQ,), idx + 1),
                "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}


def _ids(batches):
    return [int(v) for b in batches for v in b["tokens"][:, 0]]


def test_dp_split_of_the_global_order_equals_dp1():
    dataset = CountingDataset(50)
    single = list(MicroBatchIterator(dataset, 4, 0, 1))
    ranks = [list(MicroBatchIterator(dataset, 2, r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12  # 48 of 50 samples: the partial step is dropped
    merged = [torch.cat([a["tokens"], b["tokens"]]) for a, b in zip(*ranks)]
    assert [m[:, 0].tolist() for m in merged] == [s["tokens"][:, 0].tolist() for s in single]
    assert _ids(single) == list(range(48))
    assert _ids(ranks[0])[:4] == [0, 1, 4, 5] and _ids(ranks[1])[:4] == [2, 3, 6, 7]


def test_resume_continues_exactly():
    dataset = CountingDataset(64)
    for dp_size in (1, 2):
        for rank in range(dp_size):
            full = MicroBatchIterator(dataset, 3, rank, dp_size)
            uninterrupted = list(full)
            first = MicroBatchIterator(dataset, 3, rank, dp_size)
            head = [next(first) for _ in range(4)]
            assert first.consumed_samples == 4 * 3 * dp_size
            resumed = list(MicroBatchIterator(dataset, 3, rank, dp_size, first.consumed_samples))
            assert _ids(head + resumed) == _ids(uninterrupted)
            assert full.consumed_samples == len(uninterrupted) * 3 * dp_size


def test_batch_layout_and_len():
    it = MicroBatchIterator(CountingDataset(20), 3, 1, 2, consumed_samples=6)
    assert len(it) == 2
    batch = next(it)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (3, SEQ), "labels": (3, SEQ), "loss_mask": (3, SEQ), "position_ids": (3, SEQ)}
    assert batch["tokens"][:, 0].tolist() == [9, 10, 11]
    assert len(it) == 1


def test_calibration_batches_are_finite_and_layout_independent():
    dataset = CountingDataset(40)
    one = list(calibration_batches(dataset, 17, 2, 0, 1))
    assert _ids(one) == list(range(16))
    two = [list(calibration_batches(dataset, 16, 2, r, 2)) for r in range(2)]
    assert sorted(_ids(two[0]) + _ids(two[1])) == list(range(16))
    with pytest.raises(ValueError, match="num_samples=41"):
        calibration_batches(dataset, 41, 2, 0, 1)
    with pytest.raises(ValueError, match="num_samples=3"):
        calibration_batches(dataset, 3, 2, 0, 2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        MicroBatchIterator(dataset, 2, 2, 2)


def test_on_a_real_gpt_dataset(stdlib_sources, tokenizer):
    train, valid = build_gpt_datasets(stdlib_sources, tokenizer, 32, 64, None, seed=3)
    batches = list(calibration_batches(valid, 8, 2, 1, 2))
    assert len(batches) == 2
    assert set(batches[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batches[0]["tokens"].shape == (2, 32)
    assert torch.equal(batches[0]["tokens"][0], valid[2]["tokens"])
    step = next(MicroBatchIterator(train, 4, 0, 1, consumed_samples=60))
    assert torch.equal(step["labels"][3], train[63]["labels"])
