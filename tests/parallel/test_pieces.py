"""The parts of context parallelism that need no second process: shard sizes, the layout, the
online-softmax merge, the plan's splits inside a model, the order hooks nest in, and enabling
on a one-rank gloo group (hooks, restore, misuse)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from diffcaps.errors import ParallelError
from diffcaps.hooks import SHARDING, Forward, Hook, add_hook, hook_names, remove_hook
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps import parallel
from diffcaps.parallel import ContextParallelConfig, ShardAssignment, disable, shard_sizes
from diffcaps.parallel.spec import ContextParallelPlan, GatherOutput, SplitAt, SplitInput
from diffcaps.parallel._kernels import attention_with_lse, merge_partials
from diffcaps.parallel._layout import Layout
from diffcaps.parallel._service import module_paths
from tests.parallel._worker import Case, add_lora, build_model, case_inputs


@given(st.integers(0, 500), st.integers(1, 9))
def test_shard_sizes_cover_the_sequence_like_tensor_split(length: int, ranks: int) -> None:
    sizes = shard_sizes(length, ranks)
    expected = [len(part) for part in torch.arange(length).tensor_split(ranks)]
    assert list(sizes) == expected and sum(sizes) == length


def test_layout_finds_every_rank_length_of_a_joint_sequence() -> None:
    # image 9 and text 5 tokens on 2 ranks: shards (5, 4) and (3, 2); the joint sequence is (8, 6)
    for position, local in ((0, 8), (1, 6)):
        layout = Layout(position, 2, [9, 5])
        assert not layout.ambiguous
        assert layout.lengths(local) == (8, 6)
        assert layout.lengths((5, 4)[position]) == (5, 4)
    with pytest.raises(LookupError):
        Layout(0, 2, [9, 5]).lengths(7)


def test_layout_asks_for_an_exchange_when_one_length_fits_two_sequences() -> None:
    # image (5, 4) and text (4, 4): rank 1's 4 tokens may be either, so every rank exchanges
    for position in (0, 1):
        layout = Layout(position, 2, [9, 8])
        assert layout.ambiguous and layout.lengths(4) is None
    assert Layout(0, 2, []).lengths(3) is None


def test_merged_partial_attention_equals_attention_over_all_keys() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=generator) for _ in range(3))
    total = total_lse = None
    for keys, values in zip(k.tensor_split([2, 3], dim=2), v.tensor_split([2, 3], dim=2), strict=True):
        out, lse = attention_with_lse(q, keys, values)
        total, total_lse = merge_partials(total, total_lse, out, lse)
    assert total is not None and total_lse is not None
    torch.testing.assert_close(total, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)
    torch.testing.assert_close(total_lse, torch.logsumexp(q @ k.transpose(-1, -2) / 4, dim=-1), rtol=0, atol=1e-5)


def test_attention_with_lse_on_empty_pieces() -> None:
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    out, lse = attention_with_lse(q, k[:, :, :0], k[:, :, :0])
    assert torch.equal(out, torch.zeros(1, 2, 3, 4)) and bool(torch.isneginf(lse).all())
    total, _ = merge_partials(*attention_with_lse(q, k, k), out, lse)
    torch.testing.assert_close(total, F.scaled_dot_product_attention(q, k, k), rtol=0, atol=1e-6)
    empty, empty_lse = attention_with_lse(q[:, :0], k[:, :0], k[:, :0])
    assert empty.shape == (1, 0, 3, 4) and empty_lse.shape == (1, 0, 3)


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="dim must be in"):
        SplitInput(ndim=2, dim=2)
    with pytest.raises(ValueError, match="at least one"):
        ContextParallelPlan(inputs={}, outputs={"x": GatherOutput(ndim=3, dim=1)},
                            attention=FluxTransformer2DModel.declared_capabilities().context_parallel.attention)
    ids = SplitInput(ndim=2, dim=0)
    assert ids.axis("img_ids", torch.zeros(5, 3)) == 0 and ids.axis("img_ids", torch.zeros(1, 5, 3)) == 1
    with pytest.raises(ValueError, match="at least 2"):
        ids.axis("img_ids", torch.zeros(5))


def test_splits_inside_a_model() -> None:
    attention = FluxTransformer2DModel.declared_capabilities().context_parallel.attention
    tokens = SplitInput(ndim=3, dim=1, stream="video")
    plan = ContextParallelPlan(inside={"blocks.0": SplitAt(inputs={"hidden_states": tokens})},
                               outputs={"norm_out": GatherOutput(ndim=3, dim=1)}, attention=attention)
    assert plan.inputs == {} and plan.entries()[2:4] == ("split blocks.0:hidden_states@1", "gather norm_out@1")
    with pytest.raises(ValueError, match="at least one input or the output"):
        SplitAt()
    with pytest.raises(ValueError, match="dotted submodule paths"):
        ContextParallelPlan(inside={"blocks..0": SplitAt(output=tokens)}, outputs={"x": GatherOutput(ndim=3, dim=1)},
                            attention=attention)
    names = ["rope", "blocks", "blocks.0", "blocks.0.attn1", "blocks.1", "blocks.10", "norm_out"]
    assert module_paths("blocks.*", names) == ["blocks.0", "blocks.1", "blocks.10"]
    assert module_paths("blocks.1", names) == ["blocks.1"] and module_paths("*.*.attn1", names) == ["blocks.0.attn1"]
    assert module_paths("head", names) == []
    per_token = SplitInput(ndim=4, dim=1, optional=True)
    assert per_token.axis("temb", torch.zeros(2, 7, 6, 3)) == 1 and per_token.axis("temb", torch.zeros(2, 6, 3)) is None
    with pytest.raises(ValueError, match="at least 4"):
        SplitInput(ndim=4, dim=1).axis("temb", torch.zeros(2, 6, 3))


class _Trace(Hook):
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def new_forward(self, module: torch.nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(self.name)
        return forward(*args, **kwargs)


class _Sharding(Hook):
    order = SHARDING

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def new_forward(self, module: torch.nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("sharding")
        return forward(*args, **kwargs)


def test_sharding_hooks_wrap_feature_hooks_whichever_came_first() -> None:
    for sharding_first in (True, False):
        layer = torch.nn.Linear(2, 2)
        calls: list[str] = []
        hooks: list[tuple[str, Hook]] = [("a", _Trace("a", calls)), ("b", _Trace("b", calls))]
        hooks.insert(0 if sharding_first else 1, ("split", _Sharding(calls)))
        for name, hook in hooks:
            add_hook(layer, name, hook)
        assert hook_names(layer) == ("a", "b", "split")  # innermost first: by order, then by when added
        layer(torch.zeros(1, 2))
        assert calls == ["sharding", "b", "a"]
        for name, _ in hooks:
            remove_hook(layer, name)
        assert "forward" not in layer.__dict__


# --- a one-rank process group in this process (the one_rank fixture of tests/conftest.py) ------
@pytest.mark.usefixtures("one_rank")
def test_enable_and_disable_on_one_rank_restore_the_model_exactly() -> None:
    case = Case()
    model = build_model(case)
    inputs = case_inputs(case)
    attention = model.transformer_blocks[0].attn
    with torch.no_grad():
        before = model(**inputs).sample
        parallel.enable(model, ContextParallelConfig(timeout=timedelta(seconds=9)))
        assert parallel.active(model) == ContextParallelConfig(ulysses_degree=1, ring_degree=1,
                                                               timeout=timedelta(seconds=9))
        assert parallel.assignment(model) == ShardAssignment(rank=0, position=0, ranks=1)
        assert "kernel" in attention.__dict__ and hook_names(model) == ("diffcaps.parallel.split",)
        assert hook_names(model.proj_out) == ("diffcaps.parallel.gather",)
        assert torch.equal(model(**inputs).sample, before)
        with pytest.raises(ParallelError, match="outside the model's forward"):
            model.transformer_blocks[0](torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), torch.zeros(1, 32))
        disable(model)
    assert parallel.active(model) is None and parallel.assignment(model) is None
    assert "kernel" not in attention.__dict__ and "forward" not in model.__dict__
    assert hook_names(model) == () and hook_names(model.proj_out) == ()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, before)


@pytest.mark.usefixtures("one_rank")
def test_a_module_replaced_after_enabling_is_refused() -> None:
    case = Case()
    model = build_model(case)
    parallel.enable(model)
    add_lora(model)  # peft wraps proj_out in a new module: the gather hook is no longer on the path
    with torch.no_grad(), pytest.raises(ParallelError, match="'proj_out' was replaced"):
        model(**case_inputs(case))
    disable(model)


@pytest.mark.usefixtures("one_rank")
def test_a_kernel_already_replaced_is_refused() -> None:
    model = build_model(Case())
    attention = model.single_transformer_blocks[1].attn
    setattr(attention, "kernel", lambda q, k, v: q)  # an instance attribute, as a feature would set
    with pytest.raises(ParallelError, match="already replaced"):
        parallel.enable(model)
    assert parallel.active(model) is None and hook_names(model) == ()
    assert "kernel" not in model.transformer_blocks[0].attn.__dict__
