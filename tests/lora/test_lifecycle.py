"""The adapter lifecycle: weights by exact prefix, enable/disable, fuse/unfuse/unload bit-exact, delete, save."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch

from diffcaps import lora
from diffcaps.errors import LoRAError
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, flux_inputs, seeded_model, seeded_state
from tests.lora._check import base_weight, check_fuse_cycles_are_exact, fingerprint, merged_state, reference_model
from tests.lora._files import module, LoraFile, bfl_control_file, diffusers_style, kohya_style, lokr_file, bfl_modules


def _diffusers(model: FluxTransformer2DModel, seed: int, paths: list[str] | None = None) -> LoraFile:
    return diffusers_style(model, seed=seed, key=lambda p: f"transformer.{p}", alpha_every=2, paths=paths)


def _kohya(model: FluxTransformer2DModel, seed: int) -> LoraFile:
    return kohya_style(model, seed=seed, key=lambda b: "lora_unet_" + b.replace(".", "_"))


def _output(model: torch.nn.Module, channels: int | None = None) -> torch.Tensor:
    config = TINY if channels is None else attrs.evolve(TINY, in_channels=channels, out_channels=TINY.in_channels)
    with torch.no_grad():
        out: torch.Tensor = model(**flux_inputs(config)).sample
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["kohya", "bfl-control", "lokr"])
def test_unfuse_and_unload_are_bit_exact(kind: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = seeded_model(TINY).to(dtype)
    if kind == "kohya":
        file = _kohya(model, 1)
    elif kind == "lokr":
        modules = {k: v for k, v in bfl_modules(2, 2).items() if k.endswith(("qkv", "linear1", "adaLN_modulation.1"))}
        file = lokr_file(model, seed=2, key=lambda b: "lora_unet_" + b.replace(".", "_"), modules=modules,
                         w1_rows={}, decompose=True)
    else:
        file = bfl_control_file(model, seed=3, in_channels=2 * TINY.in_channels)
    original = fingerprint(model)
    lora.load_adapter(model, file.save(tmp_path / "a.safetensors"), adapter_name="a")
    check_fuse_cycles_are_exact(model, original=original)


def test_control_lora_widens_and_unload_restores(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    config, weight = model.config, model.x_embedder.weight
    file = bfl_control_file(model, seed=4, in_channels=2 * TINY.in_channels)
    report = lora.load_adapter(model, file.save(tmp_path / "c.safetensors"))
    assert report.widened == (f"x_embedder: {TINY.in_channels} → {2 * TINY.in_channels} inputs",)
    assert model.config.in_channels == 2 * TINY.in_channels
    assert model.config.output_channels == TINY.in_channels  # the output keeps its width
    assert base_weight(model, "x_embedder").shape[1] == 2 * TINY.in_channels
    assert torch.equal(module(model, "transformer_blocks.0.attn.norm_q").weight,
                       file.replaced["transformer_blocks.0.attn.norm_q.weight"])
    lora.unload(model)
    assert model.config is config and model.x_embedder.weight is weight
    assert model.x_embedder.in_features == TINY.in_channels


def test_set_adapters_prefixes_match_whole_components(tmp_path: Path) -> None:
    config = attrs.evolve(TINY, num_layers=11, num_single_layers=2)
    model = seeded_model(config)
    targets = ["transformer_blocks.1.attn.to_q", "transformer_blocks.10.attn.to_q",
               "single_transformer_blocks.1.attn.to_q", "transformer_blocks.1.ff.net.2"]
    lora.load_adapter(model, _diffusers(model, 5, targets).save(tmp_path / "p.safetensors"), adapter_name="p")
    lora.set_adapters(model, ["p"], [{"transformer_blocks.1": 0.25, "transformer_blocks.1.ff": 0.75}])
    scales = {path: module(model, path).scaling["p"] for path in targets}
    unit = {path: module(model, path).lora_alpha["p"] / module(model, path).r["p"] for path in targets}
    assert scales["transformer_blocks.1.attn.to_q"] == pytest.approx(0.25 * unit["transformer_blocks.1.attn.to_q"])
    assert scales["transformer_blocks.1.ff.net.2"] == pytest.approx(0.75 * unit["transformer_blocks.1.ff.net.2"])
    assert scales["transformer_blocks.10.attn.to_q"] == pytest.approx(unit["transformer_blocks.10.attn.to_q"])
    assert scales["single_transformer_blocks.1.attn.to_q"] == pytest.approx(
        unit["single_transformer_blocks.1.attn.to_q"])
    with pytest.raises(LoRAError, match="transformer_blocks.99"):
        lora.set_adapters(model, "p", {"transformer_blocks.99": 0.5})


def test_per_module_weight_matches_hand_merged_model(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    state = seeded_state(FluxTransformer2DModel.from_config(TINY))
    file = _diffusers(model, 6)
    lora.load_adapter(model, file.save(tmp_path / "w.safetensors"), adapter_name="w")
    lora.set_adapters(model, "w", {"single_transformer_blocks": 0.0, "transformer_blocks.0": 0.5})
    expected = LoraFile(tensors={})
    for path, delta in file.deltas.items():
        factor = 0.0 if path.startswith("single_transformer_blocks.") else (
            0.5 if path.startswith("transformer_blocks.0.") else 1.0)
        expected.deltas[path] = delta * factor
    torch.testing.assert_close(_output(model), _output(reference_model(TINY, state, expected)), atol=2e-5, rtol=0)
    lora.fuse(model)
    merged = merged_state(state, expected)
    for path in file.deltas:
        torch.testing.assert_close(base_weight(model, path), merged[f"{path}.weight"], atol=1e-6, rtol=0)


def test_two_adapters_enable_disable_and_delete(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    state = seeded_state(FluxTransformer2DModel.from_config(TINY))
    original = fingerprint(model)
    base = _output(model)
    first = _diffusers(model, 7, ["transformer_blocks.0.attn.to_q", "proj_out"])
    second = _kohya(model, 8)
    lora.load_adapter(model, first.save(tmp_path / "1.safetensors"), adapter_name="one")
    only_first = fingerprint(model)
    lora.load_adapter(model, second.save(tmp_path / "2.safetensors"), adapter_name="two")
    assert lora.list_adapters(model) == ("one", "two")
    assert lora.active_adapters(model) == ("one", "two")

    both = LoraFile(tensors={}, deltas=dict(second.deltas))
    for path, delta in first.deltas.items():
        both.deltas[path] = both.deltas.get(path, 0) + delta
    torch.testing.assert_close(_output(model), _output(reference_model(TINY, state, both)), atol=2e-5, rtol=0)

    lora.set_adapters(model, ["two"], [0.5])
    assert lora.active_adapters(model) == ("two",)
    half = LoraFile(tensors={}, deltas={p: 0.5 * d for p, d in second.deltas.items()})
    torch.testing.assert_close(_output(model), _output(reference_model(TINY, state, half)), atol=2e-5, rtol=0)

    lora.disable(model)
    assert lora.active_adapters(model) == ()
    torch.testing.assert_close(_output(model), base, atol=0, rtol=0)
    with pytest.raises(LoRAError, match="disabled"):
        lora.fuse(model)
    lora.enable(model)
    assert lora.active_adapters(model) == ("two",)

    lora.set_adapters(model, ["one", "two"])
    lora.delete_adapters(model, "two")
    assert lora.list_adapters(model) == ("one",)
    assert fingerprint(model) == only_first
    lora.delete_adapters(model, ["one"])
    assert fingerprint(model) == original
    assert lora.list_adapters(model) == ()


def test_adapters_on_disjoint_modules_are_all_active(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    state = seeded_state(FluxTransformer2DModel.from_config(TINY))
    first = _diffusers(model, 12, ["proj_out", "transformer_blocks.1.ff.net.2"])
    second = _diffusers(model, 13, ["transformer_blocks.0.attn.to_q"])
    lora.load_adapter(model, first.save(tmp_path / "1.safetensors"), adapter_name="one")
    lora.disable(model)
    lora.load_adapter(model, second.save(tmp_path / "2.safetensors"), adapter_name="two")
    assert lora.active_adapters(model) == ()
    lora.enable(model)
    assert lora.active_adapters(model) == ("one", "two")
    both = LoraFile(tensors={}, deltas={**first.deltas, **second.deltas})
    torch.testing.assert_close(_output(model), _output(reference_model(TINY, state, both)), atol=2e-5, rtol=0)
    lora.delete_adapters(model, "two")
    torch.testing.assert_close(_output(model), _output(reference_model(TINY, state, first)), atol=2e-5, rtol=0)


def test_misuse_is_a_clear_error(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    with pytest.raises(LoRAError, match="no LoRA adapter loaded"):
        lora.set_adapters(model, "nope")
    lora.load_adapter(model, _diffusers(model, 9, ["proj_out"]).save(tmp_path / "a.safetensors"), adapter_name="a")
    with pytest.raises(LoRAError, match="'nope'"):
        lora.set_adapters(model, "nope")
    with pytest.raises(LoRAError, match="2 weight"):
        lora.set_adapters(model, ["a"], [1.0, 2.0])
    lora.fuse(model)
    calls: list[Callable[[], None]] = [lambda: lora.set_adapters(model, "a", 0.5), lambda: lora.disable(model),
                                       lambda: lora.delete_adapters(model, "a"), lambda: lora.fuse(model, ["a"])]
    for call in calls:
        with pytest.raises(LoRAError):
            call()
    lora.unfuse(model)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_save_and_reload_round_trip(layout: lora.SaveLayout, tmp_path: Path) -> None:
    model = seeded_model(TINY)
    file = kohya_style(model, seed=10, key=lambda b: "lora_unet_" + b.replace(".", "_"), block_diagonal=True)
    lora.load_adapter(model, file.save(tmp_path / "in.safetensors"), adapter_name="a")
    lora.set_adapters(model, "a", 0.3)  # a user weight is not part of the adapter
    saved = lora.save_adapter(model, tmp_path / "out.safetensors", "a", layout=layout)
    lora.set_adapters(model, "a", 1.0)

    fresh = seeded_model(TINY)
    report = lora.load_adapter(fresh, saved, adapter_name="a")
    assert report.format == layout
    assert set(report.targets) == set(file.deltas)
    for path in file.deltas:  # the same peft layers, bit for bit
        ours, theirs = module(model, path), module(fresh, path)
        assert torch.equal(ours.lora_A["a"].weight, theirs.lora_A["a"].weight)
        assert torch.equal(ours.lora_B["a"].weight, theirs.lora_B["a"].weight)
        assert ours.scaling["a"] == theirs.scaling["a"]
    torch.testing.assert_close(_output(fresh), _output(model), atol=1e-5, rtol=0)


def test_save_control_lora_keeps_norms_and_width(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    file = bfl_control_file(model, seed=11, in_channels=2 * TINY.in_channels)
    lora.load_adapter(model, file.save(tmp_path / "c.safetensors"), adapter_name="c")
    saved = lora.save_adapter(model, tmp_path / "out.safetensors", "c")
    fresh = seeded_model(TINY)
    lora.load_adapter(fresh, saved, adapter_name="c")
    assert fresh.config.in_channels == 2 * TINY.in_channels
    channels = 2 * TINY.in_channels
    torch.testing.assert_close(_output(fresh, channels), _output(model, channels), atol=1e-5, rtol=0)
    with pytest.raises(LoRAError, match="replaced parameters"):
        lora.save_adapter(model, tmp_path / "k.safetensors", "c", layout="kohya")
    with pytest.raises(LoRAError, match="cannot write the 'xlabs' layout; it writes diffusers, kohya"):
        lora.save_adapter(model, tmp_path / "x.safetensors", "c", layout="xlabs")  # type: ignore[arg-type]
