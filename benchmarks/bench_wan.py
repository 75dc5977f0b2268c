"""Wan beside diffusers on the same work, at Wan 2.1 1.3B width (1536 wide, 12 heads, a few blocks).

Each measurement runs in a fresh child process (clean RSS and import caches) on the same files:

- folder load: ``from_pretrained(folder, torch_dtype=float32)``, every page of every weight read;
- single-file load: the original Wan layout (``model.diffusion_model.`` prefix, bf16), diffcaps
  ``weights.load_single_file`` vs diffusers ``from_single_file(config=<folder>)``;
- forward, float32: 4 latent frames of 16×16 (256 tokens) and 64 text tokens;
- LoRA load: a diffusers-layout rank-32 LoRA on every block linear, diffcaps
  ``lora.load_adapter`` vs diffusers ``WanLoraLoaderMixin.lora_state_dict`` + ``load_lora_adapter``
  (best of ``--repeats``, adapter removed between runs);
- one First Block Cache loop (threshold 0.3): ``--steps`` Euler steps, time and how many steps ran
  every block.

    python benchmarks/bench_wan.py [--blocks 2] [--repeats 3] [--steps 8]
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
WIDTH: dict[str, Any] = {"num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
                         "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960}
"""Wan 2.1 T2V 1.3B's shape; ``num_layers`` is set by ``--blocks`` (the real model has 30)."""
THRESHOLD = 0.3


def _class(lib: str) -> Any:
    if lib == "diffcaps":
        from diffcaps.models.wan import WanTransformer3DModel

        return WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel as DiffusersWan
    from diffusers.utils import logging

    logging.set_verbosity_error()
    return DiffusersWan


def _inputs(dtype: Any) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, WIDTH["in_channels"], 4, 16, 16, generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn(1, 64, WIDTH["text_dim"], generator=generator).to(dtype),
        "timestep": torch.tensor([500.0]),
    }


def _touch(model: Any) -> int:
    """Read every page of every weight (mapped weights fault in here); the weights' bytes."""
    for p in model.parameters():
        p.data.reshape(-1)[:: 4096 // p.element_size()].float().sum().item()
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _load(lib: str, mode: str, source: str, folder: str) -> dict[str, Any]:
    import torch

    cls = _class(lib)
    baseline = rss_bytes()
    reset_peak_rss()
    if mode == "folder":
        seconds, model = timed(lambda: cls.from_pretrained(source, torch_dtype=torch.float32))
    elif lib == "diffcaps":
        from diffcaps.weights import load_single_file

        seconds, model = timed(lambda: load_single_file(cls, source, torch_dtype=torch.bfloat16))
    else:
        seconds, model = timed(lambda: cls.from_single_file(source, config=folder, local_files_only=True,
                                                            torch_dtype=torch.bfloat16))
    touch_seconds, weights = timed(lambda: _touch(model))
    return {"seconds": seconds, "read_seconds": seconds + touch_seconds,
            "peak_over_baseline": peak_rss_bytes() - baseline, "weights": weights}


def _lora_load(lib: str, model: Any, path: str) -> None:
    if lib == "diffcaps":
        from diffcaps import lora

        lora.load_adapter(model, path, adapter_name="x")
        return
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    state, metadata = WanLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    model.load_lora_adapter(state, prefix="transformer", adapter_name="x", metadata=metadata)


def _lora_unload(lib: str, model: Any) -> None:
    if lib == "diffcaps":
        from diffcaps import lora

        lora.unload(model)
    else:
        model.delete_adapters("x")


def _cache_loop(lib: str, model: Any, steps: int) -> tuple[float, int, Any]:
    """The First Block Cache loop: seconds, steps that ran the last block, final latents."""
    import torch

    inputs = _inputs(torch.float32)
    ran: list[int] = []
    # the block itself is called either way (the cache answers inside it): read what ran on its first layer
    handle = model.blocks[-1].attn1.to_q.register_forward_hook(lambda *_: ran.append(1))
    if lib == "diffcaps":
        from diffcaps import cache

        cache.enable(model, cache.FirstBlockCacheConfig(threshold=THRESHOLD))

        def enter(t: float) -> Any:
            return cache.context(model, "cond", timestep=t)
    else:
        from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

        model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))

        def enter(t: float) -> Any:
            return model.cache_context("cond")

    def loop() -> Any:
        ts = torch.linspace(1.0, 0.0, steps + 1)
        x = inputs["hidden_states"]
        with torch.no_grad():
            for i in range(steps):
                t = float(ts[i]) * 1000
                with enter(t):
                    out = model(**dict(inputs, hidden_states=x, timestep=torch.tensor([t])), return_dict=False)[0]
                x = x + (ts[i + 1] - ts[i]) * out
        return x

    seconds, latents = timed(loop)
    handle.remove()
    return seconds, len(ran), latents


def _work(lib: str, folder: str, lora_path: str, repeats: int, steps: int, out: str) -> dict[str, Any]:
    import torch

    model = _class(lib).from_pretrained(folder, torch_dtype=torch.float32).eval()
    inputs = _inputs(torch.float32)
    with torch.no_grad():
        model(**inputs)  # warm-up
        forward = median([timed(lambda: model(**inputs))[0] for _ in range(repeats)])
    loads = []
    _lora_load(lib, model, lora_path)  # warm-up
    _lora_unload(lib, model)
    for _ in range(repeats):
        loads.append(timed(lambda: _lora_load(lib, model, lora_path))[0])
        _lora_unload(lib, model)
    cache_seconds, computed, latents = _cache_loop(lib, model, steps)
    torch.save(latents, out)
    return {"forward": forward, "lora": min(loads), "cache": cache_seconds, "computed": computed}


def _make_files(tmp: Path, blocks: int) -> tuple[Path, Path, Path]:
    import torch

    from diffcaps.io import save_safetensors
    from diffcaps.models.wan import WanConfig, WanTransformer3DModel
    from diffcaps.weights import save_single_file

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(WanConfig(**WIDTH, num_layers=blocks))
    folder = tmp / "wan"
    model.save_pretrained(folder)
    single = save_single_file(model, tmp / "wan.safetensors", prefix="model.diffusion_model.",
                              torch_dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(32, module.in_features, generator=generator) * 0.01
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 32, generator=generator) * 0.01
    lora_path = save_safetensors(tensors, tmp / "lora.safetensors")
    return folder, single, lora_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        folder, single, lora_path = _make_files(tmp, args.blocks)
        warm_page_cache(tmp)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"Wan 1.3B width (1536, 12 heads, ffn 8960), {args.blocks} blocks; fp32 folder of {size / 2**30:.2f} "
              f"GiB, bf16 single file of {single.stat().st_size / 2**30:.2f} GiB; median of {args.repeats} runs; "
              f"torch {torch.__version__}\n")
        rows: list[tuple[str, str, str, str, str]] = []

        def add(label: str, ours: float, theirs: float, unit: str, goal: str) -> None:
            rows.append((label, f"{ours:.3f} {unit}", f"{theirs:.3f} {unit}", f"{ours / theirs:.2f}x", goal))

        for mode, source in (("folder", folder), ("single", single)):
            runs = {lib: [run_child(HERE, ["--child", "load", lib, mode, str(source), str(folder)])
                          for _ in range(args.repeats)] for lib in ("diffcaps", "diffusers")}
            def both(key: str) -> tuple[float, float]:
                ours, theirs = (median([r[key] for r in runs[lib]]) for lib in ("diffcaps", "diffusers"))
                return ours, theirs

            what = "from_pretrained, float32" if mode == "folder" else "single file (original, bf16)"
            add(f"{what}: load", *both("seconds"), "s", "<= 0.5x")
            add(f"{what}: load + every page read", *both("read_seconds"), "s", "")
            weights = runs["diffcaps"][0]["weights"]
            ours, theirs = both("peak_over_baseline")
            rows.append((f"{what}: peak RSS / weights ({weights / 2**30:.2f} GiB)", f"{ours / weights:.2f}x",
                         f"{theirs / weights:.2f}x", f"{ours / theirs:.2f}x", "<= 1.2x weights"))

        work = {lib: run_child(HERE, ["--child", "work", lib, str(folder), str(lora_path), str(args.repeats),
                                      str(args.steps), str(tmp / f"{lib}.pt")]) for lib in ("diffcaps", "diffusers")}
        add("forward, float32 (256 video + 64 text tokens)", work["diffcaps"]["forward"],
            work["diffusers"]["forward"], "s", "<= 1.0x")
        add("LoRA load (diffusers layout, rank 32, every block linear)", work["diffcaps"]["lora"],
            work["diffusers"]["lora"], "s", "")
        computed = f"{work['diffcaps']['computed']}/{work['diffusers']['computed']} of {args.steps} steps in full"
        add(f"First Block Cache loop, {args.steps} steps ({computed})", work["diffcaps"]["cache"],
            work["diffusers"]["cache"], "s", "")
        gap = (torch.load(tmp / "diffcaps.pt") - torch.load(tmp / "diffusers.pt")).abs().max().item()
        print_table("diffcaps vs diffusers 0.42.1 on Wan (ratio = diffcaps / diffusers)", rows)
        print(f"\nFirst Block Cache loop: max |diffcaps - diffusers| of the final latents = {gap:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        if sys.argv[2] == "load":
            print(json.dumps(_load(*sys.argv[3:7])))
        else:
            lib, folder, lora_path, repeats, steps, out = sys.argv[3:9]
            print(json.dumps(_work(lib, folder, lora_path, int(repeats), int(steps), out)))
    else:
        main()
