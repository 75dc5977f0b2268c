"""Context parallelism: gloo ranks spawned on 127.0.0.1 against the single-process model.

Spawning processes is the expensive part (each imports torch), so one group of 2 ranks and one
of 4 ranks run every case and check; the tests below read what each rank wrote.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps.errors import ParallelError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps import parallel
from diffcaps.parallel import ContextParallelConfig, disable
from tests._distributed import free_port
from tests.parallel._worker import CACHE_CASES, FOUR_RANKS, TWO_RANKS, Case, build_model, cached_steps, case_inputs, \
    reference, run_rank

TOLERANCE = 1e-5
SPAWN_DEADLINE = 150.0
# torch leaves it unannotated; the package attribute ``spawn`` is a function hiding the module
start_processes: Callable[..., Any] = importlib.import_module("torch.multiprocessing.spawn").start_processes


def _spawn(world: int, suite: str, out_dir: Path) -> list[dict[str, Any]]:
    context = start_processes(run_rank, args=(world, free_port(), str(out_dir), suite), nprocs=world,
                              start_method="spawn", join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {SPAWN_DEADLINE:.0f} s")
    results: list[dict[str, Any]] = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(2, "two", tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(4, "four", tmp_path_factory.mktemp("four_ranks"))


def _check_case(ranks: list[dict[str, Any]], name: str, case: Case) -> None:
    expected = reference(case)
    for rank, results in enumerate(ranks):
        result = results[name]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["output"].shape == expected.shape
        torch.testing.assert_close(result["output"], expected, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(result["again"], expected, rtol=0, atol=TOLERANCE)
        assert result["restored"], f"rank {rank}: disable did not restore the model bit for bit"
        assert result["position"] == rank


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_match_one_process(two_ranks: list[dict[str, Any]], name: str) -> None:
    _check_case(two_ranks, name, TWO_RANKS[name])


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_ranks_match_one_process(four_ranks: list[dict[str, Any]], name: str) -> None:
    _check_case(four_ranks, name, FOUR_RANKS[name])


def test_lora_changes_the_output() -> None:
    # the LoRA cases would prove nothing if the adapter did nothing
    case = TWO_RANKS["ring-lora"]
    plain = build_model(Case(ring=2, height=case.height, width=case.width, text=case.text))
    with torch.no_grad():
        base = plain(**case_inputs(case)).sample
    assert (reference(case) - base).abs().max() > 1e-2


def test_misuse_is_refused_before_any_communication(two_ranks: list[dict[str, Any]]) -> None:
    rank0 = two_ranks[0]["misuse"]
    assert "error" not in rank0, rank0.get("error")
    assert rank0["degrees-mismatch"].startswith("ok:") and "world size" in rank0["degrees-mismatch"]
    assert rank0["degree-zero"].startswith("ok:") and "ring_degree" in rank0["degree-zero"]
    assert rank0["no-plan"].startswith("ok:") and "context_parallel" in rank0["no-plan"]
    assert rank0["bad-mesh"].startswith("ok:") and "DeviceMesh" in rank0["bad-mesh"]
    assert rank0["bad-timeout"].startswith("ok:")
    assert rank0["unchanged"] is True
    assert rank0["grad-enabled"].startswith("ok:") and "no_grad" in rank0["grad-enabled"]
    assert rank0["too-short"].startswith("ok:") and "fewer than the 2 ranks" in rank0["too-short"]
    assert rank0["stream-mismatch"].startswith("ok:") and "img_ids" in rank0["stream-mismatch"]
    expected = reference(Case(ulysses=2, height=3, width=3, text=5))
    for results in two_ranks:
        checks = results["misuse"]
        assert "error" not in checks, checks.get("error")
        assert checks["enable-twice"].startswith("ok:") and "already enabled" in checks["enable-twice"]
        # rank 0's refused calls sent nothing: the next call on both ranks still lines up
        torch.testing.assert_close(checks["after-misuse"], expected, rtol=0, atol=TOLERANCE)
        assert checks["disable-again"] is None


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_caches_decide_alike_on_every_rank(two_ranks: list[dict[str, Any]], name: str) -> None:
    case, kind, _ = CACHE_CASES[name]
    expected = cached_steps(build_model(case), case, kind)
    assert expected["skipped"] > 0, "the schedule must skip work for this test to mean anything"
    for rank, results in enumerate(two_ranks):
        assert "error" not in results["cache"], results["cache"].get("error")
        got = results["cache"][name]
        assert (got["computed"], got["skipped"]) == (expected["computed"], expected["skipped"]), f"rank {rank}"
        for step, (out, ref) in enumerate(zip(got["outputs"], expected["outputs"], strict=True)):
            torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE, msg=f"rank {rank}, step {step}")


def test_a_failing_rank_is_named_by_the_others(two_ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (results["failure"] for results in two_ranks)
    assert "error" not in rank0 and "error" not in rank1, (rank0.get("error"), rank1.get("error"))
    assert rank0["failure"].startswith("RankFailure rank=0")
    assert "rank 1 failed: ValueError: injected failure on rank 1" in rank0["failure"]
    assert "timed out" not in rank0["failure"]  # it learnt of the failure, it did not wait the timeout out
    assert rank1["failure"].startswith("ValueError: injected failure on rank 1")
    assert "context-parallel rank 1" in rank1["failure"]
    for checks in (rank0, rank1):
        assert checks["after-failure"].startswith("ok:") and "disable" in checks["after-failure"]
        assert checks["restored-after-failure"] is True


def test_a_stalled_rank_times_out_instead_of_hanging(two_ranks: list[dict[str, Any]]) -> None:
    checks = two_ranks[0]["stall"]
    assert "error" not in checks, checks.get("error")
    assert checks["stall"].startswith("ok: rank 0:")
    message = checks["stall"]
    # Our 1.5 s deadline, or gloo's own group timeout when the machine is loaded: either way the
    # wait ends and the message says that no rank reported an error, so one is stalled.
    assert "timed out after 1.5 s" in message or "did not complete" in message, message
    assert "no other rank reported an error" in message, message


# --- in this process: no process group -----------------------------------------------------
def test_no_process_group_is_a_clear_error() -> None:
    model = build_model(Case())
    with pytest.raises(ParallelError, match="init_process_group"):
        parallel.enable(model, ContextParallelConfig(ulysses_degree=2))
    assert parallel.active(model) is None
    disable(model)  # nothing on: a no-op
    assert parallel.active(model) is None


def test_metadata_row() -> None:
    row = FluxTransformer2DModel.metadata()["context_parallel"]
    assert row.entries[:2] == ("ulysses", "ring")
    for entry in ("split hidden_states@1", "split encoder_hidden_states@1", "split img_ids@0", "split txt_ids@0",
                  "gather proj_out@1", "attention FluxAttention"):
        assert entry in row.entries
    assert row.docs.endswith("#context-parallelism")
