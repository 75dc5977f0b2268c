"""Type-checked, never run: ``AutoModel`` gives a ``Model[Any]``; a ``supports_*`` guard narrows it for features."""

from __future__ import annotations

from typing import Any, assert_type

from diffcaps import AutoModel, Model, lora, register_model
from diffcaps.protocols import supports_lora
from tests.custom_model import TinyDiT

model = AutoModel.from_pretrained("some/folder", trust_code=True, torch_dtype=None)
assert_type(model, Model[Any])
assert_type(AutoModel.model_class("some/folder"), type[Model[Any]])

lora.load_adapter(model, "style.safetensors")  # type: ignore[arg-type]
if supports_lora(model):
    lora.load_adapter(model, "style.safetensors")
    assert_type(lora.list_adapters(model), tuple[str, ...])

assert_type(register_model(TinyDiT), type[TinyDiT])
assert_type(register_model(TinyDiT, name="tiny"), type[TinyDiT])
register_model(int)  # type: ignore[type-var]
register_model(TinyDiT())  # type: ignore[type-var, call-arg]
