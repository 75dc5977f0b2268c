"""``python -m diffcaps inspect x.gguf`` and ``convert x.gguf folder --dtype …`` (a dequantized diffusers folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcaps.cli import main
from diffcaps.errors import CheckpointError
from diffcaps.io import read_header
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights._gguf_file import GGUFFile, read_gguf
from diffcaps.weights import convert
from tests.quantization.gguf_files import dequantized, flux_gguf, mixed_types, wan_gguf, write_gguf
from tests.quantization.test_gguf_load import FLUX, FLUX_TYPES, WAN, WAN_TYPES


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flux_gguf(tmp_path_factory.mktemp("gguf") / "flux1-dev-mixed.gguf", FLUX, mixed_types(FLUX_TYPES))


def _rows(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["inspect", str(path)]) == 0
    return dict(line.strip().split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])


def test_inspect_recognises_the_checkpoint_and_lists_types_per_class(
    flux_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: GGUFFile, name: str) -> torch.Tensor:
        raise AssertionError(f"inspect read tensor {name}")

    monkeypatch.setattr(GGUFFile, "raw", refuse)
    rows = _rows(flux_file, capsys)
    assert rows["kind"] == "checkpoint" and rows["variant"].startswith("flux-dev")
    assert rows["fit"] == "every tensor has its place in FluxTransformer2DModel"
    assert rows["layers"] == "2 double blocks, 1 single block"
    file = read_gguf(flux_file)
    kinds = [info.kind for info in file.tensors.values()]
    assert rows["quantized"] == f"GGUF, {len(set(kinds))} type(s) by tensor class:"
    assert rows["norms"] == f"F32 ×{sum(1 for n in file.tensors if n.endswith('_norm.scale'))}"
    # every tensor is counted once, in its class
    listed = [part for label in ("MLP", "attention", "biases", "embeddings", "modulation", "norms", "output")
              for part in rows[label].split(", ")]
    assert sum(int(part.split("×")[1]) for part in listed) == len(kinds) == int(rows["tensors"])
    assert "Q4_K" in rows["attention"] + rows["MLP"]
    packed = sum(i.nbytes for i in file.tensors.values() if i.packed and len(i.shape) == 2)
    rest = sum(i.numel for i in file.tensors.values() if not (i.packed and len(i.shape) == 2))
    dense = sum(i.numel for i in file.tensors.values())
    assert rows["memory"] == (f"about {(packed + 2 * rest) / 1e6:.1f} MB loaded packed (quantized matrices as "
                              f"stored, the rest in bfloat16); {2 * dense / 1e6:.1f} MB dense in bfloat16")
    assert rows["metadata"] == "general.architecture=flux"


def test_inspect_groups_tensors_by_the_recognised_models_own_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wan = _rows(wan_gguf(tmp_path / "wan.gguf", WAN, mixed_types(WAN_TYPES)), capsys)
    assert wan["model"].startswith("WanTransformer3DModel")
    assert {"MLP", "attention", "embeddings", "modulation", "norms", "output"} <= set(wan)  # ffn, head., …
    assert "other" not in wan
    # a file no model recognises is still reported, every tensor in one class
    unknown = write_gguf(tmp_path / "unknown.gguf", {"net.weight": torch.randn(8, 32), "net.bias": torch.randn(8)},
                         {"net.weight": "Q8_0", "net.bias": "F32"}, architecture="mine")
    rows = _rows(unknown, capsys)
    assert rows["kind"] == "unknown" and rows["other"] == "Q8_0 ×1" and rows["biases"] == "F32 ×1"


def test_inspect_names_a_broken_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          flux_file: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(flux_file.read_bytes()[:200])
    assert main(["inspect", str(path)]) == 1
    assert "not a readable GGUF file" in capsys.readouterr().err


def test_convert_writes_a_dequantized_diffusers_folder(flux_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bf16"
    assert main(["convert", str(flux_file), str(folder), "--dtype", "bfloat16"]) == 0
    header = read_header(folder / "diffusion_pytorch_model.safetensors")
    assert {info.dtype for info in header.tensors.values()} == {torch.bfloat16}
    mapper = FluxTransformer2DModel.declared_capabilities().weight_mapping
    expected = mapper.convert(dequantized(flux_file), "to_model")
    model = FluxTransformer2DModel.from_pretrained(folder)
    assert model.config.num_layers == 2
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor.to(torch.bfloat16).float()), key
    # without a dtype, quantized tensors decode into float32 and the others keep theirs (F16, BF16, F32)
    report = convert(FluxTransformer2DModel, flux_file, tmp_path / "kept")
    kept = read_header(report.files[0])
    assert {info.dtype for info in kept.tensors.values()} == {torch.float32, torch.float16, torch.bfloat16}
    stored = FluxTransformer2DModel.from_pretrained(tmp_path / "kept").state_dict()
    for key, tensor in expected.items():
        assert torch.equal(stored[key].float(), tensor), key


def test_convert_refuses_an_unsupported_type_before_writing(tmp_path: Path) -> None:
    model = FluxTransformer2DModel.from_config(FLUX)
    mapper = FluxTransformer2DModel.declared_capabilities().weight_mapping
    tensors = mapper.convert(model.state_dict(), "to_original")
    rule = mixed_types(("Q8_0",))
    path = write_gguf(tmp_path / "i8.gguf", tensors,
                      lambda name, shape: "I8" if name == "txt_in.weight" else rule(name, shape), architecture="flux")
    with pytest.raises(CheckpointError, match=r"txt_in.weight \(I8\)"):
        convert(FluxTransformer2DModel, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
