"""Tensor transforms between a checkpoint's layout and a model's, declared once, run both ways.

A transform takes the tensors of one rule on the original side to the tensors on the model
side (``forward``) and back (``reverse``); the ``*_shapes`` methods do the same for shapes,
so that a file can be checked against a model from its header alone. Reverse after forward
is the identity, bit for bit: transforms only slice, concatenate and reorder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, final

import attrs
import torch
from torch import Tensor

__all__ = ["IDENTITY", "SWAP_HALVES", "Identity", "Inverted", "Reorder", "Shape", "Split", "Transform"]

Shape = tuple[int, ...]


class Transform(Protocol):
    """Maps the tensors of one rule from the original layout to the model's and back."""

    def arity(self) -> tuple[int, int]:
        """How many tensors it takes on the original side and gives on the model side."""
        ...

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Original-layout tensors → model tensors."""
        ...

    def reverse(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Model tensors → original-layout tensors."""
        ...

    def forward_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The shapes ``forward`` gives for inputs of these shapes (``ValueError`` if none fit)."""
        ...

    def reverse_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The shapes ``reverse`` gives for inputs of these shapes (``ValueError`` if none fit)."""
        ...

    def describe(self) -> str:
        """A few words for listings and error messages."""
        ...


@final
@attrs.frozen
class Identity:
    """The tensor is stored as is; only its name changes."""

    def arity(self) -> tuple[int, int]:
        """One in, one out."""
        return 1, 1

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The tensor itself."""
        return (tensors[0],)

    def reverse(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The tensor itself."""
        return (tensors[0],)

    def forward_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The shape itself."""
        return (shapes[0],)

    def reverse_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The shape itself."""
        return (shapes[0],)

    def describe(self) -> str:
        """``rename``."""
        return "rename"


def _check_ratios(instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    if len(value) < 2 or any(r <= 0 for r in value):
        raise ValueError(f"{attribute.name} needs two or more positive parts, got {value}")


def _along(shape: Shape, dim: int) -> int:
    if dim >= len(shape):
        raise ValueError(f"a tensor of shape {list(shape)} has no dim {dim}")
    return shape[dim]


@final
@attrs.frozen
class Split:
    """One fused tensor ↔ several, cut along ``dim`` in proportion to ``ratios``.

    ``Split(ratios=(1, 1, 1))`` cuts a fused q/k/v projection in three equal parts;
    ``Split(ratios=(1, 1, 1, 4))`` cuts q, k, v and a 4× wide MLP out of one matrix. Sizes
    follow the tensor, so the same rule serves every model width. Reverse concatenates.
    """

    ratios: tuple[int, ...] = attrs.field(validator=_check_ratios)
    dim: int = 0

    def arity(self) -> tuple[int, int]:
        """One fused tensor in, one part per ratio out."""
        return 1, len(self.ratios)

    def _sizes(self, total: int) -> list[int]:
        parts = sum(self.ratios)
        if total % parts:
            raise ValueError(f"size {total} along dim {self.dim} does not split {self.describe_ratios()}")
        unit = total // parts
        return [unit * r for r in self.ratios]

    def describe_ratios(self) -> str:
        """The ratios as ``1:1:1``."""
        return ":".join(str(r) for r in self.ratios)

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Cut the fused tensor into its parts (views: copy what you keep)."""
        (fused,) = tensors
        return tuple(torch.split(fused, self._sizes(fused.shape[self.dim]), dim=self.dim))

    def reverse(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Concatenate the parts back into one tensor."""
        return (torch.cat(list(tensors), dim=self.dim),)

    def forward_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """Each part's shape."""
        (shape,) = shapes
        sizes = self._sizes(_along(shape, self.dim))
        return tuple(shape[: self.dim] + (size,) + shape[self.dim + 1 :] for size in sizes)

    def reverse_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The fused shape; the parts must agree elsewhere and be in proportion."""
        if len(shapes) != len(self.ratios):
            raise ValueError(f"expected {len(self.ratios)} parts, got {len(shapes)}")
        rest = {s[: self.dim] + s[self.dim + 1 :] for s in shapes}
        sizes = [_along(s, self.dim) for s in shapes]
        if len(rest) != 1 or len({len(s) for s in shapes}) != 1:
            raise ValueError(f"parts of shapes {[list(s) for s in shapes]} differ outside dim {self.dim}")
        if self._sizes(sum(sizes)) != sizes:
            raise ValueError(f"parts of sizes {sizes} along dim {self.dim} are not {self.describe_ratios()}")
        first = shapes[0]
        return (first[: self.dim] + (sum(sizes),) + first[self.dim + 1 :],)

    def describe(self) -> str:
        """``split 1:1:1 on dim 0``."""
        return f"split {self.describe_ratios()} on dim {self.dim}"


def _check_order(instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    if sorted(value) != list(range(len(value))) or len(value) < 2:
        raise ValueError(f"{attribute.name} must be a permutation of 0..n-1 (n >= 2), got {value}")


@final
@attrs.frozen
class Reorder:
    """Cut a tensor into ``len(order)`` equal chunks along ``dim`` and put them in ``order``.

    ``Reorder(order=(1, 0))`` swaps the halves, as between an adaptive norm that stores
    (shift, scale) and one that stores (scale, shift). Reverse applies the inverse order.
    """

    order: tuple[int, ...] = attrs.field(validator=_check_order)
    dim: int = 0

    def arity(self) -> tuple[int, int]:
        """One in, one out."""
        return 1, 1

    def _apply(self, tensor: Tensor, order: Sequence[int]) -> Tensor:
        self._check(tuple(tensor.shape))
        chunks = torch.chunk(tensor, len(order), dim=self.dim)
        return torch.cat([chunks[i] for i in order], dim=self.dim)

    def _inverse(self) -> list[int]:
        inverse = [0] * len(self.order)
        for position, source in enumerate(self.order):
            inverse[source] = position
        return inverse

    def _check(self, shape: Shape) -> Shape:
        if _along(shape, self.dim) % len(self.order):
            raise ValueError(f"size {shape[self.dim]} along dim {self.dim} does not cut in {len(self.order)}")
        return shape

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The chunks in ``order``."""
        return (self._apply(tensors[0], self.order),)

    def reverse(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The chunks put back."""
        return (self._apply(tensors[0], self._inverse()),)

    def forward_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The same shape."""
        return (self._check(shapes[0]),)

    def reverse_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The same shape."""
        return (self._check(shapes[0]),)

    def describe(self) -> str:
        """``swap halves on dim 0`` or ``reorder chunks (2, 0, 1) on dim 0``."""
        if self.order == (1, 0):
            return f"swap halves on dim {self.dim}"
        return f"reorder chunks {self.order} on dim {self.dim}"


@final
@attrs.frozen
class Inverted:
    """A transform run the other way round (``Inverted(Split(...))`` fuses model tensors)."""

    inner: Transform

    def arity(self) -> tuple[int, int]:
        """The inner arity, swapped."""
        original, model = self.inner.arity()
        return model, original

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The inner reverse."""
        return self.inner.reverse(tensors)

    def reverse(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The inner forward."""
        return self.inner.forward(tensors)

    def forward_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The inner reverse shapes."""
        return self.inner.reverse_shapes(shapes)

    def reverse_shapes(self, shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The inner forward shapes."""
        return self.inner.forward_shapes(shapes)

    def describe(self) -> str:
        """``inverse of …``."""
        return f"inverse of {self.inner.describe()}"


IDENTITY: Final = Identity()
SWAP_HALVES: Final = Reorder(order=(1, 0))
