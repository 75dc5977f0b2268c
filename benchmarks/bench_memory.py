"""diffcaps vs diffusers: disk offloading RSS, fp8 casting bytes, checkpointing backward peak, compile time.

Each measurement runs in a fresh child process. Peak RSS is reset (``/proc/self/clear_refs``)
right before the measured step, so loading the model does not count.

    python benchmarks/bench_memory.py [--double 1] [--single 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_bytes, print_table, reset_peak_rss, rss_bytes, run_child, timed  # noqa: E402

HERE = str(Path(__file__).resolve())


def _load(lib: str, folder: str) -> Any:
    if lib == "diffcaps":
        from diffcaps.models.flux import FluxTransformer2DModel
    else:
        from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel.from_pretrained(folder)


def _inputs(config: Any, tokens: int = 256, text: int = 32) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
    }


def _child(mode: str, lib: str, folder: str, work: str) -> dict[str, Any]:
    import torch

    if mode in ("backward", "backward-ckpt"):
        return _backward(lib, checkpointed=mode == "backward-ckpt")
    model = _load(lib, folder)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs = _inputs(model.config)
    if mode == "disk":
        if lib == "diffcaps":
            from diffcaps import offload

            offload.enable(model, offload.GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=work))
        else:
            model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                       num_blocks_per_group=1, offload_to_disk_path=work)
        import gc

        gc.collect()
        resting = rss_bytes()
        reset_peak_rss()
        with torch.no_grad():
            model(**inputs)
        return {"weights": weights, "resting": resting, "peak": peak_rss_bytes()}
    if mode == "fp8":
        if lib == "diffcaps":
            from diffcaps import casting

            casting.enable(model, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
        else:
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return {"weights": weights, "after": sum(p.numel() * p.element_size() for p in model.parameters())}
    raise ValueError(mode)


SMALL = dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=4,
             joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 24, 24))
"""Width 256, 12 blocks: activations, not weights, dominate a backward pass over 4096 + 256 tokens."""


def _small(lib: str) -> Any:
    import torch

    torch.manual_seed(0)
    if lib == "diffcaps":
        from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(FluxConfig(**SMALL))
    from diffusers import FluxTransformer2DModel as Theirs

    return Theirs(**SMALL)


def _backward(lib: str, *, checkpointed: bool) -> dict[str, Any]:
    model = _small(lib).train()
    if checkpointed:
        if lib == "diffcaps":
            from diffcaps import checkpointing

            checkpointing.enable(model)
        else:
            model.enable_gradient_checkpointing()
    inputs = _inputs(model.config, tokens=4096, text=256)
    base = rss_bytes()
    reset_peak_rss()
    model(**inputs).sample.square().mean().backward()
    return {"peak_over_start": peak_rss_bytes() - base}


def _compile_child(kind: str, lib: str) -> dict[str, Any]:
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # truly cold: no cached kernels
    import torch

    config = dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=4,
                  joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    if lib == "diffcaps":
        from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

        model: Any = FluxTransformer2DModel.from_config(FluxConfig(**config)).eval()
    else:
        from diffusers import FluxTransformer2DModel as Theirs

        model = Theirs(**config).eval()
    inputs = _inputs(model.config, tokens=64, text=16)
    if kind == "regional":
        if lib == "diffcaps":
            from diffcaps import compile as regional_compile

            regional_compile.enable(model)
        else:
            model.compile_repeated_blocks()
        runner = model
    else:
        runner = torch.compile(model)
    with torch.no_grad():
        seconds, _ = timed(lambda: runner(**inputs))
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    args = parser.parse_args()

    from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

    rows: list[tuple[str, str, str, str, str]] = []
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "flux"
        FluxTransformer2DModel.from_config(
            FluxConfig(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
        ).save_pretrained(folder)
        print(f"Flux width 3072, {args.double} double + {args.single} single blocks, fp32, CPU\n")

        def both(mode: str) -> dict[str, dict[str, Any]]:
            return {lib: run_child(HERE, ["--child", mode, lib, str(folder), str(Path(tmp) / f"{mode}-{lib}")])
                    for lib in ("diffcaps", "diffusers")}

        disk = both("disk")
        weights = disk["diffcaps"]["weights"]
        ours, theirs = disk["diffcaps"], disk["diffusers"]
        rows.append((f"disk offload: RSS at rest (weights {weights / gib:.2f} GiB)", f"{ours['resting'] / gib:.2f} GiB",
                     f"{theirs['resting'] / gib:.2f} GiB", f"{ours['resting'] / theirs['resting']:.2f}x", "lower"))
        rows.append(("disk offload: peak RSS during forward", f"{ours['peak'] / gib:.2f} GiB",
                     f"{theirs['peak'] / gib:.2f} GiB", f"{ours['peak'] / theirs['peak']:.2f}x", "lower"))
        fp8 = both("fp8")
        ours_b, theirs_b = fp8["diffcaps"]["after"], fp8["diffusers"]["after"]
        rows.append(("fp8 casting: parameter bytes (fraction of fp32)", f"{ours_b / gib:.2f} GiB ({ours_b / weights:.2f})",
                     f"{theirs_b / gib:.2f} GiB ({theirs_b / weights:.2f})", f"{ours_b / theirs_b:.2f}x", "~0.25 of fp32"))
        for mode, label in (("backward", "backward peak, plain"), ("backward-ckpt", "backward peak, checkpointing")):
            result = both(mode)
            o, t = result["diffcaps"]["peak_over_start"], result["diffusers"]["peak_over_start"]
            rows.append((label + " (width 256, 12 blocks, 4096+256 tokens)", f"{o / gib:.2f} GiB", f"{t / gib:.2f} GiB", f"{o / t:.2f}x", "lower with ckpt"))
    for kind in ("regional", "full"):
        o = run_child(HERE, ["--compile", kind, "diffcaps"])["seconds"]
        t = run_child(HERE, ["--compile", kind, "diffusers"])["seconds"]
        rows.append((f"cold compile + first call, {kind} (inductor, 4+8 blocks)", f"{o:.1f} s", f"{t:.1f} s", f"{o / t:.2f}x", ""))
    print_table("diffcaps vs diffusers 0.42.1 (ratio = diffcaps / diffusers)", rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:6])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--compile":
        print(json.dumps(_compile_child(*sys.argv[2:4])))
    else:
        main()
