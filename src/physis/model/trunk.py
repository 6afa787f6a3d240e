"""The trunk (prefix + subtask tokens) and the action expert (action + future tokens).

Both are pre-norm transformers with the same heads and head dim. By default they have the same number of
layers and expert layer l attends to the trunk's layer-l keys/values (π0-style mixture of experts over one
sequence); a shallower expert reads evenly spaced trunk layers (`ModelConfig.expert_reads`). Either way the
trunk never sees action tokens, so its per-layer K/V can be computed once per observation and cached
(`PrefixCache`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm attention + MLP block. Queries/keys/values live in `heads * head_dim` (the trunk's width)
    whatever the block's own width, so trunk and expert tokens can attend to each other."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, n, head_dim); one call where three indexings cost three
        return q, k, v

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of tokens x (B, n, dim) without running the block (used for a foreign backbone)."""
        _, k, v = self._split(x)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        ctx_k: torch.Tensor | None = None,
        ctx_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, n, dim) attends to [ctx, x] under bool mask (B, 1, n, n_ctx + n) (True = may attend).

        Returns the new x and this block's own keys/values of x (B, heads, n, head_dim).
        """
        q, k, v = self._split(x)
        keys = k if ctx_k is None else torch.cat([ctx_k, k], dim=2)
        values = v if ctx_v is None else torch.cat([ctx_v, v], dim=2)
        return self._finish(x, attention(q, keys, values, mask)), k, v

    def forward_cached(
        self, x: torch.Tensor, mask: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Inference: x (B, n, dim) sits at positions start..start+n of key/value buffers (B, heads, N, head_dim).

        Its keys/values are written there in place and it attends to the whole buffer under mask (B, 1, n, N)
        (bool, or additive float), so nothing is concatenated per call. Returns the new x.
        """
        q, k, v = self._split(x)
        k_buf[:, :, start : start + x.shape[1]] = k
        v_buf[:, :, start : start + x.shape[1]] = v
        return self._finish(x, attention(q, k_buf, v_buf, mask))

    def _finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(att.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention under a bool mask (True = may attend), or without gradients an additive float mask.

    The mask may be any shape that broadcasts to (B, heads, n, N), e.g. (B, 1, 1, N) for a key mask.

    When gradients are needed, plain matmul-softmax: for these short sequences it trains about twice as fast
    on a CPU as the fused kernel, whose backward dominates a step. The scale goes on q (N/head_dim times fewer
    elements than the scores) and the mask is added in the scores' dtype, which under bf16 autocast is about
    1.2x faster than scaling and `masked_fill` on the scores. Without gradients the fused kernel: at batch 1 in
    float32 it is as fast as matmul-softmax or faster (up to 1.3x for one subtask query) for every shape physis
    runs (16 action queries, 1 subtask query, the prefix), more so with a prebuilt additive mask.
    """
    if not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    bias = additive_mask(mask, scores.dtype) if mask.dtype == torch.bool else mask.to(scores.dtype)
    return (scores + bias).softmax(-1) @ v


@dataclass
class PrefixCache:
    """Per-layer keys/values of the prefix [+ subtask] tokens, computed once per observation.

    keys/values: one (B, heads, N, head_dim) tensor per layer; mask (B, N) marks keys actions may attend;
    pooled (B, width) is the prefix summary the progress head reads; action_mask (B, A) the body's slots;
    env_state (B, E) the environment-state head's estimate (normalized), when the model has that head and the
    last layer ran.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    pooled: torch.Tensor
    action_mask: torch.Tensor
    prefix_len: int
    cameras: int = 1
    subtask_ids: torch.Tensor | None = None
    env_state: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def prefix_only(self) -> PrefixCache:
        """The cache without any subtask tokens appended."""
        n = self.prefix_len
        return replace(
            self,
            keys=[k[:, :, :n] for k in self.keys],
            values=[v[:, :, :n] for v in self.values],
            mask=self.mask[:, :n],
            subtask_ids=None,
        )

    def head(self, n: int) -> PrefixCache:
        """The cache of the first n rows (a subset of the batch a training loss is computed on)."""
        return self._map_rows(lambda x: x[:n])

    def repeat(self, n: int) -> PrefixCache:
        """Each row repeated n times (row i -> rows i*n .. i*n+n-1), for sampling n candidates per observation."""
        return self._map_rows(lambda x: x.repeat_interleave(n, dim=0))

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PrefixCache:
        """The cache with fn applied to every per-row tensor (the batch dimension first)."""

        def opt(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else fn(x)

        return replace(
            self,
            keys=[fn(k) for k in self.keys],
            values=[fn(v) for v in self.values],
            mask=fn(self.mask),
            pooled=opt(self.pooled),
            action_mask=fn(self.action_mask),
            subtask_ids=opt(self.subtask_ids),
            env_state=opt(self.env_state),
        )


def key_mask(mask: torch.Tensor, n_query: int | None = None) -> torch.Tensor:
    """(B, N) key mask -> (B, 1, n_query, N) attention mask, or (B, 1, 1, N) that broadcasts over the queries
    when n_query is None (nothing per query to build)."""
    m = mask[:, None, None, :]
    return m if n_query is None else m.expand(-1, 1, n_query, -1)


def subtask_attention_mask(prefix_mask: torch.Tensor, n_sub: int) -> torch.Tensor:
    """Subtask queries (B, 1, n_sub, N + n_sub): all valid prefix keys, and earlier-or-same subtask tokens."""
    b, _ = prefix_mask.shape
    causal = torch.ones(n_sub, n_sub, dtype=torch.bool, device=prefix_mask.device).tril()
    return torch.cat([key_mask(prefix_mask, n_sub), causal.expand(b, 1, n_sub, n_sub)], dim=-1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as 0 / -inf in `dtype`, built once and reused by every flow step."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def expert_attention_mask(ctx_mask: torch.Tensor, n_action: int, n_future: int) -> torch.Tensor:
    """Action queries see the context and all action tokens; future queries see context, actions and futures."""
    b = ctx_mask.shape[0]
    n = n_action + n_future
    own = torch.ones(n, n, dtype=torch.bool, device=ctx_mask.device)
    if n_future:  # (an empty slice assignment trips the ONNX exporter)
        own[:n_action, n_action:] = False
    return torch.cat([key_mask(ctx_mask, n), own.expand(b, 1, n, n)], dim=-1)
