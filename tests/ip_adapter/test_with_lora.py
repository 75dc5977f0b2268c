"""IP-Adapter together with ``diffcaps.lora``: both loaded, in either order, against diffusers; each unloads alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from diffcaps import ip_adapter, lora
from diffcaps.io import save_safetensors
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

RANK = 4
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "ff.net.2")


def _lora_file(path: Path) -> Path:
    """A diffusers/PEFT-layout LoRA on every double block, seeded."""
    generator = torch.Generator().manual_seed(51)
    dim = TINY.inner_dim
    tensors: dict[str, Tensor] = {}
    for index in range(TINY.num_layers):
        for target in TARGETS:
            fan_in = 4 * dim if target == "ff.net.2" else dim
            key = f"transformer.transformer_blocks.{index}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(dim, RANK, generator=generator) * 0.2
    save_safetensors(tensors, path)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ip_first", [False, True], ids=["lora-then-ip", "ip-then-lora"])
def test_lora_and_ip_adapter_match_diffusers_and_unload_independently(ip_first: bool, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ip_path = write_xlabs(tmp_path / "ip.safetensors", TINY, seed=52)
    lora_path = _lora_file(tmp_path / "lora.safetensors")
    ours = seeded_model(TINY)
    inputs = flux_inputs(TINY, batch=2)
    plain, snapshot = run(ours, inputs), model_snapshot(ours)

    oracle = DiffusersIPAdapter(diffusers_flux(TINY, seeded_state(ours)))
    oracle.transformer.load_lora_adapter(load_file(str(lora_path)), adapter_name="style", prefix="transformer")
    oracle.transformer.set_adapters(["style"], weights=[0.8])
    oracle.load(ip_path)
    oracle.set_scale(0.6)

    if ip_first:
        ip_adapter.load(ours, ip_path, adapter_name="face")
    lora.load_adapter(ours, lora_path, adapter_name="style")
    if not ip_first:
        ip_adapter.load(ours, ip_path, adapter_name="face")
    lora.set_adapters(ours, ["style"], weights=[0.8])
    ip_adapter.set_scale(ours, 0.6)
    embeds = [image_embeds(2)]

    both = run(ours, with_embeds(inputs, embeds))
    assert (both - run(oracle.transformer, with_embeds(inputs, embeds))).abs().max().item() <= 1e-5
    lora.fuse(ours)
    assert (run(ours, with_embeds(inputs, embeds)) - both).abs().max().item() <= 1e-5
    lora.unfuse(ours)

    ip_only = seeded_model(TINY)
    ip_adapter.load(ip_only, ip_path, adapter_name="face")
    ip_adapter.set_scale(ip_only, 0.6)
    expected_ip_only = run(ip_only, with_embeds(inputs, embeds))
    assert (both - expected_ip_only).abs().max().item() > 1e-3  # the LoRA acts
    lora.unload(ours)
    assert ip_adapter.adapter_names(ours) == ("face",)
    assert torch.equal(run(ours, with_embeds(inputs, embeds)), expected_ip_only)
    ip_adapter.unload(ours)
    assert_same_snapshot(snapshot, model_snapshot(ours))
    assert torch.equal(run(ours, inputs), plain)


def test_unloading_ip_adapter_first_keeps_the_lora(tmp_path: Path) -> None:
    ip_path = write_xlabs(tmp_path / "ip.safetensors", TINY, seed=53)
    model = seeded_model(TINY)
    lora.load_adapter(model, _lora_file(tmp_path / "lora.safetensors"), adapter_name="style")
    inputs = flux_inputs(TINY)
    with_lora, snapshot = run(model, inputs), model_snapshot(model)
    ip_adapter.load(model, ip_path)
    ip_adapter.unload(model)
    assert_same_snapshot(snapshot, model_snapshot(model))
    assert torch.equal(run(model, inputs), with_lora)
    assert lora.list_adapters(model) == ("style",)
