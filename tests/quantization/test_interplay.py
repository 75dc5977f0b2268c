"""Features on a packed model (scaled fp8 and GGUF): offloading works, casting refuses, caches and CP run unchanged."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn

from diffcaps import cache, casting, lora, offload, parallel, quantization, weights
from diffcaps.errors import CastingError, QuantizationError
from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.offload import GroupOffloadingConfig
from diffcaps.parallel import ContextParallelConfig
from diffcaps.quantization.spec import packed_linears
from diffcaps.quantization.spec import ScaledFP8
from tests.flux_fixtures import flux_inputs
from tests.lora._files import diffusers_style
from tests._distributed import free_port
from tests.quantization.gguf_files import flux_gguf, mixed_types
from tests.quantization.test_gguf_load import FLUX, FLUX_TYPES
from tests.quantization.test_scaled_fp8 import CONFIG, scaled_fp8_state

start_processes: Callable[..., Any] = importlib.import_module("torch.multiprocessing.spawn").start_processes

CONFIGS: Final[dict[str, FluxConfig]] = {"scaled_fp8": CONFIG, "gguf": FLUX}
"""The config of each packed format's test file, by format."""


def _write(kind: str, folder: Path) -> Path:
    if kind == "gguf":  # Q8_0, Q4_K, Q6_K and Q5_0 matrices kept packed; F16/BF16 ones dense
        return flux_gguf(folder / "flux1-dev-mixed.gguf", FLUX, mixed_types(FLUX_TYPES))
    scaled, _ = scaled_fp8_state(folder)
    path = folder / "x_fp8_scaled.safetensors"
    save_file(scaled, path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def packed_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind: str = request.param
    return kind, _write(kind, tmp_path_factory.mktemp(kind))


def _load(path: Path) -> FluxTransformer2DModel:
    model = weights.load_single_file(FluxTransformer2DModel, path)
    assert len(list(packed_linears(model))) > 10
    return model


def _run(model: FluxTransformer2DModel, config: FluxConfig, *, seed: int = 1, height: int = 4, width: int = 4,
         text_tokens: int = 5) -> Tensor:
    inputs = flux_inputs(config, height=height, width=width, text_tokens=text_tokens, seed=seed)
    with torch.no_grad():
        out: Tensor = model(**inputs, return_dict=False)[0]
    return out


@pytest.mark.parametrize("config", [GroupOffloadingConfig(onload_device="cpu", offload_type="block_level"),
                                    GroupOffloadingConfig(onload_device="cpu", offload_type="leaf_level")],
                         ids=["block_level", "leaf_level"])
def test_group_offloading_runs_a_packed_model_unchanged(packed_file: tuple[str, Path],
                                                        config: GroupOffloadingConfig) -> None:
    kind, path = packed_file
    model = _load(path)
    expected = _run(model, CONFIGS[kind])
    offload.enable(model, config)
    assert torch.equal(_run(model, CONFIGS[kind]), expected)
    offload.disable(model)
    assert all(layer.weight.dtype == torch.uint8 for _, layer in packed_linears(model))
    assert torch.equal(_run(model, CONFIGS[kind]), expected)


def test_layerwise_casting_refuses_packed_bytes_and_leaves_the_model(packed_file: tuple[str, Path]) -> None:
    kind, path = packed_file
    model = _load(path)
    expected = _run(model, CONFIGS[kind])
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    with pytest.raises(CastingError, match=r"cannot cast non-float parameter .*weight \(torch\.uint8\)"):
        casting.enable(model, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
    assert casting.active(model) is None
    assert {name: tensor.dtype for name, tensor in model.state_dict().items()} == dtypes
    assert torch.equal(_run(model, CONFIGS[kind]), expected)


def test_regional_compile_runs_a_packed_model(packed_file: tuple[str, Path]) -> None:
    """The decode runs inside each compiled block (CPU inductor; equal to eager within its reassociation)."""
    from diffcaps import compile as regional

    kind, path = packed_file
    model = _load(path)
    eager = _run(model, CONFIGS[kind])
    regional.enable(model, regional.RegionalCompileConfig())
    try:
        compiled = _run(model, CONFIGS[kind])
    finally:
        regional.disable(model)
        torch._dynamo.reset()
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() <= 1e-5


def test_first_block_cache_on_a_packed_model_equals_the_dense_model(packed_file: tuple[str, Path]) -> None:
    kind, path = packed_file
    packed = _load(path)
    dense = _load(path)
    quantization.disable(dense)  # the same decoded weights as plain nn.Linear layers
    for model in (packed, dense):
        cache.enable(model, cache.FirstBlockCacheConfig(threshold=0.5))
    outputs: list[list[Tensor]] = [[], []]
    for step in range(4):
        for model, seen in zip((packed, dense), outputs, strict=True):
            with cache.context(model, "cond"):
                seen.append(_run(model, CONFIGS[kind], seed=1 + step // 2))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    decisions = [(cache.stats(m).computed(), cache.stats(m).skipped()) for m in (packed, dense)]
    assert decisions[0] == decisions[1] and decisions[0][1] > 0  # the repeated inputs skipped the blocks


def test_disable_decodes_every_packed_layer_into_a_dense_one_with_the_same_output(
        packed_file: tuple[str, Path]) -> None:
    kind, path = packed_file
    model = _load(path)
    expected = _run(model, CONFIGS[kind])
    layers = dict(packed_linears(model))
    decoded = {name: layer.dense_weight() for name, layer in layers.items()}
    report = quantization.active(model)
    assert report is not None and sum(report.packed.values()) == len(layers)
    quantization.disable(model)
    assert quantization.active(model) is None
    for name, weight in decoded.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight), name
    assert torch.uint8 not in {tensor.dtype for tensor in model.state_dict().values()}
    assert torch.equal(_run(model, CONFIGS[kind]), expected)


def _rank(rank: int, world: int, port: int, kind: str, path: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = weights.load_single_file(FluxTransformer2DModel, path)
        parallel.enable(model, ContextParallelConfig(ulysses_degree=world, timeout=60))
        torch.save(_run(model, CONFIGS[kind], height=4, width=4, text_tokens=4), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_context_parallelism_on_two_ranks_equals_one_process(packed_file: tuple[str, Path], tmp_path: Path) -> None:
    kind, path = packed_file
    expected = _run(_load(path), CONFIGS[kind], height=4, width=4, text_tokens=4)
    context = start_processes(_rank, args=(2, free_port(), kind, str(path), str(tmp_path)), nprocs=2,
                              start_method="spawn", join=False)
    while not context.join(timeout=120):
        pass
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=1e-5)


def _packed_state(model: nn.Module) -> dict[str, tuple[type, torch.dtype]]:
    return {name: (type(layer), layer.weight.dtype) for name, layer in model.named_modules()
            if isinstance(layer, nn.Linear)}


def test_disable_is_refused_while_features_hold_the_packed_layers(packed_file: tuple[str, Path],
                                                                   tmp_path: Path) -> None:
    kind, path = packed_file
    model = _load(path)
    expected = _run(model, CONFIGS[kind])
    before = _packed_state(model)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_type="block_level"))
    with pytest.raises(QuantizationError, match=r"group offloading is enabled .*diffcaps\.offload\.disable"):
        quantization.disable(model)
    assert torch.equal(_run(model, CONFIGS[kind]), expected)
    offload.disable(model)
    assert _packed_state(model) == before
    skip = tuple(f"^{re.escape(name)}$" for name, _ in packed_linears(model))
    casting.enable(model, casting.LayerwiseCastingConfig(storage_dtype=torch.bfloat16, skip_patterns=skip))
    cast = _run(model, CONFIGS[kind])
    with pytest.raises(QuantizationError, match=r"layerwise casting is enabled .*diffcaps\.casting\.disable"):
        quantization.disable(model)
    assert torch.equal(_run(model, CONFIGS[kind]), cast)
    casting.disable(model)
    assert _packed_state(model) == before
    adapter = diffusers_style(model, seed=3, key=lambda p: f"transformer.{p}", alpha_every=3)
    lora.load_adapter(model, save_safetensors(adapter.tensors, tmp_path / "adapter.safetensors"))
    with_adapter = _run(model, CONFIGS[kind])
    with pytest.raises(QuantizationError, match=r"LoRA adapter\(s\) 'default' are loaded .*diffcaps\.lora\.unload"):
        quantization.disable(model)
    assert torch.equal(_run(model, CONFIGS[kind]), with_adapter)
    lora.unload(model)
    assert _packed_state(model) == before


def test_disable_decodes_every_layer_before_swapping_any(packed_file: tuple[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = packed_file
    model = _load(path)
    before = _packed_state(model)
    name, last = list(packed_linears(model))[-1]

    def broken(dtype: torch.dtype | None = None) -> Tensor:
        raise RuntimeError(f"cannot decode {name}")

    monkeypatch.setattr(last, "dense_weight", broken)
    with pytest.raises(RuntimeError, match="cannot decode"):
        quantization.disable(model)
    assert _packed_state(model) == before


def test_disabled_layers_keep_requires_grad_off(packed_file: tuple[str, Path]) -> None:
    _, path = packed_file
    model = _load(path)
    names = [name for name, _ in packed_linears(model)]
    quantization.disable(model)
    for name in names:
        layer = model.get_submodule(name)
        assert not any(p.requires_grad for p in layer.parameters()), name


def test_a_scaled_fp8_scale_is_placed_once_on_the_weight_device(tmp_path: Path) -> None:
    model = _load(_write("scaled_fp8", tmp_path))
    name, layer = next(iter(packed_linears(model)))
    codec = layer.codec
    assert isinstance(codec, ScaledFP8) and codec.scale_weight.device.type == "cpu"
    model.to(torch.bfloat16)  # the packed bytes and the scale the file stored are left as they are
    assert layer.weight.dtype == torch.uint8 and codec.scale_weight.dtype == torch.float32
    model.to("meta")  # stands in for a GPU: the weight moves, the codec places its scale there
    weight = layer.dense_weight()
    assert weight.device.type == "meta" and weight.shape == layer.weight_shape, name
    scale = codec.scale_on(layer.weight.device)
    assert scale.device.type == "meta" and scale.dtype == torch.float32
    layer.dense_weight()
    assert codec.scale_on(layer.weight.device) is scale  # reused by every later call, not copied again
    assert codec.scale_weight.device.type == "cpu"  # the stored scale (for export) stays where it was
