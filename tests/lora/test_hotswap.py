"""Hotswap: new weights into the same tensors (rank padded), so a compiled model is not recompiled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps import lora
from diffcaps.errors import LoRAError
from tests.flux_fixtures import TINY, flux_inputs, seeded_model
from tests.lora._check import fingerprint
from tests.lora._files import module, diffusers_style, kohya_style

_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "proj_out",
          "single_transformer_blocks.0.proj_mlp"]


def _file(seed: int, rank: int, tmp: Path, alpha_every: int = 1) -> Path:
    model = seeded_model(TINY)
    file = diffusers_style(model, seed=seed, key=lambda p: f"transformer.{p}", paths=_PATHS, alpha_every=alpha_every,
                           rank=rank)
    return file.save(tmp / f"{seed}.safetensors")


def _run(model: Callable[..., Any]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**flux_inputs(TINY), return_dict=False)[0]
    return out


def test_hotswap_replaces_weights_in_place_without_recompiling(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    model = seeded_model(TINY)
    lora.enable_hotswap(model, max_rank=8)
    lora.load_adapter(model, _file(1, 3, tmp_path, alpha_every=2), adapter_name="x")
    lora.set_adapters(model, "x", {"proj_out": 0.5})
    layer = module(model, "proj_out")
    assert layer.lora_A["x"].weight.shape[0] == 8  # padded to the declared rank
    pointers = {p: module(model, p).lora_A["x"].weight.data_ptr() for p in _PATHS}

    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    before = _run(compiled)
    frames = counter.frame_count

    new = _file(2, 5, tmp_path)
    report = lora.load_adapter(model, new, adapter_name="x", hotswap=True)
    assert report.hotswapped
    after = _run(compiled)
    assert counter.frame_count == frames  # no recompilation
    assert {p: module(model, p).lora_A["x"].weight.data_ptr() for p in _PATHS} == pointers
    assert (after - before).abs().max() > 1e-3

    fresh = seeded_model(TINY)
    lora.load_adapter(fresh, new, adapter_name="x")
    lora.set_adapters(fresh, "x", {"proj_out": 0.5})  # the user's weights carry over the swap
    torch.testing.assert_close(after, _run(fresh), atol=1e-5, rtol=0)

    from safetensors import safe_open

    saved = lora.save_adapter(model, tmp_path / "saved.safetensors", "x")
    key = "transformer.proj_out.lora_A.weight"
    with safe_open(str(saved), "pt") as ours, safe_open(str(new), "pt") as source:
        # written at the file's own rank, not the padded one
        assert ours.get_slice(key).get_shape() == source.get_slice(key).get_shape() != [8, 32]


def test_hotswap_rank_above_the_padded_rank_is_refused(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    lora.enable_hotswap(model, max_rank=4)
    with pytest.raises(LoRAError, match="exceeds the hotswap rank 4"):
        lora.load_adapter(model, _file(3, 5, tmp_path), adapter_name="x")
    lora.load_adapter(model, _file(4, 3, tmp_path), adapter_name="x")
    before = fingerprint(model)
    with pytest.raises(LoRAError, match="exceeds"):
        lora.load_adapter(model, _file(5, 6, tmp_path), adapter_name="x", hotswap=True)
    assert fingerprint(model) == before
    with pytest.raises(LoRAError, match="before the first adapter"):
        lora.enable_hotswap(model, max_rank=16)


def test_hotswap_without_padding_needs_no_larger_rank(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    lora.load_adapter(model, _file(6, 4, tmp_path), adapter_name="x")
    new = _file(7, 3, tmp_path)
    lora.load_adapter(model, new, adapter_name="x", hotswap=True)
    fresh = seeded_model(TINY)
    lora.load_adapter(fresh, new, adapter_name="x")
    torch.testing.assert_close(_run(model), _run(fresh), atol=1e-5, rtol=0)
    saved = lora.save_adapter(model, tmp_path / "saved.safetensors", "x")
    reloaded = seeded_model(TINY)
    assert set(lora.load_adapter(reloaded, saved, adapter_name="x").targets) == set(_PATHS)
    torch.testing.assert_close(_run(reloaded), _run(fresh), atol=1e-5, rtol=0)


def test_hotswapped_kohya_file_keeps_its_split(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    key = lambda b: "lora_unet_" + b.replace(".", "_")  # noqa: E731
    first = kohya_style(model, seed=8, key=key, rank=2).save(tmp_path / "a.safetensors")
    second = kohya_style(model, seed=9, key=key, rank=2).save(tmp_path / "b.safetensors")
    lora.enable_hotswap(model, max_rank=8)
    lora.load_adapter(model, first, adapter_name="k")
    lora.load_adapter(model, second, adapter_name="k", hotswap=True)
    fresh = seeded_model(TINY)
    lora.load_adapter(fresh, second, adapter_name="k")
    torch.testing.assert_close(_run(model), _run(fresh), atol=1e-5, rtol=0)
