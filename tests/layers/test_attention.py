"""``attention`` against an explicit softmax(QKᵀ/√d)V."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffcaps.layers import attention


def _explicit(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None = None) -> Tensor:
    # [batch, seq, heads, dim] → per head logits [batch, heads, q, k]
    logits = torch.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    if bias is not None:
        logits = logits + bias
    weights = logits.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, value)


def _qkv(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 5, 3, 8, generator=generator, dtype=torch.float64)
    key = torch.randn(2, 7, 3, 8, generator=generator, dtype=torch.float64)
    value = torch.randn(2, 7, 3, 8, generator=generator, dtype=torch.float64)
    return query, key, value


def test_unmasked_matches_explicit_softmax() -> None:
    query, key, value = _qkv()
    got = attention(query, key, value)
    assert got.shape == (2, 5, 3, 8)
    torch.testing.assert_close(got, _explicit(query, key, value))


def test_boolean_mask_keeps_true_positions() -> None:
    query, key, value = _qkv(1)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[0, ..., 4:] = False  # the first sample's last three keys are padding
    got = attention(query, key, value, mask=keep)
    bias = torch.zeros(2, 1, 1, 7, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(got, _explicit(query, key, value, bias))
    # the masked keys really are ignored: changing their values changes only the unmasked sample
    changed = value.clone()
    changed[:, 4:] = 100.0
    again = attention(query, key, changed, mask=keep)
    torch.testing.assert_close(again[0], got[0])
    assert not torch.allclose(again[1], got[1])


def test_float_mask_is_added_to_the_logits() -> None:
    query, key, value = _qkv(2)
    bias = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(attention(query, key, value, mask=bias), _explicit(query, key, value, bias))


def test_mask_of_wrong_shape_is_refused() -> None:
    query, key, value = _qkv()
    with pytest.raises(RuntimeError):
        attention(query, key, value, mask=torch.ones(2, 1, 1, 6, dtype=torch.bool))
