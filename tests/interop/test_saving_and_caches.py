"""A pipeline holding a wrapped model saves a folder diffusers alone reloads; its caches reset per call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from diffusers import FluxPipeline
from diffusers import FluxTransformer2DModel as DiffusersFlux

from diffcaps import cache
from diffcaps.errors import InteropError
from diffcaps.interop.diffusers import unwrap, wrap
from diffcaps.models.flux import FluxTransformer2DModel
from tests.interop.pipelines import FLUX_CALL, assert_same, generate

CALL: dict[str, Any] = {"prompt": "a photo of a cat", "guidance_scale": 3.5, **FLUX_CALL}


@pytest.fixture
def ours(flux_folder: Path) -> Any:
    model = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    return FluxPipeline.from_pretrained(flux_folder, transformer=wrap(model))


def test_save_pretrained_writes_a_folder_diffusers_reloads(ours: Any, tmp_path: Path) -> None:
    before = dict(ours.config)
    ours.save_pretrained(tmp_path / "saved")
    # the live pipeline's components are as they were (diffusers only adds its own version keys)
    assert {key: ours.config[key] for key in before} == before
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    reloaded = FluxPipeline.from_pretrained(tmp_path / "saved")
    assert type(reloaded.transformer) is DiffusersFlux
    assert_same(generate(reloaded, **CALL), generate(ours, **CALL), tolerance=0.0)


def test_the_saved_pipeline_loads_where_diffcaps_cannot_be_imported(ours: Any, tmp_path: Path) -> None:
    ours.save_pretrained(tmp_path / "saved")
    script = (
        "import sys\n"
        "sys.modules['diffcaps'] = None  # as if diffcaps were not installed\n"
        "from diffusers import FluxPipeline\n"
        f"pipe = FluxPipeline.from_pretrained({str(tmp_path / 'saved')!r})\n"
        "assert type(pipe.transformer).__module__.startswith('diffusers.'), type(pipe.transformer)\n"
        "assert not any(name == 'diffcaps' or name.startswith('diffcaps.') for name in sys.modules if sys.modules[name])\n"
        "print('loaded', type(pipe.transformer).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded FluxTransformer2DModel" in done.stdout


def test_save_pretrained_refuses_what_diffcaps_does_not_write(ours: Any, tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="variant='fp16'"):
        ours.transformer.save_pretrained(tmp_path / "t", variant="fp16")
    assert not (tmp_path / "t").exists()


def test_assigning_the_transformer_keeps_images(flux_folder: Path, ours: Any) -> None:
    pipe = FluxPipeline.from_pretrained(flux_folder)
    pipe.transformer = wrap(FluxTransformer2DModel.from_pretrained(flux_folder / "transformer"))
    assert tuple(pipe.config["transformer"]) == ("diffusers", "FluxTransformer2DModel")
    assert_same(generate(pipe, **CALL), generate(ours, **CALL), tolerance=0.0)


def test_first_block_cache_reaches_the_model_and_resets_between_calls(ours: Any) -> None:
    model = unwrap(ours.transformer)
    cache.enable(model, cache.FirstBlockCacheConfig(threshold=0.5))
    call = {**CALL, "num_inference_steps": 4, "true_cfg_scale": 2.0, "negative_prompt": "a dog"}
    seen: list[cache.CacheStats] = []

    def read_stats(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(cache.stats(model))  # the pipeline resets the cache when the call ends
        return tensors

    first = generate(ours, **call)
    ours(**call, callback_on_step_end=read_stats)
    assert set(seen[-1].contexts) == {"cond", "uncond"}  # the pipeline's cache_context names
    assert seen[-1].skipped("cond") > 0 and seen[-1].computed("cond") > 0
    assert seen[0].skipped() == 0  # each call starts from a reset cache: its first step skips nothing
    second = generate(ours, **call)
    assert_same(second, first, tolerance=0.0)  # without a reset the second call would start from cached state
    cache.disable(model)
