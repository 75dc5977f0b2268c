"""Independent references for LoRA tests: a model with the expected update merged by hand, and state hashes."""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from diffcaps import lora
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.lora._files import LoraFile


def merged_state(state: dict[str, Tensor], file: LoraFile, weight: float = 1.0) -> dict[str, Tensor]:
    """``state`` with the file's expected effect applied in fp64, at this adapter weight."""
    merged = {k: v.clone() for k, v in state.items()}
    if file.in_channels is not None:
        old = merged["x_embedder.weight"]
        wide = torch.zeros(old.shape[0], file.in_channels, dtype=old.dtype)
        wide[:, : old.shape[1]] = old
        merged["x_embedder.weight"] = wide
    for path, delta in file.deltas.items():
        key = f"{path}.weight"
        merged[key] = (merged[key].double() + weight * delta).to(merged[key].dtype)
    for path, delta in file.bias_deltas.items():
        key = f"{path}.bias"
        merged[key] = (merged[key].double() + weight * delta).to(merged[key].dtype)
    for name, value in file.replaced.items():
        merged[name] = value.to(merged[name].dtype)
    return merged


def reference_model(config: FluxConfig, state: dict[str, Tensor], file: LoraFile,
                    weight: float = 1.0) -> FluxTransformer2DModel:
    """A plain model (no adapters) holding the expected merged weights."""
    if file.in_channels is not None:
        config = attrs.evolve(config, in_channels=file.in_channels, out_channels=config.output_channels)
    model = FluxTransformer2DModel(config)
    model.load_state_dict(merged_state(state, file, weight))
    return model.eval()


def base_weight(model: nn.Module, path: str, name: str = "weight") -> Tensor:
    """The weight (or bias) of a linear module, looking through a peft layer."""
    module = model.get_submodule(path)
    module = getattr(module, "base_layer", module)
    tensor: Tensor = getattr(module, name)
    return tensor


def fingerprint(model: nn.Module) -> str:
    """A hash of everything a failed or undone LoRA call must leave as it was.

    Every parameter and buffer (name, dtype, shape, bytes, requires_grad), the module tree
    (names and classes), the peft config, the model config, and diffcaps' adapter state.
    """
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor.requires_grad}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__qualname__}".encode())
    configs: Any = getattr(model, "peft_config", None)
    digest.update(repr(sorted((k, repr(v)) for k, v in (configs or {}).items())).encode())
    digest.update(repr(getattr(model, "config", None)).encode())
    state: Any = model.__dict__.get("_diffcaps_lora")
    if state is not None:
        digest.update(repr((list(state.adapters), state.active, state.weights, state.enabled,
                            list(state.fused), state.hotswap_rank)).encode())
    return digest.hexdigest()


def check_fuse_cycles_are_exact(model: Any, *, original: str, cycles: int = 3) -> None:
    """Fuse changes the model and unfuse restores it bit for bit, ``cycles`` times; then unload
    after a fuse gives back the model whose :func:`fingerprint` was ``original``."""
    loaded = fingerprint(model)
    for _ in range(cycles):
        lora.fuse(model)
        assert fingerprint(model) != loaded
        lora.unfuse(model)
        assert fingerprint(model) == loaded
    lora.fuse(model)
    lora.unload(model)
    assert fingerprint(model) == original
    assert not hasattr(model, "peft_config")
