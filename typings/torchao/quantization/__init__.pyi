from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig

def quantize_(
    model: nn.Module,
    config: AOBaseConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = ...,
    device: torch.device | str | int | None = None,
) -> None: ...

class Int8WeightOnlyConfig(AOBaseConfig):
    group_size: int | None
    granularity: Any
    set_inductor_config: bool
    version: int
    def __init__(self, group_size: int | None = None, granularity: Any = ..., set_inductor_config: bool = True,
                 version: int = 2) -> None: ...

class Float8WeightOnlyConfig(AOBaseConfig):
    weight_dtype: torch.dtype
    set_inductor_config: bool
    version: int
    granularity: Any
    def __init__(self, weight_dtype: torch.dtype = ..., set_inductor_config: bool = True, version: int = 2,
                 granularity: Any = None) -> None: ...
