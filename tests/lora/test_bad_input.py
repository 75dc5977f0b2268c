"""Malformed LoRA files and arguments (issue 12, items 5–7): a named diffcaps error, the model bit-identical.

Every file here is written by hand (no converter of diffcaps is used to make it); each case
checks the error class, that the message names the file and the offending key, and that the
model — with and without an adapter already loaded — is exactly as it was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from diffcaps import lora
from diffcaps.errors import DiffcapsError, FormatError, LoRAError, ShapeError
from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, seeded_model
from tests.lora._check import fingerprint
from tests.lora._files import Seeded, bfl_modules, lokr_file

Q = "transformer.transformer_blocks.0.attn.to_q"
"""A diffusers-named 32 × 32 linear of the tiny model."""
PROJ = "lora_unet_double_blocks_1_img_attn_proj"
"""A kohya-named 32 × 32 linear of the tiny model."""
META = "lora_adapter_metadata"


def _diffusers(rank: int = 4, overrides: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    rand = Seeded(3)
    tensors = {f"{Q}.lora_A.weight": rand(rank, 32), f"{Q}.lora_B.weight": rand(32, rank)}
    tensors.update(overrides or {})
    return tensors


def _kohya(alpha: Tensor | None = None, overrides: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    rand = Seeded(4)
    tensors = {f"{PROJ}.lora_down.weight": rand(4, 32), f"{PROJ}.lora_up.weight": rand(32, 4),
               f"{PROJ}.alpha": torch.tensor(4.0) if alpha is None else alpha}
    tensors.update(overrides or {})
    return tensors


def _with_metadata(entry: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    return _diffusers(), {"format": "pt", META: entry}


def _nested(depth: int) -> str:
    return '{"transformer.alpha_pattern": ' + "[" * depth + "]" * depth + "}"


# case → (tensors, header metadata or None, error class, key the message names)
FILES: dict[str, tuple[dict[str, Tensor], dict[str, str] | None, type[DiffcapsError], str]] = {
    "rank-0-no-alpha": (_diffusers(rank=0), None, ShapeError, Q),
    "rank-0-with-alpha": (_kohya(overrides={f"{PROJ}.lora_down.weight": torch.zeros(0, 32),
                                    f"{PROJ}.lora_up.weight": torch.zeros(32, 0)}),
                          None, ShapeError, PROJ),
    "alpha-several-elements": (_kohya(alpha=torch.tensor([4.0, 5.0])), None, ShapeError, f"{PROJ}.alpha"),
    "alpha-nan": (_kohya(alpha=torch.tensor(math.nan)), None, FormatError, f"{PROJ}.alpha"),
    "alpha-inf": (_kohya(alpha=torch.tensor(math.inf)), None, FormatError, f"{PROJ}.alpha"),
    "alpha-bool": (_kohya(alpha=torch.tensor(True)), None, FormatError, f"{PROJ}.alpha"),
    "weights-nan": (_diffusers(overrides={f"{Q}.lora_B.weight": torch.full((32, 4), math.nan)}), None, FormatError,
                    f"{Q}.lora_B.weight"),
    "weights-inf": (_kohya(overrides={f"{PROJ}.lora_down.weight": torch.full((4, 32), -math.inf)}), None, FormatError,
                    f"{PROJ}.lora_down.weight"),
    "weights-fp8-nan": (_diffusers(overrides={f"{Q}.lora_B.weight": torch.full((32, 4), math.nan).to(
        torch.float8_e4m3fn)}), None, FormatError, f"{Q}.lora_B.weight"),
    "weights-int32": (_diffusers(overrides={f"{Q}.lora_A.weight": torch.ones(4, 32, dtype=torch.int32)}), None,
                      FormatError, f"{Q}.lora_A.weight"),
    "weights-bool": (_diffusers(overrides={f"{Q}.lora_B.weight": torch.ones(32, 4, dtype=torch.bool)}), None,
                     FormatError, f"{Q}.lora_B.weight"),
    "weights-0d": (_diffusers(overrides={f"{Q}.lora_A.weight": torch.tensor(1.0)}), None, ShapeError, Q),
    "rank-larger-than-layer": (_diffusers(rank=33), None, ShapeError, Q),
    "metadata-list": (*_with_metadata("[1, 2]"), FormatError, META),
    "metadata-string": (*_with_metadata('"transformer.lora_alpha"'), FormatError, META),
    "metadata-not-json": (*_with_metadata("{"), FormatError, META),
    "metadata-alpha-string": (*_with_metadata('{"transformer.lora_alpha": "x"}'), FormatError, "lora_alpha"),
    "metadata-alpha-1e400": (*_with_metadata('{"transformer.lora_alpha": 1e400}'), FormatError, "lora_alpha"),
    "metadata-alpha-bool": (*_with_metadata('{"transformer.lora_alpha": true}'), FormatError, "lora_alpha"),
    "metadata-alpha-nan": (*_with_metadata('{"transformer.lora_alpha": NaN}'), FormatError, "lora_alpha"),
    "metadata-bad-regex": (*_with_metadata('{"transformer.alpha_pattern": {"(": 4}}'), FormatError, "alpha_pattern"),
    "metadata-pattern-value": (*_with_metadata('{"transformer.alpha_pattern": {"to_q": "4"}}'), FormatError,
                               "alpha_pattern"),
    "metadata-pattern-list": (*_with_metadata('{"transformer.alpha_pattern": [["to_q", 4]]}'), FormatError,
                              "alpha_pattern"),
    "metadata-rslora-string": (*_with_metadata('{"transformer.use_rslora": "false"}'), FormatError, "use_rslora"),
    "metadata-deep-nesting": (*_with_metadata(_nested(100_000)), FormatError, META),
    "set-weight-0d": ({"double_blocks.0.img_attn.proj.set_weight": torch.tensor(1.0)}, None, ShapeError,
                      "double_blocks.0.img_attn.proj.set_weight"),
    "set-weight-3d": ({"double_blocks.0.img_attn.proj.set_weight": torch.zeros(32, 32, 1)}, None, ShapeError,
                      "double_blocks.0.img_attn.proj.set_weight"),
    "set-weight-rows": ({"double_blocks.0.img_attn.qkv.set_weight": torch.zeros(95, 32)}, None, ShapeError,
                        "double_blocks.0.img_attn.qkv.set_weight"),
}


@pytest.fixture(params=["fresh", "with-adapter"])
def model(request: pytest.FixtureRequest) -> FluxTransformer2DModel:
    model = seeded_model(TINY)
    if request.param == "with-adapter":
        rand = Seeded(9)
        lora.load_adapter(model, {"transformer.proj_out.lora_A.weight": rand(2, 32),
                                  "transformer.proj_out.lora_B.weight": rand(8, 2)}, adapter_name="prior")
    return model


@pytest.mark.parametrize("case", sorted(FILES))
def test_malformed_file_is_a_named_error_and_leaves_the_model(case: str, model: FluxTransformer2DModel,
                                                              tmp_path: Path) -> None:
    tensors, metadata, error, key = FILES[case]
    path = tmp_path / f"{case}.safetensors"
    save_safetensors(tensors, path, metadata=metadata)
    before = fingerprint(model)
    with pytest.raises(error) as raised:
        lora.load_adapter(model, path, adapter_name="new")
    assert type(raised.value) is error
    assert str(path) in str(raised.value) and key in str(raised.value)
    assert fingerprint(model) == before
    # the same tensors given as a state dict (no header: metadata cases load) fail the same way
    if metadata is None:
        with pytest.raises(error, match="<state dict>"):
            lora.load_adapter(model, tensors, adapter_name="new")
        assert fingerprint(model) == before


def test_an_integer_alpha_is_a_number_like_any_other() -> None:
    # an alpha stored as an integer scalar is a number; only matrices must be floating point
    as_float, as_int = seeded_model(TINY), seeded_model(TINY)
    lora.load_adapter(as_float, _kohya(alpha=torch.tensor(8.0)))
    lora.load_adapter(as_int, _kohya(alpha=torch.tensor(8, dtype=torch.int64)))
    layer: Any = as_int.get_submodule("transformer_blocks.1.attn.to_out.0")
    assert layer.scaling["default"] == 2.0
    assert fingerprint(as_float) == fingerprint(as_int)


def test_a_rank_up_to_the_larger_side_of_the_layer_loads() -> None:
    # trainers give a narrow layer (Flux's img_in: 64 inputs) the rank of the rest: rank 16 on x_embedder (8 → 32)
    model = seeded_model(TINY)
    rand = Seeded(5)
    report = lora.load_adapter(model, {"transformer.x_embedder.lora_A.weight": rand(16, 8),
                                       "transformer.x_embedder.lora_B.weight": rand(32, 16)})
    assert report.targets == ("x_embedder",)


def test_state_dict_values_must_be_tensors() -> None:
    model = seeded_model(TINY)
    before = fingerprint(model)
    bad: Any = {f"{Q}.lora_A.weight": [[0.0] * 32] * 4, f"{Q}.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(FormatError, match=rf"<state dict>: {Q}.lora_A.weight .*list"):
        lora.load_adapter(model, bad)
    with pytest.raises(FormatError, match="<state dict>: .*keys are strings"):
        lora.load_adapter(model, {5: torch.zeros(2)})  # type: ignore[dict-item]
    assert fingerprint(model) == before


ADAPTER_NAMES: list[object] = ["a.b", "", 5, None, ["a"]]


@pytest.mark.parametrize("name", ADAPTER_NAMES, ids=repr)
def test_adapter_name_must_be_a_plain_non_empty_string(name: object, model: FluxTransformer2DModel) -> None:
    before = fingerprint(model)
    with pytest.raises(LoRAError, match=r"adapter_name must (be a non-empty string|not contain '\.')"):
        lora.load_adapter(model, _diffusers(), adapter_name=name)  # type: ignore[arg-type]
    assert fingerprint(model) == before


def test_load_flags_are_booleans() -> None:
    model = seeded_model(TINY)
    before = fingerprint(model)
    flags: list[dict[str, Any]] = [{"strict": "no"}, {"hotswap": 1}]
    for flag in flags:
        with pytest.raises(LoRAError, match="must be True or False"):
            lora.load_adapter(model, _diffusers(), **flag)
    assert fingerprint(model) == before


def _two_adapters() -> FluxTransformer2DModel:
    model = seeded_model(TINY)
    lora.load_adapter(model, _diffusers(), adapter_name="a")
    lora.load_adapter(model, _kohya(), adapter_name="b")
    lora.set_adapters(model, ["a", "b"], [0.5, 0.25])
    return model


_set_adapters: Any = lora.set_adapters
"""For calls the type checkers reject (as they should): these check the run-time refusal."""

SET_ADAPTERS: dict[str, tuple[Callable[[FluxTransformer2DModel], None], str]] = {
    "duplicate-same-weight": (lambda m: lora.set_adapters(m, ["a", "a"], [1, 1]), "more than once"),
    "duplicate-other-weight": (lambda m: lora.set_adapters(m, ["a", "a"], [1, 0]), "more than once"),
    "duplicate-no-weights": (lambda m: lora.set_adapters(m, ["b", "a", "b"]), "more than once"),
    "nan": (lambda m: lora.set_adapters(m, ["a"], [math.nan]), "finite number"),
    "inf": (lambda m: lora.set_adapters(m, "a", math.inf), "finite number"),
    "-inf-in-mapping": (lambda m: lora.set_adapters(m, ["a"], [{"transformer_blocks.0": -math.inf}]),
                        "finite number"),
    "string-weight": (lambda m: _set_adapters(m, ["a"], ["0.5"]), "number"),
    "string-weights": (lambda m: _set_adapters(m, ["a"], "0.5"), "number"),
    "prefix-not-a-string": (lambda m: _set_adapters(m, ["a"], [{5: 1.0}]), "prefix"),
    "name-not-a-string": (lambda m: _set_adapters(m, [5], [1.0]), "adapter name"),
    "names-none": (lambda m: _set_adapters(m, None), "adapter name"),
    "fuse-scale-nan": (lambda m: lora.fuse(m, scale=math.nan), "finite number"),
    "fuse-duplicates": (lambda m: lora.fuse(m, ["a", "a"]), "more than once"),
    "delete-duplicates": (lambda m: lora.delete_adapters(m, ["a", "a"]), "more than once"),
}


@pytest.mark.parametrize("case", sorted(SET_ADAPTERS))
def test_adapter_weights_and_names_are_checked_before_anything_changes(case: str) -> None:
    model = _two_adapters()
    before = fingerprint(model)
    call, text = SET_ADAPTERS[case]
    with pytest.raises(LoRAError, match=text):
        call(model)
    assert fingerprint(model) == before
    assert lora.active_adapters(model) == ("a", "b")


def test_hotswap_max_rank_is_a_positive_integer() -> None:
    model = seeded_model(TINY)
    before = fingerprint(model)
    for rank in (6.5, True, 0, "8"):
        with pytest.raises(LoRAError, match="max_rank must be an integer >= 1"):
            lora.enable_hotswap(model, max_rank=rank)  # type: ignore[arg-type]
    assert fingerprint(model) == before


def test_the_metadata_that_diffusers_writes_still_loads(tmp_path: Path) -> None:
    # the checks refuse malformed entries, not the real thing: a full peft config with patterns and rslora
    config = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": True,
              "transformer.alpha_pattern": {"transformer_blocks\\.0\\.attn\\.to_q": 2.0},
              "transformer.rank_pattern": {}, "transformer.target_modules": ["to_q"], "transformer.use_dora": False}
    path = tmp_path / "a.safetensors"
    save_safetensors(_diffusers(), path, metadata={META: json.dumps(config)})
    model = seeded_model(TINY)
    lora.load_adapter(model, path)
    layer: Any = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert layer.scaling["default"] == pytest.approx(2.0 / 2.0)  # alpha 2 from the pattern, / sqrt(4)


@pytest.mark.parametrize("layout", ["lora", "lokr-one-factor"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_weights_load_like_their_wider_values(layout: str, dtype: torch.dtype) -> None:
    # torch neither checks fp8 for finiteness nor mixes it with other dtypes (a LoKr's factors are
    # multiplied): fp8 tensors load as their exact float16 values, beside tensors of other dtypes
    if layout == "lora":
        tensors = _diffusers()
        narrowed = list(tensors)
    else:
        model = seeded_model(TINY)
        tensors = lokr_file(model, seed=5, key=lambda b: "lora_unet_" + b.replace(".", "_"),
                            modules={"single_blocks.1.linear1": bfl_modules(2, 2)["single_blocks.1.linear1"]},
                            w1_rows={}, decompose=True).tensors  # 2 rows of w1 cut through q, k, v
        narrowed = ["lora_unet_single_blocks_1_linear1.lokr_w1"]
    narrow = {k: v.to(dtype) if k in narrowed else v for k, v in tensors.items()}
    as_fp8, as_wide = seeded_model(TINY), seeded_model(TINY)
    lora.load_adapter(as_fp8, narrow)
    lora.load_adapter(as_wide, {k: v.to(torch.float16) if k in narrowed else v for k, v in narrow.items()})
    assert fingerprint(as_fp8) == fingerprint(as_wide)
