"""Fuzzing the adapter loaders: any LoRA or IP-Adapter file either loads or fails with a ``diffcaps.errors``
exception, and a failure leaves the model exactly as it was.

Each example starts from a real file layout (kohya, ComfyUI, diffusers/PEFT, OneTrainer, XLabs,
BFL control, fal Kontext, LyCORIS LoKr/LoHa, XLabs IP-Adapter), written by the test helpers
the way each trainer writes it, and mutates it: keys dropped, renamed or forged (block
indices, suffixes, prefixes), shapes, dtypes, NaN/Inf values, alphas, the
``lora_adapter_metadata`` header entry (random JSON and peft-config fields), the adapter name,
and the bytes of the safetensors header (LoRA and IP-Adapter files). A load that succeeds is undone with ``unload``,
which must also restore the model exactly.

Bounded for the suite; ``DIFFCAPS_FUZZ_EXAMPLES=2000`` (say) runs a longer, random search.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from diffcaps import ip_adapter, lora
from diffcaps.errors import DiffcapsError
from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, seeded_model
from tests.ip_adapter.xlabs import state_hash, xlabs_tensors
from tests.lora._check import fingerprint
from tests.lora._files import (
    bfl_control_file,
    bfl_modules,
    diffusers_style,
    fal_kontext_file,
    kohya_style,
    loha_file,
    lokr_file,
    xlabs_file,
)

_LONG: Final = "DIFFCAPS_FUZZ_EXAMPLES" in os.environ
EXAMPLES: Final = int(os.environ.get("DIFFCAPS_FUZZ_EXAMPLES", "0"))


def _fuzz(examples: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, deadline=None, database=None, derandomize=not _LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_MODEL: Final = seeded_model(TINY)
"""One model for every example: each example must leave it as it found it (that is what is tested)."""


def _flat(prefix: str) -> Callable[[str], str]:
    return lambda name: prefix + name.replace(".", "_")


_BFL = bfl_modules(2, 2)
_SOME_BFL = {n: _BFL[n] for n in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                                  "final_layer.adaLN_modulation.1", "txt_in", "double_blocks.1.img_mlp.2")}
_SOME_PATHS = {p: [p] for p in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "proj_out")}

LAYOUTS: Final[dict[str, Callable[[FluxTransformer2DModel], dict[str, Tensor]]]] = {
    "kohya": lambda m: kohya_style(m, seed=1, key=_flat("lora_unet_")).tensors,
    "comfyui": lambda m: kohya_style(m, seed=2, key=lambda b: f"diffusion_model.{b}", down="lora_A",
                                     up="lora_B", alpha=False).tensors,
    "diffusers": lambda m: diffusers_style(m, seed=3, key=lambda p: f"transformer.{p}", alpha_every=3).tensors,
    "onetrainer": lambda m: diffusers_style(m, seed=4, key=_flat("lora_transformer_"), down="lora_down",
                                            up="lora_up", alpha_every=1).tensors,
    "xlabs": lambda m: xlabs_file(m, seed=5, doubles=[0, 1], singles=[0, 1]).tensors,
    "bfl-control": lambda m: bfl_control_file(m, seed=6, in_channels=2 * TINY.in_channels).tensors,
    "fal-kontext": lambda m: fal_kontext_file(m, seed=7).tensors,
    "lokr": lambda m: lokr_file(m, seed=8, key=_flat("lora_unet_"), modules=_SOME_BFL, decompose=True,
                                w1_rows={"double_blocks.0.img_attn.qkv": 3}).tensors,
    "loha": lambda m: loha_file(m, seed=9, key=_flat("lora_transformer_"), modules=_SOME_PATHS).tensors,
}
_FILES: Final = {name: make(_MODEL) for name, make in LAYOUTS.items()}


def _module_of(key: str) -> str:
    # a file's module name: ``….lora_A.weight`` / ``….lora_B.bias`` / ``….down.weight`` less two parts, others one
    return key.rsplit(".", 2 if key.endswith((".weight", ".bias")) else 1)[0]


def _modules(tensors: dict[str, Tensor]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for key in tensors:
        grouped.setdefault(_module_of(key), []).append(key)
    return grouped


_MODULES: Final = {name: _modules(tensors) for name, tensors in _FILES.items()}

DTYPES: Final = (torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32,
                 torch.int8, torch.uint8, torch.bool)
SUFFIXES: Final = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha",
                   ".lora_B.bias", ".diff", ".diff_b", ".set_weight", ".scale", ".weight", ".lokr_w1",
                   ".lokr_w2_a", ".hada_w1_a", ".dora_scale", ".down.weight", "")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
peft_fields = st.fixed_dictionaries({}, optional={
    "transformer.lora_alpha": json_values,
    "transformer.alpha_pattern": st.dictionaries(st.sampled_from(["to_q", "(", "proj_out", ".*", "[a-", "x)"]),
                                                 json_values, max_size=3) | json_values,
    "transformer.use_rslora": json_values,
    "transformer.r": json_values,
    "lora_alpha": json_values,
})


def _rename(key: str, draw: st.DrawFn) -> str:
    how = draw(st.sampled_from(["index", "suffix", "prefix", "text"]))
    if how == "index":
        digits = [i for i, c in enumerate(key) if c.isdigit()]
        if digits:
            i = draw(st.sampled_from(digits))
            return key[:i] + str(draw(st.integers(0, 10**7))) + key[i + 1:]
    if how == "suffix":
        stem = key.rsplit(".", 2)[0] if key.count(".") >= 2 else key
        return stem + draw(st.sampled_from(SUFFIXES))
    if how == "prefix":
        return draw(st.sampled_from(["", "transformer.", "lora_unet_", "base_model.model.", "lora_te1_",
                                     "diffusion_model.", "text_encoder."])) + key.split(".", 1)[-1]
    return draw(st.text(min_size=0, max_size=20))


def _reshaped(tensor: Tensor, draw: st.DrawFn) -> Tensor:
    shape = draw(st.lists(st.integers(0, 40), max_size=3))
    return torch.randn(shape) * 0.1 if tensor.is_floating_point() else torch.zeros(shape, dtype=tensor.dtype)


def _poisoned(tensor: Tensor, draw: st.DrawFn) -> Tensor:
    out = tensor.clone().float()
    if out.numel():
        out.view(-1)[draw(st.integers(0, out.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf,
                                                                                   1e38, -0.0]))
    return out


@st.composite
def lora_files(draw: st.DrawFn) -> tuple[str, dict[str, Tensor], dict[str, str] | None]:
    """A real layout with random mutations, and header metadata (or none)."""
    layout = draw(st.sampled_from(sorted(_FILES)))
    modules = _MODULES[layout]
    kept = draw(st.lists(st.sampled_from(sorted(modules)), min_size=1, max_size=4, unique=True))
    tensors = {k: _FILES[layout][k] for module in kept for k in modules[module]}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(tensors)))
        op = draw(st.sampled_from(["rename", "add", "shape", "dtype", "poison", "alpha", "drop", "none"]))
        value = tensors[key]
        if op == "rename":
            tensors[_rename(key, draw)] = tensors.pop(key)
        elif op == "add":
            tensors[_rename(key, draw)] = value
        elif op == "shape":
            tensors[key] = _reshaped(value, draw)
        elif op == "dtype":
            tensors[key] = value.to(draw(st.sampled_from(DTYPES)))
        elif op == "poison":
            tensors[key] = _poisoned(value, draw)
        elif op == "alpha":
            stem = key.rsplit(".", 2)[0] if key.count(".") >= 2 else key
            tensors[stem + ".alpha"] = draw(st.sampled_from([
                torch.tensor([4.0, 5.0]), torch.tensor(0.0), torch.tensor(-3.0), torch.tensor(7, dtype=torch.int64),
                torch.tensor(True), torch.zeros(0), torch.tensor(1e30)]))
        elif op == "drop" and len(tensors) > 1:
            del tensors[key]
    metadata = None
    choice = draw(st.sampled_from(["none", "none", "none", "fields", "fields", "json", "text"]))
    if choice == "fields":
        metadata = {"lora_adapter_metadata": json.dumps(draw(peft_fields))}
    elif choice == "json":
        metadata = {"lora_adapter_metadata": json.dumps(draw(json_values))}
    elif choice == "text":
        metadata = {"lora_adapter_metadata": draw(st.text(max_size=30))}
    return layout, tensors, metadata


adapter_names = st.one_of(st.just("default"), st.just("default"), st.just("style"), st.text(max_size=6),
                          st.integers() | st.none())
"""Mostly valid names, so that most examples reach the file."""


def _loads_or_fails_cleanly(model: torch.nn.Module, load: Callable[[], object], undo: Callable[[], None],
                            hashed: Callable[[torch.nn.Module], str]) -> bool:
    before = hashed(model)
    try:
        load()
    except DiffcapsError:
        assert hashed(model) == before, "a failed load changed the model"
        return False
    undo()
    assert hashed(model) == before, "unloading a successful load did not restore the model"
    return True


def _lora_load(path: Path | dict[str, Tensor], name: object) -> Callable[[], object]:
    def load() -> object:
        return lora.load_adapter(_MODEL, path, adapter_name=name)  # type: ignore[arg-type]

    return load


def _lora_undo() -> None:
    lora.unload(_MODEL)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapter-fuzz")


@_fuzz(120)
@given(lora_files(), adapter_names, st.booleans())
def test_lora_files_load_or_fail_with_a_diffcaps_error(scratch: Path, case: tuple[str, dict[str, Tensor],
                                                       dict[str, str] | None], name: object, as_file: bool) -> None:
    _, tensors, metadata = case
    source: Path | dict[str, Tensor] = tensors
    if as_file or metadata is not None:
        source = scratch / "lora.safetensors"
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, source, metadata=metadata)
    _loads_or_fails_cleanly(_MODEL, _lora_load(source, name), _lora_undo, fingerprint)


def _file_bytes(tensors: dict[str, Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)
        return path.read_bytes()


_IP_BASE: Final = xlabs_tensors(TINY, seed=1)
_BYTES: Final = {**{name: _file_bytes(tensors) for name, tensors in _FILES.items()},
                 "ip-adapter": _file_bytes(_IP_BASE)}


@st.composite
def corrupted_headers(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real LoRA or IP-Adapter file with its header edited: offsets, dtypes, shapes, metadata, lengths, bytes."""
    layout = draw(st.sampled_from(sorted(_BYTES)))
    data = _BYTES[layout]
    (length,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8:8 + length])
    body = data[8 + length:]
    how = draw(st.sampled_from(["entry", "metadata", "length", "flip", "truncate"]))
    if how == "entry":
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = draw(json_values | st.lists(st.integers(-3, 2**40), max_size=3)
                                  | st.sampled_from(["F32", "F16", "I8", "BOOL", "F8_E4M3", "C64", "x"]))
    elif how == "metadata":
        header["__metadata__"] = draw(json_values)
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text)) + text + body
    if how == "length":
        raw = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif how == "flip":
        at = draw(st.integers(0, len(text) + 7))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    elif how == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    return layout, raw


@_fuzz(60)
@given(corrupted_headers())
def test_corrupted_headers_fail_with_a_diffcaps_error(scratch: Path, case: tuple[str, bytes]) -> None:
    layout, raw = case
    path = scratch / "corrupt.safetensors"
    path.write_bytes(raw)
    if layout == "ip-adapter":
        _loads_or_fails_cleanly(_MODEL, lambda: ip_adapter.load(_MODEL, path), _ip_undo, state_hash)
    else:
        _loads_or_fails_cleanly(_MODEL, _lora_load(path, "default"), _lora_undo, fingerprint)


@st.composite
def ip_adapter_files(draw: st.DrawFn) -> dict[str, Tensor]:
    """The XLabs IP-Adapter layout with random mutations."""
    tensors = dict(_IP_BASE)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(tensors)))
        op = draw(st.sampled_from(["rename", "add", "shape", "dtype", "poison", "drop"]))
        if op == "rename":
            tensors[_rename(key, draw)] = tensors.pop(key)
        elif op == "add":
            tensors[_rename(key, draw)] = tensors[key]
        elif op == "shape":
            tensors[key] = _reshaped(tensors[key], draw)
        elif op == "dtype":
            tensors[key] = tensors[key].to(draw(st.sampled_from(DTYPES)))
        elif op == "poison":
            tensors[key] = _poisoned(tensors[key], draw)
        elif len(tensors) > 1:
            del tensors[key]
    return tensors


def _ip_undo() -> None:
    ip_adapter.unload(_MODEL)


@_fuzz(80)
@given(ip_adapter_files(), adapter_names, st.booleans())
def test_ip_adapter_files_load_or_fail_with_a_diffcaps_error(scratch: Path, tensors: dict[str, Tensor],
                                                             name: object, as_file: bool) -> None:
    source: Path | dict[str, Tensor] = tensors
    if as_file:
        source = scratch / "ip.safetensors"
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, source)

    def load() -> None:
        ip_adapter.load(_MODEL, source, adapter_name=name)  # type: ignore[arg-type]

    _loads_or_fails_cleanly(_MODEL, load, _ip_undo, state_hash)
