"""What a model author declares for group offloading.

A model lists the attribute names of its block lists (each an ``nn.ModuleList``) in a
:class:`GroupOffloading`; ``block_level`` offloading cuts those lists into groups, and
everything else in the model forms one last group::

    group_offloading: GroupOffloading = capability(GroupOffloading(block_lists=("blocks",)))
"""

from diffcaps.offload._service import GroupOffloading as GroupOffloading

__all__ = ["GroupOffloading"]
