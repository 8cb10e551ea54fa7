"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
from train_util import build_mnist_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """MNIST identity + sequence shard sets, built once for every training test."""
    return build_mnist_shards(tmp_path_factory.mktemp("shards"))
