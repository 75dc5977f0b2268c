"""RMSNorm and the adaptive layer norms whose shift, scale and gate come from a conditioning vector."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AdaLayerNormContinuous", "AdaLayerNormZero", "AdaLayerNormZeroSingle", "RMSNorm", "modulate"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift``; ``shift`` and ``scale`` broadcast against ``x``."""
    return x * (1 + scale) + shift


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
