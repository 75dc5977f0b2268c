"""``diffcaps inspect`` names a LoRA file's format; the peft stub matches the installed peft."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from diffcaps import lora
from diffcaps.cli import main
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


def test_detect_format_from_names() -> None:
    model = seeded_model(TINY)
    assert lora.detect_format(list(xlabs_file(model, seed=2, doubles=[0], singles=[]).tensors)) == "xlabs"
    assert lora.detect_format(["transformer.proj_out.lora_A.weight"]) == "diffusers"
    assert lora.detect_format(["unrelated.weight"]) is None


def test_inspect_unrecognised_file_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    path = LoraFile(tensors={"encoder.weight": torch.zeros(2)}).save(tmp_path / "x.safetensors")
    assert main(["inspect", str(path)]) == 0
    assert "in none of the formats" in capsys.readouterr().out


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
    from diffcaps.models.flux import FluxTransformer2DModel

    row = FluxTransformer2DModel.metadata()["lora"]
    assert row.entries == ("xlabs", "lycoris", "kohya", "onetrainer", "fal-kontext", "bfl-control", "comfyui",
                           "diffusers")
    assert FluxTransformer2DModel.capabilities.lora.entries() == row.entries
