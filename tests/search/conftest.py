"""One tiny teacher for every search test: the session's `small_teacher` (tests/conftest.py;
the search only needs a loadable model whose candidates differ)."""

import pytest


@pytest.fixture(scope="session")
def teacher(small_teacher):
    return small_teacher
