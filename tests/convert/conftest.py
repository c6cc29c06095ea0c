"""One set of tiny HF models per test session, shared by every convert test."""

import pytest

from tests.convert.hf_models import build_all


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{family: HF dir}; each dir also holds reference_logits.pt for the batch in tokens.pt."""
    root = tmp_path_factory.mktemp("hf_models")
    return build_all(root)


@pytest.fixture(scope="session")
def hf_moe_models(hf_models):
    """{family: HF dir} of the mixture-of-experts families (Mixtral, Qwen2-MoE), built next to
    hf_models (same tokenizer and tokens.pt), each with its reference_logits.pt."""
    from tests.convert.hf_models import build_moe

    return build_moe(next(iter(hf_models.values())).parent)
