"""The adapter lifecycle on Wan: save and reload, hotswap in place, fuse/unfuse/unload bit-exact.

The same checks as Flux's (``tests/lora/test_lifecycle.py``, ``test_hotswap.py``) on Wan's
modules and Wan's file formats; a saved file is also loaded by diffusers' Wan, which must give
the same output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from diffcaps import lora
from diffcaps.io import save_safetensors
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from tests.lora._check import check_fuse_cycles_are_exact, fingerprint
from tests.wan_fixtures import DIFFUSERS_TEXT_TOKENS
from tests.models.wan._files import (
    I2V,
    T2V,
    LoraFile,
    block_linears,
    lokr_file,
    lora_file,
    run,
    seeded_model,
    top_linears,
)


def _musubi(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def _comfy(name: str) -> str:
    return "diffusion_model." + name


def _linears(config: WanConfig) -> dict[str, str]:
    return {**top_linears(config), **block_linears(config)}


def _save(tmp_path: Path, file: LoraFile, name: str) -> Path:
    return save_safetensors(file.tensors, tmp_path / name)


def _layer(model: torch.nn.Module, path: str) -> Any:
    return model.get_submodule(path)


FILES = {
    "musubi": lambda m: lora_file(m, _linears(m.config), _musubi, rank=3, alpha=1.5),
    "comfy-diff_b": lambda m: lora_file(m, _linears(m.config), _comfy, diff_b=True),
    "lokr": lambda m: lokr_file(m, block_linears(m.config), _comfy),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", sorted(FILES))
def test_unfuse_and_unload_are_bit_exact(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    model = seeded_model(I2V).to(dtype)
    file = FILES[kind](seeded_model(I2V))
    original = fingerprint(model)
    lora.load_adapter(model, _save(tmp_path, file, "a.safetensors"), adapter_name="a")
    lora.set_adapters(model, "a", 0.7)
    check_fuse_cycles_are_exact(model, original=original)


def _diffusers_output(model: WanTransformer3DModel, saved: Path, weight: float, text: int) -> torch.Tensor:
    from diffusers import WanTransformer3DModel as DiffusersWan
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    theirs = DiffusersWan(**config)
    theirs.load_state_dict(seeded_model(model.config).state_dict())
    # the scale travels in the header's ``lora_adapter_metadata``, as diffusers writes it
    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(saved), return_lora_metadata=True)
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="a", metadata=metadata)
    theirs.set_adapters(["a"], [weight])
    return run(theirs.eval(), model.config, text=text)


@pytest.mark.parametrize("config", [T2V, I2V], ids=["t2v", "i2v"])
def test_save_and_reload_round_trip(tmp_path: Path, config: WanConfig) -> None:
    model = seeded_model(config)
    file = FILES["musubi"](model)
    lora.load_adapter(model, _save(tmp_path, file, "in.safetensors"), adapter_name="a")
    lora.set_adapters(model, "a", 0.3)  # a user weight is not part of the adapter
    saved = lora.save_adapter(model, tmp_path / "out.safetensors", "a", layout="diffusers")
    lora.set_adapters(model, "a", 1.0)
    assert all(key.startswith("transformer.") for key in load_file(str(saved)))

    fresh = seeded_model(config)
    report = lora.load_adapter(fresh, saved, adapter_name="a")
    assert report.format == "diffusers"
    assert set(report.targets) == set(file.deltas)
    for path in file.deltas:  # the same peft layers, bit for bit
        ours, theirs = _layer(model, path), _layer(fresh, path)
        assert torch.equal(ours.lora_A["a"].weight, theirs.lora_A["a"].weight), path
        assert torch.equal(ours.lora_B["a"].weight, theirs.lora_B["a"].weight), path
        assert ours.scaling["a"] == theirs.scaling["a"], path
    expected = run(model, config)
    assert not torch.equal(expected, run(seeded_model(config), config))
    torch.testing.assert_close(run(fresh, config), expected, atol=1e-5, rtol=0)
    # diffusers' Wan loads the saved file as its own and predicts the same (its image-to-video
    # attention takes the first 512 tokens for text, so the text is padded to 512 there)
    text = DIFFUSERS_TEXT_TOKENS if config.image_dim is not None else 5
    torch.testing.assert_close(_diffusers_output(model, saved, 1.0, text), run(model, config, text=text),
                               atol=1e-5, rtol=0)


_HOTSWAP_PATHS = ["blocks.0.attn1.to_q", "blocks.1.attn2.add_k_proj", "blocks.1.ffn.net.2", "proj_out",
                  "condition_embedder.image_embedder.ff.net.0.proj"]


def _diffusers_file(tmp_path: Path, seed: int, rank: int) -> Path:
    model = seeded_model(I2V)
    file = lora_file(model, {p: p for p in _HOTSWAP_PATHS}, lambda p: f"transformer.{p}", down="lora_A",
                     up="lora_B", rank=rank, alpha=None, seed=seed)
    return _save(tmp_path, file, f"{seed}.safetensors")


def test_hotswap_replaces_weights_in_place_without_recompiling(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    model = seeded_model(I2V)
    lora.enable_hotswap(model, max_rank=8)
    lora.load_adapter(model, _diffusers_file(tmp_path, 1, 3), adapter_name="x")
    lora.set_adapters(model, "x", {"proj_out": 0.5})
    assert _layer(model, "proj_out").lora_A["x"].weight.shape[0] == 8  # padded to the declared rank
    pointers = {p: _layer(model, p).lora_A["x"].weight.data_ptr() for p in _HOTSWAP_PATHS}

    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    before = run(compiled, I2V)
    frames = counter.frame_count

    new = _diffusers_file(tmp_path, 2, 5)
    report = lora.load_adapter(model, new, adapter_name="x", hotswap=True)
    assert report.hotswapped
    after = run(compiled, I2V)
    assert counter.frame_count == frames  # no recompilation
    assert {p: _layer(model, p).lora_A["x"].weight.data_ptr() for p in _HOTSWAP_PATHS} == pointers
    assert (after - before).abs().max() > 1e-3

    fresh = seeded_model(I2V)
    lora.load_adapter(fresh, new, adapter_name="x")
    lora.set_adapters(fresh, "x", {"proj_out": 0.5})  # the user's weights carry over the swap
    torch.testing.assert_close(after, run(fresh, I2V), atol=1e-5, rtol=0)

    saved = lora.save_adapter(model, tmp_path / "saved.safetensors", "x")
    key = "transformer.proj_out.lora_A.weight"
    written = load_file(str(saved))[key]
    assert written.shape == load_file(str(new))[key].shape and written.shape[0] == 5  # the file's rank, not 8


def test_hotswap_rank_above_the_padded_rank_leaves_the_model(tmp_path: Path) -> None:
    from diffcaps.errors import LoRAError

    model = seeded_model(I2V)
    lora.enable_hotswap(model, max_rank=4)
    lora.load_adapter(model, _diffusers_file(tmp_path, 3, 3), adapter_name="x")
    before = fingerprint(model)
    with pytest.raises(LoRAError, match="exceeds"):
        lora.load_adapter(model, _diffusers_file(tmp_path, 4, 6), adapter_name="x", hotswap=True)
    assert fingerprint(model) == before
