"""``python -m diffcaps inspect`` and ``convert``, and the ``convert`` function behind them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from diffcaps.cli import ProgressBar, main
from diffcaps.demo import DEMO_CONFIG
from diffcaps.errors import CheckpointError
from diffcaps.io import INDEX_NAME, MappedSafetensors, read_header
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights import convert, load_single_file, save_single_file
from tests.flux_fixtures import seeded_model
from tests.weights.fixtures import original_file, variant_model
from tests.weights.test_single_file import assert_same_file_tensors


def _no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: MappedSafetensors, key: str) -> torch.Tensor:
        raise AssertionError(f"inspect read tensor {key}")

    monkeypatch.setattr(MappedSafetensors, "view", refuse)


def test_inspect_describes_a_checkpoint_without_reading_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = variant_model("flux-fill", "medium")
    path = original_file(tmp_path / "flux1-fill-dev.safetensors", model, prefix="model.diffusion_model.",
                         dtype=torch.float8_e4m3fn)
    _no_reading(monkeypatch)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert out.splitlines()[0] == str(path)
    assert lines["kind"] == "checkpoint"
    assert lines["model"] == "FluxTransformer2DModel (Flux)"
    assert lines["variant"].startswith("flux-fill — FLUX.1 Fill [dev]")
    assert lines["layout"] == "original (prefix 'model.diffusion_model.')"
    assert lines["layers"] == "3 double blocks, 2 single blocks"
    assert "in_channels=384, out_channels=64" in lines["config"]
    assert "num_attention_heads=3" in lines["config"]
    assert lines["fit"] == "every tensor has its place in FluxTransformer2DModel"
    assert lines["dtype"] == "float8_e4m3fn"
    assert lines["tensors"] == str(len(read_header(path).tensors))
    parameters = sum(p.numel() for p in model.parameters())
    assert lines["size"] == f"{path.stat().st_size / 1e6:.1f} MB ({parameters / 1e6:.2f} M parameters)"
    assert lines["metadata"] == "format=pt"


def test_inspect_says_when_a_file_is_no_known_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, dtype=torch.float16),
               "decoder.conv_in.bias": torch.zeros(4)}, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert lines["kind"] == "unknown"
    assert lines["FluxTransformer2DModel"] == (
        "not a recognised Flux checkpoint: none of its 2 tensors fits the original or diffusers Flux layout "
        "(first keys: decoder.conv_in.bias, decoder.conv_in.weight)."
    )
    assert lines["dtype"] == "float16 (1), float32 (1)"
    assert lines["tensors"] == "2"


def _inspect_rows(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["inspect", str(path)]) == 0
    return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])


def test_inspect_does_not_call_a_full_checkpoint_of_no_known_variant_a_lora(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = seeded_model(DEMO_CONFIG)  # Flux-shaped, but 16 input channels: no declared variant
    for layout in ("original", "diffusers"):
        path = save_single_file(model, tmp_path / f"{layout}.safetensors", layout)
        lines = _inspect_rows(path, capsys)
        assert lines["kind"] == "unknown", layout
        assert lines["FluxTransformer2DModel"].startswith("not a recognised Flux checkpoint")
        assert lines["lora"] == "no adapter tensor pairs (lora_A/B, lora_down/up, LoKr, LoHa)"


def test_inspect_calls_a_checkpoint_of_another_model_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.safetensors"
    save_file({f"blocks.{i}.{name}.weight": torch.zeros(16, 16) for i in range(3) for name in ("q", "k", "up", "down")},
              str(path))
    lines = _inspect_rows(path, capsys)
    assert lines["kind"] == "unknown"
    assert "lora" in lines  # the structural check said why it is not an adapter


def test_inspect_tells_a_lora_by_its_tensor_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "style.safetensors"
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 32), f"{stem}.lora_up.weight": torch.zeros(32, 4),
               f"{stem}.alpha": torch.tensor(4.0)}, str(path))
    lines = _inspect_rows(path, capsys)
    assert lines["kind"] == "lora"
    assert lines["format"] == "kohya"


def test_inspect_names_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 4)
    assert main(["inspect", str(path)]) == 1
    assert "not a safetensors file" in capsys.readouterr().err


def test_inspect_reports_a_checkpoint_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = original_file(tmp_path / "dev.safetensors", variant_model("flux-dev", "small"))
    with MappedSafetensors(path) as file:
        tensors = {k: file.view(k).clone() for k in file if k != "single_blocks.0.linear2.bias"}
    save_file(tensors, str(tmp_path / "cut.safetensors"))
    assert main(["inspect", str(tmp_path / "cut.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "1 missing key(s): single_blocks.0.linear2.bias" in out


def test_convert_to_a_diffusers_folder_and_back_is_bit_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = variant_model("flux-depth", "medium", seed=7)
    source = original_file(tmp_path / "depth.safetensors", model, prefix="model.diffusion_model.",
                           dtype=torch.bfloat16)
    folder = tmp_path / "depth-diffusers"
    assert main(["convert", str(source), str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no progress bar when stderr is not a terminal
    assert f"wrote flux-depth diffusers layout: {len(model.state_dict())} tensors" in captured.out

    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert (config["in_channels"], config["out_channels"], config["num_layers"]) == (128, 64, 3)
    loaded = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key].to(torch.bfloat16)), key
    assert read_header(folder / "diffusion_pytorch_model.safetensors").tensors[
        "transformer_blocks.0.attn.to_q.weight"].dtype == torch.bfloat16  # dtypes kept

    back = tmp_path / "back.safetensors"
    assert main(["convert", str(folder), str(back), "--prefix", "model.diffusion_model."]) == 0
    assert_same_file_tensors(source, back)


def test_convert_writes_shards_and_refuses_to_overwrite(tmp_path: Path) -> None:
    model = variant_model("flux-schnell", "medium", seed=1)
    source = original_file(tmp_path / "schnell.safetensors", model)
    folder = tmp_path / "sharded"
    done = convert(FluxTransformer2DModel, source, folder, max_shard_size="200KB")
    assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("*-of-*.safetensors"))) > 1
    assert done.variant == "flux-schnell" and done.layout == "diffusers"
    loaded = FluxTransformer2DModel.from_pretrained(folder)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    with pytest.raises(CheckpointError, match="already holds"):
        convert(FluxTransformer2DModel, source, folder)
    convert(FluxTransformer2DModel, source, folder, overwrite=True)
    assert not (folder / INDEX_NAME).exists()  # the stale shards went too
    assert list(folder.glob("*-of-*.safetensors")) == []

    back = tmp_path / "back.safetensors"
    convert(FluxTransformer2DModel, folder, back)
    assert_same_file_tensors(source, back)
    with pytest.raises(CheckpointError, match="already exists"):
        convert(FluxTransformer2DModel, folder, back)


def test_convert_can_cast_and_reprefix_within_the_original_layout(tmp_path: Path) -> None:
    model = variant_model("flux-dev", "small")
    source = original_file(tmp_path / "dev.safetensors", model, prefix="diffusion_model.")
    target = tmp_path / "dev-fp8.safetensors"
    convert(FluxTransformer2DModel, source, target, to="original", torch_dtype=torch.float8_e4m3fn,
            prefix="model.diffusion_model.")
    header = read_header(target)
    assert all(k.startswith("model.diffusion_model.") for k in header.tensors)
    assert {info.dtype for info in header.tensors.values()} == {torch.float8_e4m3fn}
    assert_same_file_tensors(
        original_file(tmp_path / "ref.safetensors", model, prefix="model.diffusion_model.",
                      dtype=torch.float8_e4m3fn),
        target,
    )


def test_convert_reports_bad_input_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = original_file(tmp_path / "dev.safetensors", variant_model("flux-dev", "small"))
    assert main(["convert", str(source), str(tmp_path / "out"), "--variant", "flux-fill"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffcaps convert: ") and "asked for Flux variant 'flux-fill'" in err
    assert not (tmp_path / "out").exists()


def test_convert_to_an_unwritable_target_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = original_file(tmp_path / "dev.safetensors", variant_model("flux-dev", "small"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["convert", str(source), str(blocker / "sub" / "folder")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"diffcaps convert: {blocker}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_convert_with_a_model_that_has_no_weight_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = original_file(tmp_path / "dev.safetensors", variant_model("flux-dev", "small"))
    assert main(["convert", str(source), str(tmp_path / "out"), "--model", "tests.custom_model:TinyDiT"]) == 1
    err = capsys.readouterr().err
    assert err == ("diffcaps convert: TinyDiT does not support 'weight_mapping': its capabilities declare no "
                   "weight_mapping service (see TinyDiT.metadata())\n")


def test_convert_runs_as_a_module_with_the_model_loadable_after(tmp_path: Path) -> None:
    model = variant_model("flux-dev", "small", seed=3)
    source = original_file(tmp_path / "dev.safetensors", model)
    result = subprocess.run(
        [sys.executable, "-m", "diffcaps", "convert", str(source), str(tmp_path / "folder")],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "folder")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert load_single_file(FluxTransformer2DModel, source).config == loaded.config


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    terminal = _Terminal()
    with ProgressBar("converting", stream=terminal) as bar:
        bar(5 * 10**8, 10**9)
        bar(10**9, 10**9)
    assert terminal.getvalue().endswith("\rconverting [" + "#" * 30 + "] 100%  1.00 GB / 1.00 GB\n")
    assert "50%  0.50 GB / 1.00 GB" in terminal.getvalue()
    plain = io.StringIO()
    with ProgressBar("converting", stream=plain) as bar:
        bar(1, 2)
        bar(2, 2)
    assert plain.getvalue() == ""


def _fail_after(monkeypatch: pytest.MonkeyPatch, tensors: int) -> None:
    import diffcaps.io._streaming as streaming

    original = streaming._write_tensor
    count = 0

    def failing(*args: Any) -> None:
        nonlocal count
        count += 1
        if count > tensors:
            raise OSError(28, "No space left on device")
        original(*args)

    monkeypatch.setattr(streaming, "_write_tensor", failing)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_convert_force_keeps_the_old_folder_until_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old_model, new_model = variant_model("flux-dev", "small", seed=1), variant_model("flux-dev", "small", seed=2)
    folder = tmp_path / "out"
    convert(FluxTransformer2DModel, original_file(tmp_path / "old.safetensors", old_model), folder,
            max_shard_size="100KB")
    assert (folder / INDEX_NAME).is_file()
    (folder / "README.md").write_text("notes\n")
    before = _contents(folder)
    source = original_file(tmp_path / "new.safetensors", new_model)

    _fail_after(monkeypatch, 7)
    assert main(["convert", str(source), str(folder), "--force"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    assert _contents(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.safetensors", "old.safetensors", "out"]
    loaded = FluxTransformer2DModel.from_pretrained(folder)
    assert all(torch.equal(v, old_model.state_dict()[k]) for k, v in loaded.state_dict().items())

    done = convert(FluxTransformer2DModel, source, folder, overwrite=True)
    assert done.files == (folder / "diffusion_pytorch_model.safetensors", folder / "config.json")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "diffusion_pytorch_model.safetensors"]
    loaded = FluxTransformer2DModel.from_pretrained(folder)
    assert all(torch.equal(v, new_model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_convert_force_keeps_the_old_file_until_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "folder"
    seeded_model(variant_model("flux-dev", "small").config, seed=5).save_pretrained(folder)
    target = original_file(tmp_path / "old.safetensors", variant_model("flux-dev", "small", seed=1))
    before = target.read_bytes()
    _fail_after(monkeypatch, 3)
    with pytest.raises(OSError, match="No space left"):
        convert(FluxTransformer2DModel, folder, target, overwrite=True)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "old.safetensors"]
    convert(FluxTransformer2DModel, folder, target, overwrite=True)
    converted, saved = load_single_file(FluxTransformer2DModel, target), FluxTransformer2DModel.from_pretrained(folder)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in converted.state_dict().items())
