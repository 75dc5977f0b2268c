"""Exceptions raised by diffcaps.

Every error that is about a file or a key says which one, and what was expected instead.
All of them derive from :class:`DiffcapsError`, so one ``except`` catches them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

__all__ = [
    "AttentionError",
    "CacheError",
    "CapabilityError",
    "CastingError",
    "CheckpointError",
    "CheckpointingError",
    "CompileError",
    "ConfigError",
    "ContextError",
    "DiffcapsError",
    "FormatError",
    "GenerateError",
    "HookError",
    "IPAdapterError",
    "InputError",
    "InteropError",
    "LoRAError",
    "MissingDependencyError",
    "ModelRegistrationError",
    "OffloadError",
    "ParallelError",
    "QuantizationError",
    "RankFailure",
    "ShapeError",
    "UnknownModelError",
    "UntrustedCodeError",
]


def _listing(names: Iterable[str], limit: int = 12) -> str:
    items = sorted(names)
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f", … and {more} more" if more > 0 else "")


class DiffcapsError(Exception):
    """Base class of every error diffcaps raises on purpose."""


class ConfigError(DiffcapsError, ValueError):
    """A model configuration is missing, unreadable, or for another model class."""


class CheckpointError(DiffcapsError, ValueError):
    """A weight file or folder cannot be loaded as asked: wrong format, keys or shapes."""

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)

    @classmethod
    def key_mismatch(
        cls,
        path: str | PathLike[str],
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
    ) -> CheckpointError:
        """Build the error for weight keys that are missing from, or extra in, a checkpoint."""
        missing, unexpected = sorted(missing), sorted(unexpected)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        error = cls("; ".join(parts), path=path)
        error.missing, error.unexpected = tuple(missing), tuple(unexpected)
        return error

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


class UnknownModelError(DiffcapsError, LookupError):
    """A model name or ``module:Class`` reference names no diffcaps model class."""


class ModelRegistrationError(DiffcapsError, ValueError):
    """``register_model`` was given something that is not a ``Model`` subclass, or a name already taken."""


class UntrustedCodeError(DiffcapsError, PermissionError):
    """A model folder ships Python code and ``trust_code=True`` was not given; the message names the file."""


class ShapeError(CheckpointError):
    """A tensor in a file does not have the shape the model expects."""


class FormatError(DiffcapsError, ValueError):
    """A file is in none of the formats a service knows."""


class CapabilityError(DiffcapsError, TypeError):
    """A feature function was called on a model that does not declare the feature."""

    def __init__(self, model_class: str, feature: str) -> None:
        self.model_class = model_class
        self.feature = feature
        super().__init__(
            f"{model_class} does not support {feature!r}: its capabilities declare no "
            f"{feature} service (see {model_class}.metadata())"
        )


class HookError(DiffcapsError, ValueError):
    """A forward hook cannot be added or removed as asked (name taken, name unknown, forward replaced)."""


class ContextError(DiffcapsError, RuntimeError):
    """A stateful hook ran outside a named state context where it needs one."""


class InputError(DiffcapsError, ValueError):
    """A model's forward was given an argument of the wrong shape or dtype (named, with what was expected)."""


class CacheError(DiffcapsError, ValueError):
    """An inference cache config is invalid or does not fit the model, or a cache is already enabled."""


class LoRAError(DiffcapsError, ValueError):
    """A LoRA call that the model's adapter state does not allow (unknown name, fused, …)."""


class CastingError(DiffcapsError, ValueError):
    """Layerwise casting cannot be enabled as asked (dtype, patterns, already enabled)."""


class CheckpointingError(DiffcapsError, ValueError):
    """Gradient checkpointing cannot be enabled as asked (a config of the wrong kind)."""


class CompileError(DiffcapsError, ValueError):
    """Regional compile cannot be enabled as asked (a config value of the wrong kind)."""


class OffloadError(DiffcapsError, ValueError):
    """Group offloading cannot be enabled or disabled as asked."""


class GenerateError(DiffcapsError, ValueError):
    """``diffcaps generate`` cannot run as asked: a missing pipeline folder, a bad option, an unwritable output."""


class IPAdapterError(DiffcapsError, ValueError):
    """An IP-Adapter call that does not fit the loaded adapters (name, scales, image embeddings)."""


class AttentionError(DiffcapsError, RuntimeError):
    """An attention backend that is unknown, not declared, or whose package or device is missing."""


class QuantizationError(DiffcapsError, ValueError):
    """Quantized weights that cannot be decoded or applied as asked: an unsupported packed type
    (named, with the supported ones), packed bytes of the wrong length for the shape, a config of
    the wrong kind."""


class ParallelError(DiffcapsError, RuntimeError):
    """Context parallelism cannot be enabled or run as asked: no process group, degrees that do not
    fit the world, a model without a plan, or inputs the plan cannot split."""


class RankFailure(ParallelError):
    """A context-parallel collective did not complete: a rank failed or stalled, or the wait timed out.

    ``rank`` is the rank that raised this error; ``failed`` maps every rank that reported an
    error of its own to that error's text (empty when none did, e.g. a rank that hung or died).
    """

    def __init__(self, message: str, *, rank: int, failed: dict[int, str] | None = None) -> None:
        self.rank = rank
        self.failed = dict(failed or {})
        super().__init__(message)


class InteropError(DiffcapsError, ValueError):
    """Another library handed diffcaps something it cannot take (a bridge in :mod:`diffcaps.interop`)."""


class MissingDependencyError(DiffcapsError, ImportError):
    """An optional dependency is not installed; the message says what to ``pip install``."""
