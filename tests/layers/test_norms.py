"""RMSNorm against its formula; the AdaLN variants against diffusers' layers of the same names."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormContinuous as DiffusersContinuous
from diffusers.models.normalization import AdaLayerNormZero as DiffusersZero
from diffusers.models.normalization import AdaLayerNormZeroSingle as DiffusersZeroSingle
from diffusers.models.normalization import FP32LayerNorm as DiffusersFP32LayerNorm
from torch import Tensor, nn

from diffcaps.layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    FP32LayerNorm,
    RMSNorm,
    modulate,
    modulation_table,
    table_modulation,
)


def _rms(x: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _seeded(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_rms_norm_matches_its_formula() -> None:
    x = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-5).double()
    _seeded(norm)
    torch.testing.assert_close(norm(x), _rms(x, 1e-5) * norm.weight)
    plain = RMSNorm(8, elementwise_affine=False).double()
    assert plain.weight is None and not plain.state_dict()
    torch.testing.assert_close(plain(x), _rms(x, 1e-6))


def test_rms_norm_across_all_heads() -> None:
    # Wan-style query norm: one weight over heads × head_dim, applied before splitting the heads
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    norm = RMSNorm(24).double()
    _seeded(norm, 2)
    per_token = _rms(x, 1e-6) * norm.weight
    torch.testing.assert_close(norm(x).reshape(2, 5, 3, 8), per_token.reshape(2, 5, 3, 8))
    assert norm.state_dict()["weight"].shape == (24,)


def test_rms_norm_is_torchs() -> None:
    # code that looks for norm weights by type (LoRA norm targets, meta-device loading) finds it
    assert isinstance(RMSNorm(4), nn.RMSNorm)


def test_modulate() -> None:
    x, shift, scale = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(3)).unbind(0)
    torch.testing.assert_close(modulate(x, shift, scale), x + x * scale + shift)


def test_ada_layer_norm_zero_matches_diffusers() -> None:
    ours = AdaLayerNormZero(8)
    _seeded(ours)
    theirs = DiffusersZero(8)
    theirs.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(4)
    x, emb = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 8, generator=generator)
    with torch.no_grad():
        got, expected = ours(x, emb), theirs(x, emb=emb)
    assert len(got) == len(expected) == 5
    for mine, reference in zip(got, expected):
        assert torch.equal(mine, reference)


def test_ada_layer_norm_zero_single_matches_diffusers() -> None:
    ours = AdaLayerNormZeroSingle(8)
    _seeded(ours, 1)
    theirs = DiffusersZeroSingle(8)
    theirs.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(5)
    x, emb = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 8, generator=generator)
    with torch.no_grad():
        (normed, gate), (expected_normed, expected_gate) = ours(x, emb), theirs(x, emb=emb)
    assert torch.equal(normed, expected_normed) and torch.equal(gate, expected_gate)


def test_ada_layer_norm_continuous_matches_diffusers() -> None:
    ours = AdaLayerNormContinuous(8, conditioning_dim=6)
    _seeded(ours, 2)
    theirs = DiffusersContinuous(8, 6, elementwise_affine=False, eps=1e-6)
    theirs.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(6)
    x, emb = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 6, generator=generator)
    with torch.no_grad():
        assert torch.equal(ours(x, emb), theirs(x, emb))
    # scale comes first in the weight: a bias of (scale=1, shift=0) doubles the normed input
    with torch.no_grad():
        ours.linear.weight.zero_()
        ours.linear.bias.copy_(torch.cat([torch.ones(8), torch.zeros(8)]))
    torch.testing.assert_close(ours(x, emb), 2 * ours.norm(x))


def test_fp32_layer_norm_matches_diffusers_and_keeps_the_input_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=generator).to(torch.bfloat16)
    for affine in (True, False):
        ours = FP32LayerNorm(8, 1e-6, elementwise_affine=affine).to(torch.bfloat16)
        oracle = DiffusersFP32LayerNorm(8, 1e-6, elementwise_affine=affine).to(torch.bfloat16)
        if affine:
            with torch.no_grad():
                ours.weight.copy_(torch.randn(8, generator=generator))
                ours.bias.copy_(torch.randn(8, generator=generator))
            oracle.load_state_dict(ours.state_dict())
        got = ours(x)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, oracle(x))
        # computed in float32, not in bfloat16
        reference = torch.nn.functional.layer_norm(
            x.float(), (8,), ours.weight.float() if affine else None, ours.bias.float() if affine else None, 1e-6
        ).to(torch.bfloat16)
        assert torch.equal(got, reference)


def test_table_modulation_per_sample_and_per_token() -> None:
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(1, 3, 4, generator=generator)
    per_sample = torch.randn(2, 3, 4, generator=generator)
    parts = table_modulation(table, per_sample)
    assert len(parts) == 3 and all(p.shape == (2, 1, 4) for p in parts)
    assert torch.equal(parts[1][:, 0], table[0, 1] + per_sample[:, 1])
    per_token = torch.randn(2, 5, 3, 4, generator=generator)
    parts = table_modulation(table, per_token)
    assert all(p.shape == (2, 5, 4) for p in parts)
    assert torch.equal(parts[2], table[0, 2] + per_token[:, :, 2])
    shared = torch.randn(2, 1, 4, generator=generator)  # one row added to every table row
    gate = table_modulation(table, shared)[2]
    assert torch.equal(gate[:, 0], table[0, 2] + shared[:, 0])
    with pytest.raises(ValueError, match=r"table \[1, n, dim\]"):
        table_modulation(table, torch.zeros(2, 2, 4))


def test_modulation_table_is_normal_with_variance_one_over_dim_and_untouched_on_meta() -> None:
    torch.manual_seed(0)
    table = modulation_table(6, 4096)
    assert table.shape == (1, 6, 4096) and table.requires_grad
    assert abs(float(table.std()) - 4096**-0.5) < 0.05 * 4096**-0.5 and abs(float(table.mean())) < 1e-3
    with torch.device("meta"):
        on_meta = modulation_table(6, 4096)
    assert on_meta.is_meta and on_meta.shape == (1, 6, 4096)
