"""``wrap``/``unwrap``: the view a pipeline takes, sharing the model's parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffcaps.errors import InteropError
from diffcaps.interop.diffusers import DiffusersView, unwrap, wrap
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import seeded_tiny_dit
from tests.flux_fixtures import TINY, flux_inputs, seeded_model
from tests.wan_fixtures import T2V
from tests.wan_fixtures import seeded_model as wan_seeded_model


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parents[2])


def test_import_diffcaps_does_not_import_diffusers() -> None:
    result = _run("import sys, diffcaps, diffcaps.interop; print('diffusers' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("package", ["diffusers", "transformers"])
def test_without_diffusers_the_import_says_what_to_install(package: str) -> None:
    result = _run(
        f"import sys; sys.modules[{package!r}] = None\n"
        "from diffcaps.errors import MissingDependencyError\n"
        "try:\n    import diffcaps.interop.diffusers\n"
        "except MissingDependencyError as error:\n    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "diffcaps[diffusers]"' in result.stdout and f"({package} is missing)" in result.stdout


def test_the_view_shares_the_models_parameters() -> None:
    model = seeded_model(TINY)
    view = wrap(model)
    ours = dict(model.named_parameters())
    theirs = dict(view.named_parameters())
    assert len(theirs) == len(ours)
    for name, parameter in ours.items():
        assert theirs[f"model.{name}"].data_ptr() == parameter.data_ptr()
    assert unwrap(view) is model
    assert wrap(view) is view


def test_the_view_reads_like_diffusers_transformer() -> None:
    model = seeded_model(TINY)
    view = wrap(model)
    assert isinstance(view, DiffusersView)
    assert type(view).__name__ == "FluxTransformer2DModel"
    config: Any = view.config  # diffusers' FrozenDict: keys read as attributes too
    assert config.in_channels == TINY.in_channels
    assert config["num_layers"] == TINY.num_layers
    assert view.device == torch.device("cpu")
    assert view.dtype == torch.float32
    model.to(torch.bfloat16)
    assert view.dtype == torch.bfloat16


def test_forward_returns_diffusers_output_or_a_tuple() -> None:
    model = seeded_model(TINY)
    view = wrap(model)
    inputs = flux_inputs(TINY)
    expected = model(**inputs).sample
    output = view(**inputs)
    assert isinstance(output, Transformer2DModelOutput)
    torch.testing.assert_close(output.sample, expected, rtol=0, atol=0)
    as_tuple = view(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected, rtol=0, atol=0)


def test_unwrap_refuses_what_wrap_did_not_make() -> None:
    with pytest.raises(InteropError, match="unwrap takes a view made by diffcaps.interop.diffusers.wrap"):
        unwrap(seeded_model(TINY))
    with pytest.raises(InteropError, match="wrap's model must be a Model"):
        wrap(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_pipelines_record_diffusers_class_where_diffusers_has_one() -> None:
    # what a pipeline writes to model_index.json: (view.__module__ top package, class name)
    flux = wrap(seeded_model(TINY))
    assert (flux.__module__, type(flux).__name__) == ("diffusers", FluxTransformer2DModel.__name__)
    assert type(flux).__module__ == "diffcaps.interop.diffusers._view"
    custom = wrap(seeded_tiny_dit())
    assert (custom.__module__, type(custom).__name__) == ("diffcaps.interop.diffusers._view", "TinyDiT")
    assert type(wrap(seeded_model(TINY))) is type(flux)


def test_dtype_is_the_compute_dtype_not_a_float32_kept_module() -> None:
    # Wan keeps its norms and modulation tables in float32; the pipeline casts latents to view.dtype
    model = wan_seeded_model(T2V).to_dtype(torch.bfloat16)
    assert model.scale_shift_table.dtype == torch.float32
    assert wrap(model).dtype == torch.bfloat16


def test_public_names_are_pinned() -> None:
    # pinned here: tests/test_exported_members.py walks only modules importable without extras
    import diffcaps.interop.diffusers as interop

    assert interop.__all__ == ["ConvertedLoRAWarning", "DiffusersView", "cache_config", "load_lora_weights", "tiny_flux_pipeline_folder",
                               "tiny_wan_pipeline_folder", "unwrap", "wrap"]
