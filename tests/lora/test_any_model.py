"""LoRA on a model diffcaps knows nothing about, through the generic diffusers/PEFT format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from diffcaps import lora
from diffcaps.errors import FormatError
from diffcaps.io import save_safetensors
from tests.lora.tiny_lora_model import seeded_mixer

_RANK = 3


def _pair(seed: int, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(_RANK, in_features, generator=generator) * 0.2
    up = torch.randn(out_features, _RANK, generator=generator) * 0.2
    return down, up


def _expected(model: nn.Module, updates: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, Tensor]:
    # W + scale · B @ A, computed here in fp64 from the file's own tensors
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for path, (down, up, scale) in updates.items():
        key = f"{path}.weight"
        state[key] = (state[key].double() + scale * (up.double() @ down.double())).to(state[key].dtype)
    return state


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model.", ""])
def test_peft_file_on_a_custom_model(tmp_path: Path, prefix: str) -> None:
    model = seeded_mixer()
    paths = {"proj_in": (12, 12), "blocks.0.up": (24, 12), "blocks.1.down": (12, 24)}
    tensors: dict[str, Tensor] = {}
    updates: dict[str, tuple[Tensor, Tensor, float]] = {}
    for index, (path, (rows, cols)) in enumerate(paths.items()):
        down, up = _pair(index, rows, cols)
        tensors[f"{prefix}{path}.lora_A.weight"] = down
        tensors[f"{prefix}{path}.lora_B.weight"] = up
        scale = 1.0
        if path == "blocks.0.up":  # a stored alpha wins over the header
            tensors[f"{prefix}{path}.alpha"] = torch.tensor(6.0)
            scale = 6.0 / _RANK
        elif path == "blocks.1.down":  # the header's alpha_pattern
            scale = 1.5 / _RANK
        else:  # the header's lora_alpha
            scale = 9.0 / _RANK
        updates[path] = (down, up, scale)
    config = {"transformer.lora_alpha": 9.0, "transformer.r": _RANK,
              "transformer.alpha_pattern": {"blocks.1.down": 1.5}}
    file = tmp_path / "adapter.safetensors"
    save_safetensors(tensors, file, metadata={"lora_adapter_metadata": json.dumps(config)})
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(x)

    report = lora.load_adapter(model, file, adapter_name="a")

    assert report.format == "diffusers"
    assert set(report.targets) == set(paths)
    reference = seeded_mixer()
    reference.load_state_dict(_expected(reference, updates))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=0)
    lora.unload(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_custom_model_round_trips_its_adapter(tmp_path: Path) -> None:
    model = seeded_mixer()
    down, up = _pair(3, 24, 12)
    source = {"blocks.1.up.lora_A.weight": down, "blocks.1.up.lora_B.weight": up}
    lora.load_adapter(model, source, adapter_name="a")
    saved = lora.save_adapter(model, tmp_path / "saved.safetensors", "a")
    fresh = seeded_mixer()
    lora.load_adapter(fresh, saved, adapter_name="a")
    x = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_custom_model_rejects_names_it_lacks() -> None:
    model = seeded_mixer()
    down, up = _pair(0, 12, 12)
    source = {"transformer.blocks.5.up.lora_A.weight": down, "transformer.blocks.5.up.lora_B.weight": up}
    with pytest.raises(FormatError, match="'transformer.blocks.5.up' names no module"):
        lora.load_adapter(model, source, strict=False)
