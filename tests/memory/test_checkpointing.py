"""Gradient checkpointing: same gradients as the plain model, blocks restored on disable."""

from __future__ import annotations

import pytest
import torch

from diffcaps import checkpointing
from diffcaps.errors import CapabilityError
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import seeded_tiny_dit
from tests.flux_fixtures import TINY, flux_inputs, seeded_model


def _grads(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(**flux_inputs(TINY, batch=2)).sample
    (out.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_equal_the_plain_model() -> None:
    model = seeded_model(TINY).train()
    expected = _grads(model)
    assert checkpointing.active(model) is None
    checkpointing.enable(model)
    assert checkpointing.active(model) == checkpointing.CheckpointingConfig()
    got = _grads(model)
    assert got.keys() == expected.keys() and len(got) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_checkpointed_blocks_recompute_in_backward() -> None:
    model = seeded_model(TINY).train()
    calls: list[str] = []
    attn = model.get_submodule("transformer_blocks.0.attn")
    attn.register_forward_hook(lambda *_: calls.append("attn"))
    checkpointing.enable(model)
    out = model(**flux_inputs(TINY)).sample
    assert calls == ["attn"]
    out.sum().backward()
    assert calls == ["attn", "attn"]  # recomputed during backward
    calls.clear()
    with torch.no_grad():
        model(**flux_inputs(TINY))
    assert calls == ["attn"]  # no recomputation machinery without grad


def test_disable_restores_forwards_exactly() -> None:
    model = seeded_model(TINY)
    before = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    checkpointing.enable(model)
    checkpointing.enable(model)  # harmless twice
    checkpointing.disable(model)
    checkpointing.disable(model)  # nothing on: a no-op
    assert checkpointing.active(model) is None
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == before


def test_model_without_declared_blocks_is_refused() -> None:
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'gradient_checkpointing'"):
        checkpointing.enable(seeded_tiny_dit())  # type: ignore[arg-type]
