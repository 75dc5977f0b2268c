"""Type-checked, never run: what the core API must accept and what mypy must reject.

Lines that must fail carry ``# type: ignore[<code>]``; mypy --strict reports an unused
ignore, so a line that starts to pass fails the check.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, assert_type

import attrs
import torch

from diffcaps import Capabilities, Model, ModelMetadata, ModuleTypes
from diffcaps.lora._service import LoRAService
from diffcaps.models.flux import FluxCapabilities, FluxConfig, FluxOutput, FluxTransformer2DModel
from diffcaps.protocols import SupportsLoRA, SupportsRepeatedBlocks, supports_lora
from tests.custom_model import TinyDiT, TinyDiTConfig

# --- loading returns the caller's class and its config type -----------------------------
flux = FluxTransformer2DModel.from_pretrained(Path("some/folder"), torch_dtype=torch.bfloat16)
assert_type(flux, FluxTransformer2DModel)
assert_type(flux.config, FluxConfig)
assert_type(flux.config.inner_dim, int)
assert_type(TinyDiT.from_pretrained("x").config, TinyDiTConfig)
assert_type(FluxTransformer2DModel.metadata(), ModelMetadata)
assert_type(FluxTransformer2DModel.capabilities, FluxCapabilities)
assert_type(FluxTransformer2DModel.capabilities.repeated_blocks, ModuleTypes)
assert_type(Capabilities().repeated_blocks, ModuleTypes | None)

x = torch.zeros(1)
assert_type(flux.forward(x, x, x, x, x, x), FluxOutput)
assert_type(flux.forward(x, x, x, x, x, x, return_dict=False), tuple[torch.Tensor])


# --- a feature function accepts only models that declare the feature ---------------------
def compile_blocks(model: SupportsRepeatedBlocks) -> ModuleTypes:
    return model.capabilities.repeated_blocks


def load_lora(model: SupportsLoRA) -> LoRAService:
    return model.capabilities.lora


compile_blocks(flux)
compile_blocks(FluxTransformer2DModel)
compile_blocks(TinyDiT)
load_lora(TinyDiT)  # type: ignore[arg-type]
load_lora(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def maybe(model: TinyDiT) -> None:
    if supports_lora(model):
        load_lora(model)  # narrowed by the TypeGuard


# --- a capability cannot be narrowed back to None in a subclass -------------------------
@attrs.frozen(kw_only=True)
class WithBlocks(Capabilities):
    repeated_blocks: ModuleTypes = attrs.field(
        default=ModuleTypes((torch.nn.Linear,)), validator=attrs.validators.instance_of(ModuleTypes)
    )


@attrs.frozen(kw_only=True)
class LostBlocks(WithBlocks):
    repeated_blocks: None = None  # type: ignore[assignment]


class NotAModel(Model[FluxConfig]):
    capabilities: ClassVar[Capabilities] = Capabilities()


compile_blocks(NotAModel)  # type: ignore[arg-type]


# --- concrete capability classes are final; capabilities are frozen ---------------------
@attrs.frozen(kw_only=True)
class MoreFlux(FluxCapabilities):  # type: ignore[misc]
    pass


FluxTransformer2DModel.capabilities.repeated_blocks = ModuleTypes((torch.nn.Linear,))  # type: ignore[misc]
flux.capabilities = FluxCapabilities()  # type: ignore[misc]
FluxConfig().num_layers = 3  # type: ignore[misc]
