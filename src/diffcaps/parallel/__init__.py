"""Context parallelism: one sequence split over several ranks, over torch.distributed.

``enable(model, ContextParallelConfig(ulysses_degree=2, ring_degree=1))``, called on every
rank, applies the model's context-parallel plan: each rank keeps its shard of what the plan
splits (the model's inputs, or a submodule's inputs or output inside it), attention runs
Ulysses (all-to-all over heads), ring (K/V passed around with an online-softmax merge) or
both on a 2-D grid, and the declared outputs are gathered so every rank returns the whole
result. Any sequence length and head count works. ``active(model)``
gives the config in force, ``assignment(model)`` the shard this rank holds, and
``disable(model)`` restores the model exactly. What a model declares is in
:mod:`diffcaps.parallel.spec`.
"""

from diffcaps.parallel._api import (
    active as active,
    assignment as assignment,
    disable as disable,
    enable as enable,
)
from diffcaps.parallel._config import ContextParallelConfig as ContextParallelConfig, ShardAssignment as ShardAssignment
from diffcaps.parallel._layout import shard_sizes as shard_sizes

__all__ = [
    "ContextParallelConfig",
    "ShardAssignment",
    "active",
    "assignment",
    "disable",
    "enable",
    "shard_sizes",
]
