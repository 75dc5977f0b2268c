"""diffcaps vs diffusers: loading one original-layout (BFL) Flux checkpoint file.

The file is FLUX.1-wide (3072: 24 heads × 128) with a few blocks, written straight to disk
one tensor at a time (the weights are never all in memory while it is made). Each side then
loads it in a fresh child process, from a warm page cache, into the file's dtype (or ``--load-dtype``):

- diffcaps:  ``weights.load_single_file(FluxTransformer2DModel, path, torch_dtype=...)``
- diffusers: ``FluxTransformer2DModel.from_single_file(path, config=<local folder>,
  local_files_only=True, torch_dtype=...)``

Wall time is given for the load call alone, and for the load followed by reading every
page of every weight: both libraries may hand back weights that still live in the file
mapping (no copy where no cast is needed), paged in on first use.
Peak RSS is the child's high-water mark (VmHWM, interpreter and imports included), shown
beside the file size. Both sides' weights are fingerprinted to check they loaded the same.

    python benchmarks/bench_single_file.py [--double 4] [--single 8] [--dtype bfloat16] [--repeats 2]
                                           [--load-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, print_table, run_child, warm_page_cache  # noqa: E402

HERE = str(Path(__file__).resolve())
WIDTH = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096,
         "pooled_projection_dim": 768, "in_channels": 64, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def make_file(folder: Path, double: int, single: int, dtype_name: str) -> tuple[Path, Path]:
    """Write an original-layout file and a diffusers config folder for the same model."""
    import torch

    from diffcaps.io import TensorSlot, stream_safetensors
    from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
    from diffcaps.weights.spec import TensorSpec

    config = FluxConfig.from_dict({**WIDTH, "num_layers": double, "num_single_layers": single})
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    pool = torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)).to(dtype)

    def fetch(key: str) -> torch.Tensor:  # a scaled, differently placed slice of one random pool
        count = 1
        for size in shapes[key]:
            count *= size
        start = zlib.crc32(key.encode()) % (pool.numel() - count + 1)
        return (pool[start : start + count] * 0.02).view(shapes[key])

    mapper = FluxTransformer2DModel.declared_capabilities().weight_mapping
    plan = mapper.plan(list(shapes), "to_original")
    targets = plan.target_specs({k: TensorSpec(shape=s, dtype=dtype) for k, s in shapes.items()})
    slots = [TensorSlot(key, dtype, targets[key].shape) for step in plan.steps for key in step.targets]
    produced = ((key, tensor) for step in plan.steps
                for key, tensor in zip(step.targets, step.run([fetch(k) for k in step.sources]), strict=True))
    path = folder / "flux1-bench.safetensors"
    stream_safetensors(path, slots, produced)
    config_folder = folder / "config"
    config_folder.mkdir()
    (config_folder / "config.json").write_text(json.dumps(config.to_dict()))
    return path, config_folder


def _child(lib: str, path: str, config_folder: str, dtype_name: str) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, dtype_name)
    if lib == "diffcaps":
        from diffcaps.models.flux import FluxTransformer2DModel
        from diffcaps.weights import load_single_file

        def load() -> Any:
            return load_single_file(FluxTransformer2DModel, path, torch_dtype=dtype)
    else:
        from diffusers import FluxTransformer2DModel as DiffusersFlux
        from diffusers.utils import logging

        logging.set_verbosity_error()

        def load() -> Any:
            return DiffusersFlux.from_single_file(path, config=config_folder, local_files_only=True,
                                                  torch_dtype=dtype)

    before = _status("VmRSS:")
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter() - start
    fingerprint = 0.0
    for tensor in model.state_dict().values():  # one value from every 4 KiB page: all pages are read
        fingerprint += float(tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].double().sum())
    touched = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"load": loaded, "load_and_touch": touched, "peak": _status("VmHWM:"), "before": before,
            "weights": weights, "fingerprint": fingerprint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="dtype of the file")
    parser.add_argument("--load-dtype", choices=("bfloat16", "float32", "float16"),
                        help="dtype to load into (default: the file's; another one makes both sides cast)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("LIB", "FILE", "CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-single-file-") as tmp:
        start = time.perf_counter()
        path, config_folder = make_file(Path(tmp), args.double, args.single, args.dtype)
        size = path.stat().st_size
        print(f"file: {args.double} double + {args.single} single blocks at width 3072, {args.dtype}, "
              f"{size / 1e9:.2f} GB (written in {time.perf_counter() - start:.1f} s); "
              f"loaded as {args.load_dtype or args.dtype}")
        runs: dict[str, list[dict[str, Any]]] = {"diffcaps": [], "diffusers": []}
        for _ in range(args.repeats):
            for lib in runs:
                warm_page_cache(Path(tmp))
                load_dtype = args.load_dtype or args.dtype
                runs[lib].append(run_child(HERE, ["--child", lib, str(path), str(config_folder), load_dtype]))

    ours, theirs = runs["diffcaps"], runs["diffusers"]
    same = ours[0]["fingerprint"] == theirs[0]["fingerprint"] and ours[0]["weights"] == theirs[0]["weights"]

    def seconds(rows: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in rows])

    def peak(rows: list[dict[str, Any]]) -> int:
        return max(int(r["peak"]) for r in rows)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×"

    rows = [
        ("load (s)", f"{seconds(ours, 'load'):.2f}", f"{seconds(theirs, 'load'):.2f}",
         ratio(seconds(ours, "load"), seconds(theirs, "load")), "≤ 0.5×"),
        ("load + read every weight (s)", f"{seconds(ours, 'load_and_touch'):.2f}",
         f"{seconds(theirs, 'load_and_touch'):.2f}",
         ratio(seconds(ours, "load_and_touch"), seconds(theirs, "load_and_touch")), "≤ 0.5×"),
        ("peak RSS (GB)", f"{peak(ours) / 1e9:.2f}", f"{peak(theirs) / 1e9:.2f}",
         ratio(peak(ours), peak(theirs)), ""),
        ("peak RSS / file size", f"{peak(ours) / size:.2f}×", f"{peak(theirs) / size:.2f}×", "", "≤ 1.2×"),
        ("RSS growth while loading / file size", f"{(peak(ours) - ours[0]['before']) / size:.2f}×",
         f"{(peak(theirs) - theirs[0]['before']) / size:.2f}×", "", ""),
    ]
    print_table(f"single-file load, median of {args.repeats} (each in a fresh process, warm page cache)", rows)
    print(f"same weights on both sides: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
