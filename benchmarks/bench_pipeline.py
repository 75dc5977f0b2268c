"""A diffusers FluxPipeline running diffcaps' transformer (``wrap``) beside diffusers' own, same weights.

The pipeline folder has tiny seeded text encoders and VAE (``tiny_flux_pipeline_folder``) and a
real-width transformer: FLUX.1-dev's 3072 wide, 24 heads, with ``--double``/``--single`` blocks
(the real model has 19 and 38), float32. Every measurement runs in a fresh child process:

- time per image, warm: the median of ``--repeats`` pipeline calls after one warm-up call;
- the same with First Block Cache (threshold ``--threshold``; diffcaps ``cache.enable``,
  diffusers ``transformer.enable_cache``), and how many of the steps ran every block;
- time to first image from a cold process: interpreter start, imports, pipeline load and one
  image, timed by the parent around the whole child (median of ``--repeats`` children);
- the cold child's peak RSS.

The images of the two sides are compared too (max |difference| of the decoded pixels).

    python benchmarks/bench_pipeline.py [--double 2] [--single 2] [--size 128] [--steps 4] [--repeats 3]
    python benchmarks/bench_pipeline.py --quick      # 1 + 1 blocks, 32×32, 2 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, peak_rss_bytes, print_table, run_child, timed, warm_page_cache  # noqa: E402

HERE = str(Path(__file__).resolve())
PROMPT = "a photo of a red house by the sea"
WIDTH: dict[str, Any] = {"attention_head_dim": 128, "num_attention_heads": 24, "in_channels": 64,
                         "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
                         "joint_attention_dim": 64, "pooled_projection_dim": 32}
"""FLUX.1-dev's transformer width; the text widths fit the tiny text encoders (T5 64, CLIP 32)."""
TEXT_TOKENS = 32


def _pipeline(lib: str, folder: str) -> tuple[Any, Any]:
    """(pipeline, the diffcaps model or diffusers' transformer)."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if lib == "diffcaps":
        from diffcaps import AutoModel
        from diffcaps.interop.diffusers import wrap

        model = AutoModel.from_pretrained(Path(folder) / "transformer")
        pipe = FluxPipeline.from_pretrained(folder, transformer=wrap(model))
    else:
        pipe = FluxPipeline.from_pretrained(folder)
        model = pipe.transformer
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def _image(pipe: Any, size: int, steps: int) -> Any:
    import torch

    with torch.inference_mode():
        out = pipe(PROMPT, width=size, height=size, num_inference_steps=steps, max_sequence_length=TEXT_TOKENS,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _cache_on(lib: str, model: Any, threshold: float) -> None:
    if lib == "diffcaps":
        from diffcaps import cache

        cache.enable(model, cache.FirstBlockCacheConfig(threshold=threshold))
    else:
        from diffusers.hooks import FirstBlockCacheConfig

        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def _count_full_steps(model: Any) -> list[int]:
    """Count the steps that ran every block: the last block is called either way (the cache answers
    inside it), so count what ran on its first layer."""
    ran: list[int] = []
    model.single_transformer_blocks[-1].norm.register_forward_hook(lambda *_: ran.append(1))
    return ran


def _warm(lib: str, folder: str, size: int, steps: int, repeats: int, threshold: float, out: str) -> dict[str, Any]:
    import numpy as np

    pipe, model = _pipeline(lib, folder)
    image = _image(pipe, size, steps)  # warm-up
    per_image = median([timed(lambda: _image(pipe, size, steps))[0] for _ in range(repeats)])
    _cache_on(lib, model, threshold)
    _image(pipe, size, steps)  # warm-up
    cached = median([timed(lambda: _image(pipe, size, steps))[0] for _ in range(repeats)])
    ran = _count_full_steps(model)
    cached_image = _image(pipe, size, steps)
    np.save(out, np.stack([image, cached_image]))
    return {"per_image": per_image, "cached": cached, "full_steps": len(ran)}


def _cold(lib: str, folder: str, size: int, steps: int) -> dict[str, Any]:
    started = time.perf_counter()
    pipe, _ = _pipeline(lib, folder)
    loaded = time.perf_counter()
    _image(pipe, size, steps)
    done = time.perf_counter()
    return {"load": loaded - started, "image": done - loaded, "peak_rss": peak_rss_bytes()}


def _make_folder(tmp: Path, double: int, single: int) -> Path:
    from diffcaps.interop.diffusers import tiny_flux_pipeline_folder
    from diffcaps.models.flux import FluxConfig

    config = FluxConfig(num_layers=double, num_single_layers=single, **WIDTH)
    with contextlib.redirect_stderr(io.StringIO()):
        return tiny_flux_pipeline_folder(tmp / "flux-pipeline", config=config, text_tokens=TEXT_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (default 2)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (default 2)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measure (default 3)")
    parser.add_argument("--threshold", type=float, default=0.3, help="First Block Cache threshold (default 0.3)")
    parser.add_argument("--quick", action="store_true", help="1 + 1 blocks, 32x32, 2 steps, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.double, args.single, args.size, args.steps, args.repeats = 1, 1, 32, 2, 1

    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        folder = _make_folder(tmp, args.double, args.single)
        warm_page_cache(folder)
        size = sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))
        tokens = (args.size // 4) ** 2  # the tiny VAE halves each side, packing halves it again
        print(f"FluxPipeline, tiny text encoders and VAE, transformer 3072 wide with {args.double} double + "
              f"{args.single} single blocks ({size / 2**30:.2f} GiB fp32); {args.size}x{args.size} "
              f"({tokens} image + {TEXT_TOKENS} text tokens), {args.steps} steps; median of {args.repeats}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        libs = ("diffcaps", "diffusers")
        common = [str(folder), str(args.size), str(args.steps)]
        warm = {lib: run_child(HERE, ["--child", "warm", lib, *common, str(args.repeats), str(args.threshold),
                                      str(tmp / f"{lib}.npy")]) for lib in libs}
        cold: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
        walls: dict[str, list[float]] = {lib: [] for lib in libs}
        for _ in range(args.repeats):
            for lib in libs:  # alternate, so a busy moment of the machine hits both sides alike
                seconds, result = timed(lambda: run_child(HERE, ["--child", "cold", lib, *common]))
                walls[lib].append(seconds)
                cold[lib].append(result)

        rows: list[tuple[str, str, str, str, str]] = []

        def add(label: str, ours: float, theirs: float, unit: str, goal: str) -> None:
            rows.append((label, f"{ours:.3f} {unit}", f"{theirs:.3f} {unit}", f"{ours / theirs:.2f}x", goal))

        add("time per image, warm", warm["diffcaps"]["per_image"], warm["diffusers"]["per_image"], "s", "<= 1.0x")
        full = f"{warm['diffcaps']['full_steps']}/{warm['diffusers']['full_steps']} of {args.steps} steps in full"
        add(f"time per image, First Block Cache {args.threshold} ({full})", warm["diffcaps"]["cached"],
            warm["diffusers"]["cached"], "s", "")
        add("time to first image, cold process (wall)", median(walls["diffcaps"]), median(walls["diffusers"]),
            "s", "<= 0.5x")
        for key, label in (("load", "  of which pipeline load"), ("image", "  of which the first image")):
            add(label, median([r[key] for r in cold["diffcaps"]]), median([r[key] for r in cold["diffusers"]]),
                "s", "")
        ours, theirs = (median([r["peak_rss"] for r in cold[lib]]) / 2**30 for lib in libs)
        add("peak RSS, cold process", ours, theirs, "GiB", "")
        print_table("diffcaps vs diffusers 0.42.1 transformer in FluxPipeline (ratio = diffcaps / diffusers)", rows)
        images = {lib: np.load(tmp / f"{lib}.npy") for lib in libs}
        gap = np.abs(images["diffcaps"] - images["diffusers"]).max(axis=(1, 2, 3))
        print(f"\nmax |diffcaps - diffusers| of the decoded pixels (0..1): {gap[0]:.2e} plain, {gap[1]:.2e} with FBC")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        if sys.argv[2] == "warm":
            lib, folder, size, steps, repeats, threshold, out = sys.argv[3:10]
            print(json.dumps(_warm(lib, folder, int(size), int(steps), int(repeats), float(threshold), out)))
        else:
            lib, folder, size, steps = sys.argv[3:7]
            print(json.dumps(_cold(lib, folder, int(size), int(steps))))
    else:
        main()
