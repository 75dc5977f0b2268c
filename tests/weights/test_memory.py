"""Loading holds about one copy of the weights: measured in a fresh process, from /proc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.flux._weight_mapping import rope_axes
from diffcaps.weights import save_single_file

# 2 double + 4 single blocks at width 1024: about 0.14 B parameters, 0.28 GB in bf16.
CONFIG = FluxConfig(num_layers=2, num_single_layers=4, num_attention_heads=8, attention_head_dim=128,
                    joint_attention_dim=64, pooled_projection_dim=32, in_channels=64, guidance_embeds=True,
                    axes_dims_rope=rope_axes(128))

CHILD = """
import json, sys, torch
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights import load_single_file

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
before = status("VmRSS:")
model = load_single_file(FluxTransformer2DModel, path, torch_dtype=dtype)
peak = status("VmHWM:")
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "held": held}))
"""


@pytest.fixture(scope="module")
def bf16_and_fp8_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("memory")
    model = FluxTransformer2DModel.from_config(CONFIG, device="meta")
    state = {key: torch.full(meta.shape, 0.02 * (number + 1), dtype=torch.bfloat16)
             for number, (key, meta) in enumerate(model.state_dict().items())}
    model.load_state_dict(state, assign=True)
    return {
        "bfloat16": save_single_file(model, folder / "bf16.safetensors"),
        "float8_e4m3fn": save_single_file(model, folder / "fp8.safetensors", torch_dtype=torch.float8_e4m3fn),
    }


@pytest.mark.parametrize("stored", ["bfloat16", "float8_e4m3fn"])
def test_peak_memory_is_about_one_copy_of_the_loaded_weights(stored: str, bf16_and_fp8_files: dict[str, Path]) -> None:
    path = bf16_and_fp8_files[stored]
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), "bfloat16"], capture_output=True, text=True,
                          check=True, timeout=300)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    grown = figures["peak"] - figures["before"]
    assert figures["held"] == 2 * sum(p.numel() for p in FluxTransformer2DModel.from_config(
        CONFIG, device="meta").parameters())
    # the model itself, plus at most a fifth for the one tensor in flight and allocator slack
    assert grown <= 1.2 * figures["held"], figures
