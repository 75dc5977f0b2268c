"""How much of diffcaps one LoRA load walks through: few files, the header parsed once."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import diffcaps
from diffcaps import lora
from tests.flux_fixtures import TINY, seeded_model
from tests.lora._files import diffusers_style

_ROOT = Path(diffcaps.__file__).parent
_CORE = {"protocols.py", "model.py", "slots.py", "config.py", "checks.py"}
"""What every feature call visits (``require``, the capabilities property, the state slot, the
argument checks) and ``config.py``, whose ``to_dict`` peft calls while injecting."""


def _visits(call: Any) -> tuple[set[str], Counter[str]]:
    files: set[str] = set()
    functions: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _: object) -> None:
        if event != "call":
            return
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(_ROOT):
            relative = path.relative_to(_ROOT).as_posix()
            files.add(relative)
            functions[f"{relative}:{frame.f_code.co_name}"] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return files, functions


def test_a_diffusers_file_loads_through_six_lora_files(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    path = diffusers_style(model, seed=1, key=lambda p: f"transformer.{p}").save(tmp_path / "a.safetensors")

    files, functions = _visits(lambda: lora.load_adapter(model, path))

    feature = sorted(f for f in files if f.startswith(("lora/", "models/", "weights/")))
    assert len(feature) <= 6, feature
    assert "models/flux/_lora.py" in feature  # the model's table is used, and nothing else of the model folder
    reading = sorted(f for f in files if f.startswith("io/"))
    assert len(reading) <= 2, reading
    # nothing else: the refusal of fused QKV projections asks slots.holding, not the attention package
    assert files - _CORE - set(feature) - set(reading) == set()
    assert len(files) <= 13, sorted(files)  # all of diffcaps: the 6 of the bound, the io reader, the core
    headers = sum(n for name, n in functions.items() if name.startswith("io/") and name.endswith(":read_header"))
    assert headers == 1
