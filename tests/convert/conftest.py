"""One set of tiny HF models per test session, shared by every convert test."""

import pytest

from tests.convert.hf_models import build_all


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{family: HF dir}; each dir also holds reference_logits.pt for the batch in tokens.pt."""
    root = tmp_path_factory.mktemp("hf_models")
    return build_all(root)
