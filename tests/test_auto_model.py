"""``AutoModel`` and ``register_model``: one registry for folders, single files, user models and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffcaps import AutoModel, Model, register_model
from diffcaps.cli import main
from diffcaps.errors import CheckpointError, ConfigError, ModelRegistrationError, UnknownModelError, UntrustedCodeError
from diffcaps.models import model_class, model_for_class_name, model_names
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from tests.custom_model import TinyDiT, seeded_tiny_dit


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with only the built-in models and no installed entry points."""
    monkeypatch.setattr("diffcaps.models._registered", {})
    monkeypatch.setattr("diffcaps.models._entry_points_loaded", False)
    monkeypatch.setattr("diffcaps.models.entry_points", lambda group: [])
    yield


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_flux_folder_loads_as_flux(tmp_path: Path) -> None:
    from tests.flux_fixtures import save_tiny_folder

    original = save_tiny_folder(tmp_path / "flux")
    loaded = AutoModel.from_pretrained(tmp_path / "flux", torch_dtype=torch.float32)
    assert type(loaded) is FluxTransformer2DModel
    _same_state(original, loaded)


def test_a_wan_pipeline_folder_loads_its_transformer(tmp_path: Path) -> None:
    from tests.wan_fixtures import T2V, seeded_model

    original = seeded_model(T2V, seed=2)
    original.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = AutoModel.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is WanTransformer3DModel
    _same_state(original, loaded)


def test_a_single_file_is_recognised_from_its_key_layout(tmp_path: Path) -> None:
    from diffcaps.weights import load_single_file, save_single_file
    from tests.models.wan._files import VARIANTS, seeded_model

    path = save_single_file(seeded_model(VARIANTS["wan-t2v"], seed=5), tmp_path / "wan.safetensors",
                            prefix="model.diffusion_model.")
    assert AutoModel.model_class(path) is WanTransformer3DModel
    loaded = AutoModel.from_pretrained(path)
    assert type(loaded) is WanTransformer3DModel
    _same_state(load_single_file(WanTransformer3DModel, path), loaded)

    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: is no known model's checkpoint \(.*FluxTransformer2DModel"):
        AutoModel.from_pretrained(other)


def test_an_unknown_class_name_lists_what_is_registered(tmp_path: Path) -> None:
    register_model(TinyDiT)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UnknownModelError) as caught:
        AutoModel.from_pretrained(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: _class_name 'UNet2DConditionModel' is no known model's")
    assert "flux (FluxTransformer2DModel), tinydit (TinyDiT), wan (WanTransformer3DModel)" in message


def test_a_registered_model_loads_by_its_class_name(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="'TinyDiT' is no known model's"):
        model_for_class_name("TinyDiT")
    assert register_model(TinyDiT) is TinyDiT
    assert register_model(TinyDiT) is TinyDiT  # the same class again changes nothing
    assert model_names() == ["flux", "tinydit", "wan"]
    assert model_class("tinydit") is TinyDiT and model_class("TinyDiT") is TinyDiT
    original = seeded_tiny_dit(3)
    original.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is TinyDiT
    _same_state(original, loaded)


def test_registering_a_non_model_or_a_taken_name_is_refused() -> None:
    with pytest.raises(ModelRegistrationError, match="takes a diffcaps Model subclass, got <class 'int'>"):
        register_model(int)  # type: ignore[type-var]
    with pytest.raises(ModelRegistrationError, match="the name 'flux' is taken by the model 'flux'"):
        register_model(TinyDiT, name="flux")

    class Other(Model):
        pass

    with pytest.raises(ModelRegistrationError, match="the name 'FluxTransformer2DModel' is taken by the model 'flux'"):
        register_model(FluxTransformer2DModel, name="myflux")
    register_model(TinyDiT)
    with pytest.raises(ModelRegistrationError, match="the name 'tinydit' is taken by the model 'tinydit'"):
        register_model(Other, name="tinydit")
    assert model_names() == ["flux", "tinydit", "wan"]


def test_entry_points_are_loaded_on_the_first_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake(group: str) -> list[EntryPoint]:
        calls.append(group)
        return [EntryPoint(name="tiny", value="tests.custom_model:TinyDiT", group=group)]

    monkeypatch.setattr("diffcaps.models.entry_points", fake)
    assert calls == []
    assert model_class("tiny") is TinyDiT
    assert model_class("TinyDiT") is TinyDiT
    assert model_names() == ["flux", "tiny", "wan"]
    assert calls == ["diffcaps.models"]


def test_an_entry_point_that_is_not_a_model_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("diffcaps.models.entry_points", lambda group: [
        EntryPoint(name="broken", value="diffcaps.errors:DiffcapsError", group=group)])
    with pytest.raises(ModelRegistrationError, match="entry point 'broken' = 'diffcaps.errors:DiffcapsError' in group "
                                                      "'diffcaps.models' is not a diffcaps Model subclass"):
        model_names()


_SHIPPED = '''
from pathlib import Path
from typing import ClassVar

import attrs
import torch

from diffcaps import Model, ModelConfig

Path(__file__).with_name("executed").touch()


@attrs.frozen(kw_only=True)
class ShippedConfig(ModelConfig):
    class_name: ClassVar[str] = "ShippedModel"
    width: int = 4


class ShippedModel(Model[ShippedConfig]):
    def __init__(self, config: ShippedConfig) -> None:
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
'''


def _shipped_folder(path: Path) -> dict[str, torch.Tensor]:
    path.mkdir()
    (path / "my_model.py").write_text(_SHIPPED)
    (path / "config.json").write_text(json.dumps(
        {"_class_name": "ShippedModel", "_diffcaps_module": "my_model.py", "width": 3}))
    torch.manual_seed(0)
    state = {"proj.weight": torch.randn(3, 3), "proj.bias": torch.randn(3)}
    save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    return state


def test_shipped_model_code_runs_only_when_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "shipped"
    state = _shipped_folder(folder)
    with pytest.raises(UntrustedCodeError) as caught:
        AutoModel.from_pretrained(folder)
    assert str(caught.value).startswith(
        f"{folder / 'config.json'}: this folder ships its own model code; loading it would execute "
        f"{(folder / 'my_model.py').resolve()} (class ShippedModel)")
    assert not (folder / "executed").exists()

    model = AutoModel.from_pretrained(folder, trust_code=True)
    assert (folder / "executed").exists()
    assert type(model).__name__ == "ShippedModel" and isinstance(model, Model)
    assert dict(model.state_dict()).keys() == state.keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert "ShippedModel" not in model_names()  # loading shipped code registers nothing


def test_shipped_code_must_be_a_file_inside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "shipped"
    _shipped_folder(folder)
    (tmp_path / "outside.py").write_text("raise SystemExit('must not run')\n")
    (folder / "config.json").write_text(json.dumps({"_class_name": "ShippedModel", "_diffcaps_module": "../outside.py"}))
    with pytest.raises(ConfigError, match=r"_diffcaps_module '\.\./outside\.py' is not a file directly inside"):
        AutoModel.from_pretrained(folder, trust_code=True)


def test_describe_and_demo_take_a_registered_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["describe", "tinydit"]) == 1
    assert "unknown model 'tinydit'" in capsys.readouterr().err
    register_model(TinyDiT)
    assert main(["describe", "tinydit"]) == 0
    assert capsys.readouterr().out.strip() == TinyDiT.metadata().describe()
    assert main(["demo", "--model", "tinydit", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "reloaded model has the original's" in out and out.count(": yes") == 1
    assert type(AutoModel.from_pretrained(tmp_path / "demo")) is TinyDiT
