"""RMSNorm and the adaptive layer norms whose shift, scale and gate come from a conditioning vector."""

from __future__ import annotations

import torch.nn.functional as F
import torch
from torch import Tensor, nn

__all__ = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "FP32LayerNorm",
    "RMSNorm",
    "modulate",
    "modulation_table",
    "table_modulation",
]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift``; ``shift`` and ``scale`` broadcast against ``x``."""
    return x * (1 + scale) + shift


def modulation_table(rows: int, dim: int) -> nn.Parameter:
    """A learned ``scale_shift_table`` [1, rows, dim], initialised N(0, 1/dim).

    Built on the meta device (loading), it is left uninitialised: no work, and none of the
    reference-op imports that arithmetic on meta tensors triggers (about a second, once).
    """
    table = torch.empty(1, rows, dim)
    if table.device.type != "meta":
        nn.init.normal_(table, std=dim**-0.5)
    return nn.Parameter(table)


def table_modulation(table: Tensor, emb: Tensor) -> tuple[Tensor, ...]:
    """Split a learned ``scale_shift_table`` plus a projected conditioning into its modulation vectors.

    ``table`` is [1, n, dim]. ``emb`` is [batch, n, dim] (one conditioning per sample: each
    result is [batch, 1, dim]) or [batch, seq, n, dim] (one per token: each result is
    [batch, seq, dim]); its ``n`` axis may be 1 to add the same conditioning to every row.
    The sum is taken in the promoted dtype of the two; cast ``emb`` first to choose it.
    Returns the ``n`` vectors in table order.
    """
    if (table.ndim != 3 or emb.ndim not in (3, 4) or emb.shape[-1] != table.shape[-1]
            or emb.shape[-2] not in (1, table.shape[1])):
        raise ValueError(f"table_modulation takes a table [1, n, dim] and a conditioning [batch, n, dim] or "
                         f"[batch, seq, n, dim], got {list(table.shape)} and {list(emb.shape)}")
    count = table.shape[1]
    if emb.ndim == 3:
        return (table + emb).chunk(count, dim=1)
    return tuple(part.squeeze(2) for part in (table.unsqueeze(0) + emb).chunk(count, dim=2))


class FP32LayerNorm(nn.LayerNorm):
    """A ``LayerNorm`` computed in float32 (weights included) and returned in the input's dtype."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalise the last dimension of ``input`` in float32."""
        # ``weight``/``bias`` are None without an affine part (torch types them as always present).
        params = dict(self.named_parameters(recurse=False))
        weight, bias = (p.float() if (p := params.get(name)) is not None else None for name in ("weight", "bias"))
        return F.layer_norm(input.float(), self.normalized_shape, weight, bias, self.eps).to(input.dtype)


class RMSNorm(nn.RMSNorm):
    """Root-mean-square norm over the last ``dim`` features, with an optional learned ``weight``.

    ``torch.nn.RMSNorm`` with diffusers' default ``eps``, so code that looks for torch's norm
    (LoRA norm targets, meta-device loading) finds it. To normalise queries or keys across all
    heads at once, apply it to [..., heads * head_dim] before splitting the heads; per head,
    to [..., head_dim].
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, elementwise_affine: bool = True) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)


class AdaLayerNormZero(nn.Module):
    """A block's input modulation: ``linear(silu(emb))`` gives six vectors, the first pair applied here.

    Returns ``(modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Modulate ``x`` [batch, seq, dim] by the conditioning ``emb`` [batch, dim]."""
        params: Tensor = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = params.chunk(6, dim=1)
        normed: Tensor = self.norm(x)
        return modulate(normed, shift_msa[:, None], scale_msa[:, None]), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """A single-stream block's modulation: shift, scale and one gate. Returns ``(modulated x, gate)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        """Modulate ``x`` [batch, seq, dim] by the conditioning ``emb`` [batch, dim]."""
        params: Tensor = self.linear(self.silu(emb))
        shift, scale, gate = params.chunk(3, dim=1)
        normed: Tensor = self.norm(x)
        return modulate(normed, shift[:, None], scale[:, None]), gate


class AdaLayerNormContinuous(nn.Module):
    """The output norm: ``linear(silu(emb))`` gives scale then shift (in that order), no gate."""

    def __init__(self, dim: int, conditioning_dim: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim or dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Modulate ``x`` [batch, seq, dim] by the conditioning ``emb`` [batch, conditioning_dim]."""
        params: Tensor = self.linear(self.silu(emb).to(x.dtype))
        scale, shift = params.chunk(2, dim=1)
        normed: Tensor = self.norm(x)
        return modulate(normed, shift[:, None], scale[:, None])
