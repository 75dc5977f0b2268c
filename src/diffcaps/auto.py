"""``AutoModel``: load a model without naming its class, from the registry in :mod:`diffcaps.models`.

A diffusers folder names its class in ``config.json`` (``_class_name``); a single
safetensors file is recognised from its key layout by the same recognisers ``diffcaps
inspect`` uses. The result is typed ``Model[Any]``: narrow it with a ``supports_*`` guard
from :mod:`diffcaps.protocols` before a feature call::

    model = AutoModel.from_pretrained(path)
    if supports_lora(model):
        lora.load_adapter(model, "style.safetensors")

A folder may ship its own model code: ``config.json`` names a Python file of the folder in
``_diffcaps_module`` and the class in ``_class_name``. That file is executed only with
``trust_code=True``. The key starts with ``_`` so that both diffcaps' and diffusers' config
readers treat it as bookkeeping, as diffusers does for its own custom-code folders (whose
``_class_name`` names a file and a class).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Final, cast

import torch

from diffcaps.errors import CheckpointError, ConfigError, UntrustedCodeError
from diffcaps.io import CONFIG_NAME, read_config, resolve_model_folder
from diffcaps.model import Model
from diffcaps.models import model_classes, model_for_class_name

__all__ = ["AutoModel", "CODE_KEY", "model_for_file"]

CODE_KEY: Final = "_diffcaps_module"
"""The ``config.json`` key naming the Python file, inside the folder, that defines the model class."""


def model_for_file(path: str | os.PathLike[str]) -> type[Model[Any]]:
    """The one known model class whose checkpoint layout the safetensors or GGUF file at ``path`` has.

    Uses the recognisers of ``diffcaps inspect``; raises :class:`~diffcaps.errors.CheckpointError`
    naming the file, with each model's reason, when no model or several match.
    """
    from diffcaps.weights import checkpoint_recogniser, inspect_file

    verdicts = {cls: inspect_file(path, [checkpoint_recogniser([cls])]).recognitions[0] for cls in model_classes()}
    found = [cls for cls, verdict in verdicts.items() if verdict.matched]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"{path}: matches several models ({', '.join(c.__name__ for c in found)})")
    why = "; ".join(f"{label}: {reason}" for verdict in verdicts.values() for label, reason in verdict.rows)
    raise CheckpointError(f"{path}: is no known model's checkpoint ({why or 'no model declares weight mapping'})")


def _shipped_class(folder: Path, module_file: object, class_name: object, *, trust_code: bool) -> type[Model[Any]]:
    """The class ``class_name`` defined by the folder's own Python file, executed only when trusted."""
    config = folder / CONFIG_NAME
    if not isinstance(module_file, str) or not module_file.endswith(".py"):
        raise ConfigError(f"{config}: {CODE_KEY} must name a .py file in the folder, got {module_file!r}")
    if not isinstance(class_name, str) or not class_name.isidentifier():
        raise ConfigError(f"{config}: _class_name must name the class defined in {module_file}, got {class_name!r}")
    code = (folder / module_file).resolve()
    if code.parent != folder.resolve() or not code.is_file():
        raise ConfigError(f"{config}: {CODE_KEY} {module_file!r} is not a file directly inside {folder}")
    if not trust_code:
        raise UntrustedCodeError(
            f"{config}: this folder ships its own model code; loading it would execute {code} "
            f"(class {class_name}). Read that file, then pass trust_code=True to run it"
        )
    digest = hashlib.sha256(str(code).encode()).hexdigest()[:16]
    module_name = f"diffcaps_shipped_{digest}_{code.stem}"
    spec = importlib.util.spec_from_file_location(module_name, code)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{code}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclass-like decorators look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"{code}: the folder's model code raised {type(exc).__name__}: {exc}") from exc
    found: object = getattr(module, class_name, None)
    if not (isinstance(found, type) and issubclass(found, Model)):
        raise ConfigError(f"{code}: defines no diffcaps Model subclass {class_name!r} (got {found!r})")
    return cast(type[Model[Any]], found)


class AutoModel:
    """Loads any known model (built-in, registered, or shipped with its folder) by what its files say."""

    def __init__(self) -> None:
        raise TypeError("AutoModel is not instantiated; call AutoModel.from_pretrained(path)")

    @staticmethod
    def model_class(path: str | os.PathLike[str], *, trust_code: bool = False) -> type[Model[Any]]:
        """The class ``from_pretrained`` would load ``path`` with: from a folder's ``config.json``
        ``_class_name`` (and ``_diffcaps_module``), or from a single file's key layout."""
        if Path(path).is_file():
            return model_for_file(path)
        folder = resolve_model_folder(path)
        config = read_config(folder)
        class_name = config.get("_class_name")
        if CODE_KEY in config:
            return _shipped_class(folder, config[CODE_KEY], class_name, trust_code=trust_code)
        if not isinstance(class_name, str):
            raise ConfigError(f"{folder / CONFIG_NAME}: no _class_name naming the model class (got {class_name!r})")
        return model_for_class_name(class_name, source=str(folder / CONFIG_NAME))

    @staticmethod
    def from_pretrained(path: str | os.PathLike[str], *, trust_code: bool = False,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        **kwargs: Any) -> Model[Any]:
        """Load the model at ``path``: a diffusers folder (or a pipeline folder's ``transformer/``)
        or a single safetensors checkpoint file, with the class its files name.

        ``kwargs`` go to the class's ``from_pretrained`` (``allow_pickle``) or, for a file, to
        ``diffcaps.weights.load_single_file`` (``variant``, ``strict``). A folder's own model
        code runs only with ``trust_code=True``
        (:class:`~diffcaps.errors.UntrustedCodeError` otherwise). The result is a
        ``Model[Any]``; narrow it with a ``diffcaps.protocols.supports_*`` guard for feature calls.
        """
        cls = AutoModel.model_class(path, trust_code=trust_code)
        if Path(path).is_file():
            from diffcaps.weights import load_single_file

            loaded: Model[Any] = load_single_file(cast(Any, cls), path, torch_dtype=torch_dtype, device=device,
                                                  **kwargs)
            return loaded
        return cls.from_pretrained(path, torch_dtype=torch_dtype, device=device, **kwargs)
