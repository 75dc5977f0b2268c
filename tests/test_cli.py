"""The command line: ``describe`` and ``demo``, run as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffcaps import ModelMetadata
from diffcaps.cli import main
from diffcaps.models.flux import FluxTransformer2DModel


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


def test_describe_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["describe", "sdxl"])
    assert info.value.code == 2
    assert "invalid choice: 'sdxl'" in capsys.readouterr().err


def test_demo_saves_loads_and_reproduces(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "diffcaps", "demo", "--output", str(tmp_path / "demo")],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "reloaded model reproduces the original: yes" in result.stdout
    assert "FluxTransformer2DModel capabilities" in result.stdout
    assert (tmp_path / "demo" / "config.json").is_file()
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "demo")
    assert loaded.config.num_single_layers == 4
