"""Command line: ``python -m diffcaps describe|demo|inspect|convert``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

from diffcaps.models import model_class, model_names

if TYPE_CHECKING:
    from diffcaps.protocols import SupportsWeightMapping
    from diffcaps.weights import Recogniser

__all__ = ["main"]


def _describe(args: argparse.Namespace) -> int:
    meta = model_class(args.model).metadata()
    if args.json:
        print(json.dumps(meta.to_dict(), indent=2))
    else:
        print(meta.describe(verbose=args.verbose, color=sys.stdout.isatty()))
    return 0


@contextmanager
def _timed(label: str, log: Callable[[str], None]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log(f"  {label:<44} {1000 * (time.perf_counter() - start):8.1f} ms")


def _demo(args: argparse.Namespace) -> int:
    import torch

    from diffcaps.demo import DEMO_CONFIG, demo_inputs
    from diffcaps.models.flux import FluxTransformer2DModel

    torch.manual_seed(args.seed)
    print(FluxTransformer2DModel.metadata().describe(color=sys.stdout.isatty()))
    print()
    print(f"demo: a seeded Flux transformer ({DEMO_CONFIG.num_layers} double + "
          f"{DEMO_CONFIG.num_single_layers} single blocks, width {DEMO_CONFIG.inner_dim})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.output) if args.output else Path(tmp) / "flux-demo"
        with _timed("build with seeded weights", print):
            model = FluxTransformer2DModel.from_config(DEMO_CONFIG).eval()
        params = sum(p.numel() for p in model.parameters())
        with _timed(f"save_pretrained ({params / 1e6:.2f} M parameters)", print):
            model.save_pretrained(folder)
        with _timed("from_pretrained (meta device, safetensors)", print):
            loaded = FluxTransformer2DModel.from_pretrained(folder)
        inputs = demo_inputs(DEMO_CONFIG, seed=args.seed)
        with torch.no_grad(), _timed("forward pass (1 × 64 image + 8 text tokens)", print):
            out = loaded(**inputs).sample
        with torch.no_grad():
            reference = model(**inputs).sample
        same = torch.equal(out, reference)
        print(f"  output {tuple(out.shape)}, mean |x| {out.abs().mean().item():.4f}; "
              f"reloaded model reproduces the original: {'yes' if same else 'NO'}")
        print(f"  saved to {folder}" if args.output else "  (temporary folder removed)")
    return 0 if same else 1


def _file_recognisers() -> list[Recogniser]:
    """What ``inspect`` tries on a file, in order; the first that matches describes it.

    Hook: another kind of file (a LoRA and its format) is recognised by adding its
    recogniser to this list — a callable taking the parsed header and returning a
    ``diffcaps.weights.Recognition``.
    """
    from diffcaps.lora import lora_recogniser
    from diffcaps.weights import checkpoint_recogniser

    classes = [model_class(name) for name in model_names()]
    return [checkpoint_recogniser(classes), lora_recogniser(classes)]


def _inspect(args: argparse.Namespace) -> int:
    from diffcaps.errors import DiffcapsError
    from diffcaps.weights import inspect_file

    try:
        report = inspect_file(args.file, _file_recognisers())
    except DiffcapsError as exc:
        print(f"diffcaps inspect: {exc}", file=sys.stderr)
        return 1
    print(report.describe())
    return 0


def _convert(args: argparse.Namespace) -> int:
    import torch

    from diffcaps.errors import DiffcapsError
    from diffcaps.io._progress import ProgressBar
    from diffcaps.weights import convert

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        with ProgressBar("converting") as progress:
            done = convert(
                cast("type[SupportsWeightMapping]", model_class(args.model)), args.source, args.target,
                to=args.to, variant=args.variant, prefix=args.prefix, torch_dtype=dtype,
                strict=not args.non_strict, max_shard_size=args.max_shard_size, overwrite=args.force,
                progress=progress,
            )
    except DiffcapsError as exc:
        print(f"diffcaps convert: {exc}", file=sys.stderr)
        return 1
    what = f"{done.variant} " if done.variant else ""
    print(f"wrote {what}{done.layout} layout: {done.tensors} tensors, {done.nbytes / 1e9:.2f} GB → {done.target}")
    return 0


def _add_weight_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = commands.add_parser("inspect", help="say what a safetensors file is, without loading it")
    inspect.add_argument("file", help="a .safetensors file")
    inspect.set_defaults(run=_inspect)

    convert = commands.add_parser(
        "convert", help="convert a single-file checkpoint to a diffusers folder, or a folder to one file"
    )
    convert.add_argument("source", help="an original-layout .safetensors file, or a diffusers model folder")
    convert.add_argument("target", help="the folder (or, from a folder, the .safetensors file) to write")
    convert.add_argument("--model", choices=model_names(), default="flux")
    convert.add_argument("--to", choices=("diffusers", "original"), help="default: the other layout")
    convert.add_argument("--variant", help="insist on this variant instead of detecting it")
    convert.add_argument("--prefix", default="", help="key prefix for the original layout, e.g. model.diffusion_model.")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float8_e4m3fn"),
                         help="cast floating tensors (default: keep the stored dtypes)")
    convert.add_argument("--max-shard-size", default="10GB", help="diffusers shard size (default 10GB)")
    convert.add_argument("--non-strict", action="store_true", help="skip tensors the model has no place for")
    convert.add_argument("--force", action="store_true", help="replace an existing target")
    convert.set_defaults(run=_convert)


def build_parser() -> argparse.ArgumentParser:
    """The ``diffcaps`` argument parser."""
    parser = argparse.ArgumentParser(prog="diffcaps", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    describe = commands.add_parser("describe", help="print what a model class supports")
    describe.add_argument("model", choices=model_names())
    describe.add_argument("--verbose", action="store_true", help="add descriptions and docs links")
    describe.add_argument("--json", action="store_true", help="print versioned JSON instead of a table")
    describe.set_defaults(run=_describe)

    demo = commands.add_parser("demo", help="build, save, load and run a small seeded Flux model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output", help="keep the saved folder here instead of a temporary one")
    demo.set_defaults(run=_demo)

    _add_weight_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
