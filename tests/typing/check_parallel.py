"""Type-checked, never run: what the context-parallel functions accept and what mypy rejects.

Lines that must fail carry ``# type: ignore[<code>]``; mypy --strict reports an unused
ignore, so a line that starts to pass fails the check.
"""

from __future__ import annotations

from datetime import timedelta
from typing import assert_type

import torch

from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.parallel import (
    ContextParallelConfig,
    ContextParallelPlan,
    current,
    disable,
    disable_context_parallel,
    enable_context_parallel,
    shard_sizes,
)
from diffcaps.protocols import SupportsContextParallel, supports_context_parallel
from tests.custom_model import TinyDiT, seeded_tiny_dit

flux = FluxTransformer2DModel.from_pretrained("some/folder")

# --- a model that declares a plan is accepted, with every keyword ----------------------------
enable_context_parallel(flux)
enable_context_parallel(flux, ulysses_degree=2, ring_degree=2, mesh=None, timeout=timedelta(seconds=30))
enable_context_parallel(flux, ring_degree=4, timeout=60.0)
assert_type(current(flux), ContextParallelConfig | None)
assert_type(disable(flux), ContextParallelConfig | None)
assert_type(disable_context_parallel(flux), ContextParallelConfig | None)
assert_type(FluxTransformer2DModel.capabilities.context_parallel, ContextParallelPlan)
assert_type(shard_sizes(10, 4), tuple[int, ...])

# --- a model without a plan, or anything else, is rejected ----------------------------------
tiny = seeded_tiny_dit()
enable_context_parallel(tiny, ulysses_degree=2)  # type: ignore[arg-type]
disable(tiny)  # type: ignore[arg-type]
enable_context_parallel(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
enable_context_parallel(flux, 2)  # type: ignore[call-arg]
enable_context_parallel(flux, ulysses_degree="2")  # type: ignore[arg-type]


def maybe(model: TinyDiT) -> None:
    if supports_context_parallel(model):
        enable_context_parallel(model)  # narrowed by the TypeGuard


def generic(model: SupportsContextParallel) -> ContextParallelPlan:
    return model.capabilities.context_parallel
