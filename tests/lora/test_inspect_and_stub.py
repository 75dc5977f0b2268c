"""``diffcaps inspect`` names a LoRA file's format; the peft stub matches the installed peft."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from diffcaps.cli import main
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, seeded_model
from tests.lora._files import LoraFile, kohya_style, text_encoder_keys, xlabs_file

STUB = Path(__file__).parents[2] / "typings" / "peft" / "__init__.pyi"


def test_inspect_reports_lora_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = seeded_model(TINY)
    file = kohya_style(model, seed=1, key=lambda b: "lora_unet_" + b.replace(".", "_"))
    text_encoder_keys(file, "lora_te1_")
    path = file.save(tmp_path / "k.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind           lora" in out and "format         kohya" in out
    assert "text encoder   3 tensor(s), skipped when loading" in out


def _detected(keys: list[str]) -> str | None:
    found = FluxTransformer2DModel.declared_capabilities().lora.detect(keys)
    return found.name if found is not None else None


def test_detect_format_from_names() -> None:
    model = seeded_model(TINY)
    assert _detected(list(xlabs_file(model, seed=2, doubles=[0], singles=[]).tensors)) == "xlabs"
    assert _detected(["transformer.proj_out.lora_A.weight"]) == "diffusers"
    assert _detected(["unrelated.weight"]) is None


def test_recogniser_says_why_a_lora_file_fits_no_format(tmp_path: Path) -> None:
    import torch

    from diffcaps.io import read_header
    from diffcaps.lora import lora_recogniser

    tensors = {"encoder.lora_down.weight": torch.zeros(2, 4), "encoder.lora_up.weight": torch.zeros(4, 2)}
    path = LoraFile(tensors=tensors).save(tmp_path / "x.safetensors")
    found = lora_recogniser([FluxTransformer2DModel])(read_header(path))
    assert not found.matched
    assert "in none of the formats xlabs, lycoris, kohya" in dict(found.rows)["lora"]


def _stubbed() -> dict[str, ast.FunctionDef | ast.ClassDef]:
    tree = ast.parse(STUB.read_text())
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def _parameters(function: ast.FunctionDef) -> list[str]:
    return [a.arg for a in function.args.args if a.arg != "self"]


def test_peft_stub_matches_installed_peft() -> None:
    # A quick form of `python -m mypy.stubtest peft --mypy-config-file mypy.ini --ignore-missing-stub`
    # (which passes, but takes half a minute): every stubbed name exists, with the same parameters.
    import peft

    for name, node in _stubbed().items():
        runtime = getattr(peft, name)
        if isinstance(node, ast.FunctionDef):
            assert _parameters(node) == list(inspect.signature(runtime).parameters), name
            continue
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            assert _parameters(init) == list(inspect.signature(runtime.__init__).parameters)[1:], name


def test_metadata_row_lists_the_formats() -> None:
    row = FluxTransformer2DModel.metadata()["lora"]
    assert row.entries == ("xlabs", "lycoris", "kohya", "onetrainer", "fal-kontext", "bfl-control", "comfyui",
                           "diffusers")
    assert FluxTransformer2DModel.declared_capabilities().lora.entries() == row.entries
