"""diffcaps vs diffusers: forward time per attention backend, and with QKV projections fused.

Flux at its real width (3072: 24 heads of 128; 2 double + 2 single blocks) and Wan at the
1.3B width (1536: 12 heads of 128; 2 blocks), seeded weights shared by both libraries (the
diffusers model is given diffcaps' tensors), the same inputs. For each backend this machine
can run, diffcaps' ``attention.enable(model, AttentionConfig(backend=...))`` runs beside
diffusers' ``model.set_attention_backend(...)`` on the matching backend:

    sdpa -> native, math -> _native_math, flex -> flex, sdpa_flash -> _native_flash,
    sdpa_efficient -> _native_efficient, sdpa_cudnn -> _native_cudnn, flash -> flash,
    sage -> sage, xformers -> xformers

(diffcaps' ``math`` is an explicit float32 softmax, diffusers' ``_native_math`` is SDPA's math
kernel in the input dtype: the same algorithm, not the same code.) Backends that cannot run
here are listed with the reason. Then ``attention.fuse_qkv`` beside diffusers'
``fuse_qkv_projections()`` (both on ``sdpa``/``native``), and fused against unfused.

Times are CPU seconds of this process (``time.process_time``, one intra-op thread) per forward,
the median of interleaved runs, so that other work on the machine disturbs them as little as
possible. The goal is a ratio of at most 1.0x diffusers per backend.

    python benchmarks/bench_attention.py [--repeats 3] [--flux-tokens 256] [--wan-tokens 1024] [--text 64] [--quick]

At Flux's real width the linear layers dominate and take ~1 s per 100 tokens per forward on
one CPU thread, so the default is 256 image tokens (``--flux-tokens 1024 --text 128`` for
Flux's 512px shape, on a machine with time to spare). ``--quick`` runs 1 double + 1 single
Flux block and 1 Wan block over 64 tokens and 16 text tokens: a check that the script works
(the attention share of the time is then small).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
from _common import median, print_table  # noqa: E402

from diffcaps import attention  # noqa: E402
from diffcaps.errors import AttentionError  # noqa: E402
from diffcaps.io import on_meta_device  # noqa: E402
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel  # noqa: E402
from diffcaps.models.wan import WanConfig, WanTransformer3DModel  # noqa: E402

DIFFUSERS_NAME = {
    "sdpa": "native", "math": "_native_math", "flex": "flex", "sdpa_flash": "_native_flash",
    "sdpa_efficient": "_native_efficient", "sdpa_cudnn": "_native_cudnn", "flash": "flash",
    "sage": "sage", "xformers": "xformers",
}
Row = tuple[str, str, str, str, str]


def _flux(double: int, single: int) -> tuple[FluxTransformer2DModel, Any]:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as DiffusersFlux

    config = FluxConfig(num_layers=double, num_single_layers=single, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        in_channels=64, guidance_embeds=True)
    return _pair(FluxTransformer2DModel, DiffusersFlux, config)


def _wan(blocks: int) -> tuple[WanTransformer3DModel, Any]:
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel as DiffusersWan

    config = WanConfig(num_layers=blocks, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                       in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
    return _pair(WanTransformer3DModel, DiffusersWan, config)


def _pair(ours_class: Any, theirs_class: Any, config: Any) -> tuple[Any, Any]:
    """diffusers' model (seeded init) and ours built on the meta device and given its tensors:
    one copy of the weights for both."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    theirs = theirs_class(**kwargs)
    with on_meta_device():
        ours = ours_class(config)
    ours.load_state_dict(theirs.state_dict(), assign=True)
    return ours.eval().requires_grad_(False), theirs.eval().requires_grad_(False)


def _flux_inputs(tokens: int, text: int) -> dict[str, Tensor]:
    side = math.isqrt(tokens)
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return {
        "hidden_states": torch.randn(1, side * side, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, 4096, generator=generator),
        "pooled_projections": torch.randn(1, 768, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
    }


def _wan_inputs(tokens: int, text: int) -> dict[str, Tensor]:
    frames = 4
    side = max(1, math.isqrt(tokens // frames)) * 2  # patches of 2x2 latents
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, frames, side, side, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, text, 4096, generator=generator),
    }


def _forward(model: nn.Module, inputs: dict[str, Tensor]) -> Callable[[], float]:
    def run() -> float:
        start = time.process_time()
        with torch.no_grad():
            model(**inputs)
        return time.process_time() - start

    return run


def _versus(ours: Callable[[], float], theirs: Callable[[], float], repeats: int) -> tuple[float, float]:
    ours()  # warm-up
    theirs()
    mine, other = [], []
    for _ in range(repeats):
        mine.append(ours())
        other.append(theirs())
    return median(mine), median(other)


def _row(label: str, ours: float, theirs: float) -> Row:
    return label, f"{ours * 1000:.0f} ms", f"{theirs * 1000:.0f} ms", f"{ours / theirs:.2f}x", "<= 1.0x"


def _family(name: str, ours: Any, theirs: Any, inputs: dict[str, Tensor], repeats: int) -> list[Row]:
    rows: list[Row] = []
    for backend in attention.BACKENDS:
        try:
            attention.enable(ours, attention.AttentionConfig(backend=backend))
        except AttentionError as error:
            rows.append((backend, "unavailable", str(error).split(": ", 1)[-1], "", ""))
            continue
        theirs.set_attention_backend(DIFFUSERS_NAME[backend])
        rows.append(_row(f"{backend} / {DIFFUSERS_NAME[backend]}",
                         *_versus(_forward(ours, inputs), _forward(theirs, inputs), repeats)))
    attention.disable(ours)
    theirs.set_attention_backend("native")
    unfused = median([_forward(ours, inputs)() for _ in range(repeats)])
    attention.fuse_qkv(ours)
    theirs.fuse_qkv_projections()
    fused, their_fused = _versus(_forward(ours, inputs), _forward(theirs, inputs), repeats)
    rows.append(_row("fuse_qkv / fuse_qkv_projections", fused, their_fused))
    rows.append(("diffcaps fused vs unfused", f"{fused * 1000:.0f} ms", f"{unfused * 1000:.0f} ms (unfused)",
                 f"{fused / unfused:.2f}x", "< 1.0x"))
    attention.unfuse_qkv(ours)
    print(f"{name}: done", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flux-tokens", type=int, default=256, help="Flux image tokens (a square)")
    parser.add_argument("--wan-tokens", type=int, default=1024, help="Wan video tokens (4 latent frames)")
    parser.add_argument("--text", type=int, default=64, help="text tokens")
    parser.add_argument("--quick", action="store_true", help="1+1 Flux blocks, 1 Wan block, 64 tokens, 16 text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    blocks = 1 if args.quick else 2
    flux_tokens, wan_tokens, text = (64, 64, 16) if args.quick else (args.flux_tokens, args.wan_tokens, args.text)
    flux, their_flux = _flux(blocks, blocks)
    rows = _family("flux", flux, their_flux, _flux_inputs(flux_tokens, text), args.repeats)
    print_table(f"Flux width 3072, {blocks} double + {blocks} single blocks, {math.isqrt(flux_tokens) ** 2} image + "
                f"{text} text tokens, fp32, CPU ms per forward (median of {args.repeats}, 1 thread)", rows)
    del flux, their_flux
    wan, their_wan = _wan(blocks)
    wan_inputs = _wan_inputs(wan_tokens, text)
    video = math.prod(wan_inputs["hidden_states"].shape[2:]) // 4
    rows = _family("wan", wan, their_wan, wan_inputs, args.repeats)
    print_table(f"Wan width 1536, {blocks} block(s), {video} video + {text} text tokens, fp32, CPU ms per forward "
                f"(median of {args.repeats}, 1 thread)", rows)


if __name__ == "__main__":
    main()
