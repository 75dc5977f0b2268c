"""Running a pipeline twice, with diffusers' transformer and with a wrapped diffcaps model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel as DiffusersFlux
from diffusers import WanTransformer3DModel as DiffusersWan

from diffcaps.model import Model

FLUX_CALL: dict[str, Any] = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 32}
"""Small images, two steps, the tiny T5's token count."""

WAN_CALL: dict[str, Any] = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 5.0}
"""Two latent frames of 4×4, two steps, classifier-free guidance (two passes per step)."""


def generate(pipeline: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The final latents and the decoded output (images or frames, as tensors) of a seeded call."""
    seen: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen["latents"] = tensors["latents"].clone()
        return tensors

    output = pipeline(*args, generator=torch.Generator().manual_seed(0), output_type="pt",
                      callback_on_step_end=keep_latents, **kwargs)
    decoded: torch.Tensor = output.frames if hasattr(output, "frames") else output.images
    return seen["latents"], decoded


def diffusers_twin(model: Model[Any, Any], folder: Path) -> Any:
    """diffusers' transformer holding ``model``'s weights (saved by diffcaps to ``folder``, loaded by diffusers)."""
    model.save_pretrained(folder)
    twin_class: Any = DiffusersWan if type(model).__name__ == DiffusersWan.__name__ else DiffusersFlux
    return twin_class.from_pretrained(folder, torch_dtype=next(model.parameters()).dtype).eval()


def assert_same(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor],
                tolerance: float = 1e-6) -> None:
    """Same latents and same decoded output: within ``tolerance`` of the largest value (at least 1; 0: equal).

    Latents reach magnitudes of ~5, where float32 steps are ~5e-7: a relative bound keeps a
    rounding difference of a few ulps from reading as a failure.
    """
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape and mine.dtype == reference.dtype
        assert reference.abs().max() > 0
        difference = (mine.float() - reference.float()).abs().max().item()
        scale = max(1.0, reference.abs().max().item())
        assert difference <= tolerance * scale, (difference, scale)
