"""Feed-forward layers, with diffusers' parameter names (``net.0.proj``, ``net.2``)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GELU", "FeedForward"]


class GELU(nn.Module):
    """A linear projection (``proj``) followed by GELU, tanh-approximated by default."""

    def __init__(self, dim_in: int, dim_out: int, *, approximate: Literal["tanh", "none"] = "tanh",
                 bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        """Project then activate."""
        projected: Tensor = self.proj(x)
        return F.gelu(projected, approximate=self.approximate)


class FeedForward(nn.Module):
    """The transformer MLP: ``net.0`` (:class:`GELU` projection) → dropout → ``net.2`` (linear).

    The inner width is ``inner_dim``, or ``dim * mult`` when not given; the output width is
    ``dim_out``, or ``dim``.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        mult: float = 4,
        inner_dim: int | None = None,
        approximate: Literal["tanh", "none"] = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        inner = inner_dim if inner_dim is not None else int(dim * mult)
        self.net = nn.ModuleList([
            GELU(dim, inner, approximate=approximate, bias=bias),
            nn.Dropout(0.0),
            nn.Linear(inner, dim_out if dim_out is not None else dim, bias=bias),
        ])

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to features [..., dim]."""
        for layer in self.net:
            x = layer(x)
        return x
