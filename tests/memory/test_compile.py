"""Regional compile: every repeated block compiled, outputs equal eager, clear error without blocks."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffcaps import casting, compile as regional_compile
from diffcaps.casting import LayerwiseCastingConfig
from diffcaps.compile import RegionalCompileConfig
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
    config = RegionalCompileConfig(backend="aot_eager")
    names = regional_compile.enable(model, config)
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert regional_compile.active(model) is config
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-6)
    regional_compile.disable(model)
    regional_compile.disable(model)  # nothing on: a no-op
    assert regional_compile.active(model) is None
    assert torch.equal(_out(model), expected)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler on CPU")
def test_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    expected = _out(model)
    regional_compile.enable(model)
    torch.testing.assert_close(_out(model), expected, rtol=1e-5, atol=1e-5)


def test_casting_then_compile() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.bfloat16))
    expected = _out(model)
    regional_compile.enable(model, RegionalCompileConfig(backend="aot_eager"))
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-6)


def test_a_model_without_repeated_blocks_is_refused() -> None:
    with pytest.raises(CapabilityError, match="Linear does not support 'repeated_blocks'"):
        regional_compile.enable(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_whole_model_compiles_in_one_graph() -> None:
    torch._dynamo.reset()
    model = seeded_model(TINY)
    expected = _out(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break anywhere
    with torch.no_grad():
        got = compiled(**flux_inputs(TINY, batch=2))
    assert type(got).__name__ == "FluxOutput"
    assert torch.equal(got.sample, expected)
