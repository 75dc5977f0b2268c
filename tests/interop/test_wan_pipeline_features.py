"""WanPipeline with ``wrap(wan_model)``: pipeline LoRA calls and First Block Cache give diffusers' video latents.

Two WanPipelines over the same tiny seeded folder, one with diffusers' transformer, one with a
wrapped diffcaps model; the same files and calls on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers.hooks as hooks
import torch
from diffusers import WanPipeline

from diffcaps import lora
from diffcaps.io import save_safetensors
from diffcaps.interop.diffusers import unwrap, wrap
from diffcaps.models.wan import WanTransformer3DModel
from tests.interop.pipelines import WAN_CALL, assert_same, generate
from tests.interop.test_cache_configs import _calls
from tests.lora._files import diffusers_style
from tests.models.wan._files import block_linears, lora_file

CALL: dict[str, Any] = {"prompt": "a photo of a cat", "negative_prompt": "a dog", **WAN_CALL}


def _pipelines(folder: Path) -> tuple[Any, Any]:
    theirs = WanPipeline.from_pretrained(folder)
    ours = WanPipeline.from_pipe(theirs, transformer=wrap(WanTransformer3DModel.from_pretrained(folder / "transformer")))
    return ours, theirs


def test_wan_pipeline_lora_calls_match_diffusers(wan_folder: Path, tmp_path: Path) -> None:
    ours, theirs = _pipelines(wan_folder)
    model = unwrap(ours.transformer)
    assert isinstance(model, WanTransformer3DModel)
    peft = diffusers_style(model, seed=3, key=lambda path: f"transformer.{path}",
                           paths=[p for p in block_linears(model.config).values() if p.startswith("blocks.0.")])
    original = lora_file(model, block_linears(model.config), lambda name: "diffusion_model." + name,
                         down="lora_A", up="lora_B")
    files = {"peft": peft.save(tmp_path / "peft.safetensors"),
             "original": save_safetensors(original.tensors, tmp_path / "wan.safetensors")}
    with torch.no_grad():
        base = generate(ours, **CALL)
        for pipe in (ours, theirs):
            for name, path in files.items():
                pipe.load_lora_weights(path, adapter_name=name)
        assert lora.list_adapters(model) == ("peft", "original")
        assert ours.get_active_adapters() == theirs.get_active_adapters() == ["original"]  # the last loaded
        loaded = generate(ours, **CALL)
        assert_same(loaded, generate(theirs, **CALL))
        assert (loaded[0] - base[0]).abs().max() > 1e-3

        for pipe in (ours, theirs):
            pipe.set_adapters(["peft", "original"], [0.7, 0.4])
        weighted = generate(ours, **CALL)
        assert_same(weighted, generate(theirs, **CALL))
        scaled = generate(ours, **CALL, attention_kwargs={"scale": 0.5})
        assert_same(scaled, generate(theirs, **CALL, attention_kwargs={"scale": 0.5}))
        assert (scaled[0] - weighted[0]).abs().max() > 1e-4
        assert_same(generate(ours, **CALL), weighted, tolerance=0.0)  # the scale lasts one call

        for pipe in (ours, theirs):
            pipe.unload_lora_weights()
        assert_same(generate(ours, **CALL), base, tolerance=0.0)


def test_wan_first_block_cache_through_the_pipeline_decides_as_diffusers(wan_folder: Path) -> None:
    ours, theirs = _pipelines(wan_folder)
    model = unwrap(ours.transformer)
    call = {**CALL, "num_inference_steps": 6}
    with torch.no_grad():
        uncached = generate(ours, **call)
        for pipe in (ours, theirs):
            pipe.transformer.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.3))
        with _calls(model) as my_calls:
            mine = generate(ours, **call)
        with _calls(theirs.transformer) as their_calls:
            reference = generate(theirs, **call)
    assert len(my_calls) == 12  # cond and uncond pass per step, each in its own cache context
    assert my_calls == their_calls, "a block ran in one library and was skipped in the other"
    assert_same(mine, reference)
    full = max(len(c) for c in my_calls)
    assert any(len(c) < full for c in my_calls) and (mine[0] - uncached[0]).abs().max() > 0
