"""The command line as a user runs it: ``describe``, ``demo``, and how every failure is reported (``generate``: test_generate.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import diffcaps
from diffcaps import ModelMetadata
from diffcaps.cli import build_parser, main
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import TinyDiT


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_describe_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "flux"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == FluxTransformer2DModel.metadata().describe()
    assert "\033[" not in out


def test_describe_verbose_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["describe", "flux", "--verbose"])
    assert "README.md#regional-compile" in capsys.readouterr().out
    main(["describe", "flux", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert ModelMetadata.from_dict(payload) == FluxTransformer2DModel.metadata()


def test_describe_takes_any_model_class_as_module_and_name(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(["describe", "tests.custom_model:TinyDiT"], capsys)
    assert (status, err) == (0, "")
    assert out.strip() == TinyDiT.metadata().describe()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sdxl", "unknown model 'sdxl'; known models: flux (FluxTransformer2DModel), wan (WanTransformer3DModel) "
                 "(or give module:Class)"),
        ("no_such_module:Model", "cannot import 'no_such_module' for 'no_such_module:Model': ModuleNotFoundError"),
        ("tests.custom_model:Nothing", "module 'tests.custom_model' has no 'Nothing'"),
        ("diffcaps.errors:DiffcapsError", "'diffcaps.errors:DiffcapsError' is not a diffcaps Model subclass"),
        (":TinyDiT", "':TinyDiT' is not a module:Class reference"),
    ],
)
def test_describe_refuses_what_is_not_a_model_in_one_line(
    spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(["describe", spec], capsys)
    assert (status, out) == (1, "")
    assert err.startswith(f"diffcaps describe: {message}")
    assert err.count("\n") == 1


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(["frobnicate"], capsys)
    assert status == 1
    assert err.startswith("diffcaps: argument COMMAND: invalid choice: 'frobnicate'") and err.count("\n") == 1
    status, _, err = _run(["convert", "only-a-source"], capsys)
    assert status == 1
    assert "the following arguments are required: target" in err and err.count("\n") == 1


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"diffcaps {diffcaps.__version__}\n"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:  # argparse has no public listing of its actions
        if isinstance(action.choices, dict):
            found += [p for sub in action.choices.values() if isinstance(sub, argparse.ArgumentParser)
                      for p in _parsers(sub)]
    return found


def test_every_argument_has_help() -> None:
    parsers = _parsers(build_parser())
    assert {p.prog for p in parsers} >= {f"diffcaps {c}" for c in ("describe", "demo", "generate", "inspect", "convert")}
    for parser in parsers:
        for action in parser._actions:
            if action.dest != "command":
                assert action.help, f"{parser.prog}: {action.dest} has no help text"


def test_an_unexpected_error_is_one_line_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(FluxTransformer2DModel, "metadata", broken)
    status, out, err = _run(["describe", "flux"], capsys)
    assert (status, out) == (1, "")
    assert err == "diffcaps describe: internal error: RuntimeError: boom; rerun with --debug for the traceback\n"
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "describe", "flux"])
    with pytest.raises(RuntimeError, match="boom"):
        main(["describe", "flux", "--debug"])


@pytest.mark.parametrize(("error", "expected"), [
    (PermissionError(13, "Permission denied", "/some/file"), "/some/file: Permission denied"),
    (KeyError("missing"), "internal error: KeyError: 'missing'; rerun with --debug for the traceback"),
    (RecursionError("maximum recursion depth exceeded"),
     "internal error: RecursionError: maximum recursion depth exceeded; rerun with --debug for the traceback"),
])
def test_every_exception_type_ends_as_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, expected: str
) -> None:
    def broken(*args: object) -> None:
        raise error

    monkeypatch.setattr(FluxTransformer2DModel, "metadata", broken)
    assert _run(["describe", "flux"], capsys) == (1, "", f"diffcaps describe: {expected}\n")
    with pytest.raises(type(error)):
        main(["describe", "flux", "--debug"])


def test_a_closed_pipe_ends_quietly() -> None:
    child = subprocess.Popen([sys.executable, "-m", "diffcaps", "describe", "flux", "--verbose"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # as `| head` does, before the child has written anything
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1
    assert err == ""


def test_demo_saves_loads_reproduces_and_draws(tmp_path: Path) -> None:
    from PIL import Image

    from diffcaps.demo import DEMO_PROMPT
    from diffcaps.interop.diffusers import tiny_flux_pipeline_folder

    result = subprocess.run(  # from tmp_path: the image goes to the current folder by default
        [sys.executable, "-m", "diffcaps", "demo", "--output", str(tmp_path / "demo")],
        capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "reloaded model reproduces the original: yes" in result.stdout
    assert "FluxTransformer2DModel capabilities" in result.stdout
    assert (tmp_path / "demo" / "config.json").is_file()
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "demo")
    assert loaded.config.num_single_layers == 4

    image = tmp_path / "diffcaps-demo.png"
    assert "pipeline: FluxPipeline with diffcaps FluxTransformer2DModel on cpu" in result.stdout
    assert f"wrote {image}" in result.stdout
    assert [line.split()[1] for line in result.stderr.splitlines() if line.startswith("step ")] == [
        "1/4", "2/4", "3/4", "4/4"]
    # The same image as `generate` on the tiny pipeline folder with the demo's settings.
    folder = tiny_flux_pipeline_folder(tmp_path / "pipeline")
    again = tmp_path / "again.png"
    assert main(["generate", str(folder), "--prompt", DEMO_PROMPT, "--size", "64x64", "--steps", "4",
                 "--out", str(again)]) == 0
    with Image.open(image) as drawn, Image.open(again) as generated:
        assert drawn.size == (64, 64)
        assert drawn.tobytes() == generated.tobytes()


@pytest.mark.parametrize("package", ["diffusers", "transformers"])
def test_demo_without_diffusers_says_what_to_install(tmp_path: Path, package: str) -> None:
    code = (f"import sys; sys.modules[{package!r}] = None; from diffcaps.cli import main; "
            f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo.png')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reloaded model reproduces the original: yes" in result.stdout
    assert result.stdout.rstrip().endswith(
        'skipped: the pipeline needs diffusers and transformers; pip install "diffcaps[diffusers]"')
    assert not (tmp_path / "demo.png").exists()


def test_demo_runs_wan(tmp_path: Path) -> None:
    from diffcaps.demo import WAN_DEMO_CONFIG
    from diffcaps.models.wan import WanTransformer3DModel

    from PIL import Image
    from PIL.GifImagePlugin import GifImageFile

    result = subprocess.run(
        [sys.executable, "-m", "diffcaps", "demo", "--model", "wan", "--seed", "3", "--output", str(tmp_path / "wan")],
        capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "WanTransformer3DModel capabilities" in result.stdout
    assert "a seeded Wan transformer (2 blocks, width 128)" in result.stdout
    assert "forward pass (1 × 48 video + 8 text tokens)" in result.stdout
    assert "output (1, 16, 3, 8, 8)" in result.stdout
    assert "reloaded model reproduces the original: yes" in result.stdout
    assert json.loads((tmp_path / "wan" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "wan")
    assert loaded.config == WAN_DEMO_CONFIG
    video = tmp_path / "diffcaps-demo-wan.gif"
    assert "pipeline: WanPipeline with diffcaps WanTransformer3DModel on cpu" in result.stdout
    assert f"wrote {video}" in result.stdout
    with Image.open(video) as gif:
        assert isinstance(gif, GifImageFile)
        assert (gif.size, gif.n_frames) == ((32, 32), 5)


def _original_files(tmp_path: Path) -> dict[str, Path]:
    """A tiny Flux and a tiny Wan checkpoint, each in its original single-file layout."""
    from diffcaps.models.wan import WanTransformer3DModel
    from diffcaps.weights import save_single_file
    from tests.models.wan._files import VARIANTS, seeded_model
    from tests.weights.fixtures import variant_model

    wan: WanTransformer3DModel = seeded_model(VARIANTS["wan-t2v"], seed=5)
    return {
        "flux": save_single_file(variant_model("flux-dev", "medium", seed=5), tmp_path / "flux.safetensors"),
        "wan": save_single_file(wan, tmp_path / "wan.safetensors", prefix="model.diffusion_model."),
    }


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_convert_picks_the_model_from_the_file_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    from diffcaps.models import model_class
    from tests.weights.test_single_file import assert_same_file_tensors

    source = _original_files(tmp_path)[name]
    cls = model_class(name)
    status, out, err = _run(["convert", str(source), str(tmp_path / "folder")], capsys)
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == f"model: {name} ({cls.__name__}), recognised from {source}"
    assert json.loads((tmp_path / "folder" / "config.json").read_text())["_class_name"] == cls.__name__
    # and back from the folder, whose config.json names the class
    back = tmp_path / "back.safetensors"
    prefix = "model.diffusion_model." if name == "wan" else ""
    status, out, err = _run(["convert", str(tmp_path / "folder"), str(back), "--prefix", prefix], capsys)
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == f"model: {name} ({cls.__name__}), recognised from {tmp_path / 'folder'}"
    assert_same_file_tensors(source, back)


def test_convert_model_option_still_forces_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _original_files(tmp_path)["wan"]
    status, out, err = _run(["convert", str(source), str(tmp_path / "as-flux"), "--model", "flux"], capsys)
    assert (status, out) == (1, "")
    assert err.startswith(f"diffcaps convert: {source}: ") and "Flux" in err
    assert not (tmp_path / "as-flux").exists()
    status, out, err = _run(["convert", str(source), str(tmp_path / "folder"), "--model", "wan"], capsys)
    assert (status, err) == (0, "")
    assert "recognised from" not in out and "wrote" in out


def test_convert_without_a_model_names_the_file_it_cannot_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import save_file

    source = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(source))
    status, out, err = _run(["convert", str(source), str(tmp_path / "out")], capsys)
    assert (status, out) == (1, "")
    assert err.startswith(f"diffcaps convert: {source}: is no known model's checkpoint (")
    assert "FluxTransformer2DModel: " in err and "WanTransformer3DModel: " in err and err.endswith("pass --model\n")
    assert not (tmp_path / "out").exists()

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    status, out, err = _run(["convert", str(folder), str(tmp_path / "out.safetensors")], capsys)
    assert (status, out) == (1, "")
    assert err == (f"diffcaps convert: {folder / 'config.json'}: _class_name 'UNet2DConditionModel' is no known "
                   "model's; known models: flux (FluxTransformer2DModel), wan (WanTransformer3DModel) (register "
                   "yours with diffcaps.register_model); pass --model\n")
