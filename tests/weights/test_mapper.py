"""The WeightMapper service on its own: transforms, rules and plans, and a model that is not Flux."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, final

import attrs
import pytest
import torch
from torch import Tensor, nn

from diffcaps import Capabilities, Model, ModelConfig, capability
from diffcaps.errors import CheckpointError
from diffcaps.io import read_header
from diffcaps.weights.spec import (
    SWAP_HALVES,
    BlockCount,
    Const,
    Derived,
    Dim,
    DimIs,
    Has,
    Inverted,
    Reorder,
    Rule,
    Split,
    TensorSpec,
    WeightMapper,
    WeightVariant,
)
from diffcaps.weights import load_single_file, save_single_file


def test_split_cuts_in_proportion_and_concatenates_back() -> None:
    fused = torch.arange(7 * 4 * 2, dtype=torch.float32).reshape(28, 2)
    split = Split(ratios=(1, 1, 1, 4))
    parts = split.forward([fused])
    assert [tuple(p.shape) for p in parts] == [(4, 2), (4, 2), (4, 2), (16, 2)]
    assert torch.equal(parts[3], fused[12:])
    assert split.forward_shapes([(28, 2)]) == ((4, 2), (4, 2), (4, 2), (16, 2))
    (back,) = split.reverse(parts)
    assert torch.equal(back, fused)
    assert split.reverse_shapes([p.shape for p in parts]) == ((28, 2),)


def test_split_refuses_shapes_that_do_not_fit() -> None:
    split = Split(ratios=(1, 1, 1))
    with pytest.raises(ValueError, match="size 10 along dim 0 does not split 1:1:1"):
        split.forward_shapes([(10, 4)])
    with pytest.raises(ValueError, match="not 1:1:1"):
        split.reverse_shapes([(3, 4), (3, 4), (6, 4)])
    with pytest.raises(ValueError, match="differ outside dim 0"):
        split.reverse_shapes([(4, 4), (4, 4), (4, 5)])
    with pytest.raises(ValueError, match="two or more positive parts"):
        Split(ratios=(3,))


def test_reorder_swaps_halves_and_inverts_any_order() -> None:
    x = torch.arange(6.0)
    (swapped,) = SWAP_HALVES.forward([x])
    assert swapped.tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    rotate = Reorder(order=(2, 0, 1))
    (moved,) = rotate.forward([x])
    assert moved.tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0]
    assert torch.equal(rotate.reverse([moved])[0], x)
    with pytest.raises(ValueError, match="does not cut in 2"):
        SWAP_HALVES.forward_shapes([(5,)])
    with pytest.raises(ValueError, match="permutation"):
        Reorder(order=(0, 0))


def test_inverted_runs_a_transform_the_other_way() -> None:
    fuse = Inverted(Split(ratios=(1, 2)))
    assert fuse.arity() == (2, 1)
    a, b = torch.ones(2, 3), torch.zeros(4, 3)
    (fused,) = fuse.forward([a, b])
    assert fused.shape == (6, 3)
    assert fuse.forward_shapes([(2, 3), (4, 3)]) == ((6, 3),)
    parts = fuse.reverse([fused])
    assert torch.equal(parts[0], a) and torch.equal(parts[1], b)


def test_rules_are_checked_when_declared() -> None:
    with pytest.raises(ValueError, match="takes 1 original and gives 3"):
        Rule("a.{n}.qkv", "b.{n}.q", Split(ratios=(1, 1, 1)))
    with pytest.raises(ValueError, match="same placeholders"):
        Rule("a.{n}.w", "b.{m}.w")
    with pytest.raises(ValueError, match="repeats a placeholder"):
        Rule("a.{n}.{n}", "b.{n}.{n}")


def test_overlapping_rules_are_a_table_error() -> None:
    mapper = WeightMapper(family="Toy", rules=(Rule("a.{p}", "x.{p}"), Rule("b.{p}", "x.{p}")), variants=())
    with pytest.raises(ValueError, match="the rule table overlaps"):
        mapper.plan(["a.w", "b.w"], "to_model")


def test_plans_report_unused_and_cut_short_groups() -> None:
    mapper = WeightMapper(
        family="Toy",
        rules=(Rule(("w_a.{n}", "w_b.{n}"), "w.{n}", Inverted(Split(ratios=(1, 1)))), Rule("{x}.bias", "{x}.b")),
        variants=(),
    )
    plan = mapper.plan(["w_a.0", "w_b.0", "w_a.1", "pre.norm.scale", "head.bias"], "to_model")
    steps = [(s.sources, s.targets) for s in plan.steps]
    assert steps == [(("w_a.0", "w_b.0"), ("w.0",)), (("head.bias",), ("head.b",))]
    assert plan.unused == ("pre.norm.scale", "w_a.1")
    assert plan.missing == ("w_b.1",)
    state = {"w_a.0": torch.ones(2), "w_b.0": torch.zeros(2), "head.bias": torch.full((1,), 3.0)}
    model_state = mapper.convert(state, "to_model")
    assert model_state["w.0"].tolist() == [1.0, 1.0, 0.0, 0.0]
    back = mapper.convert(model_state, "to_original")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="missing key"):
        mapper.convert({"w_a.0": torch.ones(2)}, "to_model")


# --- a model that is not Flux: the service needs nothing but the table it is given ----------


@attrs.frozen(kw_only=True)
class ToyConfig(ModelConfig):
    class_name: ClassVar[str] = "Toy"
    width: int = 4
    depth: int = 2
    gated: bool = True


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.mod = nn.Linear(width, 3 * width)


TOY_WEIGHTS = WeightMapper(
    family="Toy",
    prefixes=("net.",),
    rules=(
        Rule("layers.{i}.qk.{p}", ("blocks.{i}.q.{p}", "blocks.{i}.k.{p}"), Split(ratios=(1, 1))),
        Rule("layers.{i}.modulation.{p}", "blocks.{i}.mod.{p}", Reorder(order=(1, 2, 0))),
        Rule(("head_a", "head_b"), "head", Inverted(Split(ratios=(1, 3)))),
    ),
    variants=(
        WeightVariant(
            name="toy-gated",
            conditions=(Has("layers.0.qk.weight"), DimIs("head_a", 0, 1)),
            config={"width": Dim("layers.0.qk.weight", 1), "depth": BlockCount("layers.{n}"), "gated": Const(True)},
        ),
        WeightVariant(
            name="toy-wide",
            conditions=(Has("layers.0.qk.weight"), DimIs("head_a", 0, 2)),
            config={"width": Derived(lambda rows: rows // 2, (Dim("layers.0.qk.weight", 0),)),
                    "depth": BlockCount("layers.{n}"), "gated": Const(False)},
        ),
    ),
)


@final
@attrs.frozen(kw_only=True)
class ToyCapabilities(Capabilities):
    weight_mapping: WeightMapper = capability(TOY_WEIGHTS)


@final
class Toy(Model[ToyConfig, ToyCapabilities]):

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(ToyBlock(config.width) for _ in range(config.depth))
        self.head = nn.Parameter(torch.zeros(4 if config.gated else 8, config.width))

    def forward(self, x: Tensor) -> Tensor:
        return x


def test_a_non_flux_model_maps_through_its_own_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Toy(ToyConfig(width=6, depth=3))
    nn.init.normal_(model.head)
    path = save_single_file(model, tmp_path / "toy.safetensors", prefix="net.")
    header = read_header(path)
    assert set(header.tensors) == {
        *(f"net.layers.{i}.{name}.{p}" for i in range(3) for name in ("qk", "modulation") for p in ("weight", "bias")),
        "net.head_a", "net.head_b",
    }
    mod = model.state_dict()["blocks.1.mod.weight"]
    # forward puts the file's chunks in order (1, 2, 0): model = [f1, f2, f0], so the file is [m2, m0, m1]
    stored = torch.cat([mod[12:], mod[:6], mod[6:12]])
    assert torch.equal(header_tensor(path, "net.layers.1.modulation.weight"), stored)
    assert torch.equal(header_tensor(path, "net.head_a"), model.head.detach()[:1])

    loaded = load_single_file(Toy, path)
    assert loaded.config == ToyConfig(width=6, depth=3, gated=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_non_flux_variant_is_told_apart_by_shape(tmp_path: Path) -> None:
    model = Toy(ToyConfig(width=4, depth=1, gated=False))
    path = save_single_file(model, tmp_path / "wide.safetensors")
    found = TOY_WEIGHTS.identify(
        {k: TensorSpec(shape=i.shape, dtype=i.dtype) for k, i in read_header(path).tensors.items()}
    )
    assert (found.variant.name, found.layout, found.prefix) == ("toy-wide", "original", "")
    assert found.config == {"width": 4, "depth": 1, "gated": False}
    assert load_single_file(Toy, path).config == model.config
    with pytest.raises(CheckpointError, match="not a recognised Toy checkpoint"):
        TOY_WEIGHTS.identify({"x": TensorSpec(shape=(1,), dtype=torch.float32)})


def header_tensor(path: Path, key: str) -> Tensor:
    from diffcaps.io import MappedSafetensors

    with MappedSafetensors(path) as file:
        return file.view(key).clone()
