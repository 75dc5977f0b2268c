"""Bad input is a clear error and leaves the model bit-identical, for every kind of failure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps import lora
from diffcaps.errors import CheckpointError, FormatError, LoRAError, ShapeError
from diffcaps.lora import _load
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, seeded_model
from tests.lora._check import fingerprint
from tests.lora._files import LoraFile, bfl_control_file, bfl_modules, diffusers_style, kohya_style, lokr_file


def _kohya(model: FluxTransformer2DModel, seed: int = 1) -> LoraFile:
    return kohya_style(model, seed=seed, key=lambda b: "lora_unet_" + b.replace(".", "_"))


def _kohya_file(model: FluxTransformer2DModel, tmp: Path) -> Path:
    return _kohya(model, 6).save(tmp / "x.safetensors")


def _unrecognised(model: FluxTransformer2DModel, tmp: Path) -> Path:
    return LoraFile(tensors={"encoder.layer.0.weight": torch.zeros(2, 2)}).save(tmp / "x.safetensors")


def _unmatched(model: FluxTransformer2DModel, tmp: Path) -> Path:
    file = diffusers_style(model, seed=2, key=lambda p: f"transformer.{p}", paths=["proj_out"])
    file.tensors["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    file.tensors["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    return file.save(tmp / "x.safetensors")


def _rank_mismatch(model: FluxTransformer2DModel, tmp: Path) -> Path:
    file = _kohya(model)
    file.tensors["lora_unet_double_blocks_1_img_attn_proj.lora_up.weight"] = torch.zeros(32, 9)
    return file.save(tmp / "x.safetensors")


def _width_mismatch(model: FluxTransformer2DModel, tmp: Path) -> Path:
    file = diffusers_style(model, seed=3, key=lambda p: f"transformer.{p}")
    file.tensors["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"] = torch.zeros(4, 48)
    return file.save(tmp / "x.safetensors")


def _fused_mismatch(model: FluxTransformer2DModel, tmp: Path) -> Path:
    file = _kohya(model)
    down = file.tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    file.tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.zeros(200, down.shape[0])
    return file.save(tmp / "x.safetensors")


def _truncated(model: FluxTransformer2DModel, tmp: Path) -> Path:
    path = _kohya(model).save(tmp / "x.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _control(model: FluxTransformer2DModel, tmp: Path) -> Path:
    return bfl_control_file(model, seed=4, in_channels=2 * TINY.in_channels).save(tmp / "x.safetensors")


def _lokr(model: FluxTransformer2DModel, tmp: Path) -> Path:
    modules = {k: v for k, v in bfl_modules(2, 2).items() if k.startswith("double_blocks.0")}
    return lokr_file(model, seed=5, key=lambda b: "lora_unet_" + b.replace(".", "_"), modules=modules,
                     w1_rows={}, decompose=True).save(tmp / "x.safetensors")


class _FailOn:
    """Raise on the ``n``-th call of a wrapped function."""

    def __init__(self, wrapped: Callable[..., Any], n: int) -> None:
        self.wrapped, self.n, self.calls = wrapped, n, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected failure")
        return self.wrapped(*args, **kwargs)


def _fail_in_peft_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora.layer import LoraLayer

    # the 7th module peft wraps raises: six are already injected
    monkeypatch.setattr(LoraLayer, "update_layer", _method_failing(LoraLayer.update_layer, 7))


def _method_failing(function: Callable[..., Any], n: int) -> Callable[..., Any]:
    fail = _FailOn(function, n)

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fail(self, *args, **kwargs)

    return method


def _fail_in(monkeypatch: pytest.MonkeyPatch, function: str, n: int) -> None:
    # a fault injected into one step of the load path (private by design: it is what is tested)
    monkeypatch.setattr(_load, function, _FailOn(getattr(_load, function), n))


def _fail_in_patching(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_in(monkeypatch, "_patch", 3)


def _fail_after_peft_state(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_in(monkeypatch, "_activate", 1)


# (make the file, what to expect, text the message must contain, optional fault to inject)
FAILURES: dict[str, tuple[Callable[[FluxTransformer2DModel, Path], Path], type[Exception], str,
                          Callable[[pytest.MonkeyPatch], None] | None]] = {
    "unrecognised": (_unrecognised, FormatError, "encoder.layer.0.weight", None),
    "unmatched-strict": (_unmatched, FormatError, "transformer.transformer_blocks.7.attn.to_q.lora_A.weight", None),
    "rank-mismatch": (_rank_mismatch, ShapeError, "lora_unet_double_blocks_1_img_attn_proj", None),
    "width-mismatch": (_width_mismatch, ShapeError, "transformer_blocks.1.attn.to_q", None),
    "fused-rows-mismatch": (_fused_mismatch, ShapeError, "single_transformer_blocks.0.proj_mlp", None),
    "truncated": (_truncated, CheckpointError, "truncated", None),
    "half-way-through-peft-injection": (_kohya_file, RuntimeError, "injected failure", _fail_in_peft_injection),
    "half-way-through-norm-patches": (_control, RuntimeError, "injected failure", _fail_in_patching),
    "after-injection": (_kohya_file, RuntimeError, "injected failure", _fail_after_peft_state),
}


@pytest.fixture(params=["fresh", "with-adapter"])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> FluxTransformer2DModel:
    model = seeded_model(TINY)
    if request.param == "with-adapter":
        file = diffusers_style(model, seed=9, key=lambda p: f"transformer.{p}",
                               paths=["transformer_blocks.0.attn.to_q", "proj_out"])
        lora.load_adapter(model, file.save(tmp_path / "prior.safetensors"), adapter_name="prior")
    return model


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failure_leaves_model_bit_identical(failure: str, model: FluxTransformer2DModel, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    make, error, text, fault = FAILURES[failure]
    path = make(seeded_model(TINY), tmp_path)
    before = fingerprint(model)
    if fault is not None:
        fault(monkeypatch)
    with pytest.raises(error) as raised:
        lora.load_adapter(model, path, adapter_name="new")
    assert text in str(raised.value)
    if failure not in ("half-way-through-peft-injection", "half-way-through-norm-patches", "after-injection"):
        assert str(path) in str(raised.value)  # the message names the file
    assert fingerprint(model) == before
    monkeypatch.undo()
    # the model still works: a good file loads and unloads cleanly afterwards
    lora.load_adapter(model, _kohya(model, 7).save(tmp_path / "good.safetensors"), adapter_name="good")
    lora.delete_adapters(model, "good")
    assert fingerprint(model) == before


def test_shape_error_names_module_and_both_shapes(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    with pytest.raises(ShapeError) as raised:
        lora.load_adapter(model, _width_mismatch(model, tmp_path))
    message = str(raised.value)
    assert "transformer_blocks.1.attn.to_q" in message
    assert "Linear(in=32, out=32)" in message and "[32, 48]" in message


def test_unrecognised_file_names_the_formats_tried(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    with pytest.raises(FormatError) as raised:
        lora.load_adapter(model, _unrecognised(model, tmp_path))
    for name in ("kohya", "xlabs", "diffusers", "bfl-control", "lycoris", "onetrainer", "comfyui", "fal-kontext"):
        assert name in str(raised.value)


def test_non_strict_loads_the_rest_and_reports(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    report = lora.load_adapter(model, _unmatched(model, tmp_path), strict=False)
    assert report.targets == ("proj_out",)
    assert set(report.skipped) == {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight",
                                   "transformer.transformer_blocks.7.attn.to_q.lora_B.weight"}
    assert "names no module" in report.skipped["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"]


def test_state_errors_leave_model_unchanged(model: FluxTransformer2DModel, tmp_path: Path) -> None:
    lora.load_adapter(model, _kohya(model).save(tmp_path / "a.safetensors"), adapter_name="a")
    before = fingerprint(model)
    attempts: list[tuple[Callable[[], object], str]] = [
        (lambda: lora.load_adapter(model, _kohya(model, 2).save(tmp_path / "b.safetensors"), adapter_name="a"),
         "already loaded"),
        (lambda: lora.load_adapter(model, _lokr(model, tmp_path), adapter_name="k"), "one adapter kind"),
        (lambda: lora.load_adapter(model, _control(model, tmp_path), adapter_name="c"), "widening x_embedder"),
        (lambda: lora.load_adapter(model, _kohya(model, 3).save(tmp_path / "c.safetensors"), adapter_name="zz",
                                   hotswap=True), "no such adapter"),
        (lambda: lora.load_adapter(model, kohya_style(model, seed=4, key=lambda b: "lora_unet_" + b.replace(".", "_"),
                                                      modules=["txt_in"]).save(tmp_path / "d.safetensors"),
                                   adapter_name="a", hotswap=True), "same modules"),
    ]
    for attempt, text in attempts:
        with pytest.raises(LoRAError, match=text):
            attempt()
        assert fingerprint(model) == before


def test_model_without_lora_is_refused() -> None:
    from diffcaps.errors import CapabilityError
    from tests.custom_model import TinyDiT, TinyDiTConfig

    with pytest.raises(CapabilityError):
        lora.load_adapter(TinyDiT(TinyDiTConfig()), {})  # type: ignore[arg-type]
