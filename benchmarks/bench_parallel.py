"""Context parallelism on N CPU ranks (gloo) against one process: time and per-rank activation memory.

One seeded Flux transformer, one input (image + text tokens, lengths that do not divide by
the rank counts), fp32. The single process runs it whole with all the machine's threads; each
context-parallel run spawns N ranks on 127.0.0.1 with ``cores // N`` threads each (at least
one: more ranks than cores are oversubscribed, and their times say so); the single process
also runs with one thread. Every rank checks its gathered output against the single-process one.

- time: median wall-clock seconds of a forward (after a warm-up), on rank 0, against the fastest
  single-process run;
- activation memory: the peak bytes of tensor storages alive during one forward that were made
  by it (a dispatch-mode counter: weights, inputs and views of them are excluded), the largest
  over ranks.

diffusers has its own context parallelism (``enable_parallelism``); each rank tries it on the
same weights and the table says what happened (it needs an accelerator).

    python benchmarks/bench_parallel.py [--ranks 2 4] [--height 40] [--width 39] [--text 253]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parents[1]))
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel  # noqa: E402
from diffcaps import parallel  # noqa: E402
from diffcaps.parallel import ContextParallelConfig, disable  # noqa: E402
from tests.flux_fixtures import diffusers_flux, flux_inputs, seeded_state  # noqa: E402

start_processes: Callable[..., Any] = importlib.import_module("torch.multiprocessing.spawn").start_processes
CORES = os.cpu_count() or 1


class PeakMemory(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    """Counts the bytes of tensor storages made inside it while they are alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an argument's storage (a weight's transpose, say): not new
        shared = {v.untyped_storage().data_ptr() for v in tree_flatten((args, kwargs))[0] if isinstance(v, Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._sizes and key not in shared:
                    self._sizes[key] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def config_from(args: argparse.Namespace) -> FluxConfig:
    return FluxConfig(num_layers=args.double, num_single_layers=args.single, num_attention_heads=args.heads,
                      attention_head_dim=64, joint_attention_dim=256, pooled_projection_dim=64, in_channels=64,
                      guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def build(args: argparse.Namespace) -> tuple[FluxTransformer2DModel, dict[str, Any]]:
    config = config_from(args)
    model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict(seeded_state(model))
    model.eval().requires_grad_(False)
    return model, flux_inputs(config, height=args.height, width=args.width, text_tokens=args.text)


def measure(call: Callable[[], Tensor], repeats: int, barrier: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Warm-up, activation peak, then the median time of ``repeats`` calls."""
    with torch.no_grad():
        call()
        with PeakMemory() as memory:
            out = call()
        times = []
        for _ in range(repeats):
            barrier()
            start = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "activation": memory.peak, "output": out}


def try_diffusers_parallel(args: argparse.Namespace, degrees: tuple[int, int], model: FluxTransformer2DModel,
                           inputs: dict[str, Any]) -> str:
    """Run diffusers' own context parallelism on this rank, or say why it cannot run."""
    try:
        from diffusers import ContextParallelConfig as DiffusersContextParallelConfig

        peer = diffusers_flux(config_from(args), model.state_dict())
        peer.requires_grad_(False)
        ulysses, ring = degrees
        peer.enable_parallelism(config=DiffusersContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        result = measure(lambda: peer(**inputs).sample, args.repeats, dist.barrier)
        return f"ran: {result['seconds']:.3f} s, activation {result['activation'] / 2**20:.1f} MiB"
    except Exception as error:  # reported in the table
        why = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if isinstance(error, ZeroDivisionError) and torch.accelerator.device_count() == 0:
            why += (" (enable_parallelism picks a device as rank % torch.accelerator.device_count(), "
                    "which is 0 without an accelerator)")
        return f"cannot run: {why}"


def rank_main(rank: int, world: int, port: int, degrees: tuple[int, int], args: argparse.Namespace,
              out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(max(1, CORES // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))
    model, inputs = build(args)
    reference = torch.load(Path(out_dir) / "reference.pt")
    ulysses, ring = degrees
    parallel.enable(model, ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, timeout=300))
    result = measure(lambda: model(**inputs).sample, args.repeats, dist.barrier)
    error = float((result.pop("output") - reference).abs().max())
    disable(model)
    peer = try_diffusers_parallel(args, degrees, model, inputs) if rank == 0 and args.diffusers else ""
    (Path(out_dir) / f"{world}-{ulysses}-{ring}-rank{rank}.json").write_text(
        json.dumps({**result, "max_abs_error": error, "diffusers": peer}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--width", type=int, default=39)
    parser.add_argument("--text", type=int, default=253)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    args = parser.parse_args()

    model, inputs = build(args)
    peer = diffusers_flux(config_from(args), model.state_dict()).requires_grad_(False)
    rows: list[tuple[str, int, int, dict[str, Any]]] = []
    for threads in sorted({1, CORES}, reverse=True):
        torch.set_num_threads(threads)
        rows.append(("1 process, diffcaps", 1, threads, measure(lambda: model(**inputs).sample, args.repeats)))
        rows.append(("1 process, diffusers", 1, threads, measure(lambda: peer(**inputs).sample, args.repeats)))
    single = min((row[3] for row in rows if "diffcaps" in row[0]), key=lambda result: result["seconds"])
    del peer
    tokens = args.height * args.width
    print(f"Flux {args.double} double + {args.single} single blocks, {args.heads} heads × 64, "
          f"{tokens} image + {args.text} text tokens, fp32, CPU with {CORES} cores, gloo\n")
    peers: list[str] = []
    with tempfile.TemporaryDirectory() as out_dir:
        torch.save(single["output"], Path(out_dir) / "reference.pt")
        for world in args.ranks:
            layouts = [(world, 1), (1, world)] + ([(2, world // 2)] if world >= 4 and world % 2 == 0 else [])
            for ulysses, ring in layouts:
                # diffusers fails the same way on every layout when it cannot run: try it again only if it ran
                args.diffusers = args.diffusers and not any("cannot run" in line for line in peers)
                context = start_processes(rank_main, args=(world, free_port(), (ulysses, ring), args, out_dir),
                                          nprocs=world, start_method="spawn", join=False)
                while not context.join(timeout=1.0):
                    pass
                ranks = [json.loads((Path(out_dir) / f"{world}-{ulysses}-{ring}-rank{r}.json").read_text())
                         for r in range(world)]
                name = (f"ulysses {ulysses}" if ring == 1 else f"ring {ring}" if ulysses == 1
                        else f"ulysses {ulysses} × ring {ring}")
                worst = {"seconds": ranks[0]["seconds"], "activation": max(r["activation"] for r in ranks),
                         "error": max(r["max_abs_error"] for r in ranks)}
                rows.append((name, world, max(1, CORES // world), worst))
                if ranks[0]["diffusers"]:
                    peers.append(f"  diffusers, {name}: {ranks[0]['diffusers']}")

    print("(ratios against the fastest single diffcaps process)")
    header = ("run", "ranks", "threads/rank", "time (s)", "time vs 1 process", "activation/rank (MiB)",
              "memory vs 1 process", "max |diff|")
    table = [header]
    for name, world, threads, result in rows:
        table.append((name, str(world), str(threads), f"{result['seconds']:.3f}",
                      f"{result['seconds'] / single['seconds']:.2f}×", f"{result['activation'] / 2**20:.1f}",
                      f"{result['activation'] / single['activation']:.2f}×",
                      f"{result['error']:.1e}" if "error" in result else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if peers:
        print("\ndiffusers' own context parallelism on the same ranks:")
        print("\n".join(peers))
        if any("cannot run" in line for line in peers):
            print("  (it stops before any work, the same way for every layout, so it was tried on the first only)")
    if max(args.ranks) > CORES:
        print(f"\n(more ranks than the {CORES} cores: those runs share cores, so their times cannot show a speed-up)")


if __name__ == "__main__":
    main()
