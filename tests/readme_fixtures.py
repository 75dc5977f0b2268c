"""The README's Python blocks, and the small stand-ins they run against.

``python_blocks`` reads README.md as it is now: every ```python fence, named by the nearest
heading above it. A block runs in a fresh namespace (``namespace()``) inside a working
directory that ``write_stand_ins`` fills. Everything the README assumes but does not create
— weight files, folders, input tensors, a ``model`` — comes from the two tables below,
``STAND_IN_FILES`` and ``STAND_IN_NAMES``: each stand-in replaces real weights or real inputs
with a tiny seeded one of the same kind, so a block runs on a CPU in well under a second.

A block that sets context-parallel degrees runs on that many gloo ranks (``run_on_rank``).
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import symtable
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import attrs
import torch
import torch.distributed as dist

from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, flux_inputs, save_tiny_folder, seeded_model
from tests.ip_adapter.xlabs import image_embeds, write_xlabs
from tests.lora._files import bfl_control_file, bfl_modules, kohya_style
from tests.weights.fixtures import original_file, variant_model

README: Final = Path(__file__).parents[1] / "README.md"


# ---------------------------------------------------------------------------------------------
# The stand-in tables: the ONE place to add what a new README block needs.
# ---------------------------------------------------------------------------------------------

def _pipeline_folder(path: Path) -> None:
    # a pipeline folder whose transformer/ holds the tiny seeded Flux instead of FLUX.1-dev
    save_tiny_folder(path / "transformer", TINY)


def _kohya_lora(path: Path) -> None:
    # a kohya sd-scripts LoRA on the double and single blocks (what sd-scripts trains by
    # default), fitted to the tiny model that `model` stands in for
    blocks = [name for name in bfl_modules(TINY.num_layers, TINY.num_single_layers)
              if name.startswith(("double_blocks.", "single_blocks."))]
    kohya_style(seeded_model(TINY), seed=5, key=lambda name: "lora_unet_" + name.replace(".", "_"),
                modules=blocks).save(path)


def _canny_lora(path: Path) -> None:
    # a BFL control LoRA (what FLUX.1-Canny-dev-lora is): it widens x_embedder to twice the channels
    bfl_control_file(seeded_model(TINY), seed=6, in_channels=2 * TINY.in_channels).save(path)


def _original_file(variant: str, dtype: torch.dtype | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # BFL's original layout, from a small seeded model of the variant instead of FLUX.1's 12B
        original_file(path, variant_model(variant, "small"), dtype=dtype)
    return write


def _ip_adapter(seed: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # an XLabs IP-Adapter file fitted to the tiny model (embedding size EMBED_DIM, not CLIP's 768)
        write_xlabs(path, TINY, seed)
    return write


StandIn = Callable[[Path], None] | None

STAND_IN_FILES: Final[dict[str, StandIn]] = {
    # files and folders a block reads: written into the working directory before it runs
    "FLUX.1-dev": _pipeline_folder,
    "style.safetensors": _kohya_lora,
    "canny-lora.safetensors": _canny_lora,
    "flux1-dev-fp8.safetensors": _original_file("flux-dev", torch.float8_e4m3fn),
    "flux1-fill-dev.safetensors": _original_file("flux-fill"),
    "flux-ip-adapter.safetensors": _ip_adapter(seed=3),
    "another-ip-adapter.safetensors": _ip_adapter(seed=4),
    # what a block writes itself: nothing to provide
    "my-flux": None,
    "style-kohya.safetensors": None,
    "out.safetensors": None,
    "scratch/flux-groups": None,
    "saved-pipeline": None,
}


def _inputs(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return flux_inputs(TINY, dtype=dtype)


def _quickstart_input(name: str) -> Callable[[], object]:
    # the Quickstart loads its model in bfloat16, so its loose input tensors are bfloat16 too
    return lambda: _inputs(torch.bfloat16)[name]


def _other_inputs() -> dict[str, Any]:
    # the forward's arguments besides the latents and the timestep the denoising loop passes
    return {k: v for k, v in _inputs().items() if k not in ("hidden_states", "timestep")}


STAND_IN_NAMES: Final[dict[str, Callable[[], object]]] = {
    # names the blocks use without defining them: the tiny seeded model replaces real weights,
    # seeded tensors of its sizes replace real latents, text embeddings and CLIP image embeddings
    "torch": lambda: torch,
    "FluxTransformer2DModel": lambda: FluxTransformer2DModel,
    "model": lambda: seeded_model(TINY),
    "path": lambda: "FLUX.1-dev/transformer",
    "device": lambda: "cuda" if torch.cuda.is_available() else "cpu",
    "inputs": _inputs,
    **{name: _quickstart_input(name) for name in _inputs()},
    "x": lambda: _inputs()["hidden_states"],
    "other_inputs": _other_inputs,
    # one row per denoising step: that step's timestep (0–1000 scale) for each batch element
    "timesteps": lambda: torch.linspace(1000.0, 0.0, 5)[:, None],
    "style_embeds": lambda: image_embeds(1, seed=7),
    "face_embeds": lambda: image_embeds(1, seed=8),
}


def write_stand_ins(folder: Path) -> None:
    """Write every stand-in file and folder of ``STAND_IN_FILES`` into ``folder``."""
    for name, write in STAND_IN_FILES.items():
        if write is not None:
            write(folder / name)


def namespace() -> dict[str, Any]:
    """A fresh namespace for one block: every stand-in name, built anew."""
    names: dict[str, Any] = {"__name__": "readme_block"}
    names.update({name: build() for name, build in STAND_IN_NAMES.items()})
    return names


# ---------------------------------------------------------------------------------------------
# Reading the README
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(\s*)```\s*(\S*)\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
_PATH_SUFFIX = re.compile(r"\.(safetensors|json|bin|pt|pth|ckpt|gguf)$")


@attrs.frozen
class Block:
    """One ```python block of the README."""

    heading: str
    """The nearest heading above the block."""
    index: int
    """Its position among the Python blocks under that heading."""
    line: int
    """The README line of its first line of code."""
    source: str

    @property
    def name(self) -> str:
        """``heading #index``: the test id."""
        return f"{self.heading} #{self.index}"

    def code(self) -> Any:
        """The block compiled so that tracebacks give README.md's own line numbers."""
        return compile("\n" * (self.line - 1) + self.source, str(README), "exec")


def python_blocks(text: str) -> list[Block]:
    """Every ```python fenced block of ``text``, in order, named by the heading above it."""
    blocks: list[Block] = []
    heading = "(top)"
    counts: dict[str, int] = {}
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        fence = _FENCE.match(line)
        number += 1
        if fence is None:
            found = _HEADING.match(line)
            if found is not None:
                heading = found.group(1)
            continue
        indent, language = fence.groups()
        start = number
        while number < len(lines) and not lines[number].strip().startswith("```"):
            number += 1
        if language == "python":
            body = [row[len(indent):] if row.startswith(indent) else row.lstrip() for row in lines[start:number]]
            index = counts.get(heading, 0)
            counts[heading] = index + 1
            blocks.append(Block(heading=heading, index=index, line=start + 1, source="\n".join(body) + "\n"))
        number += 1  # the closing fence
    return blocks


def readme_blocks() -> list[Block]:
    """The Python blocks of the repository's README.md, read now."""
    return python_blocks(README.read_text(encoding="utf-8"))


def free_names(source: str) -> set[str]:
    """Names a block uses without defining them (builtins excluded)."""
    top = symtable.symtable(source, "<readme block>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}

    def inner(table: symtable.SymbolTable) -> Iterator[str]:
        for child in table.get_children():
            yield from (s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced())
            yield from inner(child)

    used.update(inner(top))
    return {name for name in used - bound if not hasattr(builtins, name)}


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def mentioned_paths(source: str) -> set[str]:
    """File and folder names a block mentions.

    A string literal counts when it ends in a weights/config suffix (``.safetensors``,
    ``.json``, …), contains a ``/``, or is a positional argument of ``from_pretrained`` /
    ``save_pretrained``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _PATH_SUFFIX.search(node.value) or "/" in node.value:
                found.add(node.value)
        elif isinstance(node, ast.Call) and _call_name(node).endswith("_pretrained"):
            found.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return found


def world_size(source: str) -> int:
    """The product of the context-parallel degrees a block sets (1 when it sets none)."""
    size = 1
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg in ("ulysses_degree", "ring_degree") \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int):
            size *= node.value.value
    return size


# ---------------------------------------------------------------------------------------------
# Running a block on gloo ranks
# ---------------------------------------------------------------------------------------------

def run_on_rank(rank: int, world: int, port: int, block: Block, workdir: str, out_dir: str) -> None:
    """Entry point of one spawned rank: join the gloo group, run ``block``, write ``rank<N>.txt``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    os.chdir(workdir)
    names = namespace()
    names["device"] = "cpu"  # gloo ranks compute on the CPU
    try:
        exec(block.code(), names)
        outcome = "ok"
    except Exception:  # reported to the parent, which fails the test with it
        outcome = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome, encoding="utf-8")
