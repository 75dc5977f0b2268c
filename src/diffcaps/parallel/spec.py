"""What a model author declares for context parallelism: what is split, what is gathered.

A model's capabilities hold one :class:`ContextParallelPlan`: its forward inputs that are
split across ranks (:class:`SplitInput`, by parameter name), the submodules whose outputs are
gathered back (:class:`GatherOutput`, by dotted name), and the attention module classes whose
``kernel(query, key, value)`` method is replaced by the distributed algorithm::

    context_parallel: ContextParallelPlan = capability(ContextParallelPlan(
        inputs={"hidden_states": SplitInput(ndim=3, dim=1)},
        outputs={"proj_out": GatherOutput(ndim=3, dim=1)},
        attention=ModuleTypes((MyAttention,)),
    ))
"""

from diffcaps.parallel._service import (
    ContextParallelPlan as ContextParallelPlan,
    GatherOutput as GatherOutput,
    SplitInput as SplitInput,
)

__all__ = ["ContextParallelPlan", "GatherOutput", "SplitInput"]
