"""Regional compile: every repeated block compiled, outputs equal eager, clear error without blocks."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffcaps.casting import enable_layerwise_casting
from diffcaps.compile import compile_repeated_blocks, compiled_blocks, uncompile_repeated_blocks
from diffcaps.errors import CapabilityError
from tests.flux_fixtures import TINY, flux_inputs, seeded_model


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(**flux_inputs(TINY, batch=2)).sample
    return result


def test_compiles_each_repeated_block_and_matches_eager() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    expected = _out(model)
    names = compile_repeated_blocks(model, backend="aot_eager")
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert compiled_blocks(model) == names
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-6)
    uncompile_repeated_blocks(model)
    assert compiled_blocks(model) == []
    assert torch.equal(_out(model), expected)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler on CPU")
def test_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    expected = _out(model)
    compile_repeated_blocks(model)
    torch.testing.assert_close(_out(model), expected, rtol=1e-5, atol=1e-5)


def test_casting_then_compile() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    enable_layerwise_casting(model, storage_dtype=torch.bfloat16)
    expected = _out(model)
    compile_repeated_blocks(model, backend="aot_eager")
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-6)


def test_a_model_without_repeated_blocks_is_refused() -> None:
    with pytest.raises(CapabilityError, match="Linear does not support 'repeated_blocks'"):
        compile_repeated_blocks(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_whole_model_compiles_in_one_graph() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    expected = _out(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break anywhere
    with torch.no_grad():
        got = compiled(**flux_inputs(TINY, batch=2))
    assert type(got).__name__ == "FluxOutput"
    assert torch.equal(got.sample, expected)
