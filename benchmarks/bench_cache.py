"""diffcaps vs diffusers: inference caches on a 20-step Euler loop over a seeded Flux transformer.

For each cache (First Block Cache, Pyramid Attention Broadcast, FasterCache, TaylorSeer,
MagCache) both libraries run the same loop, on the same weights and inputs, at the same
settings, in one process:

- speed: time of the loop uncached and cached on a small Flux, and the decisions (module
  calls skipped over the loop; "same" when every step ran exactly the same modules in both
  libraries, and the final latents' largest difference);
- overhead: the same cache at settings that never skip, minus the uncached loop, per step,
  on a tiny Flux where the hooks and decisions are a visible part of the work: CPU time, and
  the exact numbers of Python function calls and tensor operations the cache adds (counts
  that no other load on the machine can disturb).

Times are CPU seconds of this process (``time.process_time``, one intra-op thread) of
interleaved runs, so that other work on the machine disturbs them as little as possible:
medians for speed; for overhead, the median of paired differences (cached minus uncached,
run back to back), which cancels slow drift in the machine's load.

    python benchmarks/bench_cache.py [--double 2] [--single 4] [--width 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _common import median, print_table  # noqa: E402

STEPS = 20
RAN = ("attn.to_q", ".norm", ".norm1")  # the first sub-layer of each attention module and block


class Clock:
    """The current timestep (0–1000) for diffusers' ``current_timestep_callback``."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


def _inputs(config: Any, side: int, text: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
    }


@contextmanager
def _call_log(model: nn.Module) -> Iterator[list[str]]:
    log: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: log.append(n))
               for n, m in model.named_modules() if n.endswith(RAN)]
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


def _loop(model: nn.Module, inputs: dict[str, Tensor], enter: Callable[[float], Any],
          log: list[str] | None = None) -> tuple[Tensor, list[int]]:
    ts = torch.linspace(1.0, 0.0, STEPS + 1)
    x = inputs["hidden_states"].clone()
    ran: list[int] = []
    with torch.no_grad():
        for i in range(STEPS):
            if log is not None:
                log.clear()
            with enter(float(ts[i]) * 1000):
                out = model(**dict(inputs, hidden_states=x, timestep=ts[i].expand(1)), return_dict=False)[0]
            if log is not None:
                ran.append(len(log))
            x = x + (ts[i + 1] - ts[i]) * out
    return x, ran


class Side:
    """One library's model and how to switch its caches on and off."""

    def __init__(self, lib: str, model: nn.Module) -> None:
        self.lib = lib
        self.model = model
        self.clock = Clock()

    def enter(self, timestep: float) -> Any:
        if self.lib == "diffcaps":
            from diffcaps import cache

            return cache.context(self.model, "cond", timestep=timestep)  # type: ignore[arg-type]
        self.clock.now = timestep
        return self.model.cache_context("cond")

    def enable(self, kind: str, settings: dict[str, Any]) -> None:
        if self.lib == "diffcaps":
            import diffcaps.cache as lib
        else:
            import diffusers.hooks as lib  # type: ignore[no-redef]
        classes = {"fbc": lib.FirstBlockCacheConfig, "pab": lib.PyramidAttentionBroadcastConfig,
                   "faster": lib.FasterCacheConfig, "taylorseer": lib.TaylorSeerCacheConfig,
                   "mag": lib.MagCacheConfig}
        if self.lib == "diffusers" and kind in ("pab", "faster"):
            settings = dict(settings, current_timestep_callback=self.clock)
        if self.lib == "diffusers" and "mag_ratios" in settings:
            settings = dict(settings, mag_ratios=list(settings["mag_ratios"]))
        config = classes[kind](**settings)
        if self.lib == "diffcaps":
            from diffcaps import cache

            cache.enable(self.model, config)  # type: ignore[arg-type]
        else:
            self.model.enable_cache(config)

    def disable(self) -> None:
        if self.lib == "diffcaps":
            from diffcaps import cache

            cache.disable(self.model)  # type: ignore[arg-type]
        else:
            self.model.disable_cache()

    def reset(self) -> None:
        if self.lib == "diffcaps":
            from diffcaps import cache

            cache.reset(self.model)  # type: ignore[arg-type]
        elif getattr(self.model, "_cache_config", None) is not None:
            self.model._reset_stateful_cache()

    def run(self, inputs: dict[str, Tensor]) -> float:
        self.reset()
        start = time.process_time()
        _loop(self.model, inputs, self.enter)
        return time.process_time() - start

    def decisions(self, inputs: dict[str, Tensor]) -> tuple[Tensor, list[int]]:
        self.reset()
        with _call_log(self.model) as log:
            return _loop(self.model, inputs, self.enter, log)


def _times(sides: list[Side], inputs: dict[str, Tensor], repeats: int,
           pick: Callable[[list[float]], float] = median) -> list[float]:
    """Interleaved runs (so drift in machine load hits every side alike), ``pick`` per side."""
    for side in sides:
        side.run(inputs)  # warm-up
    samples: list[list[float]] = [[] for _ in sides]
    for _ in range(repeats):
        for index, side in enumerate(sides):
            samples[index].append(side.run(inputs))
    return [pick(s) for s in samples]


def _flux_config(double: int, single: int, width: int) -> Any:
    from diffcaps.models.flux import FluxConfig

    return FluxConfig(num_layers=double, num_single_layers=single, attention_head_dim=64,
                      num_attention_heads=width // 64, joint_attention_dim=128, pooled_projection_dim=64,
                      in_channels=16, guidance_embeds=True, axes_dims_rope=(8, 28, 28))


def _sides(config: Any) -> tuple[Side, Side]:
    from tests.flux_fixtures import diffusers_flux, seeded_model

    model = seeded_model(config, seed=3)
    return Side("diffcaps", model), Side("diffusers", diffusers_flux(config, model.state_dict()))


def _mag_ratios(side: Side, inputs: dict[str, Tensor]) -> tuple[float, ...]:
    from diffcaps import cache

    cache.enable(side.model, cache.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))  # type: ignore[arg-type]
    _loop(side.model, inputs, side.enter)
    ratios = cache.calibrated_mag_ratios(side.model, context="cond")  # type: ignore[arg-type]
    cache.disable(side.model)  # type: ignore[arg-type]
    return ratios


Case = tuple[str, str, dict[str, Any], dict[str, Any]]


def _cases(ratios: tuple[float, ...]) -> list[Case]:
    """(title, kind, settings that skip, settings that never skip)."""
    return [
        ("First Block Cache", "fbc", {"threshold": 0.6}, {"threshold": 0.0}),
        ("Pyramid Attention Broadcast", "pab", {"spatial_attention_block_skip_range": 3},
         {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": (0, 0)}),
        ("FasterCache (guidance-distilled)", "faster",
         {"spatial_attention_timestep_skip_range": (-1, 901), "is_guidance_distilled": True},
         {"spatial_attention_timestep_skip_range": (0, 0), "is_guidance_distilled": True}),
        ("TaylorSeer", "taylorseer", {"cache_interval": 3, "taylor_factors_dtype": torch.float32},
         {"cache_interval": 1, "taylor_factors_dtype": torch.float32}),
        ("MagCache", "mag", {"threshold": 0.3, "mag_ratios": ratios, "num_inference_steps": STEPS},
         {"threshold": 0.3, "mag_ratios": ratios, "num_inference_steps": STEPS, "max_skip_steps": 0}),
    ]


def _speed(args: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    config = _flux_config(args.double, args.single, args.width)
    ours, theirs = _sides(config)
    inputs = _inputs(config, args.side, 32)
    uncached = _times([ours, theirs], inputs, args.repeats)
    _, full = ours.decisions(inputs)
    rows = [("uncached loop", f"{uncached[0]:.3f} s", f"{uncached[1]:.3f} s", f"{uncached[0] / uncached[1]:.2f}x", "")]
    for title, kind, settings, _ in _cases(_mag_ratios(ours, inputs)):
        for side in (ours, theirs):
            side.enable(kind, settings)
        (ours_latents, ours_ran), (their_latents, their_ran) = ours.decisions(inputs), theirs.decisions(inputs)
        cached = _times([ours, theirs], inputs, args.repeats)
        for side in (ours, theirs):
            side.disable()
        skipped = [sum(f - r for f, r in zip(full, ran, strict=True)) for ran in (ours_ran, their_ran)]
        diff = (ours_latents - their_latents).abs().max().item()
        rows.append((f"{title}: loop", f"{cached[0]:.3f} s", f"{cached[1]:.3f} s", f"{cached[0] / cached[1]:.2f}x",
                     f"{uncached[0] / cached[0]:.2f}x faster than uncached"))
        rows.append((f"{title}: module calls skipped", str(skipped[0]), str(skipped[1]),
                     "same" if ours_ran == their_ran else "DIFFERENT", f"max |latents diff| {diff:.1e}"))
    return rows


def _paired_overhead(plain: Side, cached: Side, inputs: dict[str, Tensor], repeats: int) -> float:
    """Median over runs of (cached - uncached) CPU time, each pair run back to back, order alternating."""
    plain.run(inputs), cached.run(inputs)  # warm-up
    differences = []
    for index in range(repeats):
        first, second = (plain, cached) if index % 2 else (cached, plain)
        times = {id(first): first.run(inputs), id(second): second.run(inputs)}
        differences.append(times[id(cached)] - times[id(plain)])
    return median(differences)


def _work_per_step(side: Side, inputs: dict[str, Tensor]) -> tuple[float, float]:
    """(Python function calls, tensor operations) per step of the loop: exact counts, no timing noise."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = 0

    def profile(_: Any, event: str, __: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    side.reset()
    sys.setprofile(profile)
    try:
        _loop(side.model, inputs, side.enter)
    finally:
        sys.setprofile(None)
    ops = 0

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            nonlocal ops
            ops += 1
            return func(*args, **(kwargs or {}))

    side.reset()
    with CountOps():
        _loop(side.model, inputs, side.enter)
    return calls / STEPS, ops / STEPS


def _hook_call_cost() -> tuple[float, float, float]:
    """µs per call of an identity module: bare, behind a pass-through diffcaps hook, behind a diffusers one."""
    from diffusers.hooks import HookRegistry, ModelHook

    from diffcaps.hooks import Forward, Hook, add_hook

    class Ours(Hook):
        def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs)

    class Theirs(ModelHook):  # type: ignore[misc]
        def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.fn_ref.original_forward(*args, **kwargs)

    bare, ours, theirs = nn.Identity(), nn.Identity(), nn.Identity()
    add_hook(ours, "pass", Ours())
    HookRegistry.check_if_exists_or_initialize(theirs).register_hook(Theirs(), "pass")
    x = torch.zeros(1)

    def cost(module: nn.Module, calls: int = 100_000) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(calls):
                module(x)
            best = min(best, time.process_time() - start)
        return 1e6 * best / calls
    return cost(bare), cost(ours), cost(theirs)


def _overhead(args: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    bare, ours_call, theirs_call = _hook_call_cost()
    rows = [("hook mechanism: extra cost per hooked call", f"{ours_call - bare:.3f} µs", f"{theirs_call - bare:.3f} µs",
             f"{(ours_call - bare) / (theirs_call - bare):.2f}x", "<= diffusers")]
    config = _flux_config(1, 1, 64)
    plain = _sides(config)
    inputs = _inputs(config, 4, 4)
    repeats = args.repeats * 20
    for title, kind, _, never in _cases(_mag_ratios(plain[0], inputs)):
        cached = _sides(config)
        for side in cached:
            side.enable(kind, never)
        assert cached[0].decisions(inputs)[1] == cached[1].decisions(inputs)[1]
        overhead = [1e3 * _paired_overhead(p, c, inputs, repeats) / STEPS for p, c in zip(plain, cached, strict=True)]
        ratio = f"{overhead[0] / overhead[1]:.2f}x" if overhead[1] > 0 else "n/a"
        rows.append((f"{title}: overhead per step", f"{overhead[0]:.3f} ms", f"{overhead[1]:.3f} ms", ratio,
                     "<= diffusers"))
        added = [[c - p for c, p in zip(_work_per_step(c_side, inputs), _work_per_step(p_side, inputs), strict=True)]
                 for p_side, c_side in zip(plain, cached, strict=True)]
        for index, what in enumerate(("Python calls", "tensor ops")):
            ours_added, theirs_added = added[0][index], added[1][index]
            rows.append((f"{title}: {what} added per step", f"{ours_added:.1f}", f"{theirs_added:.1f}",
                         f"{ours_added / theirs_added:.2f}x" if theirs_added > 0 else "n/a", "<= diffusers"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="inner dim (heads of 64)")
    parser.add_argument("--side", type=int, default=16, help="latent tokens per side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("speed", "overhead", "both"), default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import warnings

    import diffusers.utils.logging

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()

    print(f"{STEPS} Euler steps; CPU time, median of interleaved runs; 1 thread; torch {torch.__version__}\n")
    if args.part in ("speed", "both"):
        print_table(f"speed: Flux width {args.width}, {args.double} double + {args.single} single blocks, "
                    f"{args.side * args.side} image + 32 text tokens, median of {args.repeats}", _speed(args))
        print()
    if args.part in ("overhead", "both"):
        print_table(f"overhead: Flux width 64, 1 double + 1 single block, 16 image + 4 text tokens, median of "
                    f"{args.repeats * 20} paired differences", _overhead(args))


if __name__ == "__main__":
    main()
