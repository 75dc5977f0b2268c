"""Type-checked, never run: what the context-parallel functions accept and what mypy rejects.

Lines that must fail carry ``# type: ignore[<code>]``; mypy --strict reports an unused
ignore, so a line that starts to pass fails the check.
"""

from __future__ import annotations

from datetime import timedelta
from typing import assert_type

import torch

from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps import parallel
from diffcaps.parallel import ContextParallelConfig, ShardAssignment, shard_sizes
from diffcaps.parallel.spec import ContextParallelPlan
from diffcaps.protocols import SupportsContextParallel, supports_context_parallel
from tests.custom_model import TinyDiT, seeded_tiny_dit

flux = FluxTransformer2DModel.from_pretrained("some/folder")

# --- a model that declares a plan is accepted, with every config field -----------------------
parallel.enable(flux)
parallel.enable(flux, ContextParallelConfig(ulysses_degree=2, ring_degree=2, mesh=None, timeout=timedelta(seconds=30)))
parallel.enable(flux, ContextParallelConfig(ring_degree=4, timeout=60.0))
assert_type(parallel.active(flux), ContextParallelConfig | None)
assert_type(parallel.assignment(flux), ShardAssignment | None)
assert_type(parallel.disable(flux), None)
assert_type(ContextParallelConfig(timeout=3).timeout, timedelta)
assert_type(FluxTransformer2DModel.declared_capabilities().context_parallel, ContextParallelPlan)
assert_type(shard_sizes(10, 4), tuple[int, ...])

# --- a model without a plan, a model class, or anything else, is rejected --------------------
tiny = seeded_tiny_dit()
parallel.enable(tiny, ContextParallelConfig(ulysses_degree=2))  # type: ignore[arg-type]
parallel.disable(tiny)  # type: ignore[arg-type]
parallel.enable(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
parallel.enable(FluxTransformer2DModel)  # type: ignore[arg-type]
parallel.enable(flux, 2)  # type: ignore[arg-type]
ContextParallelConfig(2)  # type: ignore[call-arg]
ContextParallelConfig(ulysses_degree="2")  # type: ignore[arg-type]


def maybe(model: TinyDiT) -> None:
    if supports_context_parallel(model):
        parallel.enable(model)  # narrowed by the TypeGuard


def generic(model: SupportsContextParallel) -> ContextParallelPlan:
    return model.capabilities.context_parallel
