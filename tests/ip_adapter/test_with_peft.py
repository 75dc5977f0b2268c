"""IP-Adapter beside a LoRA held as peft layers (injected with peft directly), against diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps import ip_adapter
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model, seeded_state
from tests.ip_adapter.xlabs import (
    DiffusersIPAdapter,
    assert_same_snapshot,
    image_embeds,
    model_snapshot,
    run,
    with_embeds,
    write_xlabs,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out"]


def _inject_lora(model: torch.nn.Module) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), model, adapter_name="style")


def _seeded_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return {name: torch.randn(t.shape, generator=generator) * 0.2
            for name, t in model.state_dict().items() if ".lora_" in name}


@pytest.mark.parametrize("ip_first", [False, True], ids=["lora-then-ip", "ip-then-lora"])
def test_ip_adapter_with_a_peft_lora_matches_diffusers(ip_first: bool, tmp_path: Path) -> None:
    path = write_xlabs(tmp_path / "ip.safetensors", TINY, seed=31)
    ours = seeded_model(TINY)
    oracle = DiffusersIPAdapter(diffusers_flux(TINY, seeded_state(ours)))
    if ip_first:
        ip_adapter.load(ours, path)
    _inject_lora(ours)
    _inject_lora(oracle.transformer)
    lora = _seeded_lora_state(oracle.transformer)
    assert lora and not any(".processor." in name for name in lora)  # peft left the IP layers alone
    oracle.transformer.load_state_dict(lora, strict=False)
    ours.load_state_dict(lora, strict=False)
    if not ip_first:
        ip_adapter.load(ours, path)
    oracle.load(path)
    assert not any("lora" in name for name, _ in ours.named_modules() if ".processor" in name)

    ip_adapter.set_scale(ours, 0.5)
    oracle.set_scale(0.5)
    inputs = flux_inputs(TINY, batch=2)
    embeds = [image_embeds(2)]
    expected = run(oracle.transformer, with_embeds(inputs, embeds))
    got = run(ours, with_embeds(inputs, embeds))
    assert (got - expected).abs().max().item() <= 1e-5
    without_lora = seeded_model(TINY)
    ip_adapter.load(without_lora, path)
    ip_adapter.set_scale(without_lora, 0.5)
    assert (got - run(without_lora, with_embeds(inputs, embeds))).abs().max().item() > 1e-3  # the LoRA acts


def test_unloading_ip_adapter_keeps_the_lora_model_exactly(tmp_path: Path) -> None:
    path = write_xlabs(tmp_path / "ip.safetensors", TINY, seed=32)
    model = seeded_model(TINY)
    _inject_lora(model)
    model.load_state_dict(_seeded_lora_state(model), strict=False)
    inputs: dict[str, Any] = flux_inputs(TINY)
    before, snapshot = run(model, inputs), model_snapshot(model)
    ip_adapter.load(model, path)
    assert not torch.equal(run(model, with_embeds(inputs, [image_embeds(1)])), before)
    ip_adapter.unload(model)
    assert_same_snapshot(snapshot, model_snapshot(model))
    assert torch.equal(run(model, inputs), before)

