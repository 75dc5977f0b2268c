"""What a model author declares for context parallelism: what is split, where, and what is gathered.

A model's capabilities hold one :class:`ContextParallelPlan`:

- ``inputs``: its forward inputs split across ranks (:class:`SplitInput`, by parameter name);
- ``inside``: splits inside the model (:class:`SplitAt`, by submodule path; ``*`` matches any
  one path component): a submodule's forward arguments, split before it runs, or its output,
  split after it ran — for a model whose tokens exist only after an embedding;
- ``outputs``: the submodules whose outputs are gathered back (:class:`GatherOutput`);
- ``attention``: the attention module classes whose ``kernel(query, key, value)`` method is
  replaced by the distributed algorithm (modules of other classes attend as they are: a
  cross-attention to an unsplit context needs nothing).

Splitting the model's own inputs::

    context_parallel: ContextParallelPlan = capability(ContextParallelPlan(
        inputs={"hidden_states": SplitInput(ndim=3, dim=1)},
        outputs={"proj_out": GatherOutput(ndim=3, dim=1)},
        attention=ModuleTypes((MyAttention,)),
    ))

Splitting inside (tokens made by a patch embedding, RoPE computed from the latent's shape)::

    ContextParallelPlan(
        inside={
            "rope": SplitAt(output=SplitInput(ndim=2, dim=0, stream="tokens")),
            "blocks.0": SplitAt(inputs={"hidden_states": SplitInput(ndim=3, dim=1, stream="tokens")}),
        },
        outputs={"norm_out": GatherOutput(ndim=3, dim=1)},
        attention=ModuleTypes((MySelfAttention,)),
    )

Inputs and outputs of one ``stream`` hold the same tokens and must have the same length.
Every split and gather hook wraps the other features' hooks on its module (it has the
highest :attr:`diffcaps.hooks.Hook.order`), so those see this rank's shard whichever was
enabled first.
"""

from diffcaps.parallel._service import (
    ContextParallelPlan as ContextParallelPlan,
    GatherOutput as GatherOutput,
    SplitAt as SplitAt,
    SplitInput as SplitInput,
)

__all__ = ["ContextParallelPlan", "GatherOutput", "SplitAt", "SplitInput"]
