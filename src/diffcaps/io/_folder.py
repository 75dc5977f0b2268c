"""The diffusers folder layout: ``config.json`` beside one safetensors file or a sharded index."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Final, cast

import attrs
import torch

from diffcaps.errors import CheckpointError, ConfigError
from diffcaps.io._safetensors import DuplicateKey, SafetensorsHeader, TensorInfo, read_header, strict_json

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "WeightSource",
    "find_weights",
    "parse_size",
    "read_config",
    "resolve_model_folder",
]

CONFIG_NAME: Final = "config.json"
WEIGHTS_NAME: Final = "diffusion_pytorch_model.safetensors"
INDEX_NAME: Final = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_NAMES: Final = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.pt")
PIPELINE_SUBFOLDER: Final = "transformer"


def resolve_model_folder(path: str | os.PathLike[str]) -> Path:
    """Return the folder that holds the model's ``config.json``: ``path`` or ``path/transformer``."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ConfigError(
            f"{folder}: expected a model folder (config.json + weights), got a file; "
            "single-file checkpoints load through diffcaps.weights.load_single_file"
        )
    for candidate in (folder, folder / PIPELINE_SUBFOLDER):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ConfigError(
        f"{folder}: no {CONFIG_NAME} here nor in {PIPELINE_SUBFOLDER}/; "
        "expected a diffusers model folder or a pipeline folder"
    )


def read_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` as a JSON object."""
    path = folder / CONFIG_NAME
    try:
        data: Any = strict_json(path.read_text(encoding="utf-8"))
    except DuplicateKey as duplicate:
        raise ConfigError(f"{path}: the config sets {duplicate.key!r} twice") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise ConfigError(f"{path}: unreadable config ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@attrs.frozen
class WeightSource:
    """Where each weight of a folder lives: tensor name → (file, header entry)."""

    files: tuple[Path, ...]
    entries: Mapping[str, tuple[Path, TensorInfo]]
    pickled: bool = False
    headers: Mapping[Path, SafetensorsHeader] = attrs.field(factory=dict)

    @property
    def elements(self) -> int:
        """Elements of all the tensors together, from the headers."""
        return sum(math.prod(info.shape) for _, info in self.entries.values())

    def by_file(self) -> Iterator[tuple[Path, list[str]]]:
        """Group tensor names by the file that holds them, in file order."""
        for path in self.files:
            yield path, [key for key, (p, _) in self.entries.items() if p == path]


def _single_file_source(path: Path) -> WeightSource:
    header = read_header(path)
    return WeightSource(
        files=(path,), entries={key: (path, info) for key, info in header.tensors.items()}, headers={path: header}
    )


def _plain_name(name: str) -> bool:
    """A file name with no directory part, on any system: no separator, drive, ``.`` or ``..``."""
    return (
        name not in ("", ".", "..") and "\0" not in name
        and PurePosixPath(name).name == name and PureWindowsPath(name).name == name
    )


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor → shard file name), every entry checked."""
    try:
        index: Any = strict_json(index_path.read_text(encoding="utf-8"))
    except DuplicateKey as duplicate:
        raise CheckpointError(f"the index lists {duplicate.key!r} twice", path=index_path) from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"unreadable shard index ({str(exc)[:200]})", path=index_path) from None
    weight_map: object = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError("a shard index must be a JSON object with a weight_map object", path=index_path)
    for key, shard in cast(dict[str, object], weight_map).items():
        if not isinstance(shard, str):
            raise CheckpointError(f"weight_map places {key!r} in {shard!r}, not a file name", path=index_path)
        if not _plain_name(shard):
            raise CheckpointError(
                f"weight_map places {key!r} in {shard!r}: shards must be plain file names in the index's folder",
                path=index_path,
            )
    return cast(dict[str, str], weight_map)


def _sharded_source(index_path: Path) -> WeightSource:
    weight_map = _weight_map(index_path)
    entries: dict[str, tuple[Path, TensorInfo]] = {}
    files: list[Path] = []
    headers: dict[Path, SafetensorsHeader] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise CheckpointError(f"the index names shard {shard_name!r}, which is missing", path=index_path)
        files.append(shard)
        header = headers[shard] = read_header(shard)
        for key in header.tensors:
            placed = weight_map.get(key)
            if placed is None:
                raise CheckpointError(f"tensor {key!r} is in the shard but not in the index", path=shard)
            if placed != shard_name:
                raise CheckpointError(
                    f"tensor {key!r} is in this shard and, as the index says, in {placed!r}", path=shard
                )
        for key in (k for k, v in weight_map.items() if v == shard_name):
            if key not in header.tensors:
                raise CheckpointError(f"the index places {key!r} here, but the shard lacks it", path=shard)
            entries[key] = (shard, header.tensors[key])
    return WeightSource(files=tuple(files), entries=entries, headers=headers)


def find_weights(folder: Path, *, allow_pickle: bool = False) -> WeightSource:
    """Locate a folder's weights: one safetensors file, a sharded index, or (opt-in) a pickle."""
    if (folder / INDEX_NAME).is_file():
        return _sharded_source(folder / INDEX_NAME)
    if (folder / WEIGHTS_NAME).is_file():
        return _single_file_source(folder / WEIGHTS_NAME)
    for name in PICKLE_NAMES:
        if (folder / name).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"only a pickle weight file ({name}) was found; pickles can run code when "
                    "loaded, so they are refused unless you pass allow_pickle=True "
                    "(then read with torch.load(weights_only=True))",
                    path=folder / name,
                )
            return _pickle_source(folder / name)
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in the folder", path=folder)


def _pickle_source(path: Path) -> WeightSource:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds here; the message says which
        raise CheckpointError(f"cannot read the pickle with weights_only=True ({exc})", path=path) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the pickle does not hold a flat state dict of tensors", path=path)
    entries = {
        str(key): (path, TensorInfo(dtype=t.dtype, shape=tuple(t.shape), start=0, end=t.nbytes))
        for key, t in state.items()
    }
    return WeightSource(files=(path,), entries=entries, pickled=True)


_SIZE_UNITS: Final = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                      "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Turn ``"5GB"``, ``"500MiB"`` or a byte count into bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot read {size!r} as a size; use bytes or e.g. '5GB', '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"a shard size must be positive, got {size!r}")
    return value
