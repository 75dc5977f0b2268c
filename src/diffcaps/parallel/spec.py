"""What a model author declares for context parallelism: what is split, what is gathered."""

from diffcaps.parallel._service import (
    ContextParallelPlan as ContextParallelPlan,
    GatherOutput as GatherOutput,
    SplitInput as SplitInput,
)

__all__ = ["ContextParallelPlan", "GatherOutput", "SplitInput"]
