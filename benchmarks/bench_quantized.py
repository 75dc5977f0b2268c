"""diffcaps vs diffusers: loading and running GGUF Flux files (Q8_0 and Q4_K), weights kept packed.

Two GGUF files of a FLUX.1-wide transformer (3072: 24 heads × 128, FLUX.1-dev's text widths)
with ``--double``/``--single`` blocks are written with the ``gguf`` package as valid random
blocks (1-D tensors F32; in the Q4_K file, matrices whose rows are not whole 256-value
blocks are Q8_0). Each side then loads each file in a fresh child process, from a warm page
cache, computing in bfloat16:

- diffcaps:  ``weights.load_single_file(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)``
- diffusers: ``FluxTransformer2DModel.from_single_file(path, config=<local folder>, local_files_only=True,
  torch_dtype=torch.bfloat16, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))``

Measured in each child:

- load, cold: the library's imports (torch included) plus the first load call;
- load, warm: the quicker of two more load calls in the same process (imports and lazy
  imports done, the first model freed and its memory handed back to the OS, ``malloc_trim``,
  so that the load allocates afresh as a first one does);
- resident memory: RSS after the first load minus RSS just before it, and the same after the
  first forward call (a memory-mapped weight is resident only once it is read: the forward
  reads every one; freed memory trimmed first), beside the file size; and the bytes of the
  model's weights (packed bytes and dense tensors);
- peak RSS (VmHWM: interpreter, imports, load and forward calls);
- forward time: the quickest of ``--forwards`` bf16 calls after one warm-up call (the
  quickest, as the machine may be shared), on
  ``--image-tokens`` image tokens and ``--text-tokens`` text tokens.

Both sides' outputs are compared (largest difference / largest value; diffusers dequantizes
through float16, diffcaps through float32).

    python benchmarks/bench_quantized.py [--double 2] [--single 2] [--image-tokens 1024] [--text-tokens 128]
    python benchmarks/bench_quantized.py --quick     # 64 image + 16 text tokens, one timed forward
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, run_child, warm_page_cache  # noqa: E402

HERE = str(Path(__file__).resolve())
ROOT = str(Path(__file__).resolve().parents[1])
WIDTH: dict[str, Any] = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096,
                         "pooled_projection_dim": 768, "in_channels": 64, "guidance_embeds": True,
                         "axes_dims_rope": [16, 56, 56]}
# GGUF block types: (values per block, bytes per block, offsets of the fp16 scale fields, largest value / scale)
BLOCKS: dict[str, tuple[int, int, tuple[int, ...], float]] = {
    "Q8_0": (32, 34, (0,), 127.0),
    "Q4_K": (256, 144, (0, 2), 945.0),
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps it otherwise), so RSS
    shows what is live and a later load faults its pages in as a first one does."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _config(double: int, single: int) -> dict[str, Any]:
    return {**WIDTH, "num_layers": double, "num_single_layers": single}


def _kind(main: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return "F32"
    if shape[-1] % BLOCKS[main][0] == 0:
        return main
    return "Q8_0" if shape[-1] % 32 == 0 else "F16"


def write_file(path: Path, config: dict[str, Any], main: str) -> Path:
    """A GGUF file in BFL's original layout: matrices in ``main`` (random valid blocks), 1-D tensors F32."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter

    from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(FluxConfig.from_dict(config))
    mapper = FluxTransformer2DModel.declared_capabilities().weight_mapping
    generator = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch="flux")
    for name, meta in mapper.convert(model.state_dict(), "to_original").items():
        shape: tuple[int, ...] = tuple(int(d) for d in meta.shape)
        kind = _kind(main, shape)
        outer, inner = shape[:-1], shape[-1]
        size = inner ** -0.5 if outer else 0.1
        if kind in BLOCKS:
            values, nbytes, scales, span = BLOCKS[kind]
            count = int(np.prod(shape)) // values
            blocks = generator.integers(0, 256, size=(count, nbytes), dtype=np.uint8)
            for offset in scales:
                d = (size / span * generator.uniform(0.5, 1.0, size=count)).astype(np.float16)
                blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
            writer.add_tensor(name, blocks.reshape(*outer, inner // values * nbytes),
                              raw_dtype=GGMLQuantizationType[kind])
            continue
        dtype = np.float32 if kind == "F32" else np.float16
        data = generator.standard_normal(shape, dtype=np.float32) * size
        writer.add_tensor(name, (1.0 + data if name.endswith(".scale") else data).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _child(lib: str, path: str, config_folder: str, image_tokens: int, text_tokens: int, forwards: int,
           out: str) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    if lib == "diffcaps":
        from diffcaps.models.flux import FluxTransformer2DModel
        from diffcaps.weights import load_single_file

        def load() -> Any:
            return load_single_file(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)

        def forward(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
            out: torch.Tensor = model(**inputs, return_dict=False)[0]
            return out
    else:
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as DiffusersFlux
        from diffusers.quantizers.quantization_config import GGUFQuantizationConfig
        from diffusers.utils import logging

        logging.set_verbosity_error()

        def load() -> Any:
            return DiffusersFlux.from_single_file(
                path, config=config_folder, local_files_only=True, torch_dtype=torch.bfloat16,
                quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))

        def forward(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
            out: torch.Tensor = model(**inputs, return_dict=False)[0]
            return out

    imports = time.perf_counter() - started
    sys.path.insert(0, ROOT)
    from diffcaps.models.flux import FluxConfig
    from tests.flux_fixtures import flux_inputs

    side = int(image_tokens**0.5)
    inputs = flux_inputs(FluxConfig.from_dict(json.loads((Path(config_folder) / "config.json").read_text())),
                         height=side, width=image_tokens // side, text_tokens=text_tokens, dtype=torch.bfloat16)
    before = _status("VmRSS:")
    start_split = {field: _status(field + ":") for field in ("RssAnon", "RssFile")}
    start = time.perf_counter()
    model = load()
    first_load = time.perf_counter() - start
    after_load = _status("VmRSS:")
    peak_load = _status("VmHWM:")
    times: list[float] = []
    with torch.no_grad():
        output = forward(model, inputs)
        _trim()
        after_forward = _status("VmRSS:")
        split = {field: _status(field + ":") - start_split[field] for field in ("RssAnon", "RssFile")}
        for _ in range(forwards):
            start = time.perf_counter()
            forward(model, inputs)
            times.append(time.perf_counter() - start)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    torch.save(output, out)
    del model
    loads: list[float] = []
    for _ in range(2):
        _trim()
        start = time.perf_counter()
        load()
        loads.append(time.perf_counter() - start)
    return {"cold": imports + first_load, "warm": min(loads), "resident_load": after_load - before,
            "resident_forward": after_forward - before, "peak_load": peak_load, "peak": _status("VmHWM:"),
            "forward": min(times), "split": split, "held": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--forwards", type=int, default=3, help="timed forward calls per child")
    parser.add_argument("--types", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    parser.add_argument("--quick", action="store_true", help="64 image + 16 text tokens, one timed forward")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        lib, path, folder, image, text, forwards, out = args.child
        print(json.dumps(_child(lib, path, folder, int(image), int(text), int(forwards), out)))
        return
    if args.quick:
        args.image_tokens, args.text_tokens, args.forwards = 64, 16, 1

    import torch

    config = _config(args.double, args.single)
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as tmp:
        folder = Path(tmp) / "config"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        for kind in args.types:
            start = time.perf_counter()
            path = write_file(Path(tmp) / f"flux1-bench-{kind}.gguf", config, kind)
            size = path.stat().st_size
            print(f"\n{path.name}: {args.double} double + {args.single} single blocks at width 3072, "
                  f"{size / 1e9:.2f} GB (written in {time.perf_counter() - start:.1f} s); "
                  f"forward on {args.image_tokens} image + {args.text_tokens} text tokens, bfloat16")
            runs: dict[str, dict[str, Any]] = {}
            for lib in ("diffcaps", "diffusers"):
                warm_page_cache(path.parent)
                out = Path(tmp) / f"{lib}.pt"
                runs[lib] = run_child(HERE, ["--child", lib, str(path), str(folder), str(args.image_tokens),
                                             str(args.text_tokens), str(args.forwards), str(out)])
                runs[lib]["output"] = torch.load(out)
            _report(kind, runs["diffcaps"], runs["diffusers"], size)


def _report(kind: str, ours: dict[str, Any], theirs: dict[str, Any], size: int) -> None:
    def ratio(key: str) -> str:
        return f"{ours[key] / theirs[key]:.2f}×"

    def gb(value: int) -> str:
        return f"{value / 1e9:.2f}"

    def of_file(value: int) -> str:
        return f"{value / size:.2f}×"

    rows = [
        ("load, warm (s)", f"{ours['warm']:.2f}", f"{theirs['warm']:.2f}", ratio("warm"), "≤ 0.5×"),
        ("load, cold incl. imports (s)", f"{ours['cold']:.2f}", f"{theirs['cold']:.2f}", ratio("cold"), ""),
        ("resident after load (GB)", gb(ours["resident_load"]), gb(theirs["resident_load"]), "", ""),
        ("  / file size", of_file(ours["resident_load"]), of_file(theirs["resident_load"]), "", "≤ 1.1×"),
        ("weights held by the model (GB)", gb(ours["held"]), gb(theirs["held"]), "", ""),
        ("  / file size", of_file(ours["held"]), of_file(theirs["held"]), "", ""),
        ("resident after a forward (GB)", gb(ours["resident_forward"]), gb(theirs["resident_forward"]), "", ""),
        ("  / file size", of_file(ours["resident_forward"]), of_file(theirs["resident_forward"]), "", "≤ 1.1×"),
        ("peak RSS, load (GB)", gb(ours["peak_load"]), gb(theirs["peak_load"]), ratio("peak_load"), ""),
        ("peak RSS, load + forward (GB)", gb(ours["peak"]), gb(theirs["peak"]), ratio("peak"), ""),
        ("forward (s)", f"{ours['forward']:.2f}", f"{theirs['forward']:.2f}", ratio("forward"), "≤ 1.0×"),
    ]
    print_table(f"GGUF {kind}, file {size / 1e9:.2f} GB (each side in a fresh process, warm page cache)", rows)
    a, b = ours["output"].float(), theirs["output"].float()
    print(f"outputs: largest difference / largest value {(a - b).abs().max().item() / b.abs().max().item():.2e}")
    for lib, run in (("diffcaps", ours), ("diffusers", theirs)):
        split = run["split"]
        print(f"{lib}: RSS growth by the first forward's end (freed memory trimmed): anonymous "
              f"{split['RssAnon'] / 1e9:.2f} GB, file-backed {split['RssFile'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
