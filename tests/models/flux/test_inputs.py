"""Wrong forward arguments give an ``InputError`` naming the argument, the expected shape and what came."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from diffcaps.errors import DiffcapsError, InputError
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, flux_inputs, seeded_model

Edit = Callable[[dict[str, Any]], Any]

# TINY: in_channels 8, joint_attention_dim 24, pooled_projection_dim 20, guidance embedded;
# the inputs are batch 2, 16 image tokens, 5 text tokens.
BAD_INPUTS: list[tuple[str, Edit, str, str]] = [
    ("hidden_states", lambda i: i["hidden_states"][..., :7], "a float tensor [batch, image_tokens, 8]",
     "shape [2, 16, 7] float32"),
    ("hidden_states", lambda i: i["hidden_states"].long(), "a float tensor [batch, image_tokens, 8]",
     "shape [2, 16, 8] int64"),
    ("hidden_states", lambda i: i["hidden_states"][0], "a float tensor [batch, image_tokens, 8]",
     "shape [16, 8] float32"),
    ("hidden_states", lambda i: i["hidden_states"].tolist(), "a float tensor [batch, image_tokens, 8]", "(list)"),
    ("encoder_hidden_states", lambda i: i["encoder_hidden_states"][..., :-1],
     "a float tensor [2, text_tokens, 24]", "shape [2, 5, 23] float32"),
    ("encoder_hidden_states", lambda i: i["encoder_hidden_states"][:1],
     "a float tensor [2, text_tokens, 24]", "shape [1, 5, 24] float32"),
    ("pooled_projections", lambda i: i["pooled_projections"][:, :4], "a float tensor [batch, 20] (batch 1 or 2)",
     "shape [2, 4] float32"),
    ("pooled_projections", lambda i: i["pooled_projections"].int(), "a float tensor [batch, 20] (batch 1 or 2)",
     "shape [2, 20] int32"),
    ("timestep", lambda i: torch.rand(3), "a real tensor [batch] (batch 1 or 2)", "shape [3] float32"),
    ("timestep", lambda i: torch.rand(2, 1), "a real tensor [batch] (batch 1 or 2)", "shape [2, 1] float32"),
    ("timestep", lambda i: torch.tensor(0.5), "a real tensor [batch] (batch 1 or 2)", "shape [] float32"),
    ("timestep", lambda i: 0.5, "a real tensor [batch] (batch 1 or 2)", "0.5 (float)"),
    ("timestep", lambda i: torch.ones(2, dtype=torch.bool), "a real tensor [batch] (batch 1 or 2)",
     "shape [2] bool"),
    ("guidance", lambda i: None, "a tensor [batch] (this model embeds guidance)", "None (NoneType)"),
    ("guidance", lambda i: torch.full((5,), 3.5), "a real tensor [batch] (batch 1 or 2)", "shape [5] float32"),
    ("img_ids", lambda i: i["img_ids"][:-1], "a tensor [16, 3] (one (t, h, w) id per token of hidden_states)",
     "shape [15, 3] float32"),
    ("img_ids", lambda i: i["img_ids"][:, :2], "a tensor [16, 3] (one (t, h, w) id per token of hidden_states)",
     "shape [16, 2] float32"),
    ("img_ids", lambda i: i["img_ids"].flatten(), "a tensor [16, 3] (one (t, h, w) id per token of hidden_states)",
     "shape [48] float32"),
    ("txt_ids", lambda i: i["txt_ids"][None, :4],
     "a tensor [5, 3] (one (t, h, w) id per token of encoder_hidden_states)", "shape [1, 4, 3] float32"),
]


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return seeded_model(TINY)


@pytest.mark.parametrize(("name", "edit", "expected", "got"), BAD_INPUTS)
def test_bad_argument_is_named_with_expected_and_given_shape(
    model: FluxTransformer2DModel, name: str, edit: Edit, expected: str, got: str
) -> None:
    inputs = flux_inputs(TINY, batch=2)
    inputs[name] = edit(inputs)
    with pytest.raises(InputError) as caught:
        model(**inputs)
    message = str(caught.value)
    assert message.startswith(f"forward argument {name!r}: expected {expected}, got "), message
    assert message.endswith(got), message
    assert isinstance(caught.value, DiffcapsError)
    assert isinstance(caught.value, ValueError)


def test_shapes_diffusers_accepts_still_work(model: FluxTransformer2DModel) -> None:
    inputs = flux_inputs(TINY, batch=2)
    for name in ("timestep", "pooled_projections"):  # one condition for the whole batch
        inputs[name] = inputs[name][:1].expand(2, *inputs[name].shape[1:])
    broadcast = {  # batch-1 conditioning broadcasts over the batch; ids may carry a batch dim
        "timestep": inputs["timestep"][:1], "guidance": inputs["guidance"][:1],
        "pooled_projections": inputs["pooled_projections"][:1],
        "img_ids": inputs["img_ids"][None], "txt_ids": inputs["txt_ids"][None].expand(2, -1, -1),
    }
    with torch.no_grad():
        expected = model(**inputs).sample
        got = model(**{**inputs, **broadcast}).sample
        integer_steps = model(**{**inputs, "timestep": torch.tensor([1, 0])}).sample
        float_steps = model(**{**inputs, "timestep": torch.tensor([1.0, 0.0])}).sample
    torch.testing.assert_close(got, expected)
    assert torch.equal(integer_steps, float_steps)


def test_a_refused_call_leaves_the_model_working(model: FluxTransformer2DModel) -> None:
    inputs = flux_inputs(TINY, batch=2)
    with torch.no_grad():
        expected = model(**inputs).sample
        with pytest.raises(InputError, match=re.escape("'hidden_states'")):
            model(**{**inputs, "hidden_states": inputs["hidden_states"][..., :3]})
        assert torch.equal(model(**inputs).sample, expected)

