"""``python -m diffcaps generate`` end to end on a tiny seeded FluxPipeline folder built here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.GifImagePlugin import GifImageFile

from diffcaps import AutoModel, cache, lora
from diffcaps.cli import main
from diffcaps.errors import GenerateError
from diffcaps.interop.diffusers import generate as run, tiny_flux_pipeline_folder, tiny_wan_pipeline_folder, wrap
from diffcaps.io import save_safetensors
from diffcaps.protocols import supports_lora

_TEXT_TOKENS = 32
_BASE = ["--prompt", "a photo of a red cat", "--size", "32x32", "--steps", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_flux_pipeline_folder(tmp_path_factory.mktemp("pipeline") / "tiny-flux", text_tokens=_TEXT_TOKENS)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers/PEFT LoRA (rank 4) on every attention query and key of the tiny transformer."""
    generator = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for block in ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                  "single_transformer_blocks.1"):
        for projection in ("to_q", "to_k"):
            key = f"transformer.{block}.attn.{projection}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 32, generator=generator) * 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(32, 4, generator=generator) * 0.5
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_safetensors(tensors, path)
    return path


def _generate(folder: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    status = main(["generate", str(folder), *_BASE, "--out", str(out), *extra])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _pixels(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_the_same_png_for_the_same_seed(folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    status, out, err = _generate(folder, first, capsys)
    assert status == 0, err
    assert _generate(folder, second, capsys)[0] == 0
    assert _generate(folder, other, capsys, "--seed", "1")[0] == 0

    with Image.open(first) as image:
        assert (image.format, image.size) == ("PNG", (32, 32))
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(other)
    assert "pipeline: FluxPipeline with diffcaps FluxTransformer2DModel on cpu" in out
    assert "no diffcaps features switched on" in out
    assert "3 steps in" in out and "peak memory:" in out and f"wrote {first}" in out
    # not a terminal: one progress line per step
    assert [line.split()[:2] for line in err.splitlines() if line.startswith("step")] == [
        ["step", "1/3"], ["step", "2/3"], ["step", "3/3"]]


def test_lora_changes_the_image_exactly_as_diffcaps_lora_in_a_pipeline(
    folder: Path, lora_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert _generate(folder, plain, capsys)[0] == 0
    status, out, err = _generate(folder, styled, capsys, "--lora", f"{lora_file}:0.7")
    assert status == 0, err
    assert "LoRA style.safetensors (diffusers, 8 layers) as 'style' × 0.7" in out

    # The same thing in process: diffcaps model + diffcaps.lora, handed to diffusers' pipeline.
    loaded = AutoModel.from_pretrained(folder / "transformer")
    model = loaded
    assert supports_lora(model)  # narrows model (not loaded) to what diffcaps.lora takes
    lora.load_adapter(model, lora_file, adapter_name="style")
    lora.set_adapters(model, ["style"], [0.7])
    pipe: Any = FluxPipeline.from_pretrained(folder, transformer=wrap(loaded))
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        expected = pipe("a photo of a red cat", width=32, height=32, num_inference_steps=3,
                        max_sequence_length=_TEXT_TOKENS, generator=torch.Generator().manual_seed(0)).images[0]

    assert not np.array_equal(_pixels(styled), _pixels(plain))
    assert np.array_equal(_pixels(styled), np.asarray(expected.convert("RGB")))


def test_first_block_cache_prints_its_skips(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _generate(folder, tmp_path / "cached.png", capsys, "--steps", "6", "--cache", "first_block:0.3")
    assert status == 0, err
    assert "cache: FirstBlockCacheConfig(threshold=0.3)" in out
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.strip().startswith("cond ")}
    assert set(rows) == {"transformer_blocks", "single_transformer_blocks"}
    computed, skipped = int(rows["transformer_blocks"][0]), int(rows["transformer_blocks"][2])
    assert computed + skipped == 6 and skipped > 0
    assert f"cache skipped {2 * skipped} of 12 decisions" in out


def test_offload_gives_the_same_image_and_bf16_a_close_one(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, offloaded, half = tmp_path / "plain.png", tmp_path / "offloaded.png", tmp_path / "bf16.png"
    assert _generate(folder, plain, capsys)[0] == 0
    status, out, err = _generate(folder, offloaded, capsys, "--offload", "block")
    assert status == 0, err
    assert "group offloading: block_level to cpu, onload to cpu" in out
    assert np.array_equal(_pixels(offloaded), _pixels(plain))

    status, out, err = _generate(folder, half, capsys, "--dtype", "bf16")
    assert status == 0, err
    difference = np.abs(_pixels(half).astype(np.int16) - _pixels(plain).astype(np.int16))
    assert 0 < difference.max() and difference.mean() < 8


def test_negative_prompt_runs_true_cfg_on_flux(folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    plain, negative, scale_one = tmp_path / "plain.png", tmp_path / "negative.png", tmp_path / "one.png"
    assert _generate(folder, plain, capsys)[0] == 0
    assert _generate(folder, negative, capsys, "--negative-prompt", "a blue dog")[0] == 0
    assert _generate(folder, scale_one, capsys, "--negative-prompt", "a blue dog", "--true-cfg", "1")[0] == 0
    assert not np.array_equal(_pixels(negative), _pixels(plain))  # true CFG at the default scale 4
    assert np.array_equal(_pixels(scale_one), _pixels(plain))  # FluxPipeline runs true CFG only above 1


def test_fp8_casting_and_gif(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _generate(folder, tmp_path / "cast.gif", capsys, "--casting", "fp8")
    assert status == 0, err
    assert "layerwise casting:" in out and "stored as torch.float8_e4m3fn" in out
    with Image.open(tmp_path / "cast.gif") as image:
        assert (image.format, image.size) == ("GIF", (32, 32))


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_wan_pipeline_folder(tmp_path_factory.mktemp("pipeline") / "tiny-wan", text_tokens=_TEXT_TOKENS)


def test_video_pipeline_writes_frames(wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gif = tmp_path / "video.gif"
    status, out, err = _generate(wan_folder, gif, capsys, "--frames", "5", "--negative-prompt", "a dog")
    assert status == 0, err
    assert "pipeline: WanPipeline with diffcaps WanTransformer3DModel on cpu" in out
    with Image.open(gif) as image:
        assert isinstance(image, GifImageFile)
        assert (image.size, image.n_frames) == ((32, 32), 5)
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
    assert any(not np.array_equal(frames[0], frame) for frame in frames[1:])

    # .png is refused for a video; .mp4 is written when a video writer is installed, else named
    status = main(["generate", str(wan_folder), *_BASE, "--frames", "5", "--out", str(tmp_path / "video.png")])
    assert status == 1 and "WanPipeline makes videos; write .gif or .mp4" in capsys.readouterr().err


def test_video_pipeline_writes_mp4(wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imageio = pytest.importorskip("imageio.v3")  # the dev extra installs it (diffcaps[video])
    pytest.importorskip("imageio_ffmpeg")
    gif, mp4 = tmp_path / "video.gif", tmp_path / "video.mp4"
    for target in (gif, mp4):
        status, _, err = _generate(wan_folder, target, capsys, "--frames", "5")
        assert status == 0, err
    frames = np.asarray(imageio.imread(mp4, index=None)).astype(np.int16)
    assert frames.shape == (5, 32, 32, 3)
    with Image.open(gif) as image:
        shown = []
        for index in (0, 2):
            image.seek(index)
            shown.append(np.asarray(image.convert("RGB")).astype(np.int16))
    # the GIF's frames through a lossy codec: each mp4 frame is near its own GIF frame, not another
    own, other = np.abs(frames[2] - shown[1]).mean(), np.abs(frames[2] - shown[0]).mean()
    assert own < 12 and own < other


def test_mp4_without_a_writer_is_one_line(wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "mp4_writer_installed", lambda: False)
    mp4 = tmp_path / "video.mp4"
    status, _, err = _generate(wan_folder, mp4, capsys, "--frames", "5")
    assert status == 1 and not mp4.exists()
    assert err.count("\n") == 1 and 'pip install "diffcaps[video]"' in err


def _bad_lora(tmp_path: Path) -> Path:
    path = tmp_path / "other.safetensors"
    save_safetensors({"transformer.no_such_layer.lora_A.weight": torch.zeros(4, 32),
                      "transformer.no_such_layer.lora_B.weight": torch.zeros(32, 4)}, path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing folder", "no such pipeline folder"),
        ("not a pipeline", "not a diffusers pipeline folder (no model_index.json)"),
        ("bad size", "argument --size: size must be WIDTHxHEIGHT with positive numbers, e.g. 512x512; got '32by32'"),
        ("unknown cache", "argument --cache: unknown cache 'teacache'; known caches: first_block, pab, taylorseer"),
        ("bad offload", "argument --offload: offload must be block, leaf or disk:PATH; got 'gpu'"),
        ("frames for an image pipeline", "--frames: FluxPipeline makes images, not videos"),
        ("mp4 from an image pipeline", "FluxPipeline makes images; write .png or .gif"),
        ("no output folder", "the folder"),
        ("unknown suffix", "write .png, .gif or .mp4, not '.jpg'"),
        ("missing LoRA file", "--lora: "),
        ("LoRA the model refuses", "other.safetensors"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case: str, message: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"
    where, extra = str(folder), list[str]()
    if case == "missing folder":
        where = str(tmp_path / "nowhere")
    elif case == "not a pipeline":
        where = str(folder / "transformer")
    elif case == "bad size":
        extra = ["--size", "32by32"]
    elif case == "unknown cache":
        extra = ["--cache", "teacache"]
    elif case == "bad offload":
        extra = ["--offload", "gpu"]
    elif case == "frames for an image pipeline":
        extra = ["--frames", "9"]
    elif case == "mp4 from an image pipeline":
        out = tmp_path / "out.mp4"
    elif case == "no output folder":
        out = tmp_path / "missing" / "out.png"
    elif case == "unknown suffix":
        out = tmp_path / "out.jpg"
    elif case == "missing LoRA file":
        extra = ["--lora", str(tmp_path / "absent.safetensors")]
    else:
        extra = ["--lora", str(_bad_lora(tmp_path))]
    status = main(["generate", where, *_BASE, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 1
    assert message in err
    assert err.startswith("diffcaps") and err.count("\n") == 1
    assert not out.exists()


def test_option_parsers() -> None:
    assert run.size_option("640x360") == (640, 360)
    assert run.lora_option("a/b.safetensors:0.5") == run.LoRAChoice(Path("a/b.safetensors"), 0.5)
    assert run.lora_option("C:/style.safetensors") == run.LoRAChoice(Path("C:/style.safetensors"), 1.0)
    assert run.cache_option("first_block:0.1") == cache.FirstBlockCacheConfig(threshold=0.1)
    assert run.cache_option("taylorseer:3") == cache.TaylorSeerCacheConfig(cache_interval=3)
    config = run.offload_option("disk:/tmp/offload", onload_device="cpu")
    assert (config.offload_type, config.offload_to_disk_path) == ("block_level", Path("/tmp/offload"))
    assert run.casting_option("fp8_e5m2").storage_dtype == torch.float8_e5m2
    with pytest.raises(GenerateError, match="'first_block:-1': .*threshold"):
        run.cache_option("first_block:-1")
    with pytest.raises(GenerateError, match="'x.safetensors:1e': the weight after ':' must be a number"):
        run.lora_option("x.safetensors:1e")


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt", "--negative-prompt", "--true-cfg", "--lora", "--cache", "--offload", "--casting",
                   "--steps", "--guidance", "--size", "--frames", "--fps", "--seed", "--dtype", "--out"):
        assert option in text
