"""Type-checked, never run: the LoRA functions accept models that declare LoRA and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import assert_type

import torch

from diffcaps import lora
from diffcaps.lora import LoadReport
from diffcaps.lora.spec import DIFFUSERS_PEFT, KeyFormat, LoRAFormat, LoRAService
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import TinyDiT, TinyDiTConfig
from tests.lora.tiny_lora_model import Mixer, MixerConfig

flux = FluxTransformer2DModel.from_pretrained("some/folder")
assert_type(FluxTransformer2DModel.declared_capabilities().lora, LoRAService)
assert_type(flux.capabilities.lora.detect(["a.lora_A.weight"]), LoRAFormat | None)
assert_type(DIFFUSERS_PEFT, KeyFormat)

report = lora.load_adapter(flux, "style.safetensors", adapter_name="style")
assert_type(report, LoadReport)
assert_type(report.format, str)
assert_type(report.targets, tuple[str, ...])
assert_type(lora.load_adapter(flux, {"transformer.proj_out.lora_A.weight": torch.zeros(4, 8)}), LoadReport)
assert_type(lora.load_adapter(flux, Path("x.safetensors"), strict=False, hotswap=True), LoadReport)
assert_type(lora.active_adapters(flux), tuple[str, ...])
assert_type(lora.list_adapters(flux), tuple[str, ...])
assert_type(lora.save_adapter(flux, "out.safetensors", "style", layout="kohya"), Path)
assert_type(lora.save_adapter(flux, "out.safetensors", "style"), Path)

lora.set_adapters(flux, ["style", "other"], [0.8, {"transformer_blocks.1": 0.5}])
lora.set_adapters(flux, "style", 0.5)
lora.set_adapters(flux, "style", 1)
lora.set_adapters(flux, ["style"], [1, 0.5])
lora.set_adapters(flux, "style")
lora.enable(flux)
lora.disable(flux)
lora.fuse(flux, ["style"], scale=0.7)
lora.unfuse(flux)
lora.delete_adapters(flux, "style")
lora.unload(flux)
lora.enable_hotswap(flux, max_rank=64)

# a custom model gets LoRA from one capabilities line
mixer = Mixer(MixerConfig())
assert_type(lora.load_adapter(mixer, "adapter.safetensors"), LoadReport)

# a model without LoRA, a model class, or anything that is no model, is rejected
tiny = TinyDiT(TinyDiTConfig())
lora.load_adapter(tiny, "style.safetensors")  # type: ignore[arg-type]
lora.fuse(tiny)  # type: ignore[arg-type]
lora.unload(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
lora.load_adapter(FluxTransformer2DModel, "style.safetensors")  # type: ignore[arg-type]
lora.unload(FluxTransformer2DModel)  # type: ignore[arg-type]
# wrong arguments
lora.load_adapter(flux, 3)  # type: ignore[arg-type]
lora.save_adapter(flux, "out.safetensors", "style", layout="peft")  # type: ignore[arg-type]


def a_string_weight() -> None:
    lora.set_adapters(flux, "style", "loud")  # type: ignore[arg-type]


# a bool is not a weight (bool is an int, so this is the deprecated overload's job); each call
# returns NoReturn, so each sits in its own function to keep the lines after it checked
def bools_in_a_list() -> None:
    lora.set_adapters(flux, ["style"], [True])  # type: ignore[deprecated]


def one_bool() -> None:
    lora.set_adapters(flux, "style", False)  # type: ignore[deprecated]
