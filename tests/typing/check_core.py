"""Type-checked, never run: what the core API must accept and what both checkers must reject.

Lines that must fail carry ``# type: ignore[<mypy code>]``. mypy --strict reports an unused
ignore, and pyright reports an unnecessary one, so a line that starts to pass fails the check
under either checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import assert_type, final

import attrs
import torch

from diffcaps import Capabilities, Model, ModelConfig, ModelMetadata, ModuleTypes, capability
from diffcaps.casting.spec import LayerwiseCasting
from diffcaps.lora.spec import LoRAService
from diffcaps.metadata import CapabilityRow
from diffcaps.models.flux import FluxCapabilities, FluxConfig, FluxOutput, FluxTransformer2DModel
from diffcaps.protocols import SupportsLoRA, SupportsRepeatedBlocks, require, supports_lora
from tests.custom_model import TinyDiT, TinyDiTConfig

# --- loading returns the caller's class and its config type -----------------------------
flux = FluxTransformer2DModel.from_pretrained(Path("some/folder"), torch_dtype=torch.bfloat16)
assert_type(flux, FluxTransformer2DModel)
assert_type(flux.config, FluxConfig)
assert_type(flux.config.inner_dim, int)
assert_type(TinyDiT.from_pretrained("x").config, TinyDiTConfig)
assert_type(FluxTransformer2DModel.metadata(), ModelMetadata)
assert_type(flux.capabilities, FluxCapabilities)
assert_type(flux.capabilities.repeated_blocks, ModuleTypes)
assert_type(FluxTransformer2DModel.declared_capabilities(), FluxCapabilities)
assert_type(Capabilities().repeated_blocks, ModuleTypes | None)
assert_type(FluxTransformer2DModel.from_config(FluxConfig()), FluxTransformer2DModel)
assert_type(FluxTransformer2DModel.metadata()["lora"], CapabilityRow)

x = torch.zeros(1)
assert_type(flux.forward(x, x, x, x, x, x), FluxOutput)
assert_type(flux.forward(x, x, x, x, x, x, return_dict=False), tuple[torch.Tensor])

# --- the config type follows the model ---------------------------------------------------
TinyDiT.from_config(FluxConfig())  # type: ignore[arg-type]
TinyDiT(FluxConfig())  # type: ignore[arg-type]
FluxTransformer2DModel.from_config(ModelConfig())  # type: ignore[arg-type]


# --- a feature function accepts only model instances that declare the feature -----------
def compile_blocks(model: SupportsRepeatedBlocks) -> ModuleTypes:
    return model.capabilities.repeated_blocks


def load_lora(model: SupportsLoRA) -> LoRAService:
    return model.capabilities.lora


tiny = TinyDiT(TinyDiTConfig())
compile_blocks(flux)
compile_blocks(tiny)
load_lora(flux)
load_lora(tiny)  # type: ignore[arg-type]
load_lora(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
compile_blocks(FluxTransformer2DModel)  # type: ignore[arg-type]
load_lora(FluxTransformer2DModel)  # type: ignore[arg-type]
assert_type(require(flux, "lora"), tuple[torch.nn.Module, LoRAService])
require(tiny, "lora")  # type: ignore[call-overload]


def maybe(model: TinyDiT) -> None:
    if supports_lora(model):
        load_lora(model)  # narrowed by the TypeGuard


# --- a bare Model subclass is what a user writes first ------------------------------------
class Bare(Model):
    pass


assert_type(Bare(ModelConfig()).config, ModelConfig)
assert_type(Bare(ModelConfig()).capabilities, Capabilities)
compile_blocks(Bare(ModelConfig()))  # type: ignore[arg-type]


class OnlyConfig(Model[FluxConfig]):
    pass


assert_type(OnlyConfig(FluxConfig()).capabilities, Capabilities)


# --- a declaration is one line a field; it cannot be narrowed back to None --------------
@final
@attrs.frozen(kw_only=True)
class WithCasting(Capabilities):
    layerwise_casting: LayerwiseCasting = capability(LayerwiseCasting(skip_patterns=("norm",)))
    repeated_blocks: ModuleTypes = capability(ModuleTypes((torch.nn.Linear,)))


class Casts(Model[ModelConfig, WithCasting]):
    pass


compile_blocks(Casts(ModelConfig()))
load_lora(Casts(ModelConfig()))  # type: ignore[arg-type]


@attrs.frozen(kw_only=True)
class WithBlocks(Capabilities):
    repeated_blocks: ModuleTypes = capability(ModuleTypes((torch.nn.Linear,)))


@attrs.frozen(kw_only=True)
class LostBlocks(WithBlocks):
    repeated_blocks: None = None  # type: ignore[assignment]


class WrongArgument(Model[ModelConfig, int]):  # type: ignore[type-var]
    pass


# --- concrete capability classes are final; capabilities are frozen and read-only --------
@attrs.frozen(kw_only=True)
class MoreFlux(FluxCapabilities):  # type: ignore[misc]
    pass


flux.capabilities.repeated_blocks = ModuleTypes((torch.nn.Linear,))  # type: ignore[misc]
flux.capabilities = FluxCapabilities()  # type: ignore[misc]
FluxTransformer2DModel.capabilities = FluxCapabilities()  # type: ignore[assignment, method-assign]
FluxConfig().num_layers = 3  # type: ignore[misc]

# --- metadata rows are looked up by name, not by attribute -------------------------------
FluxTransformer2DModel.metadata().no_such_row  # type: ignore[attr-defined]  # noqa: B018
