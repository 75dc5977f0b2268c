"""Command line: ``python -m diffcaps describe|demo|generate|inspect|convert``.

Every failure prints one line to stderr and exits 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

import diffcaps
from diffcaps.errors import CheckpointError, ConfigError, DiffcapsError, UnknownModelError
from diffcaps.models import model_class, model_classes, model_names

if TYPE_CHECKING:
    from diffcaps.model import ConfigT, Model
    from diffcaps.protocols import SupportsWeightMapping
    from diffcaps.weights import Recogniser

__all__ = ["ProgressBar", "build_parser", "main"]

class _UsageError(Exception):
    """A command line argparse refuses (shown as one line, like every other failure)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class ProgressBar:
    """``label [#####-----] 50%  1.20 GB / 2.40 GB``, redrawn in place at most ten times a second.

    Drawn only when ``stream`` (default: stderr) is a terminal, unless ``enabled`` says
    otherwise; call it with (done, total) byte counts (a ``diffcaps.io.Progress``), and use
    it as a context manager so the line is finished on exit.
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        fraction = done / total if total else 1.0
        filled = int(round(fraction * 30))
        bar = "#" * filled + "-" * (30 - filled)
        self.stream.write(f"\r{self.label} [{bar}] {fraction:4.0%}  {_bytes(done)} / {_bytes(total)}")
        self.stream.flush()
        self._drawn = True

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _bytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 10**8 else f"{count / 1e6:.1f} MB"


def _describe(args: argparse.Namespace) -> int:
    meta = model_class(args.model).metadata()
    if args.json:
        print(json.dumps(meta.to_dict(), indent=2))
    else:
        print(meta.describe(verbose=args.verbose, color=sys.stdout.isatty()))
    return 0


@contextmanager
def _timed(label: str) -> Generator[None]:
    start = time.perf_counter()
    yield
    print(f"  {label:<44} {1000 * (time.perf_counter() - start):8.1f} ms")


def _demo(args: argparse.Namespace) -> int:
    from diffcaps.demo import DEMO_CONFIG, WAN_DEMO_CONFIG, demo_inputs, wan_demo_inputs
    from diffcaps.models.flux import FluxTransformer2DModel
    from diffcaps.models.wan import WanTransformer3DModel

    cls = model_class(args.model)
    if cls is WanTransformer3DModel:
        frames, side = 3, 8
        tokens = frames * (side // WAN_DEMO_CONFIG.patch_size[1]) * (side // WAN_DEMO_CONFIG.patch_size[2])
        status = _run_demo(
            WanTransformer3DModel, WAN_DEMO_CONFIG, args,
            what=f"a seeded Wan transformer ({WAN_DEMO_CONFIG.num_layers} blocks, width {WAN_DEMO_CONFIG.inner_dim})",
            inputs=wan_demo_inputs(WAN_DEMO_CONFIG, seed=args.seed, frames=frames, side=side),
            work=f"1 × {tokens} video + 8 text tokens",
        )
        return _pipeline_demo(args, video=True) or status
    if cls is FluxTransformer2DModel:
        status = _run_demo(
            FluxTransformer2DModel, DEMO_CONFIG, args,
            what=(f"a seeded Flux transformer ({DEMO_CONFIG.num_layers} double + "
                  f"{DEMO_CONFIG.num_single_layers} single blocks, width {DEMO_CONFIG.inner_dim})"),
            inputs=demo_inputs(DEMO_CONFIG, seed=args.seed), work="1 × 64 image + 8 text tokens",
        )
        return _pipeline_demo(args) or status
    # Any other model: its default config, saved and loaded; no forward pass (its inputs are its own).
    return _run_demo(cls, cls.config_class(), args, what=f"a seeded {cls.__name__} (its default config)",
                     inputs=None, work="")


def _pipeline_demo(args: argparse.Namespace, *, video: bool = False) -> int:
    """The demo's second half: a tiny seeded pipeline makes an image (a video) with a diffcaps transformer."""
    from diffcaps.demo import DEMO_PROMPT, pipeline_demo
    from diffcaps.errors import MissingDependencyError

    print()
    what = "WanPipeline (UMT5, Wan VAE" if video else "FluxPipeline (CLIP, T5, VAE"
    print(f"demo: a tiny seeded {what} built offline) draws {DEMO_PROMPT!r} with a diffcaps transformer")
    out = args.out or ("diffcaps-demo-wan.gif" if video else "diffcaps-demo.png")
    try:
        report = pipeline_demo(out, video=video, seed=args.seed, progress=_StepLine(sys.stderr))
    except MissingDependencyError:
        print('  skipped: the pipeline needs diffusers and transformers; pip install "diffcaps[diffusers]"')
        return 0
    print("\n".join("  " + line for line in report.describe().splitlines()))
    return 0


def _run_demo(cls: type[Model[ConfigT, Any]], config: ConfigT, args: argparse.Namespace, *, what: str,
              inputs: dict[str, Any] | None, work: str) -> int:
    """Build, save, load and run one demo model; 0 when the reloaded model reproduces the original
    (its outputs on ``inputs``, or without inputs its state dict)."""
    import torch

    torch.manual_seed(args.seed)
    print(cls.metadata().describe(color=sys.stdout.isatty()))
    print()
    print(f"demo: {what}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.output) if args.output else Path(tmp) / f"{args.model}-demo"
        with _timed("build with seeded weights"):
            model = cls.from_config(config).eval()
        params = sum(p.numel() for p in model.parameters())
        with _timed(f"save_pretrained ({params / 1e6:.2f} M parameters)"):
            model.save_pretrained(folder)
        with _timed("from_pretrained (meta device, safetensors)"):
            loaded = cls.from_pretrained(folder)
        if inputs is None:
            original, reloaded = model.state_dict(), loaded.state_dict()
            same = original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
            print(f"  reloaded model has the original's {len(original)} tensors: {'yes' if same else 'NO'}")
        else:
            with torch.no_grad(), _timed(f"forward pass ({work})"):
                out: torch.Tensor = loaded(**inputs).sample
            with torch.no_grad():
                reference: torch.Tensor = model(**inputs).sample
            same = torch.equal(out, reference)
            print(f"  output {tuple(out.shape)}, mean |x| {out.abs().mean().item():.4f}; "
                  f"reloaded model reproduces the original: {'yes' if same else 'NO'}")
        print(f"  saved to {folder}" if args.output else "  (temporary folder removed)")
    return 0 if same else 1


class _StepLine:
    """Per-step progress: ``step 3/8  1.26 s`` (time since step 0) redrawn in place on a terminal,
    one line per step otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._start = time.perf_counter()

    def __call__(self, step: int, steps: int) -> None:
        if step == 0:
            self._start = time.perf_counter()
            return
        line = f"step {step}/{steps}  {time.perf_counter() - self._start:.2f} s"
        if self.tty:
            filled = round(30 * step / steps)
            self.stream.write(f"\r{line} [{'#' * filled}{'-' * (30 - filled)}]" + ("\n" if step >= steps else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _generate(args: argparse.Namespace) -> int:
    import torch

    from diffcaps.interop.diffusers import generate as run

    options = run.GenerateOptions(
        prompt=args.prompt, negative_prompt=args.negative_prompt, loras=tuple(args.lora), cache=args.cache,
        offload=args.offload, casting=args.casting, steps=args.steps, guidance=args.guidance,
        true_cfg=args.true_cfg, size=args.size, frames=args.frames, seed=args.seed,
        dtype=getattr(torch, _DTYPES[args.dtype]) if args.dtype else None, fps=args.fps,
    )
    report = run.generate(args.folder, options, args.out, progress=_StepLine(sys.stderr))
    print(report.describe())
    return 0


def _file_recognisers() -> list[Recogniser]:
    """What ``inspect`` tries on a file, in order; the first that matches describes it.

    Another kind of file is recognised by adding its recogniser to this list: a callable
    taking the parsed header and returning a ``diffcaps.weights.Recognition``.
    """
    from diffcaps.lora import lora_recogniser
    from diffcaps.weights import checkpoint_recogniser

    classes = model_classes()
    return [checkpoint_recogniser(classes), lora_recogniser(classes)]


def _inspect(args: argparse.Namespace) -> int:
    from diffcaps.weights import inspect_file

    print(inspect_file(args.file, _file_recognisers()).describe())
    return 0


def _convert(args: argparse.Namespace) -> int:
    import torch

    from diffcaps.auto import AutoModel
    from diffcaps.weights import convert

    dtype: torch.dtype | None = getattr(torch, args.dtype) if args.dtype else None
    if args.model is not None:
        cls = model_class(args.model)
    else:
        try:
            cls = AutoModel.model_class(args.source)
        except (CheckpointError, ConfigError, UnknownModelError) as exc:
            raise type(exc)(f"{exc}; pass --model") from exc
        name = next((name for name in model_names() if model_class(name) is cls), cls.__name__)
        print(f"model: {name} ({cls.__name__}), recognised from {args.source}")
    # A class from the registry may lack weight mapping; convert checks that first.
    model = cast("type[SupportsWeightMapping]", cls)
    with ProgressBar("converting") as progress:
        done = convert(
            model, args.source, args.target,
            to=args.to, variant=args.variant, prefix=args.prefix, torch_dtype=dtype,
            strict=not args.non_strict, max_shard_size=args.max_shard_size, overwrite=args.force,
            progress=progress,
        )
    what = f"{done.variant} " if done.variant else ""
    print(f"wrote {what}{done.layout} layout: {done.tensors} tensors, {done.nbytes / 1e9:.2f} GB → {done.target}")
    return 0


_MODEL_HELP = ("a model's short name (flux, wan, or one registered with diffcaps.register_model or the "
               "diffcaps.models entry points), its class name, or module:Class naming any diffcaps Model subclass")


def build_parser() -> argparse.ArgumentParser:
    """The ``diffcaps`` argument parser."""
    parser = _Parser(prog="diffcaps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffcaps {diffcaps.__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="on a failure, show the full traceback")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on a failure, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    describe = commands.add_parser("describe", parents=[common], help="print what a model class supports")
    describe.add_argument("model", help=_MODEL_HELP)
    describe.add_argument("--verbose", action="store_true", help="add descriptions and docs links")
    describe.add_argument("--json", action="store_true", help="print versioned JSON instead of a table")
    describe.set_defaults(run=_describe)

    demo = commands.add_parser("demo", parents=[common],
                               help="build, save, load and run a small seeded model; flux, wan: generate with it")
    demo.add_argument("--model", default="flux",
                      help="the demo model (default: flux); " + _MODEL_HELP + " (run with its default config)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the weights and inputs (default: 0)")
    demo.add_argument("--output", help="keep the saved folder here instead of a temporary one")
    demo.add_argument("--out", help="where the flux demo writes its image, the wan demo its video (default: "
                                     "diffcaps-demo.png or diffcaps-demo-wan.gif in the current folder)")
    demo.set_defaults(run=_demo)

    _add_generate(commands.add_parser(
        "generate", parents=[common], help="make an image or video with a diffusers pipeline folder and diffcaps",
        description="Run a diffusers pipeline folder's own pipeline with its transformer loaded by diffcaps "
                    "and the diffcaps features asked for; print what was done (features, cache skips, time, "
                    "peak memory). Needs the diffusers extra.",
    ))

    inspect = commands.add_parser("inspect", parents=[common], help="say what a safetensors file is, without loading it")
    inspect.add_argument("file", help="a .safetensors file (a checkpoint, a LoRA, or anything else)")
    inspect.set_defaults(run=_inspect)

    _add_convert(commands.add_parser(
        "convert", parents=[common],
        help="convert a single-file checkpoint to a diffusers folder, or a folder to one file",
    ))
    return parser


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _option(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a parser that raises ``GenerateError``: its message becomes the usage error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except DiffcapsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _add_generate(generate: argparse.ArgumentParser) -> None:
    # The option parsers live beside the generator; diffusers is imported only when they run.
    def lazy(name: str) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            from diffcaps.interop.diffusers import generate as run

            parser: Callable[[str], Any] = getattr(run, name)
            return parser(text)

        return _option(parse)

    generate.add_argument("folder", help="a diffusers pipeline folder (model_index.json, transformer/, …)")
    generate.add_argument("--prompt", required=True, help="the text prompt")
    generate.add_argument("--negative-prompt", help="a negative prompt (Flux: runs true CFG, see --true-cfg)")
    generate.add_argument("--true-cfg", type=float, help="true CFG scale with --negative-prompt (default 4.0)")
    generate.add_argument("--lora", action="append", default=[], type=lazy("lora_option"), metavar="FILE[:WEIGHT]",
                          help="load a LoRA file with diffcaps.lora at WEIGHT (default 1.0); repeat for more")
    generate.add_argument("--cache", type=lazy("cache_option"), metavar="NAME[:VALUE]",
                          help="an inference cache: first_block[:THRESHOLD], pab[:SKIP_RANGE] or "
                               "taylorseer[:INTERVAL], e.g. first_block:0.1")
    generate.add_argument("--offload", type=lazy("offload_option"), metavar="block|leaf|disk:PATH",
                          help="group offloading of the transformer (onto CUDA when there is one)")
    generate.add_argument("--casting", type=lazy("casting_option"), metavar="fp8",
                          help="layerwise casting: store the transformer's weights in fp8 (fp8, fp8_e5m2)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    generate.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    generate.add_argument("--size", type=lazy("size_option"), metavar="WxH",
                          help="image or video size in pixels, e.g. 512x512 (default: the pipeline's)")
    generate.add_argument("--frames", type=int, help="number of frames (video pipelines only)")
    generate.add_argument("--fps", type=int, default=16, help="frames per second of a .gif or .mp4 (default: 16)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the CPU generator (default: 0)")
    generate.add_argument("--dtype", choices=tuple(_DTYPES), help="the dtype every component computes in "
                                                                  "(default: float32)")
    generate.add_argument("--out", required=True, help="the output file: .png, .gif, or .mp4 (video pipelines)")
    generate.set_defaults(run=_generate)


def _add_convert(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("source", help="an original-layout .safetensors file, or a diffusers model folder")
    convert.add_argument("target", help="the folder (or, from a folder, the .safetensors file) to write")
    convert.add_argument("--model", help=_MODEL_HELP + " (default: the model the source is recognised as)")
    convert.add_argument("--to", choices=("diffusers", "original"), help="the layout to write (default: the other one)")
    convert.add_argument("--variant", help="insist on this variant instead of detecting it")
    convert.add_argument("--prefix", default="", help="key prefix for the original layout, e.g. model.diffusion_model.")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float8_e4m3fn"),
                         help="cast floating tensors (default: keep the stored dtypes)")
    convert.add_argument("--max-shard-size", default="10GB", help="diffusers shard size (default: 10GB)")
    convert.add_argument("--non-strict", action="store_true", help="skip tensors the model has no place for")
    convert.add_argument("--force", action="store_true", help="replace an existing target")
    convert.set_defaults(run=_convert)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] + (" (rerun with --debug for the details)" if len(lines) > 1 else "")


def _silence_stdout() -> None:
    """After a closed pipe (``describe … | head``), send what is left of stdout nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 1 after a one-line message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"diffcaps: {exc}", file=sys.stderr)
        return 1
    label = f"diffcaps {args.command}"
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()  # the reader has all it wanted; there is nothing to report
        return 1
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, DiffcapsError):
            message = _one_line(exc)
        elif isinstance(exc, OSError):
            message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else _one_line(exc)
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            message = f"internal error: {type(exc).__name__}: {first}; rerun with --debug for the traceback"
        print(f"{label}: {message}", file=sys.stderr)
        return 1
