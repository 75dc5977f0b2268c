"""Command line: ``python -m diffcaps describe|demo``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from diffcaps.models import model_class, model_names

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
