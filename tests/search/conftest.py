"""One tiny teacher for every search test (trained for 3 steps: the search only needs a
loadable model whose candidates differ; its quality does not matter here)."""

import pytest

from tests.commands import SMALL, run_command


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    save = tmp_path_factory.mktemp("search-teacher") / "teacher"
    run_command("train", *SMALL, "train.steps=3", "train.eval_interval=3", f"save={save}")
    return save
