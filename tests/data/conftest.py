"""The data tests' fixtures: the byte tokenizer and the KJV validation documents."""

import pytest

from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def byte():
    return build_tokenizer("byte")


@pytest.fixture(scope="session")
def val_docs(kjv_dir) -> list[str]:
    src = open_source("kjv", "validation", data_dir=kjv_dir)
    return [src[i] for i in range(len(src))]
