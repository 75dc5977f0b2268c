"""diffcaps vs diffusers: import time, from_pretrained, peak RSS, forward (fp32 and bf16).

Both libraries work on the same diffusers folder (a Flux transformer at real width 3072 with
a few blocks), each measurement in a fresh child process so RSS and import caches are clean.

    python benchmarks/bench_load.py [--double 1] [--single 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    median, peak_rss_bytes, print_table, reset_peak_rss, rss_bytes, run_child, timed, warm_page_cache,
)

HERE = str(Path(__file__).resolve())


def _config(double: int, single: int) -> dict[str, Any]:
    return dict(num_layers=double, num_single_layers=single, guidance_embeds=True)


def _child(mode: str, lib: str, folder: str, extra: str) -> dict[str, Any]:
    import time

    start = time.perf_counter()
    import torch  # noqa: F401  (torch is imported by both; timed separately)

    torch_seconds = time.perf_counter() - start
    if mode == "import":
        seconds, _ = timed(lambda: _import_class(lib))
        return {"seconds": seconds, "torch_seconds": torch_seconds}
    cls = _import_class(lib)
    dtype = getattr(torch, extra)
    if mode == "load":
        baseline = rss_bytes()
        reset_peak_rss()

        def load() -> Any:
            model = cls.from_pretrained(folder, torch_dtype=dtype)
            for p in model.parameters():  # every page of every weight read (mapped weights fault in here)
                p.data.reshape(-1)[:: 4096 // p.element_size()].float().sum().item()
            return model

        seconds, model = timed(load)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"seconds": seconds, "peak_over_baseline": peak_rss_bytes() - baseline, "weights": size}
    model = cls.from_pretrained(folder, torch_dtype=dtype)
    inputs = _inputs(model.config if lib == "diffcaps" else model.config, dtype)
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = [timed(lambda: model(**inputs))[0] for _ in range(3)]
    return {"seconds": median(times)}


def _import_class(lib: str) -> Any:
    if lib == "diffcaps":
        from diffcaps.models.flux import FluxTransformer2DModel
    else:
        from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel


def _inputs(config: Any, dtype: Any) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    side, text = 16, 32
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator).to(dtype),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator).to(dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([3.5], dtype=dtype),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "flux"
        torch.manual_seed(0)
        FluxTransformer2DModel.from_config(FluxConfig(**_config(args.double, args.single))).save_pretrained(folder)
        warm_page_cache(folder)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"Flux width 3072, {args.double} double + {args.single} single blocks; "
              f"fp32 folder of {size / 2**30:.2f} GiB; median of {args.repeats} runs; torch {torch.__version__}\n")

        def both(mode: str, extra: str = "float32") -> dict[str, list[dict[str, Any]]]:
            return {
                lib: [run_child(HERE, ["--child", mode, lib, str(folder), extra]) for _ in range(args.repeats)]
                for lib in ("diffcaps", "diffusers")
            }

        rows: list[tuple[str, str, str, str, str]] = []

        def add(name: str, ours: float, theirs: float, unit: str, goal: str) -> None:
            rows.append((name, f"{ours:.3f} {unit}", f"{theirs:.3f} {unit}", f"{ours / theirs:.2f}x", goal))

        imports = both("import")
        add("import model class (torch already imported)",
            median([r["seconds"] for r in imports["diffcaps"]]), median([r["seconds"] for r in imports["diffusers"]]),
            "s", "<= 0.5x")
        add("import model class (incl. torch)",
            median([r["seconds"] + r["torch_seconds"] for r in imports["diffcaps"]]),
            median([r["seconds"] + r["torch_seconds"] for r in imports["diffusers"]]), "s", "")
        for dtype in ("float32", "bfloat16"):
            loads = both("load", dtype)
            add(f"from_pretrained -> {dtype}, every page read",
                median([r["seconds"] for r in loads["diffcaps"]]), median([r["seconds"] for r in loads["diffusers"]]),
                "s", "<= 0.7x")
            weights = loads["diffcaps"][0]["weights"]
            ours_peak = median([r["peak_over_baseline"] for r in loads["diffcaps"]])
            theirs_peak = median([r["peak_over_baseline"] for r in loads["diffusers"]])
            rows.append((f"peak RSS over baseline / weights ({dtype}, {weights / 2**30:.2f} GiB)",
                         f"{ours_peak / weights:.2f}x", f"{theirs_peak / weights:.2f}x",
                         f"{ours_peak / theirs_peak:.2f}x", "<= 1.2x weights"))
        for dtype in ("float32", "bfloat16"):
            runs = both("forward", dtype)
            add(f"forward, {dtype} (256 image + 32 text tokens)",
                median([r["seconds"] for r in runs["diffcaps"]]), median([r["seconds"] for r in runs["diffusers"]]),
                "s", "<= 1.0x")
        print_table("diffcaps vs diffusers 0.42.1 (ratio = diffcaps / diffusers)", rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:6])))
    else:
        main()
