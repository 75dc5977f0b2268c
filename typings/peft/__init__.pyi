# Stub for the few top-level peft names diffcaps imports. peft ships its own types, but
# following them pulls in all of transformers (slow); this stub keeps mypy inside peft's
# public surface. Keep it honest with:
#   python -m mypy.stubtest peft --mypy-config-file mypy.ini --ignore-missing-stub
from collections.abc import Sequence
from typing import Any, Literal

import torch

class PeftConfig:
    peft_type: Any
    def __init__(
        self,
        task_type: Any = ...,
        peft_type: Any = ...,
        auto_mapping: dict[str, Any] | None = ...,
        peft_version: str | None = ...,
        base_model_name_or_path: str | None = ...,
        revision: str | None = ...,
        inference_mode: bool = ...,
    ) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...

class LoraConfig(PeftConfig):
    r: int
    lora_alpha: float
    lora_bias: bool
    def __init__(
        self,
        task_type: Any = ...,
        peft_type: Any = ...,
        auto_mapping: dict[str, Any] | None = ...,
        peft_version: str | None = ...,
        base_model_name_or_path: str | None = ...,
        revision: str | None = ...,
        inference_mode: bool = ...,
        r: int = ...,
        target_modules: list[str] | str | None = ...,
        exclude_modules: list[str] | str | None = ...,
        lora_alpha: float = ...,
        lora_dropout: float = ...,
        fan_in_fan_out: bool = ...,
        bias: Literal["none", "all", "lora_only"] = ...,
        use_rslora: bool = ...,
        modules_to_save: list[str] | None = ...,
        init_lora_weights: bool | str = ...,
        layers_to_transform: list[int] | int | None = ...,
        layers_pattern: list[str] | str | None = ...,
        rank_pattern: dict[str, int] | None = ...,
        alpha_pattern: dict[str, float] | None = ...,
        megatron_config: dict[str, Any] | None = ...,
        megatron_core: str | None = ...,
        trainable_token_indices: Any = ...,
        loftq_config: Any = ...,
        eva_config: Any = ...,
        corda_config: Any = ...,
        lora_ga_config: Any = ...,
        use_dora: bool = ...,
        velora_config: Any = ...,
        alora_invocation_tokens: list[int] | None = ...,
        use_qalora: bool = ...,
        qalora_group_size: int = ...,
        monteclora_config: Any = ...,
        layer_replication: list[tuple[int, int]] | None = ...,
        runtime_config: Any = ...,
        lora_bias: bool = ...,
        target_parameters: list[str] | None = ...,
        use_bdlora: Any = ...,
        arrow_config: Any = ...,
        kasa_config: Any = ...,
        ensure_weight_tying: bool = ...,
    ) -> None: ...

class LoKrConfig(PeftConfig):
    r: int
    alpha: float
    def __init__(
        self,
        task_type: Any = ...,
        peft_type: Any = ...,
        auto_mapping: dict[str, Any] | None = ...,
        peft_version: str | None = ...,
        base_model_name_or_path: str | None = ...,
        revision: str | None = ...,
        inference_mode: bool = ...,
        rank_pattern: dict[str, int] | None = ...,
        alpha_pattern: dict[str, float] | None = ...,
        r: int = ...,
        alpha: float = ...,
        rank_dropout: float = ...,
        module_dropout: float = ...,
        use_effective_conv2d: bool = ...,
        decompose_both: bool = ...,
        decompose_factor: int = ...,
        rank_dropout_scale: bool = ...,
        target_modules: list[str] | str | None = ...,
        exclude_modules: list[str] | str | None = ...,
        init_weights: bool | Literal["lycoris"] = ...,
        layers_to_transform: list[int] | int | None = ...,
        layers_pattern: list[str] | str | None = ...,
        modules_to_save: list[str] | None = ...,
    ) -> None: ...

class LoHaConfig(PeftConfig):
    r: int
    alpha: float
    def __init__(
        self,
        task_type: Any = ...,
        peft_type: Any = ...,
        auto_mapping: dict[str, Any] | None = ...,
        peft_version: str | None = ...,
        base_model_name_or_path: str | None = ...,
        revision: str | None = ...,
        inference_mode: bool = ...,
        rank_pattern: dict[str, int] | None = ...,
        alpha_pattern: dict[str, float] | None = ...,
        r: int = ...,
        alpha: float = ...,
        rank_dropout: float = ...,
        module_dropout: float = ...,
        use_effective_conv2d: bool = ...,
        target_modules: list[str] | str | None = ...,
        exclude_modules: list[str] | str | None = ...,
        init_weights: bool = ...,
        layers_to_transform: list[int] | int | None = ...,
        layers_pattern: list[str] | str | None = ...,
        modules_to_save: list[str] | None = ...,
    ) -> None: ...

def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: torch.nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module: ...

__all__: Sequence[str]
