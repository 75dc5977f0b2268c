"""Fill a model built on the meta device straight from weight files, one tensor at a time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Generator, Mapping
from typing import Final

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

from diffcaps.errors import CheckpointError, ShapeError
from diffcaps.io._folder import WeightSource
from diffcaps.io._mapped import SafetensorsReader

__all__ = ["assign_tensor", "expected_tensors", "landing_dtype", "load_weights", "on_meta_device"]


_INITIALISED_LAYERS: Final[tuple[type[torch.nn.Module], ...]] = (
    torch.nn.Linear, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.Embedding, torch.nn.GroupNorm,
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
)
_UNBOUNDED: Final = 2**63
_patch_lock = threading.Lock()
_patch_depth = 0


def _skipping_meta(original: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
    def reset_parameters(module: torch.nn.Module) -> None:
        if any(p.is_meta for p in module.parameters(recurse=False)):
            return  # the values are about to be replaced by the file's: drawing them is wasted work
        original(module)

    reset_parameters.__wrapped__ = original  # type: ignore[attr-defined]
    return reset_parameters


def _bounded(max_tensors: int, max_elements: int, where: str) -> Callable[..., None]:
    """A parameter-registration hook that stops a build outgrowing what the weights hold."""
    thread = threading.get_ident()
    built = [0, 0]

    def count(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is None or threading.get_ident() != thread:
            return
        built[0] += 1
        built[1] += param.numel()
        # Twice the weights: room for a module that replaces a parameter while it is built.
        if built[0] > 2 * max_tensors or built[1] > 2 * max_elements:
            raise CheckpointError(
                f"the model this config describes outgrows the weights, which hold {max_tensors} tensor(s) "
                f"of {max_elements} element(s) in all; building stopped at {type(module).__name__}.{name} "
                f"after {built[0]} parameter(s) of {built[1]} element(s) (is a layer count or size forged?)",
                path=where,
            )

    return count


@contextlib.contextmanager
def on_meta_device(
    *, max_tensors: int | None = None, max_elements: int | None = None, where: str = "the weights"
) -> Generator[None]:
    """Build modules without allocating or initialising their parameters.

    Inside, the common layers skip ``reset_parameters`` for parameters on the meta device
    (other threads building real modules meanwhile are initialised as usual).

    With ``max_tensors``/``max_elements`` (what the weight files hold), a build in this
    thread that registers far more parameters or elements than that stops at once with a
    ``CheckpointError`` naming ``where``: a forged layer count fails in milliseconds instead
    of building a huge model on meta first. (The exact match is checked after the build.)
    """
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for layer in _INITIALISED_LAYERS:
                setattr(layer, "reset_parameters", _skipping_meta(getattr(layer, "reset_parameters")))
        _patch_depth += 1
    bounded = (
        None if max_tensors is None and max_elements is None
        else register_module_parameter_registration_hook(
            _bounded(max_tensors if max_tensors is not None else _UNBOUNDED,
                     max_elements if max_elements is not None else _UNBOUNDED, where)
        )
    )
    try:
        with torch.device("meta"):
            yield
    finally:
        if bounded is not None:
            bounded.remove()
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for layer in _INITIALISED_LAYERS:
                    setattr(layer, "reset_parameters", getattr(layer, "reset_parameters").__wrapped__)


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every parameter and persistent buffer the model saves."""
    return {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict(keep_vars=True).items()}


def assign_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer called ``key`` with ``tensor`` (no copy)."""
    owner_path, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_path)
    old = dict(owner.named_parameters(recurse=False)).get(name)
    if old is not None:
        setattr(owner, name, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))
    elif name in dict(owner.named_buffers(recurse=False)):
        setattr(owner, name, tensor)  # nn.Module keeps it a buffer, persistent or not as before
    else:
        raise KeyError(key)


def landing_dtype(stored: torch.dtype, model_dtype: torch.dtype, requested: torch.dtype | None, *,
                  keep_fp32: bool = False) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` lands in, for a parameter built as ``model_dtype``.

    ``requested`` (a loader's ``torch_dtype``) applies to floating tensors only, and a tensor
    of a module the model keeps in float32 (``keep_fp32``) lands in float32 instead; every
    loader (folders, single files) decides through this one rule.
    """
    if requested is None or not (stored.is_floating_point and model_dtype.is_floating_point):
        return model_dtype
    return torch.float32 if keep_fp32 else requested


def load_weights(
    model: torch.nn.Module,
    source: WeightSource,
    *,
    torch_dtype: torch.dtype | None,
    device: str | torch.device,
    rename: Callable[[str], str] | None = None,
    keep_fp32: Collection[str] = frozenset(),
) -> None:
    """Check a source against the model (names, then shapes), then load every tensor into it.

    Nothing is read before the checks pass, so a bad file leaves the model untouched. The
    tensors named in ``keep_fp32`` land in float32 whatever ``torch_dtype`` says.
    """
    expected = expected_tensors(model)
    located: Mapping[str, str] = {rename(k) if rename else k: k for k in source.entries}
    where = ", ".join(str(p) for p in source.files)
    missing = expected.keys() - located.keys()
    unexpected = located.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError.key_mismatch(
            where, missing=missing, unexpected=[located[k] for k in unexpected]
        )
    for name, (shape, _) in expected.items():
        file, info = source.entries[located[name]]
        if info.shape != shape:
            raise ShapeError(
                f"tensor {located[name]!r} has shape {list(info.shape)}, "
                f"the model expects {list(shape)} for {name!r}",
                path=file,
            )
    by_file_key = {file_key: name for name, file_key in located.items()}
    for path, keys in source.by_file():
        if source.pickled:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for file_key in keys:
                name = by_file_key[file_key]
                target = landing_dtype(state[file_key].dtype, expected[name][1], torch_dtype,
                                       keep_fp32=name in keep_fp32)
                assign_tensor(model, name, state.pop(file_key).to(device=device, dtype=target))
            continue
        with SafetensorsReader(path, device=device, header=source.headers.get(path)) as reader:
            for file_key in keys:
                name = by_file_key[file_key]
                target = landing_dtype(source.entries[file_key][1].dtype, expected[name][1], torch_dtype,
                                       keep_fp32=name in keep_fp32)
                assign_tensor(model, name, reader.get(file_key, target))
