"""Sharded index files: shard names stay inside the folder, every tensor has one place, symlinks work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps.errors import CheckpointError, ConfigError
from diffcaps.io import CONFIG_NAME, INDEX_NAME, save_safetensors
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import save_tiny_folder


def _sharded(folder: Path) -> tuple[FluxTransformer2DModel, dict[str, Any]]:
    model = save_tiny_folder(folder, max_shard_size=20_000)
    index: dict[str, Any] = json.loads((folder / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    return model, index


def _write_index(folder: Path, index: object) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "../../outside.safetensors", "sub/shard.safetensors", "sub\\shard.safetensors",
     "C:shard.safetensors", "", ".", "..", "ABSOLUTE"],
)
def test_shard_names_must_be_plain_file_names_in_the_folder(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "a" / "b" / "model"
    _, index = _sharded(folder)
    first = next(iter(index["weight_map"].values()))
    outside = tmp_path / "a" / "outside.safetensors"
    shutil.copy(folder / first, outside)  # a real shard, there to be read if the loader escaped
    shutil.copy(folder / first, tmp_path / "a" / "b" / "outside.safetensors")
    if name == "ABSOLUTE":
        name = str(outside)
    key = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][key] = name
    _write_index(folder, index)
    with pytest.raises(CheckpointError) as info:
        FluxTransformer2DModel.from_pretrained(folder)
    assert str(info.value) == (
        f"{folder / INDEX_NAME}: weight_map places {key!r} in {name!r}: "
        "shards must be plain file names in the index's folder"
    )


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ({"weight_map": ["a.safetensors"]}, "a shard index must be a JSON object with a weight_map object"),
        (["weight_map"], "a shard index must be a JSON object with a weight_map object"),
        ({"metadata": {}}, "a shard index must be a JSON object with a weight_map object"),
        ({"weight_map": {"x_embedder.weight": 3}}, "weight_map places 'x_embedder.weight' in 3, not a file name"),
        ({"weight_map": {"x_embedder.weight": None}}, "weight_map places 'x_embedder.weight' in None, not a file name"),
        ({"weight_map": {"x_embedder.weight": ["a"]}}, "weight_map places 'x_embedder.weight' in ['a'], not a file name"),
    ],
)
def test_malformed_weight_maps_are_named(tmp_path: Path, index: object, expected: str) -> None:
    _sharded(tmp_path)
    _write_index(tmp_path, index)
    with pytest.raises(CheckpointError) as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert str(info.value) == f"{tmp_path / INDEX_NAME}: {expected}"


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b"[" * 100_000, b'{"weight_map": {"a": NaN}}'])
def test_unreadable_index_is_named(tmp_path: Path, text: bytes) -> None:
    _sharded(tmp_path)
    (tmp_path / INDEX_NAME).write_bytes(text)
    with pytest.raises(CheckpointError, match="unreadable shard index") as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert info.value.path == str(tmp_path / INDEX_NAME)


def test_a_tensor_listed_twice_in_the_index_is_an_error(tmp_path: Path) -> None:
    _, index = _sharded(tmp_path)
    key, shard = next(iter(index["weight_map"].items()))
    other = next(v for v in index["weight_map"].values() if v != shard)
    text = json.dumps(index)
    entry = json.dumps({key: shard})[1:-1]
    assert entry in text
    (tmp_path / INDEX_NAME).write_text(text.replace(entry, f"{json.dumps(key)}: {json.dumps(other)}, {entry}"))
    with pytest.raises(CheckpointError, match=f"the index lists {key!r} twice"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_a_tensor_in_two_shard_headers_is_an_error(tmp_path: Path) -> None:
    model, index = _sharded(tmp_path)
    key, shard = next(iter(index["weight_map"].items()))
    other = next(v for v in index["weight_map"].values() if v != shard)
    state = model.state_dict()
    second = {k: state[k] for k, v in index["weight_map"].items() if v == other} | {key: torch.zeros_like(state[key])}
    save_safetensors(second, tmp_path / other)
    with pytest.raises(CheckpointError) as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert str(info.value) == f"{tmp_path / other}: tensor {key!r} is in this shard and, as the index says, in {shard!r}"


def test_a_config_setting_a_key_twice_is_named(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    config = tmp_path / CONFIG_NAME
    config.write_text(config.read_text().replace("{", '{"num_layers": 1, ', 1))
    with pytest.raises(ConfigError, match="the config sets 'num_layers' twice"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("sharded", [True, False])
def test_a_hugging_face_cache_snapshot_of_symlinks_loads(tmp_path: Path, sharded: bool) -> None:
    """The hub cache keeps files in ``blobs/<hash>``; a snapshot folder holds relative symlinks to them."""
    source = tmp_path / "saved"
    model = save_tiny_folder(source, max_shard_size=20_000 if sharded else "10GB")
    repo = tmp_path / "hub" / "models--someone--flux-tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("0" * 40) / "transformer"
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        os.symlink(Path("..", "..", "..", "blobs", digest), snapshot / file.name)
    assert all(p.is_symlink() for p in snapshot.iterdir())
    loaded = FluxTransformer2DModel.from_pretrained(snapshot.parent)  # the pipeline folder
    _same_weights(loaded, model)
    shutil.rmtree(source)  # nothing was read from the original folder
    _same_weights(FluxTransformer2DModel.from_pretrained(snapshot), model)
