"""``SparseMultiheadAttention``: multi-head attention whose q, k, v and out projections are :class:`SparseLinear`.

``nn.MultiheadAttention`` keeps its input projections in one packed ``in_proj_weight`` and computes with
``out_proj.weight`` directly, so neither can be made sparse in place. This module has four separate projections,
each a ``SparseLinear`` (its own pattern and density), and computes attention itself with
``F.scaled_dot_product_attention``; the attention scores stay dense, as they are in every transformer. Its call
signature and return value are ``nn.MultiheadAttention``'s, so it also slots into ``nn.TransformerEncoderLayer``
and ``nn.TransformerDecoderLayer`` (``sparsify(model, attention="sparse")`` puts it there).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import SparseLinear, _check_density
from .pattern import Pattern
from .topology._common import check_size

__all__ = ["SparseMultiheadAttention"]


class SparseMultiheadAttention(nn.Module):
    r"""Multi-head attention ``softmax(Q K^T / sqrt(d) + mask) V`` with sparse projections.

    Args:
        embed_dim, num_heads, dropout, bias, batch_first, kdim, vdim: as ``nn.MultiheadAttention``
            (``add_bias_kv`` and ``add_zero_attn`` are not offered).
        density: density of each projection's random pattern, in (0, 1]; or
        patterns: ``{"q": Pattern, "k": ..., "v": ..., "out": ...}``, one per projection (e.g. ERK densities).
        layout, block_size, device, dtype, generator: passed to every :class:`SparseLinear`.

    Modules ``q_proj (embed, embed)``, ``k_proj (embed, kdim)``, ``v_proj (embed, vdim)``, ``out_proj (embed,
    embed)`` (``(out, in)`` shapes). ``in_proj_weight`` and ``in_proj_bias`` exist and are None: there is no
    packed projection, and the ``nn.Transformer*`` layers read that as "no fused fast path".

    Shapes as ``nn.MultiheadAttention``: query ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``, ``(L, E)``
    unbatched), key/value ``(S, N, kdim/vdim)``; returns ``(attn_output, attn_weights)`` with ``attn_weights``
    ``(N, L, S)`` averaged over heads (``(N, H, L, S)`` when ``average_attn_weights=False``), or None when
    ``need_weights=False``, which takes the fused ``scaled_dot_product_attention`` path.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, kdim: Optional[int] = None, vdim: Optional[int] = None, *,
                 density: Optional[float] = None, patterns: Optional[dict] = None, layout: Optional[str] = None,
                 block_size: Optional[int] = None, device=None, dtype=None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        embed_dim, num_heads = check_size("embed_dim", embed_dim, minimum=1), check_size("num_heads", num_heads,
                                                                                         minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        kdim = embed_dim if kdim is None else check_size("kdim", kdim, minimum=1)
        vdim = embed_dim if vdim is None else check_size("vdim", vdim, minimum=1)
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if (density is None) == (patterns is None):
            raise ValueError("give exactly one of density= (random patterns) or patterns= (one per projection)")
        if patterns is not None:
            if not isinstance(patterns, dict) or set(patterns) != {"q", "k", "v", "out"}:
                raise ValueError("patterns must be a dict with the keys 'q', 'k', 'v' and 'out'")
            for p in patterns.values():
                if not isinstance(p, Pattern):
                    raise TypeError(f"patterns must hold sparsecore.Pattern objects, got {type(p).__name__}")
        else:
            density = _check_density(density)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self._qkv_same_embed_dim = kdim == embed_dim and vdim == embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.in_proj_weight = None
        self.in_proj_bias = None

        def proj(key: str, in_f: int) -> SparseLinear:
            kw = dict(bias=bias, layout=layout, block_size=block_size, device=device, dtype=dtype)
            if patterns is not None:
                return SparseLinear(in_f, embed_dim, pattern=patterns[key], **kw)
            return SparseLinear(in_f, embed_dim, density=density, generator=generator, **kw)

        self.q_proj, self.k_proj, self.v_proj = proj("q", embed_dim), proj("k", kdim), proj("v", vdim)
        self.out_proj = proj("out", embed_dim)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, *, method: str = "uniform", density: Optional[float] = None,
                   epsilon: Optional[float] = None, layout: Optional[str] = None, block_size: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention holding ``mha``'s weights at each projection's pattern, chosen by
        ``method`` as in :func:`sparsecore.sparsify` (``"uniform"``, ``"er"``, ``"magnitude"``; ``"erk"`` is
        uniform here: the four projections are one block)."""
        from .nn import _sparse_from

        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by SparseMultiheadAttention")
        e, dev, dt = mha.embed_dim, mha.out_proj.weight.device, mha.out_proj.weight.dtype
        has_bias = mha.in_proj_bias is not None
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
        else:
            wq, wk, wv = (w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        bq, bk, bv = mha.in_proj_bias.detach().chunk(3) if has_bias else (None, None, None)
        bs = 1 if layout in (None, "csr") else (32 if block_size is None else block_size)
        if method == "erk":
            method = "uniform"

        def sparse(w: Tensor, b: Optional[Tensor]) -> SparseLinear:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=dev, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            return _sparse_from(lin, method, density, epsilon, bs, generator)

        projs = {"q": sparse(wq, bq), "k": sparse(wk, bk), "v": sparse(wv, bv),
                 "out": sparse(mha.out_proj.weight.detach(), None if mha.out_proj.bias is None
                               else mha.out_proj.bias.detach())}
        new = cls(e, mha.num_heads, mha.dropout, has_bias, mha.batch_first, mha.kdim, mha.vdim,
                  patterns={k: v.pattern for k, v in projs.items()}, device=dev, dtype=dt)
        with torch.no_grad():
            for key, layer in projs.items():
                target = getattr(new, f"{key}_proj")
                target.values.copy_(layer.values)
                if layer.bias is not None:
                    target.bias.copy_(layer.bias)
        new.train(mha.training)
        return new

    def to_dense(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` computing the same function (for checks and export)."""
        has_bias = self.q_proj.bias is not None
        w = self.out_proj.values
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=has_bias,
                                    batch_first=self.batch_first, kdim=self.kdim, vdim=self.vdim,
                                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            q, k, v = (p.to_dense() for p in (self.q_proj, self.k_proj, self.v_proj))
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            else:
                mha.q_proj_weight.copy_(q.weight)
                mha.k_proj_weight.copy_(k.weight)
                mha.v_proj_weight.copy_(v.weight)
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if self.out_proj.bias is not None:
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.train(self.training)
        return mha

    # ------------------------------------------------------------------ forward
    def _float_mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], n: int, l: int, s: int,
                    dtype: torch.dtype) -> Optional[Tensor]:
        """One additive mask (N, H or 1, L, S) from nn.MultiheadAttention's masks: a bool True means *masked
        out* there (the opposite of scaled_dot_product_attention's bool masks), a float mask is added."""
        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
            if not m.is_floating_point():
                raise TypeError(f"masks must be bool or floating, got {m.dtype}")
            return m.to(dtype)

        out = None
        if attn_mask is not None:
            m = additive(attn_mask)
            if m.dim() == 2:
                if tuple(m.shape) != (l, s):
                    raise ValueError(f"attn_mask of shape {tuple(m.shape)}: expected ({l}, {s})")
                m = m.view(1, 1, l, s)
            elif m.dim() == 3:
                if tuple(m.shape) != (n * self.num_heads, l, s):
                    raise ValueError(f"attn_mask of shape {tuple(m.shape)}: expected ({n * self.num_heads}, {l}, {s})")
                m = m.view(n, self.num_heads, l, s)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {m.dim()}-D")
            out = m
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, s):
                raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)}: expected ({n}, {s})")
            k = additive(key_padding_mask).view(n, 1, 1, s)
            out = k if out is None else out + k
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif query.dim() != 3:
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        if not self.batch_first or unbatched:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, l, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, l, h, d).transpose(1, 2)   # (N, H, L, D)
        k = self.k_proj(key).view(n, s, h, d).transpose(1, 2)     # (N, H, S, D)
        v = self.v_proj(value).view(n, s, h, d).transpose(1, 2)
        mask = self._float_mask(attn_mask, key_padding_mask, n, l, s, q.dtype)
        causal = is_causal and mask is None  # with a mask, is_causal is only a hint that the mask is causal
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            if causal:
                scores = scores.masked_fill(torch.ones(l, s, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, l, self.embed_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        nnz = sum(p.nnz for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        dense = self.embed_dim * (self.embed_dim * 2 + self.kdim + self.vdim)
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"nnz={nnz}, density={nnz / dense:.4g}")
