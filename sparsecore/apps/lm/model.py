"""A small decoder-only transformer (GPT) whose projections are :class:`~sparsecore.nn.SparseLinear`, and its dense
twin.

Each block is pre-norm: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; attention is causal multi-head self-attention,
the MLP is ``Linear(d, 4d) -> GELU -> Linear(4d, d)``. In the sparse model the six projections of a block (q, k, v,
out, fc, proj) are ``SparseLinear`` (attention is :class:`sparsecore.SparseMultiheadAttention`); in the dense model
they are ``nn.Linear`` of the same widths (attention computed the same way, with ``scaled_dot_product_attention``).
The token and position embeddings, the LayerNorms and the LM head (``nn.Linear(d, vocab)``, no bias) stay dense in
both: they are small next to the blocks for a character vocabulary, and the head's softmax needs every logit.

Shapes: tokens int64 ``(B, T)`` with ``T <= context`` -> logits ``(B, T, vocab)``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attention import SparseMultiheadAttention
from ...nn import SparseLinear
from ...topology import erk_densities, random_blocks, uniform

__all__ = ["GPT", "projection_shapes", "layer_densities", "PROJECTIONS"]

PROJECTIONS = ("q", "k", "v", "out", "fc", "proj")  # the projections of one block, in order


def projection_shapes(layers: int, d_model: int) -> List[tuple]:
    """``(out, in)`` of every projection of the model, block by block in :data:`PROJECTIONS` order."""
    d = d_model
    per_block = [(d, d), (d, d), (d, d), (d, d), (4 * d, d), (d, 4 * d)]
    return per_block * layers


def layer_densities(layers: int, d_model: int, density: float, distribution: str) -> List[float]:
    """Per-projection densities: ``density`` everywhere (``"uniform"``) or ERK (``"erk"``: density proportional to
    ``(in + out) / (in * out)``, scaled so the total nnz is ``density`` of the total, capped at 1 with the excess
    redistributed; :func:`sparsecore.topology.erk_densities`)."""
    shapes = projection_shapes(layers, d_model)
    if distribution == "uniform":
        return [float(density)] * len(shapes)
    if distribution == "erk":
        return erk_densities(shapes, density)
    raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")


class DenseSelfAttention(nn.Module):
    """Causal multi-head self-attention with four ``nn.Linear`` projections (the dense twin of
    ``SparseMultiheadAttention``, same names ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
    ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: Tensor) -> Tensor:  # (B, T, d) -> (B, H, T, d/H)
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class SparseSelfAttention(nn.Module):
    """Causal self-attention through :class:`SparseMultiheadAttention` (``batch_first``, fused SDPA path).
    ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d_model: int, heads: int, patterns: Dict[str, object]):
        super().__init__()
        self.mha = SparseMultiheadAttention(d_model, heads, batch_first=True, patterns=patterns)

    def forward(self, x: Tensor) -> Tensor:
        # need_weights=False takes scaled_dot_product_attention(is_causal=True): no (T, T) mask is built
        return self.mha(x, x, x, need_weights=False, is_causal=True)[0]


class Block(nn.Module):
    """Pre-norm transformer block. ``(B, T, d) -> (B, T, d)``. ``patterns``: None (dense) or one
    :class:`~sparsecore.pattern.Pattern` per name of :data:`PROJECTIONS`."""

    def __init__(self, d_model: int, heads: int, patterns: Optional[Dict[str, object]] = None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        if patterns is None:
            self.attn = DenseSelfAttention(d_model, heads)
            self.fc, self.proj = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
        else:
            self.attn = SparseSelfAttention(d_model, heads, {k: patterns[k] for k in ("q", "k", "v", "out")})
            # default row-major layout: feature_major only pays in chains of sparse layers and elementwise ops
            self.fc = SparseLinear(d_model, 4 * d_model, pattern=patterns["fc"])
            self.proj = SparseLinear(4 * d_model, d_model, pattern=patterns["proj"])

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


def _pattern(out: int, in_: int, density: float, block_size: int, generator):
    """A projection's random pattern: CSR connections, or BSR blocks (density counted in blocks)."""
    if block_size == 1:
        return uniform(out, in_, density, generator=generator)
    return random_blocks(out, in_, density, block_size, generator=generator)


class GPT(nn.Module):
    """Character-level GPT. ``densities``: None for the dense model, else one density per projection
    (:func:`layer_densities`), the patterns drawn uniformly at random from ``generator``: single connections, or
    with ``block_size > 1`` whole ``block_size x block_size`` blocks (BSR; ``d_model`` a multiple of it).

    ``forward(idx)``: int64 ``(B, T)``, ``T <= context`` -> logits ``(B, T, vocab_size)``.
    """

    def __init__(self, vocab_size: int, context: int, layers: int, d_model: int, heads: int,
                 densities: Optional[Sequence[float]] = None, generator: Optional[torch.Generator] = None,
                 block_size: int = 1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be divisible by heads {heads}")
        if block_size < 1 or d_model % block_size:
            raise ValueError(f"d_model {d_model} must be a multiple of block_size {block_size}")
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        shapes = projection_shapes(layers, d_model)
        if densities is not None and len(densities) != len(shapes):
            raise ValueError(f"need {len(shapes)} densities (6 per layer), got {len(densities)}")
        blocks = []
        for i in range(layers):
            pats = None
            if densities is not None:
                pats = {name: _pattern(*shapes[6 * i + j], densities[6 * i + j], block_size, generator)
                        for j, name in enumerate(PROJECTIONS)}
            blocks.append(Block(d_model, heads, pats))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def projections(self) -> List[nn.Module]:
        """The projection layers (``SparseLinear`` or ``nn.Linear``), block by block in :data:`PROJECTIONS` order."""
        out = []
        for b in self.blocks:
            a = b.attn.mha if isinstance(b.attn, SparseSelfAttention) else b.attn
            out += [a.q_proj, a.k_proj, a.v_proj, a.out_proj, b.fc, b.proj]
        return out

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: Tensor, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Append ``n`` tokens to ``idx`` (int64 ``(B, T0)``): sampled from the softmax with ``generator``, or the
        most likely ones (greedy) when ``generator`` is None. Returns ``(B, T0 + n)``."""
        was = self.training
        self.eval()
        for _ in range(n):
            logits = self(idx[:, -self.context:])[:, -1]
            if generator is None:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was)
        return idx
