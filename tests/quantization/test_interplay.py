"""Features on a packed (scaled-fp8) model: offloading works, casting refuses, caches and CP run unchanged."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor

from diffcaps import cache, casting, offload, parallel, quantization, weights
from diffcaps.errors import CastingError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.offload import GroupOffloadingConfig
from diffcaps.parallel import ContextParallelConfig
from diffcaps.quantization.spec import packed_linears
from tests.flux_fixtures import flux_inputs
from tests.parallel._worker import free_port
from tests.quantization.test_scaled_fp8 import CONFIG, scaled_fp8_state

start_processes: Callable[..., Any] = importlib.import_module("torch.multiprocessing.spawn").start_processes


@pytest.fixture
def scaled_file(tmp_path: Path) -> Path:
    scaled, _ = scaled_fp8_state(tmp_path)
    path = tmp_path / "x_fp8_scaled.safetensors"
    save_file(scaled, path)
    return path


def _load(path: Path) -> FluxTransformer2DModel:
    model = weights.load_single_file(FluxTransformer2DModel, path)
    assert len(list(packed_linears(model))) > 10
    return model


def _run(model: FluxTransformer2DModel, *, seed: int = 1, height: int = 4, width: int = 4,
         text_tokens: int = 5) -> Tensor:
    inputs = flux_inputs(CONFIG, height=height, width=width, text_tokens=text_tokens, seed=seed)
    with torch.no_grad():
        out: Tensor = model(**inputs, return_dict=False)[0]
    return out


@pytest.mark.parametrize("config", [GroupOffloadingConfig(onload_device="cpu", offload_type="block_level"),
                                    GroupOffloadingConfig(onload_device="cpu", offload_type="leaf_level")],
                         ids=["block_level", "leaf_level"])
def test_group_offloading_runs_a_packed_model_unchanged(scaled_file: Path, config: GroupOffloadingConfig) -> None:
    model = _load(scaled_file)
    expected = _run(model)
    offload.enable(model, config)
    assert torch.equal(_run(model), expected)
    offload.disable(model)
    assert all(layer.weight.dtype == torch.uint8 for _, layer in packed_linears(model))
    assert torch.equal(_run(model), expected)


def test_layerwise_casting_refuses_packed_bytes_and_leaves_the_model(scaled_file: Path) -> None:
    model = _load(scaled_file)
    expected = _run(model)
    with pytest.raises(CastingError, match="uint8"):
        casting.enable(model, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
    assert casting.active(model) is None
    assert all(layer.weight.dtype == torch.uint8 for _, layer in packed_linears(model))
    assert torch.equal(_run(model), expected)


def test_first_block_cache_on_a_packed_model_equals_the_dense_model(scaled_file: Path) -> None:
    packed = _load(scaled_file)
    dense = _load(scaled_file)
    quantization.disable(dense)  # the same decoded weights as plain nn.Linear layers
    for model in (packed, dense):
        cache.enable(model, cache.FirstBlockCacheConfig(threshold=0.5))
    outputs: list[list[Tensor]] = [[], []]
    for step in range(4):
        for model, seen in zip((packed, dense), outputs, strict=True):
            with cache.context(model, "cond"):
                seen.append(_run(model, seed=1 + step // 2))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    decisions = [(cache.stats(m).computed(), cache.stats(m).skipped()) for m in (packed, dense)]
    assert decisions[0] == decisions[1] and decisions[0][1] > 0  # the repeated inputs skipped the blocks


def _rank(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = weights.load_single_file(FluxTransformer2DModel, path)
        parallel.enable(model, ContextParallelConfig(ulysses_degree=world, timeout=60))
        torch.save(_run(model, height=4, width=4, text_tokens=4), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_context_parallelism_on_two_ranks_equals_one_process(scaled_file: Path, tmp_path: Path) -> None:
    expected = _run(_load(scaled_file), height=4, width=4, text_tokens=4)
    context = start_processes(_rank, args=(2, free_port(), str(scaled_file), str(tmp_path)), nprocs=2,
                              start_method="spawn", join=False)
    while not context.join(timeout=120):
        pass
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=1e-5)
