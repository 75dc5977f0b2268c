"""Type-checked, never run: what ``diffcaps.attention`` accepts and what mypy must reject."""

from __future__ import annotations

from typing import assert_type

import torch

from diffcaps import attention
from diffcaps.attention.spec import AttentionSupport, QKVFusion, QKVGroup
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from diffcaps.protocols import SupportsAttention, supports_attention
from tests.custom_model import TinyDiT, TinyDiTConfig

flux = FluxTransformer2DModel.from_pretrained("some/folder")
wan = WanTransformer3DModel.from_pretrained("some/folder")

# --- Flux and Wan declare the feature --------------------------------------------------------
assert_type(FluxTransformer2DModel.declared_capabilities().attention, AttentionSupport)
as_protocol: SupportsAttention = wan

# --- what must pass ------------------------------------------------------------------------
assert_type(attention.enable(flux, attention.AttentionConfig(backend="math")), None)
assert_type(attention.enable(wan), None)
assert_type(attention.active(flux), attention.AttentionConfig | None)
assert_type(attention.disable(flux), None)
with attention.backend(flux, "flex"):
    pass
name: attention.BackendName = "sdpa_flash"
assert_type(attention.fuse_qkv(flux), None)
assert_type(attention.unfuse_qkv(wan), None)
assert_type(attention.qkv_fused(flux), bool)
assert_type(FluxTransformer2DModel.declared_capabilities().attention.qkv_fusion, QKVFusion | None)
QKVGroup(("to_q", "to_k", "to_v"), fused="to_qkv")

# --- what must fail --------------------------------------------------------------------------
tiny = TinyDiT(TinyDiTConfig())
attention.enable(tiny)  # type: ignore[arg-type]
attention.disable(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
attention.enable(flux, "math")  # type: ignore[arg-type]
attention.AttentionConfig(backend="cuda")  # type: ignore[arg-type]
attention.backend(flux, "fast")  # type: ignore[arg-type]
attention.enable(FluxTransformer2DModel)  # type: ignore[arg-type]
attention.fuse_qkv(tiny)  # type: ignore[arg-type]
attention.fuse_qkv(FluxTransformer2DModel)  # type: ignore[arg-type]
QKVGroup(("to_k", "to_v"), fused="to_kv")  # type: ignore[arg-type]


def maybe(model: TinyDiT) -> None:
    if supports_attention(model):
        attention.enable(model)  # narrowed by the TypeGuard
