"""Shared pytest settings: deterministic, single-process CPU runs; fixtures several packages use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests._distributed import one_rank_group

torch.manual_seed(0)


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-rank gloo process group in this process (context parallelism on one rank)."""
    yield from one_rank_group()
