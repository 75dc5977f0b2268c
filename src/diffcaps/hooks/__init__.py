"""Generic, removable hooks around ``nn.Module.forward``, with per-context state.

Any feature that needs to act inside a model's forward (inference caches, offloading,
layerwise casting, context parallelism) builds on this module and names no model class:

- :class:`Hook` — override ``pre_forward``, ``new_forward`` (replace the call), ``post_forward``,
  ``reset``; :func:`add_hook` / :func:`remove_hook` attach and detach it by name. Removing the
  last hook of a module restores its ``forward`` exactly. Hooks on one module nest in a
  defined order: by ``Hook.order`` (higher outside; :data:`SHARDING` for hooks that split or
  gather a call's data, so feature hooks always see one rank's shard), then later outside.
- :class:`StateContext` / :class:`ContextualState` — state kept per named context, so that a
  "cond" and an "uncond" pass through the same hooks do not mix.
- :func:`eager` — marks a hook's host-side bookkeeping to run outside ``torch.compile`` graphs.
"""

from diffcaps.hooks._eager import eager as eager
from diffcaps.hooks._hook import SHARDING as SHARDING, Forward as Forward, Hook as Hook
from diffcaps.hooks._registry import (
    add_hook as add_hook,
    get_hook as get_hook,
    hook_names as hook_names,
    hooked_modules as hooked_modules,
    remove_hook as remove_hook,
    reset_hooks as reset_hooks,
)
from diffcaps.hooks._shards import (
    Reducer as Reducer,
    sharded as sharded,
    sum_over_shards as sum_over_shards,
    summing_over_shards as summing_over_shards,
)
from diffcaps.hooks._state import ContextualState as ContextualState, StateContext as StateContext

__all__ = [
    "ContextualState",
    "Forward",
    "Hook",
    "Reducer",
    "SHARDING",
    "StateContext",
    "add_hook",
    "eager",
    "get_hook",
    "hook_names",
    "hooked_modules",
    "remove_hook",
    "reset_hooks",
    "sharded",
    "sum_over_shards",
    "summing_over_shards",
]
