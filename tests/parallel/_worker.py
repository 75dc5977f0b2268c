"""What the spawned ranks run, and the builders the parent uses for its single-process references.

Each rank writes ``rank<N>.pt`` into the output folder: the gathered output of every case,
whether ``disable`` restored the model bit for bit, and the outcome of the error checks.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffcaps.cache import FirstBlockCacheConfig
from diffcaps.errors import CapabilityError, ParallelError, RankFailure
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps import parallel
from diffcaps.parallel import ContextParallelConfig, disable
from tests.custom_model import seeded_tiny_dit
from tests.flux_fixtures import PARITY_CONFIGS, TINY, flux_inputs, seeded_model

CONFIGS = {"tiny": TINY, **PARITY_CONFIGS}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "ff.net.2")


@attrs.frozen(kw_only=True)
class Case:
    """One context-parallel run compared with the single-process model."""

    config: str = "tiny"
    ulysses: int = 1
    ring: int = 1
    height: int = 4
    width: int = 4
    text: int = 5
    batch: int = 1
    lora: bool = False
    mesh: bool = False
    controlnet: bool = False
    batched_ids: bool = False


TWO_RANKS: dict[str, Case] = {
    "ulysses-even": Case(ulysses=2, height=4, width=4, text=4),
    "ulysses-uneven": Case(ulysses=2, height=3, width=3, text=5),
    "ulysses-uneven-heads": Case(config="patch2-odd-channels", ulysses=2, height=3, width=5, text=3),
    "ulysses-lora": Case(ulysses=2, height=4, width=3, text=7, lora=True),
    "ulysses-mesh": Case(ulysses=2, height=3, width=3, text=4, mesh=True),
    "ring-even": Case(ring=2, height=4, width=4, text=6),
    "ring-uneven": Case(ring=2, height=3, width=3, text=5, batch=2),
    "ring-lora": Case(ring=2, height=3, width=3, text=5, lora=True),
    "ring-controlnet-3d-ids": Case(config="schnell-like", ring=2, height=3, width=3, text=3, controlnet=True,
                                   batched_ids=True),
}
FOUR_RANKS: dict[str, Case] = {
    "ulysses4-even": Case(config="schnell-like", ulysses=4, height=4, width=4, text=8),
    "ulysses4-uneven-fewer-heads": Case(ulysses=4, height=3, width=3, text=5),
    "ulysses4-lora": Case(config="schnell-like", ulysses=4, height=3, width=5, text=6, lora=True),
    "ring4-even": Case(ring=4, height=4, width=4, text=4),
    "ring4-uneven": Case(ring=4, height=3, width=5, text=7),
    "ring4-lora": Case(ring=4, height=3, width=3, text=5, lora=True),
    "2d-even": Case(ulysses=2, ring=2, height=4, width=4, text=8),
    "2d-uneven": Case(config="patch2-odd-channels", ulysses=2, ring=2, height=3, width=3, text=6),
    "2d-lora": Case(ulysses=2, ring=2, height=3, width=5, text=5, lora=True),
    "2d-mesh": Case(ulysses=2, ring=2, height=3, width=3, text=5, mesh=True, batch=2),
}


CACHE_STEPS = 5
CACHE_CASES: dict[str, tuple[Case, str, str]] = {
    # name: (case, cache kind, whether the cache is enabled before or after context parallelism)
    "mag-cache-ring": (Case(ring=2, height=3, width=3, text=5), "mag", "before"),
    "pyramid-broadcast-ulysses": (Case(ulysses=2, height=3, width=3, text=5), "pab", "after"),
    "taylorseer-ulysses-lora": (Case(ulysses=2, height=4, width=3, text=5, lora=True), "taylorseer", "after"),
    "first-block-ulysses": (Case(ulysses=2, height=3, width=3, text=5), "fbc", "before"),
    "first-block-ring-uneven": (Case(ring=2, height=3, width=3, text=4), "fbc", "after"),
}


def cache_config(kind: str) -> Any:
    """A cache config that skips work on a 5-step schedule."""
    from diffcaps.cache import MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if kind == "fbc":  # decides from the data: on these cases it skips steps 2 and 4 (changes 0.65–0.7 vs > 0.75)
        return FirstBlockCacheConfig(threshold=0.72)
    if kind == "mag":
        return MagCacheConfig(threshold=1.0, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=CACHE_STEPS,
                              mag_ratios=(1.0,) * CACHE_STEPS)
    if kind == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1001))
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)


def cached_steps(model: FluxTransformer2DModel, case: Case, kind: str,
                 parallel: Callable[[], object] | None = None, order: str = "before") -> dict[str, Any]:
    """Outputs of a 5-step denoising loop with a cache, and how many block runs it skipped."""
    from diffcaps import cache

    inputs = case_inputs(case)
    if parallel is not None and order == "after":
        parallel()
    cache.enable(model, cache_config(kind))
    if parallel is not None and order == "before":
        parallel()
    outputs = []
    with torch.no_grad():
        for step in range(CACHE_STEPS):
            timestep = 900.0 - 200.0 * step
            inputs["timestep"] = torch.full((case.batch,), timestep / 1000)
            with cache.context(model, "cond", timestep=timestep):
                outputs.append(model(**inputs).sample)
    stats = cache.stats(model)
    cache.disable(model)
    return {"outputs": outputs, "computed": stats.computed(), "skipped": stats.skipped()}


def lora_file(model: nn.Module, seed: int = 7, rank: int = 4) -> dict[str, Tensor]:
    """A diffusers/PEFT-layout LoRA with seeded, non-zero weights on every targeted linear."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and name.endswith(LORA_TARGETS):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.2
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.2
    return tensors


def add_lora(model: FluxTransformer2DModel, seed: int = 7) -> None:
    """Load a seeded LoRA through ``diffcaps.lora`` (real peft layers)."""
    from diffcaps import lora

    lora.load_adapter(model, lora_file(model, seed), adapter_name="cp-test")


def build_model(case: Case) -> FluxTransformer2DModel:
    """The seeded model of ``case`` (with its LoRA when asked)."""
    model = seeded_model(CONFIGS[case.config])
    if case.lora:
        add_lora(model)
    return model.requires_grad_(False)


def case_inputs(case: Case) -> dict[str, Any]:
    """The forward arguments of ``case``."""
    config = CONFIGS[case.config]
    inputs = flux_inputs(config, batch=case.batch, height=case.height, width=case.width, text_tokens=case.text)
    if case.controlnet:
        generator = torch.Generator().manual_seed(3)
        shape = (case.batch, case.height * case.width, config.inner_dim)
        inputs["controlnet_block_samples"] = [torch.randn(shape, generator=generator) for _ in range(2)]
        inputs["controlnet_single_block_samples"] = [torch.randn(shape, generator=generator) for _ in range(3)]
    if case.batched_ids:
        inputs["img_ids"] = inputs["img_ids"][None]
        inputs["txt_ids"] = inputs["txt_ids"][None]
    return inputs


def reference(case: Case) -> Tensor:
    """The single-process output of ``case``."""
    with torch.no_grad():
        out: Tensor = build_model(case)(**case_inputs(case)).sample
    return out


def _mesh(case: Case) -> Any:
    if not case.mesh:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if case.ulysses > 1 and case.ring > 1:
        return init_device_mesh("cpu", (case.ring, case.ulysses), mesh_dim_names=("ring", "ulysses"))
    return init_device_mesh("cpu", (case.ulysses * case.ring,), mesh_dim_names=("cp",))


def _run_case(case: Case, models: dict[tuple[str, bool], FluxTransformer2DModel]) -> dict[str, Any]:
    model = models.get((case.config, case.lora))
    if model is None:
        model = models[(case.config, case.lora)] = build_model(case)
    inputs = case_inputs(case)
    with torch.no_grad():
        before = model(**inputs).sample
        parallel.enable(model, ContextParallelConfig(ulysses_degree=case.ulysses, ring_degree=case.ring,
                                                     mesh=_mesh(case), timeout=60))
        shard = parallel.assignment(model)
        output = model(**inputs).sample
        again = model(**inputs).sample  # a second call reuses the groups
        disable(model)
        after = model(**inputs).sample
    return {"output": output, "again": again, "restored": torch.equal(after, before),
            "position": None if shard is None else shard.position}


def _cache_checks(rank: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (case, kind, order) in CACHE_CASES.items():
        model = build_model(case)

        def split(model: FluxTransformer2DModel = model, case: Case = case) -> None:
            parallel.enable(model, ContextParallelConfig(ulysses_degree=case.ulysses, ring_degree=case.ring,
                                                         timeout=60))
        results[name] = cached_steps(model, case, kind, split, order)
        disable(model)
    return results


def _expect(kind: type[BaseException], call: Callable[[], object]) -> str:
    try:
        call()
    except kind as error:
        return f"ok: {error}"
    except BaseException as error:  # noqa: BLE001 - reported to the parent as a failed check
        return f"wrong error {type(error).__name__}: {error}"
    return "no error"


def _bad_input_checks(rank: int) -> dict[str, Any]:
    """Misuse on rank 0 alone: if any of it communicated, the calls after it would not line up."""
    checks: dict[str, Any] = {}
    case = Case(ulysses=2, height=3, width=3, text=5)
    model = build_model(case)
    inputs = case_inputs(case)
    if rank == 0:
        checks["degrees-mismatch"] = _expect(ParallelError, lambda: parallel.enable(
            model, ContextParallelConfig(ulysses_degree=4)))
        checks["degree-zero"] = _expect(ParallelError, lambda: parallel.enable(
            model, ContextParallelConfig(ring_degree=0)))
        checks["no-plan"] = _expect(CapabilityError, lambda: parallel.enable(
            seeded_tiny_dit(), ContextParallelConfig(ulysses_degree=2)))  # type: ignore[arg-type]
        checks["bad-mesh"] = _expect(ParallelError, lambda: parallel.enable(
            model, ContextParallelConfig(ulysses_degree=2, mesh="not a mesh")))
        checks["bad-timeout"] = _expect(ParallelError, lambda: parallel.enable(
            model, ContextParallelConfig(ulysses_degree=2, timeout=0)))
        checks["unchanged"] = parallel.active(model) is None and not model.__dict__.get("_diffcaps_hooks")
    parallel.enable(model, ContextParallelConfig(ulysses_degree=2, timeout=60))
    checks["enable-twice"] = _expect(ParallelError, lambda: parallel.enable(
        model, ContextParallelConfig(ulysses_degree=2)))
    if rank == 0:
        checks["grad-enabled"] = _expect(ParallelError, lambda: model(**{**inputs, "hidden_states":
                                                                       inputs["hidden_states"].requires_grad_()}))
        inputs["hidden_states"].requires_grad_(False)
        short = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :1],
                 "txt_ids": inputs["txt_ids"][:1]}
        checks["too-short"] = _expect(ParallelError, lambda: model(**short))
        mismatched = {**inputs, "img_ids": inputs["img_ids"][:-1]}
        checks["stream-mismatch"] = _expect(ParallelError, lambda: model(**mismatched))
    with torch.no_grad():
        checks["after-misuse"] = model(**inputs).sample
    disable(model)
    disable(model)  # nothing on: a no-op
    checks["disable-again"] = parallel.active(model)
    return checks


def _failure_checks(rank: int) -> dict[str, Any]:
    """Rank 1 raises inside the forward: rank 0 must name it; then the session refuses to run."""
    checks: dict[str, Any] = {}
    case = Case(ring=2, height=3, width=3, text=5)
    model = build_model(case)
    inputs = case_inputs(case)
    with torch.no_grad():
        before = model(**inputs).sample
    parallel.enable(model, ContextParallelConfig(ring_degree=2, timeout=60))
    handle = None
    if rank == 1:
        def boom(module: nn.Module, args: Any) -> None:
            raise ValueError("injected failure on rank 1")
        handle = model.single_transformer_blocks[0].register_forward_pre_hook(boom)
    try:
        with torch.no_grad():
            model(**inputs)
        checks["failure"] = "no error"
    except RankFailure as error:
        checks["failure"] = f"RankFailure rank={error.rank} failed={error.failed}: {error}"
    except ValueError as error:
        checks["failure"] = f"ValueError: {error} | notes={getattr(error, '__notes__', [])}"
    if handle is not None:
        handle.remove()
    checks["after-failure"] = _expect(ParallelError, lambda: model(**inputs))
    disable(model)
    with torch.no_grad():
        checks["restored-after-failure"] = torch.equal(model(**inputs).sample, before)
    return checks


def _stall_checks(rank: int) -> dict[str, Any]:
    """Rank 1 never calls the model: rank 0's collective gives up at the timeout instead of hanging."""
    checks: dict[str, Any] = {}
    case = Case(ulysses=2, height=3, width=3, text=5)
    model = build_model(case)
    parallel.enable(model, ContextParallelConfig(ulysses_degree=2, timeout=1.5))
    if rank == 0:
        start = time.monotonic()
        checks["stall"] = _expect(RankFailure, lambda: model(**case_inputs(case)))
        checks["stall-seconds"] = time.monotonic() - start
    dist.barrier()
    disable(model)
    return checks


def run_rank(rank: int, world: int, port: int, out_dir: str, suite: str) -> None:
    """Entry point of one spawned rank."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results: dict[str, Any] = {}
    models: dict[tuple[str, bool], FluxTransformer2DModel] = {}
    cases = TWO_RANKS if suite == "two" else FOUR_RANKS
    for name, case in cases.items():
        try:
            results[name] = _run_case(case, models)
        except Exception:  # reported to the parent, which fails that case's test
            results[name] = {"error": traceback.format_exc()}
    if suite == "two":
        for name, checks in (("misuse", _bad_input_checks), ("cache", _cache_checks),
                             ("failure", _failure_checks), ("stall", _stall_checks)):
            try:
                results[name] = checks(rank)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
