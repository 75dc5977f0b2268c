"""The built-in demo models: small Flux and Wan configs and their inputs, and a tiny pipeline run; no downloads."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffcaps.models.flux import FluxConfig
from diffcaps.models.wan import WanConfig

if TYPE_CHECKING:
    from diffcaps.interop.diffusers.generate import GenerateReport

__all__ = ["DEMO_CONFIG", "DEMO_PROMPT", "WAN_DEMO_CONFIG", "demo_inputs", "pipeline_demo", "wan_demo_inputs"]

DEMO_CONFIG = FluxConfig(
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    in_channels=16,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)
"""A FLUX.1-dev-shaped model, 128 wide, with 2 double and 4 single blocks."""


def demo_inputs(config: FluxConfig, *, seed: int = 0, side: int = 8, text_tokens: int = 8) -> dict[str, Any]:
    """Seeded forward arguments for a ``side``×``side`` latent grid and a short prompt."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.75]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


WAN_DEMO_CONFIG = WanConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=256,
    num_layers=2,
    rope_max_seq_len=64,
)
"""A Wan 2.1 T2V-shaped model, 128 wide, with 2 blocks."""


def wan_demo_inputs(config: WanConfig, *, seed: int = 0, frames: int = 3, side: int = 8,
                    text_tokens: int = 8) -> dict[str, Any]:
    """Seeded forward arguments for a ``frames``×``side``×``side`` video latent and a short prompt."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, config.in_channels, frames, side, side, generator=generator),
        "encoder_hidden_states": torch.randn(1, text_tokens, config.text_dim, generator=generator),
        "timestep": torch.tensor([750.0]),
    }


DEMO_PROMPT = "a small red house by the sea"
"""What the demo pipeline draws (its tiny tokenizer knows these words; its weights are random)."""


def pipeline_demo(out: str | Path, *, video: bool = False, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> GenerateReport:
    """Build a tiny seeded pipeline folder in a temporary folder and generate with diffcaps.

    A ``FluxPipeline`` draws a 64×64 image in 4 steps, or with ``video`` a ``WanPipeline`` makes
    5 frames of 32×32 in 3 steps. The folder's transformer is loaded by diffcaps and handed to
    diffusers' pipeline through ``diffcaps.interop.diffusers.wrap`` — what ``python -m diffcaps
    generate`` does with a real folder. Writes ``out`` (``.png`` or ``.gif``; ``.gif`` or ``.mp4``
    for the video). Needs the ``diffusers`` extra.
    """
    from diffcaps.interop.diffusers import tiny_flux_pipeline_folder, tiny_wan_pipeline_folder
    from diffcaps.interop.diffusers.generate import GenerateOptions, generate

    if video:
        options = GenerateOptions(prompt=DEMO_PROMPT, size=(32, 32), frames=5, steps=3, seed=seed)
    else:
        options = GenerateOptions(prompt=DEMO_PROMPT, size=(64, 64), steps=4, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stderr(io.StringIO()):  # the text encoders' saving progress bars
            if video:
                folder = tiny_wan_pipeline_folder(Path(tmp) / "tiny-wan-pipeline", seed=seed, text_tokens=32)
            else:
                folder = tiny_flux_pipeline_folder(Path(tmp) / "tiny-flux-pipeline", seed=seed)
        return generate(folder, options, Path(out).resolve(), progress=progress)
