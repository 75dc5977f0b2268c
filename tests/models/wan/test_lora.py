"""Wan LoRA files in every format Wan users have, against an independent merge and against diffusers.

Each file is written in its trainer's names by ``_files.py`` with its expected effect computed
there (``W + scale · up @ down`` in fp64); diffusers' Wan converters are the second oracle where
diffusers loads the file (they scale their input in place, so they get copies).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from diffcaps import lora
from diffcaps.errors import FormatError
from diffcaps.io import save_safetensors
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from tests.lora._check import fingerprint
from tests.models.wan._files import (
    I2V,
    T2V,
    LoraFile,
    block_linears,
    lokr_file,
    loha_file,
    lora_file,
    merged_state,
    plain_state,
    reference,
    run,
    seeded_model,
    top_linears,
)


def _original(prefix: str) -> Callable[[str], str]:
    return lambda name: prefix + name


def _musubi(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def _all_linears(config: WanConfig) -> dict[str, str]:
    return {**top_linears(config), **block_linears(config)}


def _save(tmp_path: Path, file: LoraFile, name: str = "lora.safetensors") -> Path:
    return save_safetensors(file.tensors, tmp_path / name)


def _assert_state(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in actual.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=atol, msg=key)


def _bits(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in plain_state(model).items()}


def _files(model: WanTransformer3DModel) -> dict[str, tuple[LoraFile, str]]:
    config = model.config
    linears = _all_linears(config)
    blocks = block_linears(config)
    return {
        "comfy-lora_down": (lora_file(model, linears, _original("diffusion_model."), diff_b=True), "wan-original"),
        "comfy-lora_A": (lora_file(model, linears, _original("model.diffusion_model."), down="lora_A",
                                   up="lora_B", alpha=None), "wan-original"),
        "original-no-prefix": (lora_file(model, blocks, _original(""), alpha=2.0), "wan-original"),
        "ai-toolkit": (lora_file(model, {f"blocks.0.{n}": f"blocks.0.{n}" for n in ("attn1.to_q", "ffn.net.2")},
                                 _original("diffusion_model."), down="lora_A", up="lora_B"), "wan-original"),
        "musubi": (lora_file(model, linears, _musubi, rank=3, alpha=1.5), "musubi"),
        "lokr-musubi": (lokr_file(model, linears, _musubi), "lycoris"),
        "lokr-original": (lokr_file(model, blocks, _original("diffusion_model.")), "lycoris"),
        "loha-lycoris": (loha_file(model, {p: p for p in blocks.values()},
                                   lambda p: "lycoris_" + p.replace(".", "_")), "lycoris"),
        "diffusers": (lora_file(model, {p: p for p in linears.values()}, _original("transformer."),
                                down="lora_A", up="lora_B", alpha=None), "diffusers"),
    }


_NAMES = ["comfy-lora_down", "comfy-lora_A", "original-no-prefix", "ai-toolkit", "musubi", "lokr-musubi",
          "lokr-original", "loha-lycoris", "diffusers"]


@pytest.fixture(scope="module")
def i2v() -> WanTransformer3DModel:
    return seeded_model(I2V)


@pytest.mark.parametrize("name", _NAMES)
def test_each_format_matches_an_independent_merge(tmp_path: Path, i2v: WanTransformer3DModel, name: str) -> None:
    model = seeded_model(I2V)
    file, fmt = _files(i2v)[name]
    expected = merged_state(model, file)
    original = _bits(model)

    report = lora.load_adapter(model, _save(tmp_path, file), adapter_name="a")

    assert report.format == fmt
    assert set(report.used) == set(file.tensors)
    assert set(report.targets) == set(file.deltas)
    torch.testing.assert_close(run(model, I2V), run(reference(I2V, expected), I2V), rtol=0, atol=1e-5)
    lora.fuse(model)
    _assert_state(plain_state(model), expected)
    lora.unfuse(model)
    assert _bits(model) == original
    lora.unload(model)
    assert _bits(model) == original
    assert set(model.state_dict()) == set(i2v.state_dict())


def test_bias_differences_beside_a_pair_scale_with_the_adapter_weight(tmp_path: Path, i2v: WanTransformer3DModel
                                                                      ) -> None:
    model = seeded_model(I2V)
    file = lora_file(model, _all_linears(I2V), _original("diffusion_model."), diff_b=True)
    lora.load_adapter(model, _save(tmp_path, file), adapter_name="a")

    lora.set_adapters(model, "a", 0.5)
    torch.testing.assert_close(run(model, I2V), run(reference(I2V, merged_state(i2v, file, 0.5)), I2V),
                               rtol=0, atol=1e-5)
    lora.disable(model)
    torch.testing.assert_close(run(model, I2V), run(i2v, I2V), rtol=0, atol=0)


def test_diff_patches_apply_in_full_whatever_the_weight_and_unload_restores(tmp_path: Path) -> None:
    model = seeded_model(I2V)
    original = _bits(model)
    generator = torch.Generator().manual_seed(9)
    pair = lora_file(model, {"blocks.0.self_attn.q": "blocks.0.attn1.to_q"}, _original("diffusion_model."))
    patched = {  # file name → model parameter, for the whole-parameter differences
        "blocks.0.self_attn.norm_q.diff": "blocks.0.attn1.norm_q.weight",
        "blocks.1.cross_attn.norm_k_img.diff": "blocks.1.attn2.norm_added_k.weight",
        "blocks.2.norm3.diff": "blocks.2.norm2.weight",
        "blocks.2.norm3.diff_b": "blocks.2.norm2.bias",
        "blocks.1.modulation.diff": "blocks.1.scale_shift_table",
        "head.modulation.diff": "scale_shift_table",
        "patch_embedding.diff_b": "patch_embedding.bias",
        "head.head.diff": "proj_out.weight",
        "time_projection.1.diff_b": "condition_embedder.time_proj.bias",
        "img_emb.proj.0.diff": "condition_embedder.image_embedder.norm1.weight",
    }
    state = model.state_dict()
    for key, param in patched.items():
        delta = torch.randn(state[param].shape, generator=generator) * 0.05
        pair.tensors[f"diffusion_model.{key}"] = delta
        pair.patches[param] = delta

    report = lora.load_adapter(model, _save(tmp_path, pair), adapter_name="a")
    lora.set_adapters(model, "a", 0.25)

    assert set(report.patched) >= {"blocks.0.attn1.norm_q.weight", "proj_out.weight"}
    expected = merged_state(seeded_model(I2V), LoraFile(deltas={k: 0.25 * v for k, v in pair.deltas.items()},
                                                        patches=pair.patches))
    torch.testing.assert_close(run(model, I2V), run(reference(I2V, expected), I2V), rtol=0, atol=1e-5)
    lora.unload(model)
    assert _bits(model) == original


def test_unknown_module_names_the_key_and_leaves_the_model(tmp_path: Path) -> None:
    model = seeded_model(T2V)
    file = lora_file(model, block_linears(T2V), _original("diffusion_model."))
    file.tensors["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, 256)
    file.tensors["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(256, 4)
    before = fingerprint(model)

    with pytest.raises(FormatError, match=r"blocks\.7\.self_attn\.q"):
        lora.load_adapter(model, _save(tmp_path, file))
    assert fingerprint(model) == before


def test_i2v_names_on_a_t2v_model_are_an_error(tmp_path: Path, i2v: WanTransformer3DModel) -> None:
    file = lora_file(i2v, {"blocks.0.cross_attn.k_img": "blocks.0.attn2.add_k_proj"}, _original("diffusion_model."))
    model = seeded_model(T2V)
    before = fingerprint(model)
    with pytest.raises(FormatError, match="k_img"):
        lora.load_adapter(model, _save(tmp_path, file))
    assert fingerprint(model) == before


# --- diffusers as the second oracle -------------------------------------------------------------

def _diffusers(model: WanTransformer3DModel, file: LoraFile, weight: float) -> Any:
    from diffusers import WanTransformer3DModel as DiffusersWan
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    theirs = DiffusersWan(**config)
    theirs.load_state_dict(model.state_dict())
    converted = WanLoraLoaderMixin.lora_state_dict(file.copy())
    theirs.load_lora_adapter(converted, prefix="transformer", adapter_name="a")
    theirs.set_adapters(["a"], [weight])
    return theirs.eval()


_DIFFUSERS_FILES: dict[str, Callable[[WanTransformer3DModel], LoraFile]] = {
    # diffusers' original-name converter reads alphas inside the blocks only
    "comfy-lora_down": lambda m: LoraFile(
        tensors={**lora_file(m, block_linears(m.config), _original("diffusion_model."), diff_b=True).tensors,
                 **lora_file(m, top_linears(m.config), _original("diffusion_model."), alpha=None, seed=8).tensors}),
    "comfy-lora_A": lambda m: lora_file(m, block_linears(m.config), _original("diffusion_model."), down="lora_A",
                                        up="lora_B", alpha=4.0),
    "musubi": lambda m: lora_file(m, block_linears(m.config), _musubi, rank=3, alpha=1.5),
    "diffusers": lambda m: lora_file(m, {p: p for p in _all_linears(m.config).values()}, _original("transformer."),
                                     down="lora_A", up="lora_B", alpha=None),
}


@pytest.mark.parametrize("weight", [1.0, 0.5])
@pytest.mark.parametrize("name", sorted(_DIFFUSERS_FILES))
def test_same_weights_as_diffusers(tmp_path: Path, i2v: WanTransformer3DModel, name: str, weight: float) -> None:
    model = seeded_model(I2V)
    file = _DIFFUSERS_FILES[name](model)
    before = {k: v.clone() for k, v in file.tensors.items()}
    theirs = _diffusers(model, file, weight)
    assert all(torch.equal(before[k], v) for k, v in file.tensors.items())  # diffusers had copies

    lora.load_adapter(model, _save(tmp_path, file), adapter_name="a")
    lora.set_adapters(model, "a", weight)
    lora.fuse(model)
    theirs.fuse_lora(lora_scale=1.0, adapter_names=["a"])

    _assert_state(plain_state(model), plain_state(theirs), atol=1e-6)


def test_same_output_as_diffusers_with_bias_differences_at_half_weight(tmp_path: Path) -> None:
    model = seeded_model(T2V)
    file = lora_file(model, _all_linears(T2V), _original("diffusion_model."), alpha=None, diff_b=True)
    theirs = _diffusers(model, file, 0.5)
    lora.load_adapter(model, _save(tmp_path, file), adapter_name="a")
    lora.set_adapters(model, "a", 0.5)

    torch.testing.assert_close(run(model, T2V), run(theirs, T2V), rtol=0, atol=1e-5)
