"""Folder saves are atomic per folder: the old content survives any failure, even a killed process.

A save builds the new folder beside the target and swaps it in whole; files diffcaps does not
write survive; concurrent saves end with one complete folder; a killed save's leftovers are
removed by the next save.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import diffcaps.io._staging as staging
import diffcaps.io._streaming as streaming
from diffcaps.errors import CheckpointError
from diffcaps.io import INDEX_NAME, WEIGHTS_NAME, save_safetensors
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.flux_fixtures import TINY, save_tiny_folder, seeded_model

ROOT = Path(__file__).resolve().parents[2]
DEEPER = attrs.evolve(TINY, num_layers=TINY.num_layers + 1)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name → content hash), symlinks as their targets."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if ".diffcaps-" in p.name) + sorted(
        p.name for p in folder.rglob("*") if ".diffcaps-" in p.name)


def _assert_holds(folder: Path, config: FluxConfig, seed: int) -> None:
    loaded = FluxTransformer2DModel.from_pretrained(folder)
    assert loaded.config == config
    for key, value in seeded_model(config, seed).state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _fail_after(monkeypatch: pytest.MonkeyPatch, tensors: int) -> None:
    original = streaming._write_tensor
    count = 0

    def failing(*args: Any) -> None:
        nonlocal count
        count += 1
        if count > tensors:
            raise OSError(28, "No space left on device")
        original(*args)

    monkeypatch.setattr(streaming, "_write_tensor", failing)


@pytest.mark.parametrize("max_shard_size", ["10GB", 20_000])
@pytest.mark.parametrize("tensors", [0, 5, 10_000])
def test_a_failed_save_leaves_the_old_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tensors: int, max_shard_size: int | str
) -> None:
    folder = tmp_path / "model"
    save_tiny_folder(folder, seed=1, max_shard_size=20_000)
    before = _snapshot(folder)
    if tensors == 10_000:  # every tensor written, then the config fails
        monkeypatch.setattr(FluxConfig, "to_dict", lambda self: {"not json": object()})
        expected: type[Exception] = TypeError
    else:
        _fail_after(monkeypatch, tensors)
        expected = OSError
    with pytest.raises(expected):
        seeded_model(DEEPER, seed=2).save_pretrained(folder, max_shard_size=max_shard_size)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert _leftovers(folder) == []
    _assert_holds(folder, TINY, seed=1)


def test_a_failed_swap_leaves_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_tiny_folder(tmp_path / "model", seed=1)
    before = _snapshot(tmp_path / "model")

    def refuse(stage: Path, target: Path) -> None:
        assert (stage / WEIGHTS_NAME).is_file() and (stage / "config.json").is_file()  # complete before the swap
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(staging, "_swap", refuse)
    with pytest.raises(PermissionError):
        seeded_model(DEEPER, seed=2).save_pretrained(tmp_path / "model")
    assert _snapshot(tmp_path / "model") == before
    assert _leftovers(tmp_path / "model") == []


@pytest.mark.parametrize("exchange", ["atomic", "two renames"])
def test_files_diffcaps_did_not_write_survive_a_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: str
) -> None:
    if exchange == "two renames":
        monkeypatch.setattr(staging, "_EXCHANGE", None)
    folder = tmp_path / "model"
    save_tiny_folder(folder, seed=1, max_shard_size=20_000)
    (folder / "README.md").write_text("my notes\n")
    (folder / "extra").mkdir()
    (folder / "extra" / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "blob").write_text("shared")
    (folder / "link").symlink_to("../blob")
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant weights are not ours")
    kept = {k: v for k, v in _snapshot(folder).items() if not k.startswith(("diffusion_pytorch_model-", "config"))}
    kept.pop(INDEX_NAME)

    seeded_model(DEEPER, seed=2).save_pretrained(folder)  # sharded -> one file

    after = _snapshot(folder)
    assert {k: after[k] for k in kept} == kept
    assert set(after) == set(kept) | {WEIGHTS_NAME, "config.json"}  # the old shards and index are gone
    assert (folder / "link").read_text() == "shared"
    assert _leftovers(folder) == []
    _assert_holds(folder, DEEPER, seed=2)


def test_a_save_into_a_new_or_symlinked_folder(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path / "a" / "b" / "model", seed=1)
    _assert_holds(tmp_path / "a" / "b" / "model", TINY, seed=1)
    (tmp_path / "alias").symlink_to(tmp_path / "a" / "b" / "model")
    seeded_model(DEEPER, seed=2).save_pretrained(tmp_path / "alias")
    assert (tmp_path / "alias").is_symlink()
    _assert_holds(tmp_path / "a" / "b" / "model", DEEPER, seed=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file.*not a folder"):
        seeded_model(TINY).save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_concurrent_saves_of_different_configs_end_with_one_complete_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    models = [(TINY, 1, seeded_model(TINY, seed=1)), (DEEPER, 2, seeded_model(DEEPER, seed=2))]
    for round_ in range(12):
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def save(model: FluxTransformer2DModel, shard: int | str) -> None:
            try:
                barrier.wait()
                model.save_pretrained(folder, max_shard_size=shard)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(m, 20_000 if (round_ + i) % 2 else "10GB"))
                   for i, (_, _, m) in enumerate(models)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        loaded = FluxTransformer2DModel.from_pretrained(folder)  # refuses a mix of the two
        config, seed, _ = next(entry for entry in models if entry[0] == loaded.config)
        _assert_holds(folder, config, seed)
        assert _leftovers(folder) == []


_CHILD = """
import os, sys, time
from pathlib import Path
import diffcaps.io._staging as staging
import diffcaps.io._streaming as streaming
from diffcaps.io import save_safetensors
from tests.flux_fixtures import TINY, seeded_model
import attrs

where, folder = sys.argv[1], Path(sys.argv[2])

def pause(label):
    print(label, flush=True)
    time.sleep(600)

def after(module, name, label, when=lambda *a: True):
    original = getattr(module, name)
    def wrapped(*args):
        result = original(*args)
        if when(*args):
            pause(label)
        return result
    setattr(module, name, wrapped)

def before(module, name, label):
    original = getattr(module, name)
    def wrapped(*args):
        pause(label)
        return original(*args)
    setattr(module, name, wrapped)

if where == "writing":
    after(streaming, "_write_tensor", "paused")
elif where == "swapping":
    before(staging, "_swap", "paused")
elif where == "removing the old folder":
    before(staging, "_remove", "paused")
elif where == "between two renames":
    staging._EXCHANGE = None
    rename = os.rename
    def first_rename(source, destination):
        rename(source, destination)
        if Path(source) == folder:
            pause("paused")
    staging.os.rename = first_rename
if where == "writing a file":
    after(streaming, "_write_tensor", "paused")
    save_safetensors(seeded_model(TINY, seed=2).state_dict(), folder / "weights.safetensors")
else:
    seeded_model(attrs.evolve(TINY, num_layers=TINY.num_layers + 1), seed=2).save_pretrained(folder)
print("finished", flush=True)
"""


def _killed_mid_save(where: str, folder: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, where, str(folder)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    assert line == "paused", f"the child did not reach {where!r}: {line!r}"


@pytest.mark.parametrize("where", ["writing", "swapping", "removing the old folder", "between two renames"])
def test_a_killed_save_leaves_a_loadable_folder_and_the_next_save_cleans_up(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "model"
    save_tiny_folder(folder, seed=1)
    (folder / "README.md").write_text("kept\n")

    _killed_mid_save(where, folder)

    assert _leftovers(folder)  # what the killed save left behind
    if where == "between two renames":  # no atomic exchange: the old folder waits beside the target
        assert not folder.exists()
    elif where == "removing the old folder":  # the new folder was already in place
        _assert_holds(folder, DEEPER, seed=2)
    else:
        _assert_holds(folder, TINY, seed=1)
    seeded_model(TINY, seed=3).save_pretrained(folder)
    assert _leftovers(folder) == []
    assert (folder / "README.md").read_text() == "kept\n"
    _assert_holds(folder, TINY, seed=3)


def test_a_killed_file_write_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    save_safetensors({"x": torch.ones(3)}, target)
    _killed_mid_save("writing a file", tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".diffcaps-partial")]
    from diffcaps.io import read_header

    assert list(read_header(target).tensors) == ["x"]  # the old file is intact
    save_safetensors({"y": torch.zeros(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
    assert list(read_header(target).tensors) == ["y"]


def test_a_live_save_is_never_cleaned_up_by_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    save_tiny_folder(folder, seed=1)
    inner_done = threading.Event()
    original = streaming._write_tensor
    calls = 0

    def write_and_let_another_save_run(*args: Any) -> None:
        nonlocal calls
        original(*args)
        calls += 1
        if calls == 1:  # the outer save is half-way: a whole other save runs now
            seeded_model(TINY, seed=3).save_pretrained(folder)
            inner_done.set()

    monkeypatch.setattr(streaming, "_write_tensor", write_and_let_another_save_run)
    seeded_model(DEEPER, seed=2).save_pretrained(folder)
    monkeypatch.undo()
    assert inner_done.is_set()
    _assert_holds(folder, DEEPER, seed=2)  # the outer save's stage survived the inner save's cleanup
    assert _leftovers(folder) == []
