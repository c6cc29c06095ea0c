"""Suite-wide set-up. Triton runs kernels in its interpreter on CPU-only machines:
TRITON_INTERPRET must be set before triton is first imported (megatron.core imports it).
Also the one small teacher run dir that tests in several folders read."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """One `train` run dir of tests.commands.SMALL (3 steps: a loadable model, its quality does
    not matter) for every test that only reads it: prune, search and run-setting tests."""
    from tests.commands import SMALL, run_command

    save = tmp_path_factory.mktemp("small-teacher") / "teacher"
    run_command("train", *SMALL, "train.steps=3", "train.eval_interval=3", f"save={save}")
    return save
