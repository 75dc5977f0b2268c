"""Context parallelism: one sequence split over several ranks, over torch.distributed.

``enable_context_parallel(model, ulysses_degree=..., ring_degree=...)`` applies the model's
:class:`ContextParallelPlan`: each rank keeps its shard of the split inputs, attention runs
Ulysses (all-to-all over heads), ring (K/V passed around with an online-softmax merge) or both
on a 2-D grid, and the declared outputs are gathered so every rank returns the whole result.
Any sequence length and head count works. ``disable(model)`` restores the model exactly.
"""

from diffcaps.parallel._api import (
    ContextParallelConfig as ContextParallelConfig,
    current as current,
    disable as disable,
    disable_context_parallel as disable_context_parallel,
    enable_context_parallel as enable_context_parallel,
)
from diffcaps.parallel._layout import shard_sizes as shard_sizes
from diffcaps.parallel._service import (
    ContextParallelPlan as ContextParallelPlan,
    GatherOutput as GatherOutput,
    SplitInput as SplitInput,
)

__all__ = [
    "ContextParallelConfig",
    "ContextParallelPlan",
    "GatherOutput",
    "SplitInput",
    "current",
    "disable",
    "disable_context_parallel",
    "enable_context_parallel",
    "shard_sizes",
]
