"""Shared multi-process runs: one TP=1 reference launch and one 2-process launch that goes
through every 2-rank layout (re-initialising the runtime between layouts is cheaper than
spawning again). Results are files in a session tmp dir; see workers.py."""

import pytest

from tests.dist_utils import run_distributed
from tests.importance import workers


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("importance_runs")
    run_distributed(workers.reference_worker, 1, str(out))
    return out


@pytest.fixture(scope="session")
def parallel_run(reference_run):
    run_distributed(workers.parallel_worker, 2, str(reference_run), ["tp2", "pp2", "dp2", "sp_synthetic"])
    return reference_run
