"""Type-checked, never run: what ``diffcaps.ip_adapter`` accepts and what mypy must reject."""

from __future__ import annotations

from pathlib import Path
from typing import assert_type

import torch

from diffcaps import ip_adapter
from diffcaps.ip_adapter.spec import IPAdapterSupport
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.flux._ip_adapter import FluxIPAdapter
from diffcaps.protocols import SupportsIPAdapter, supports_ip_adapter
from tests.custom_model import TinyDiT, TinyDiTConfig

flux = FluxTransformer2DModel.from_pretrained("some/folder")
tensors: dict[str, torch.Tensor] = {}

# --- Flux declares the feature; its implementation satisfies the shared protocol ----------
assert_type(FluxTransformer2DModel.declared_capabilities().ip_adapter, FluxIPAdapter)
support: IPAdapterSupport = FluxTransformer2DModel.declared_capabilities().ip_adapter
as_protocol: SupportsIPAdapter = flux

# --- what must pass ------------------------------------------------------------------------
assert_type(ip_adapter.load(flux, "ip_adapter.safetensors", adapter_name="style"), None)
assert_type(ip_adapter.load(flux, Path("ip_adapter.safetensors")), None)
assert_type(ip_adapter.load(flux, tensors, adapter_name="face"), None)
ip_adapter.set_scale(flux, 0.6)
ip_adapter.set_scale(flux, 1)
ip_adapter.set_scale(flux, [0.0, 0.5, 1.0])
ip_adapter.set_scale(flux, [0.5, [0.1, 0.2]])
ip_adapter.set_scale(flux, {"style": 0.3, "face": [0.2, 0.4]})
assert_type(ip_adapter.adapter_names(flux), tuple[str, ...])
assert_type(ip_adapter.get_scales(flux), dict[str, tuple[float, ...]])
assert_type(ip_adapter.unload(flux), None)
assert_type(ip_adapter.unload(flux, "style"), None)
assert_type(ip_adapter.unload(flux, ["style", "face"]), None)

# --- what must fail --------------------------------------------------------------------------
tiny = TinyDiT(TinyDiTConfig())
ip_adapter.load(tiny, "ip_adapter.safetensors")  # type: ignore[arg-type]
ip_adapter.set_scale(tiny, 1.0)  # type: ignore[arg-type]
ip_adapter.unload(tiny)  # type: ignore[arg-type]
ip_adapter.load(torch.nn.Linear(2, 2), tensors)  # type: ignore[arg-type]
ip_adapter.load(flux, 42)  # type: ignore[arg-type]
ip_adapter.load(flux, "x.safetensors", "style")  # type: ignore[call-arg]
ip_adapter.set_scale(flux, "strong")  # type: ignore[arg-type]
ip_adapter.set_scale(flux, {"style": "strong"})  # type: ignore[dict-item]
ip_adapter.unload(flux, 3)  # type: ignore[arg-type]
ip_adapter.load(FluxTransformer2DModel, tensors)  # type: ignore[arg-type]


def maybe(model: TinyDiT) -> None:
    if supports_ip_adapter(model):
        ip_adapter.set_scale(model, 0.5)  # narrowed by the TypeGuard
