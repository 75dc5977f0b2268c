"""Wan under context parallelism: gloo ranks spawned on 127.0.0.1 against the single-process model.

Wan's plan splits inside the model (after the patch embedding, at ``rope``'s output, per-token
timesteps at every block) and gathers at ``norm_out``. One group of 2 ranks and one of 4 run
every case; the tests read what each rank wrote. First Block Cache is enabled before and after
context parallelism and must take the single process's decisions and outputs.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import torch.distributed as dist

from diffcaps import cache, parallel
from diffcaps.cache import FirstBlockCacheConfig
from diffcaps.errors import ParallelError
from diffcaps.hooks import hook_names
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from diffcaps.parallel import ContextParallelConfig
from diffcaps.parallel._api import _inside  # the pattern check, without a model that declares a bad plan
from diffcaps.parallel.spec import ContextParallelPlan, SplitAt, SplitInput
from tests._distributed import free_port
from tests.wan_fixtures import CONFIGS, seeded_model, wan_inputs

TOLERANCE = 1e-5
SPAWN_DEADLINE = 150.0
CACHE_STEPS = 6
FBC_THRESHOLD = 0.62  # on the cache cases: changes near 0.57 and 0.67 fall on either side, so 4 steps run, 2 skip
start_processes: Callable[..., Any] = importlib.import_module("torch.multiprocessing.spawn").start_processes


@attrs.frozen(kw_only=True)
class Case:
    """One context-parallel run of a seeded Wan model (``tokens`` = frames × height/2 × width/2)."""

    config: str = "t2v"
    ulysses: int = 1
    ring: int = 1
    frames: int = 3
    height: int = 4
    width: int = 6
    batch: int = 1
    per_token: bool = False

    @property
    def tokens(self) -> int:
        p_t, p_h, p_w = CONFIGS[self.config].patch_size
        return (self.frames // p_t) * (self.height // p_h) * (self.width // p_w)


TWO_RANKS: dict[str, Case] = {
    "ulysses-even": Case(ulysses=2),  # 18 tokens
    "ulysses-uneven": Case(ulysses=2, frames=3, height=2, width=6, batch=2),  # 9 tokens
    "ring-even": Case(ring=2, frames=2, height=4, width=4),  # 8 tokens
    "ring-uneven-i2v": Case(config="i2v", ring=2, frames=1, height=6, width=6),  # 9 tokens
    "ulysses-uneven-heads-per-token": Case(config="ti2v", ulysses=2, frames=1, height=6, width=6, per_token=True),
    "ring-per-token": Case(config="ti2v", ring=2, frames=1, height=4, width=6, per_token=True, batch=2),
}
FOUR_RANKS: dict[str, Case] = {
    "ulysses4-even": Case(ulysses=4, frames=2, height=4, width=4),  # 8 tokens, 2 heads: two ranks hold none
    "ulysses4-uneven-i2v": Case(config="i2v", ulysses=4, frames=3, height=2, width=6),  # 9 tokens
    "ring4-even": Case(ring=4),  # 18 tokens: 5, 5, 4, 4
    "ring4-uneven": Case(ring=4, frames=1, height=6, width=6, batch=2),
    "2d-even": Case(ulysses=2, ring=2, frames=2, height=4, width=4),
    "2d-uneven-per-token": Case(config="ti2v", ulysses=2, ring=2, frames=1, height=6, width=6, per_token=True),
    "2d-uneven-i2v": Case(config="i2v", ulysses=2, ring=2, frames=1, height=2, width=10),  # 5 tokens
}
CACHE_CASES: dict[str, tuple[Case, str]] = {
    # name: (case, whether First Block Cache is enabled before or after context parallelism)
    "fbc-before-ulysses": (Case(ulysses=2, height=2, width=6), "before"),
    "fbc-after-ulysses": (Case(ulysses=2, height=2, width=6), "after"),
    "fbc-before-ring-uneven": (Case(ring=2, height=2, width=6), "before"),
    "fbc-after-ring-uneven": (Case(ring=2, height=2, width=6), "after"),
}


def build_model(case: Case) -> WanTransformer3DModel:
    """The seeded model of ``case``."""
    return seeded_model(CONFIGS[case.config]).requires_grad_(False)


def case_inputs(case: Case) -> dict[str, torch.Tensor]:
    """The forward arguments of ``case``."""
    config: WanConfig = CONFIGS[case.config]
    return wan_inputs(config, batch=case.batch, frames=case.frames, height=case.height, width=case.width,
                      per_token=case.per_token)


def reference(case: Case) -> torch.Tensor:
    """The single-process output of ``case``."""
    with torch.no_grad():
        out: torch.Tensor = build_model(case)(**case_inputs(case)).sample
    return out


def cached_steps(model: WanTransformer3DModel, case: Case, split: Callable[[], object] | None = None,
                 order: str = "before") -> dict[str, Any]:
    """Outputs of a denoising loop with First Block Cache, the steps it computed and skipped, and the
    hooks on the first block, innermost first."""
    inputs = case_inputs(case)
    if split is not None and order == "after":
        split()
    cache.enable(model, FirstBlockCacheConfig(threshold=FBC_THRESHOLD))
    if split is not None and order == "before":
        split()
    outputs = []
    x = inputs["hidden_states"]
    with torch.no_grad():
        for step in range(CACHE_STEPS):
            timestep = 1000.0 - 1000.0 / CACHE_STEPS * step
            with cache.context(model, "cond", timestep=timestep):
                out = model(**dict(inputs, hidden_states=x, timestep=torch.full((case.batch,), timestep))).sample
            outputs.append(out)
            x = x - out / CACHE_STEPS
    stats = cache.stats(model)
    hooks = hook_names(model.blocks[0])
    cache.disable(model)
    return {"outputs": outputs, "computed": stats.computed(), "skipped": stats.skipped(), "hooks": hooks}


def _enable(model: WanTransformer3DModel, case: Case) -> None:
    parallel.enable(model, ContextParallelConfig(ulysses_degree=case.ulysses, ring_degree=case.ring, timeout=60))


def _run_case(case: Case) -> dict[str, Any]:
    model = build_model(case)
    inputs = case_inputs(case)
    with torch.no_grad():
        before = model(**inputs).sample
        _enable(model, case)
        hooks = {name: hook_names(model.get_submodule(name)) for name in ("rope", "blocks.0", "blocks.1", "norm_out")}
        output = model(**inputs).sample
        again = model(**inputs).sample
        parallel.disable(model)
        after = model(**inputs).sample
    return {"output": output, "again": again, "restored": torch.equal(after, before), "hooks": hooks}


def _cache_case(case: Case, order: str) -> dict[str, Any]:
    model = build_model(case)
    result = cached_steps(model, case, lambda: _enable(model, case), order)
    parallel.disable(model)
    return result


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry point of one spawned rank: every case of its group, each result or its traceback."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results: dict[str, Any] = {}
    for name, case in (TWO_RANKS if world == 2 else FOUR_RANKS).items():
        try:
            results[name] = _run_case(case)
        except Exception:  # reported to the parent, which fails that case's test
            results[name] = {"error": traceback.format_exc()}
    if world == 2:
        for name, (case, order) in CACHE_CASES.items():
            try:
                results[name] = _cache_case(case, order)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(world: int, out_dir: Path) -> list[dict[str, Any]]:
    context = start_processes(run_rank, args=(world, free_port(), str(out_dir)), nprocs=world,
                              start_method="spawn", join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {SPAWN_DEADLINE:.0f} s")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(2, tmp_path_factory.mktemp("wan_two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(4, tmp_path_factory.mktemp("wan_four_ranks"))


def _check_case(ranks: list[dict[str, Any]], name: str, case: Case) -> None:
    assert case.tokens >= case.ulysses * case.ring
    expected = reference(case)
    for rank, results in enumerate(ranks):
        result = results[name]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["output"].shape == expected.shape
        torch.testing.assert_close(result["output"], expected, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(result["again"], expected, rtol=0, atol=TOLERANCE)
        assert result["restored"], f"rank {rank}: disable did not restore the model bit for bit"
        assert result["hooks"] == {
            "rope": ("diffcaps.parallel.split@rope",),
            "blocks.0": ("diffcaps.parallel.split@blocks.0", "diffcaps.parallel.split@blocks.*"),
            "blocks.1": ("diffcaps.parallel.split@blocks.*",),
            "norm_out": ("diffcaps.parallel.gather",),
        }


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_match_one_process(two_ranks: list[dict[str, Any]], name: str) -> None:
    _check_case(two_ranks, name, TWO_RANKS[name])


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_ranks_match_one_process(four_ranks: list[dict[str, Any]], name: str) -> None:
    _check_case(four_ranks, name, FOUR_RANKS[name])


def test_the_cases_cover_even_and_uneven_token_counts() -> None:
    # the claim of the parametrised tests above: both kinds of length on every grid
    for cases in (TWO_RANKS, FOUR_RANKS):
        remainders = {case.tokens % (case.ulysses * case.ring) == 0 for case in cases.values()}
        assert remainders == {True, False}


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_first_block_cache_before_or_after_decides_as_one_process(two_ranks: list[dict[str, Any]],
                                                                   name: str) -> None:
    case = CACHE_CASES[name][0]
    expected = cached_steps(build_model(case), case)
    assert expected["skipped"] > 0 and expected["computed"] > 2, "the threshold must both skip and compute"
    for rank, results in enumerate(two_ranks):
        got = results[name]
        assert "error" not in got, f"rank {rank}:\n{got.get('error')}"
        assert (got["computed"], got["skipped"]) == (expected["computed"], expected["skipped"]), f"rank {rank}"
        for step, (out, ref) in enumerate(zip(got["outputs"], expected["outputs"], strict=True)):
            torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE, msg=f"rank {rank}, step {step}")
        # whichever was enabled first, the split wraps the cache's hook on the first block
        assert got["hooks"] == ("diffcaps.cache.first_block_cache", "diffcaps.parallel.split@blocks.0",
                                "diffcaps.parallel.split@blocks.*")


def test_metadata_row() -> None:
    row = WanTransformer3DModel.metadata()["context_parallel"]
    assert row.entries == ("ulysses", "ring", "split rope output@0", "split blocks.0:hidden_states@1",
                           "split blocks.*:temb@1", "gather norm_out@1", "attention WanSelfAttention")


# --- in this process: a one-rank gloo group (the one_rank fixture of tests/conftest.py) -------
@pytest.mark.usefixtures("one_rank")
def test_a_split_submodule_called_alone_is_refused_and_disable_restores() -> None:
    case = Case(config="ti2v", per_token=True)
    model = build_model(case)
    inputs = case_inputs(case)
    with torch.no_grad():
        before = model(**inputs).sample
        parallel.enable(model)
        assert torch.equal(model(**inputs).sample, before)
        with pytest.raises(ParallelError, match="rope ran outside the model's forward"):
            model.rope(inputs["hidden_states"])
        with pytest.raises(ParallelError, match="blocks.1 ran outside the model's forward"):
            model.blocks[1](torch.zeros(1, 4, 24), torch.zeros(1, 3, 24), torch.zeros(1, 4, 6, 24),
                            (torch.zeros(4, 8), torch.zeros(4, 8)))
        parallel.disable(model)
        assert all(hook_names(module) == () for module in model.modules())
        assert torch.equal(model(**inputs).sample, before)


def test_a_pattern_matching_no_submodule_is_refused() -> None:
    model = build_model(Case())
    declared = WanTransformer3DModel.declared_capabilities().context_parallel
    plan = ContextParallelPlan(inside={"blocks.*.ffn.9": SplitAt(output=SplitInput(ndim=3, dim=1))},
                               outputs=declared.outputs, attention=declared.attention)
    with pytest.raises(ParallelError, match="'blocks.\\*.ffn.9', which matches no submodule"):
        _inside(model, plan)
    assert [path for path, *_ in _inside(model, declared)] == ["rope", "blocks.0", "blocks.0", "blocks.1"]
