"""The ``KERNEL`` and ``PROCESSOR`` hooks of Flux attention, which context parallelism and IP-Adapter use."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffcaps.layers import attention, grid_position_ids, rope_frequencies
from diffcaps.models.flux._attention import KERNEL, PROCESSOR, FluxAttention
from diffcaps.models.flux._blocks import FluxTransformerBlock


def _inputs(seed: int = 0) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 6, 16, generator=generator)
    text = torch.randn(2, 3, 16, generator=generator)
    ids = torch.cat([torch.zeros(3, 2, dtype=torch.long), grid_position_ids(2, 3)])
    return image, text, rope_frequencies(ids, (4, 4))


def test_kernel_replaced_on_an_instance_runs_and_deleting_it_restores() -> None:
    attn = FluxAttention(16, 2, 8, joint=True).eval()
    image, text, rotary = _inputs()
    with torch.no_grad():
        before = attn(image, text, rotary)
        shapes: list[tuple[int, ...]] = []

        def doubled(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
            shapes.append(tuple(query.shape))
            return 2 * attention(query, key, value)

        setattr(attn, KERNEL, doubled)
        replaced = attn(image, text, rotary)
        delattr(attn, KERNEL)
        after = attn(image, text, rotary)
    assert shapes == [(2, 9, 2, 8)]  # [batch, text + image tokens, heads, head_dim]
    assert not torch.allclose(replaced[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(after, before))


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}

    def forward(self, image_query: Tensor, **kwargs: Any) -> Tensor:
        self.seen = dict(kwargs, shape=tuple(image_query.shape))
        return torch.full((image_query.shape[0], image_query.shape[1], 16), 0.5)


def test_processor_output_is_added_to_the_image_stream() -> None:
    block = FluxTransformerBlock(16, 2, 8).eval()
    image, text, rotary = _inputs(1)
    temb = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        text_before, image_before = block(image, text, temb, rotary)
        recorder = _Recorder()
        block.attn.add_module(PROCESSOR, recorder)
        text_after, image_after = block(image, text, temb, rotary, {"marker": 7})
        delattr(block.attn, PROCESSOR)
        _, image_restored = block(image, text, temb, rotary)
    assert recorder.seen == {"marker": 7, "shape": (2, 6, 2, 8)}  # the image query only
    assert torch.equal(text_after, text_before)
    torch.testing.assert_close(image_after, image_before + 0.5)
    assert torch.equal(image_restored, image_before)
