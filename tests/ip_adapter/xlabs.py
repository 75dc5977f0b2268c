"""Seeded XLabs-layout Flux IP-Adapter files, and diffusers' own IP-Adapter loading as the oracle."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

EMBED_DIM = 12
"""CLIP image embedding size of the default test adapter (real files: 768 or 1024)."""


def xlabs_tensors(config: FluxConfig, seed: int, *, embed_dim: int = EMBED_DIM, tokens: int = 4,
                  prefix: str = "ip_adapter_proj_model.", blocks: int | None = None) -> dict[str, Tensor]:
    """An XLabs IP-Adapter state dict for ``config``: projection and per-double-block IP K/V."""
    generator = torch.Generator().manual_seed(seed)
    width, inner = config.joint_attention_dim, config.inner_dim

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        std: float = scale / shape[-1] ** 0.5
        return torch.randn(*shape, generator=generator) * std

    tensors = {
        f"{prefix}proj.weight": randn(tokens * width, embed_dim),
        f"{prefix}proj.bias": randn(tokens * width, scale=0.1),
        f"{prefix}norm.weight": 1.0 + randn(width, scale=0.1),
        f"{prefix}norm.bias": randn(width, scale=0.1),
    }
    for index in range(config.num_layers if blocks is None else blocks):
        for kind in "kv":
            key = f"double_blocks.{index}.processor.ip_adapter_double_stream_{kind}_proj"
            tensors[f"{key}.weight"] = randn(inner, width, scale=2.0)
            tensors[f"{key}.bias"] = randn(inner, scale=0.1)
    return tensors


def write_xlabs(path: Path, config: FluxConfig, seed: int, **kwargs: Any) -> Path:
    """Save ``xlabs_tensors(config, seed, **kwargs)`` as a safetensors file."""
    save_safetensors(xlabs_tensors(config, seed, **kwargs), path)
    return path


def image_embeds(batch: int, embed_dim: int = EMBED_DIM, *, images: int = 1, seed: int = 7) -> Tensor:
    """A seeded stand-in for CLIP image embeddings, [batch, images, embed_dim]."""
    return torch.randn(batch, images, embed_dim, generator=torch.Generator().manual_seed(seed))


def with_embeds(inputs: dict[str, Any], embeds: list[Tensor]) -> dict[str, Any]:
    """Forward kwargs with a fresh joint_attention_kwargs (diffusers pops from the dict it is given)."""
    return {**inputs, "joint_attention_kwargs": {"ip_adapter_image_embeds": list(embeds)}}


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
    """The model's prediction for ``inputs``, without autograd."""
    with torch.no_grad():
        out: Tensor = model(**inputs).sample
    return out


class DiffusersIPAdapter:
    """diffusers' Flux IP-Adapter loading, scaling and unloading, driven without a pipeline.

    The pipeline mixin's methods only touch ``self.transformer`` (and skip the image encoder
    when the object has no such attribute), so a namespace holding the transformer stands in
    for the pipeline; files are read from a local folder, with no network.
    """

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer
        self._pipe: Any = types.SimpleNamespace(transformer=transformer)  # the one attribute the loaders read

    def load(self, *files: Path) -> None:
        """Load the files (one folder) as diffusers does, all at once, in order."""
        from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

        folder = {f.parent for f in files}
        assert len(folder) == 1
        FluxIPAdapterMixin.load_ip_adapter(self._pipe, str(folder.pop()), weight_name=[f.name for f in files],
                                           low_cpu_mem_usage=False)

    def set_scale(self, scale: Any) -> None:
        """diffusers' ``set_ip_adapter_scale``."""
        from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

        FluxIPAdapterMixin.set_ip_adapter_scale(self._pipe, scale)

    def unload(self) -> None:
        """diffusers' ``unload_ip_adapter``."""
        from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

        FluxIPAdapterMixin.unload_ip_adapter(self._pipe)


def model_snapshot(model: FluxTransformer2DModel) -> dict[str, Any]:
    """Everything ``unload`` must restore: state dict (keys, values, dtypes), module tree, instance attributes,
    ``requires_grad`` flags."""
    return {
        "grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "state": {name: (t.dtype, t.shape, t.clone()) for name, t in model.state_dict().items()},
        "tree": [(name, type(m).__name__, tuple(m._modules), tuple(sorted(vars(m))), m.training)
                 for name, m in model.named_modules()],
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-identical state and the same module tree."""
    assert after["tree"] == before["tree"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for name, (dtype, shape, tensor) in before["state"].items():
        a_dtype, a_shape, a_tensor = after["state"][name]
        assert (a_dtype, a_shape) == (dtype, shape), name
        assert torch.equal(a_tensor, tensor), name


def state_hash(model: torch.nn.Module) -> str:
    """A hash of the state dict's names, dtypes, shapes and bytes."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__name__}:{tuple(module._modules)}".encode())
    return digest.hexdigest()
