"""Every ```python block of README.md runs, against tiny seeded stand-ins for real weights.

The blocks are read from the README at test time, so an edited example is tested as written.
What the blocks assume but do not create is listed once, in ``tests/readme_fixtures.py``.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._distributed import free_port
from tests.readme_fixtures import (
    STAND_IN_FILES,
    STAND_IN_NAMES,
    Block,
    free_names,
    mentioned_paths,
    namespace,
    python_blocks,
    readme_blocks,
    run_on_rank,
    world_size,
    write_stand_ins,
)

BLOCKS = readme_blocks()
RANK_DEADLINE = 120.0
# torch leaves it unannotated; the package attribute ``spawn`` is a function hiding the module
start_processes: Callable[..., Any] = importlib.import_module("torch.multiprocessing.spawn").start_processes


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme_stand_ins")
    write_stand_ins(folder)
    return folder


@pytest.fixture
def workdir(stand_ins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # each block gets its own copy, so what one block writes is never seen by the next
    folder = tmp_path / "work"
    shutil.copytree(stand_ins, folder)
    monkeypatch.chdir(folder)
    return folder


def _run_on_ranks(block: Block, world: int, workdir: Path, out_dir: Path) -> None:
    context = start_processes(run_on_rank, args=(world, free_port(), block, str(workdir), str(out_dir)),
                              nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + RANK_DEADLINE
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            break
    failed: dict[int, str] = {}
    for rank in range(world):
        path = out_dir / f"rank{rank}.txt"
        outcome = path.read_text(encoding="utf-8") if path.exists() else f"no result within {RANK_DEADLINE:.0f} s"
        if outcome != "ok":
            failed[rank] = outcome
    assert not failed, f"README block {block.name!r} failed on {len(failed)} of {world} ranks:\n" + "\n".join(
        f"rank {rank}: {outcome}" for rank, outcome in failed.items())


def test_the_readme_has_python_blocks() -> None:
    # the extraction would make every other test here vacuous if it found nothing
    assert len(BLOCKS) >= 10
    assert any("from_pretrained" in block.source for block in BLOCKS)


def test_blocks_are_read_with_their_heading_and_line() -> None:
    text = "# Top\n\n## Use it\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n   ```python\n   y = 2\n   ```\n"
    blocks = python_blocks(text)
    assert [(b.name, b.line, b.source) for b in blocks] == [("Use it #0", 6, "x = 1\n"), ("Use it #1", 14, "y = 2\n")]


def test_new_file_names_and_free_names_are_found() -> None:
    source = (
        "import torch\n"
        'lora.load_adapter(model, "new-style.safetensors", adapter_name="new")\n'
        'other = Flux.from_pretrained("some-folder").to(device)\n'
        "def step(t):\n"
        "    return other(latents, t)\n"
        "for t in range(3):\n"
        "    print(step(t), [v for v in values])\n"
    )
    assert mentioned_paths(source) == {"new-style.safetensors", "some-folder"}
    assert free_names(source) == {"lora", "model", "Flux", "device", "latents", "values"}
    assert "new-style.safetensors" not in STAND_IN_FILES and "latents" not in STAND_IN_NAMES


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_stand_ins_cover_the_block(block: Block) -> None:
    missing_files = sorted(mentioned_paths(block.source) - STAND_IN_FILES.keys())
    assert not missing_files, (
        f"README block {block.name!r} (README.md:{block.line}) mentions {missing_files}: add each to "
        "STAND_IN_FILES in tests/readme_fixtures.py (a writer of a tiny stand-in, or None if the block writes it)")
    missing_names = sorted(free_names(block.source) - STAND_IN_NAMES.keys())
    assert not missing_names, (
        f"README block {block.name!r} (README.md:{block.line}) uses {missing_names} without defining them: add "
        "each to STAND_IN_NAMES in tests/readme_fixtures.py")


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_block_runs(block: Block, workdir: Path, tmp_path: Path) -> None:
    world = world_size(block.source)
    if world > 1:
        out_dir = tmp_path / "ranks"
        out_dir.mkdir()
        _run_on_ranks(block, world, workdir, out_dir)
        return
    exec(block.code(), namespace())
