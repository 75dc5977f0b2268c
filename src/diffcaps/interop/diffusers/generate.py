"""Make an image or a video with a diffusers pipeline folder whose transformer diffcaps loads.

What ``python -m diffcaps generate`` runs: :func:`generate` loads the folder's transformer with
``diffcaps.AutoModel``, hands ``wrap(model)`` to the folder's own diffusers pipeline class,
switches on the diffcaps features asked for (LoRA, an inference cache, group offloading,
layerwise casting) through their public functions, runs the pipeline with a seeded CPU
generator and writes ``.png``, ``.gif`` or ``.mp4``. Every option is checked, and the output
path too, before a weight is read. The ``*_option`` functions turn the command line's strings
into the configs :class:`GenerateOptions` holds. Needs the ``diffusers`` extra.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from diffcaps import cache, casting, lora, offload
from diffcaps.errors import CacheError, GenerateError, MissingDependencyError
from diffcaps.protocols import supports_cache, supports_group_offloading, supports_layerwise_casting, supports_lora

if TYPE_CHECKING:
    from diffcaps.model import Model

__all__ = [
    "CACHE_NAMES",
    "GenerateOptions",
    "GenerateReport",
    "LoRAChoice",
    "cache_option",
    "casting_option",
    "generate",
    "lora_option",
    "mp4_writer_installed",
    "offload_option",
    "size_option",
]

CACHE_NAMES: tuple[str, ...] = ("first_block", "pab", "taylorseer")
"""The caches ``--cache NAME[:VALUE]`` names: First Block Cache (VALUE: threshold), Pyramid
Attention Broadcast (VALUE: spatial skip range) and TaylorSeer (VALUE: cache interval)."""

_OUTPUTS = (".png", ".gif", ".mp4")
_MP4_HINT = 'writing .mp4 needs imageio with imageio-ffmpeg (pip install "diffcaps[video]") or opencv-python'


@attrs.frozen
class LoRAChoice:
    """A LoRA file to load and the weight to run it at."""

    path: Path
    weight: float = 1.0


@attrs.frozen(kw_only=True)
class GenerateOptions:
    """What to generate and with which diffcaps features; ``None`` keeps the pipeline's default.

    ``size`` is (width, height); ``frames`` only for a video pipeline; ``true_cfg`` is the
    true classifier-free guidance scale used with ``negative_prompt`` where the pipeline has
    one (default 4.0 then); ``dtype`` is the dtype every component computes in.
    """

    prompt: str
    negative_prompt: str | None = None
    loras: tuple[LoRAChoice, ...] = ()
    cache: cache.CacheConfig | None = None
    offload: offload.GroupOffloadingConfig | None = None
    casting: casting.LayerwiseCastingConfig | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    size: tuple[int, int] | None = None
    frames: int | None = None
    seed: int = 0
    dtype: torch.dtype | None = None
    fps: int = 16


@attrs.frozen(kw_only=True)
class GenerateReport:
    """What :func:`generate` did: the pipeline, the features, the cache's decisions, time and memory."""

    out: Path
    pipeline: str
    model: str
    device: str
    features: tuple[str, ...]
    cache_stats: cache.CacheStats | None
    steps: int
    load_seconds: float
    generate_seconds: float
    peak_memory: str

    def describe(self) -> str:
        """Lines for a person: features, cache skips, time, peak memory, where the output went."""
        lines = [f"pipeline: {self.pipeline} with diffcaps {self.model} on {self.device}"]
        lines += [f"  {feature}" for feature in self.features] or ["  no diffcaps features switched on"]
        if self.cache_stats is not None:
            stats = self.cache_stats
            lines.append(f"  cache skipped {stats.skipped()} of {stats.skipped() + stats.computed()} decisions")
            lines += ["  " + line for line in stats.describe().splitlines()]
        lines.append(f"time: load {self.load_seconds:.2f} s, {self.steps} steps in {self.generate_seconds:.2f} s "
                     f"({self.generate_seconds / max(self.steps, 1):.3f} s/step)")
        lines.append(f"peak memory: {self.peak_memory}")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def size_option(text: str) -> tuple[int, int]:
    """``"WxH"`` as (width, height), both positive."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise GenerateError(f"size must be WIDTHxHEIGHT with positive numbers, e.g. 512x512; got {text!r}")
    return int(match[1]), int(match[2])


def lora_option(text: str) -> LoRAChoice:
    """``"FILE"`` or ``"FILE:WEIGHT"`` (a weight is a number after the last colon)."""
    path, colon, weight = text.rpartition(":")
    if colon and path:
        try:
            return LoRAChoice(Path(path), float(weight))
        except ValueError:
            if re.fullmatch(r"[-+.\deE]+", weight):
                raise GenerateError(f"{text!r}: the weight after ':' must be a number") from None
    return LoRAChoice(Path(text))


def cache_option(text: str) -> cache.CacheConfig:
    """``"NAME[:VALUE]"`` with NAME one of :data:`CACHE_NAMES` as a cache config."""
    name, _, value = text.partition(":")
    if name not in CACHE_NAMES:
        raise GenerateError(f"unknown cache {name!r}; known caches: {', '.join(CACHE_NAMES)} "
                            "(FasterCache and MagCache need per-model settings: use diffcaps.cache)")
    try:
        if name == "first_block":
            return cache.FirstBlockCacheConfig(threshold=float(value)) if value else cache.FirstBlockCacheConfig()
        if name == "pab":
            return cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value or 2))
        return cache.TaylorSeerCacheConfig(cache_interval=int(value)) if value else cache.TaylorSeerCacheConfig()
    except CacheError as exc:
        raise GenerateError(f"{text!r}: {exc}") from None
    except ValueError:
        raise GenerateError(f"{text!r}: {value!r} is not a number") from None


def offload_option(text: str, *, onload_device: str | torch.device | None = None) -> offload.GroupOffloadingConfig:
    """``"block"``, ``"leaf"`` or ``"disk:PATH"`` (blocks offloaded to files in PATH) as an offload config.

    The weights are brought to ``onload_device`` (default: CUDA when there is one, else the CPU) when used.
    """
    device = onload_device if onload_device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if text == "block":
        return offload.GroupOffloadingConfig(onload_device=device, offload_type="block_level")
    if text == "leaf":
        return offload.GroupOffloadingConfig(onload_device=device, offload_type="leaf_level")
    if text.startswith("disk:") and text[5:]:
        return offload.GroupOffloadingConfig(onload_device=device, offload_type="block_level",
                                             offload_to_disk_path=text[5:])
    raise GenerateError(f"offload must be block, leaf or disk:PATH; got {text!r}")


def casting_option(text: str) -> casting.LayerwiseCastingConfig:
    """``"fp8"`` (weights stored as float8_e4m3fn) or ``"fp8_e5m2"`` as a layerwise casting config."""
    dtypes = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    if text not in dtypes:
        raise GenerateError(f"casting must be one of {', '.join(dtypes)}; got {text!r}")
    return casting.LayerwiseCastingConfig(storage_dtype=dtypes[text])


def generate(folder: str | os.PathLike[str], options: GenerateOptions, out: str | os.PathLike[str], *,
             progress: Callable[[int, int], None] | None = None) -> GenerateReport:
    """Run the pipeline folder with its transformer loaded by diffcaps; write ``out`` and report.

    ``progress`` is called with (0, steps) when denoising starts, then with (step, steps) after
    every denoising step. Bad input raises
    :class:`~diffcaps.errors.GenerateError` (or the feature's own error) before the image is made,
    and nothing is written then.
    """
    root, target = Path(folder), Path(out)
    pipeline_class = _pipeline_class(root)
    parameters = inspect.signature(pipeline_class.__call__).parameters
    video = "num_frames" in parameters
    _check_output(target, video=video, pipeline=pipeline_class.__name__)
    if options.frames is not None and not video:
        raise GenerateError(f"--frames: {pipeline_class.__name__} makes images, not videos")
    if options.negative_prompt is not None and "negative_prompt" not in parameters:
        raise GenerateError(f"--negative-prompt: {pipeline_class.__name__} takes no negative prompt")
    for choice in options.loras:
        if not choice.path.is_file():
            raise GenerateError(f"--lora: {choice.path}: no such file")

    from diffcaps.auto import AutoModel
    from diffcaps.interop.diffusers import wrap

    device = _device(options)
    start = time.perf_counter()
    with _quiet():
        model = AutoModel.from_pretrained(root / "transformer", torch_dtype=options.dtype)
        loader: Any = pipeline_class
        pipe: Any = loader.from_pretrained(root, transformer=wrap(model), torch_dtype=options.dtype)
        features = _apply_features(model, options, pipe)
    _place(pipe, device, offloaded=options.offload is not None)
    load_seconds = time.perf_counter() - start

    steps = options.steps if options.steps is not None else int(parameters["num_inference_steps"].default)
    arguments = _call_arguments(pipe, parameters, options, steps)
    # The pipeline resets the cache when it finishes, so its decisions are read after each step.
    last_stats: list[cache.CacheStats] = []
    if "callback_on_step_end" in parameters:
        arguments["callback_on_step_end"] = _step_callback(model, progress, steps, last_stats)
        if progress is not None:
            pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if progress is not None:
        progress(0, steps)
    start = time.perf_counter()
    with _quiet(), torch.inference_mode():
        result: Any = pipe(**arguments)
    generate_seconds = time.perf_counter() - start
    stats = last_stats[-1] if last_stats else None
    _write(result, target, video=video, fps=options.fps)
    return GenerateReport(
        out=target, pipeline=pipeline_class.__name__, model=type(model).__name__, device=str(device),
        features=tuple(features), cache_stats=stats, steps=steps, load_seconds=load_seconds,
        generate_seconds=generate_seconds, peak_memory=_peak_memory(device),
    )


def _pipeline_class(root: Path) -> type[Any]:
    index = root / "model_index.json"
    if not root.is_dir():
        raise GenerateError(f"{root}: no such pipeline folder")
    if not index.is_file():
        raise GenerateError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    if not (root / "transformer").is_dir():
        raise GenerateError(f"{root}: the pipeline has no transformer/ folder")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError):
        raise GenerateError(f"{index}: no _class_name naming the pipeline class") from None
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError('generate needs diffusers: pip install "diffcaps[diffusers]"') from None
    found: object = getattr(diffusers, str(name), None)
    if not isinstance(found, type):
        raise GenerateError(f"{index}: _class_name {name!r} is not a pipeline class of diffusers {diffusers.__version__}")
    return found


def _check_output(target: Path, *, video: bool, pipeline: str) -> None:
    suffix = target.suffix.lower()
    if suffix not in _OUTPUTS:
        raise GenerateError(f"--out {target}: write .png, .gif or .mp4, not {suffix or 'a file without suffix'!r}")
    if video and suffix == ".png":
        raise GenerateError(f"--out {target}: {pipeline} makes videos; write .gif or .mp4")
    if not video and suffix == ".mp4":
        raise GenerateError(f"--out {target}: {pipeline} makes images; write .png or .gif")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise GenerateError(f"--out {target}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise GenerateError(f"--out {target}: not writable")
    if suffix == ".mp4" and not mp4_writer_installed():
        raise GenerateError(f"--out {target}: {_MP4_HINT}")


def mp4_writer_installed() -> bool:
    """Whether ``.mp4`` can be written: imageio with imageio-ffmpeg, or opencv-python (diffusers' ``export_to_video``)."""
    found = importlib.util.find_spec
    return (found("imageio") is not None and found("imageio_ffmpeg") is not None) or found("cv2") is not None


def _device(options: GenerateOptions) -> torch.device:
    if options.offload is not None:
        return torch.device(options.offload.onload_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _adapter_names(loras: tuple[LoRAChoice, ...]) -> list[str]:
    names: list[str] = []
    for choice in loras:
        base = re.sub(r"\W", "_", choice.path.stem) or "lora"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def _apply_features(model: Model[Any], options: GenerateOptions, pipe: Any) -> list[str]:
    """Switch on what ``options`` asks for, in diffusers' order (LoRA, casting, cache, offload)."""
    done: list[str] = []
    kind = type(model).__name__
    if options.loras:
        if not supports_lora(model):
            raise GenerateError(f"--lora: {kind} does not support LoRA")
        names = _adapter_names(options.loras)
        for choice, name in zip(options.loras, names, strict=True):
            loaded = lora.load_adapter(model, choice.path, adapter_name=name)
            done.append(f"LoRA {choice.path.name} ({loaded.format}, {len(loaded.targets)} layers) "
                        f"as {name!r} × {choice.weight:g}")
        lora.set_adapters(model, names, [choice.weight for choice in options.loras])
    if options.casting is not None:
        if not supports_layerwise_casting(model):
            raise GenerateError(f"--casting: {kind} does not support layerwise casting")
        cast_layers = casting.enable(model, options.casting)
        done.append(f"layerwise casting: {len(cast_layers)} layers stored as {options.casting.storage_dtype}")
    if options.cache is not None:
        if not supports_cache(model):
            raise GenerateError(f"--cache: {kind} does not support inference caches")
        config = options.cache
        if isinstance(config, cache.PyramidAttentionBroadcastConfig) and config.current_timestep_callback is None:
            config = attrs.evolve(config, current_timestep_callback=lambda: int(pipe.current_timestep))
        cache.enable(model, config)
        done.append(f"cache: {_shown(options.cache)}")
    if options.offload is not None:
        if not supports_group_offloading(model):
            raise GenerateError(f"--offload: {kind} does not support group offloading")
        offload.enable(model, options.offload)
        where = options.offload.offload_to_disk_path or options.offload.offload_device
        done.append(f"group offloading: {options.offload.offload_type} to {where}, "
                    f"onload to {options.offload.onload_device}")
    return done


def _shown(config: attrs.AttrsInstance) -> str:
    """A config with only the fields that differ from their defaults: ``FirstBlockCacheConfig(threshold=0.1)``."""
    changed = [f"{field.name}={getattr(config, field.name)!r}" for field in attrs.fields(type(config))
               if field.default is attrs.NOTHING or getattr(config, field.name) != field.default]
    return f"{type(config).__name__}({', '.join(changed)})"


def _place(pipe: Any, device: torch.device, *, offloaded: bool) -> None:
    """Move the components to ``device``; an offloaded transformer stays where offloading keeps it."""
    if device.type == "cpu":
        return
    if not offloaded:
        pipe.to(device)
        return
    components: dict[str, Any] = pipe.components
    for name, component in components.items():
        if name != "transformer" and isinstance(component, torch.nn.Module):
            component.to(device)


def _call_arguments(pipe: Any, parameters: Any, options: GenerateOptions, steps: int) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "prompt": options.prompt,
        "num_inference_steps": steps,
        "generator": torch.Generator("cpu").manual_seed(options.seed),
        "output_type": "pil",
    }
    if options.negative_prompt is not None:
        arguments["negative_prompt"] = options.negative_prompt
        if "true_cfg_scale" in parameters:
            arguments["true_cfg_scale"] = options.true_cfg if options.true_cfg is not None else 4.0
    elif options.true_cfg is not None and "true_cfg_scale" in parameters:
        arguments["true_cfg_scale"] = options.true_cfg
    if options.guidance is not None:
        arguments["guidance_scale"] = options.guidance
    if options.size is not None:
        arguments["width"], arguments["height"] = options.size
    if options.frames is not None:
        arguments["num_frames"] = options.frames
    if "max_sequence_length" in parameters:
        # A folder's text tokenizer may be shorter than the pipeline's default sequence length.
        default = int(parameters["max_sequence_length"].default)
        # Flux's T5 is its second tokenizer, Wan's UMT5 its only one.
        tokenizer = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
        length = getattr(tokenizer, "model_max_length", default)
        arguments["max_sequence_length"] = min(default, length) if isinstance(length, int) else default
    return arguments


def _step_callback(model: Model[Any], progress: Callable[[int, int], None] | None, steps: int,
                   last_stats: list[cache.CacheStats]) -> Callable[..., dict[str, Any]]:
    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if supports_cache(model) and cache.active(model) is not None:
            last_stats[:] = [cache.stats(model)]
        if progress is not None:
            total = getattr(pipe, "num_timesteps", None)
            progress(step + 1, total if isinstance(total, int) and total > 0 else steps)
        return {}

    return on_step_end


def _write(result: Any, target: Path, *, video: bool, fps: int) -> None:
    frames: list[Any] = list(result.frames[0]) if video else list(result.images[:1])
    if target.suffix.lower() == ".png":
        frames[0].save(target)
    elif target.suffix.lower() == ".gif":
        frames[0].save(target, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    else:
        from diffusers.utils.export_utils import export_to_video

        export_to_video(frames, str(target), fps=fps)


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB allocated on {device} (torch.cuda)"
    import resource  # POSIX only; imported where peak memory is read

    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return f"{kilobytes * scale / 1e9:.2f} GB resident (process peak RSS)"


@contextmanager
def _quiet() -> Generator[None]:
    """Silence diffusers' and transformers' loading bars and warnings; our own progress is shown instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_module

    transformers_logging: Any = transformers_module  # its functions are unannotated

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
