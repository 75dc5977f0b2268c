"""Parity with diffusers' own single-file loader on the same original-layout files.

diffusers (0.42.1) loads a local single file offline when given a local config folder
(``config=<folder with config.json>``, ``local_files_only=True``). Its Flux converter
hard-codes the width (3072) to split the single blocks' fused ``linear1`` and needs at
least one block of each kind, so it cannot read the small files the other tests use.
These files are therefore FLUX.1-wide (24 heads × 128) with one double and one single
block, and small text/pooled widths: about 0.5 B parameters, stored in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.weights import load_single_file, save_single_file
from tests.flux_fixtures import flux_inputs
from tests.weights.fixtures import VARIANT_SHAPES

WIDE = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 24, "attention_head_dim": 128,
        "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (16, 56, 56)}

# (variant, key prefix in the file, dtype of the file)
CASES = [
    ("flux-dev", "model.diffusion_model.", torch.bfloat16),
    ("flux-schnell", "", torch.bfloat16),
    ("flux-fill", "", torch.bfloat16),
    ("flux-depth", "model.diffusion_model.", torch.float8_e4m3fn),
]


def _config(variant: str) -> FluxConfig:
    return FluxConfig.from_dict({**WIDE, **VARIANT_SHAPES[variant]})


@pytest.fixture(scope="module")
def random_pool() -> torch.Tensor:
    """Seeded bf16 normals that the wide models' tensors are slices of (0.5 B fresh draws are slow)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(1 << 26, generator=generator).to(torch.bfloat16)


def _wide_model(config: FluxConfig, pool: torch.Tensor) -> FluxTransformer2DModel:
    """A FLUX.1-wide model whose every tensor is a differently placed, scaled slice of ``pool``."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(config)
    state: dict[str, torch.Tensor] = {}
    for number, (key, meta) in enumerate(model.state_dict().items()):
        start = (number * 7_919_993) % (pool.numel() - meta.numel() + 1)
        values = pool[start : start + meta.numel()].view(meta.shape)
        scale = meta.shape[-1] ** -0.5 if meta.ndim > 1 else 0.1
        if key.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            state[key] = 1.0 + 0.1 * values
        else:
            state[key] = values * scale
    model.load_state_dict(state, assign=True)
    return model.eval()


def _diffusers_load(path: Path, config: FluxConfig, folder: Path) -> Any:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as DiffusersFlux

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return DiffusersFlux.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wide")


@pytest.mark.parametrize(("variant", "prefix", "dtype"), CASES, ids=[c[0] for c in CASES])
def test_same_state_dict_and_output_as_diffusers_from_single_file(
    variant: str, prefix: str, dtype: torch.dtype, random_pool: torch.Tensor, workdir: Path
) -> None:
    config = _config(variant)
    path = save_single_file(_wide_model(config, random_pool), workdir / f"{variant}.safetensors",
                            prefix=prefix, torch_dtype=dtype)

    ours = load_single_file(FluxTransformer2DModel, path, torch_dtype=torch.float32)
    theirs = _diffusers_load(path, config, workdir / f"{variant}-config")

    assert ours.config == config
    expected = theirs.state_dict()
    state = ours.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert tensor.dtype == expected[key].dtype == torch.float32, key
        assert torch.equal(tensor, expected[key]), key
    del expected, state

    inputs = flux_inputs(config, text_tokens=4)
    with torch.no_grad():
        got = ours(**inputs).sample
        want = theirs(**inputs).sample
    assert (got - want).abs().max().item() <= 1e-5
    assert got.abs().mean().item() > 1e-2
    path.unlink()
