"""Suite-wide set-up. Triton runs kernels in its interpreter on CPU-only machines:
TRITON_INTERPRET must be set before triton is first imported (megatron.core imports it).
Also the small teacher run dirs that tests in several folders read (dense and mixture of experts)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Files with a test marked `slow` run first. `make test` runs two pytest-xdist workers that
    take whole files in collection order (--dist loadfile): a minutes-long file collected last
    would leave the other worker idle at the end. Stable: the order within each file is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """One `train` run dir of tests.commands.SMALL (3 steps: a loadable model, its quality does
    not matter) for every test that only reads it: prune, search and run-setting tests."""
    from tests.commands import SMALL, run_command

    save = tmp_path_factory.mktemp("small-teacher") / "teacher"
    run_command("train", *SMALL, "train.steps=3", "train.eval_interval=3", f"save={save}")
    return save


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """(run dir, summary) of one `train` of tests.commands.SMALL_MOE (tiny-moe on 2 layers, 3 steps)
    for the MoE command and search tests."""
    from tests.commands import SMALL_MOE, run_command, summary

    run_dir = tmp_path_factory.mktemp("moe") / "teacher"
    out = summary(run_command("train", *SMALL_MOE, "train.steps=3", f"save={run_dir}"))
    return run_dir, out
