"""Stages 7 to 14: multi-head self-attention with grouped-query heads and a KV cache.

Shapes (see stages.config): T new tokens at positions P..P+T-1, H query heads,
Hkv key/value heads, Dh head dim. Attention is computed explicitly so that the
scores and their softmax exist as tensors to look at.
"""
import math

import torch
import torch.nn.functional as F

from .hooks import record
from .kv_cache import KVCache
from .rope import apply_rotary_embeddings
from .tensor_parallel import parallel_linear
from .weights import LayerWeights


def calculate_xq_xk_xv(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor):
    """Stage 8. normalized x (T, D) -> xq (T, H·Dh), xk (T, Hkv·Dh), xv (T, Hkv·Dh)."""
    record(8, "normalized x", x)
    record(8, "wq", wq)
    record(8, "wk", wk)
    record(8, "wv", wv)
    return (record(8, "xq", F.linear(x, wq)), record(8, "xk", F.linear(x, wk)),
            record(8, "xv", F.linear(x, wv)))


def do_reshapings(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, head_dim: int):
    """Stage 9. xq (T, H·Dh) -> (T, H, Dh); xk, xv (T, Hkv·Dh) -> (T, Hkv, Dh).
    A training batch has a leading B on every tensor from here to stage 14; it is carried along."""
    rows = xq.shape[:-1]  # (T), or (B, T) in training
    record(9, "xq", xq)
    record(9, "xk", xk)
    record(9, "xv", xv)
    return (record(9, "xq (reshaped)", xq.view(*rows, -1, head_dim)),  # (T, H, Dh)
            record(9, "xk (reshaped)", xk.view(*rows, -1, head_dim)),  # (T, Hkv, Dh)
            record(9, "xv (reshaped)", xv.view(*rows, -1, head_dim)))  # (T, Hkv, Dh)


def update_kv_cache(cache: KVCache | None, xk: torch.Tensor, xv: torch.Tensor, start_pos: int):
    """Stage 11. Write xk, xv (T, Hkv, Dh) at positions P..P+T-1 of the cache (S, Hkv, Dh);
    returns the filled part, keys and values (P+T, Hkv, Dh). Without a cache (training, which sees
    every position at once and never comes back for more), xk and xv are the keys and values."""
    record(11, "xk (rotated)", xk)
    record(11, "xv (reshaped)", xv)
    if cache is None:
        return xk, xv
    end = start_pos + xk.shape[0]
    cache.cache_k[start_pos:end] = xk
    cache.cache_v[start_pos:end] = xv
    # Later steps write only beyond `end`, so these views keep their values: they are lasting.
    return (record(11, "cache_k", cache.cache_k[:end], lasting=True),
            record(11, "cache_v", cache.cache_v[:end], lasting=True))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(P+T, Hkv, Dh) -> (P+T, Hkv, n_rep, Dh), read as (P+T, H, Dh): KV head j serves query heads
    j·n_rep .. j·n_rep+n_rep-1. A view on a zero stride: the keys are never copied."""
    *rows, n_kv_heads, head_dim = x.shape  # rows: (P+T), or (B, T) in training
    return x[..., None, :].expand(*rows, n_kv_heads, n_rep, head_dim)


def do_transposes(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_rep: int):
    """Stage 12. xq (T, H, Dh) -> (H, T, Dh); keys, values (P+T, Hkv, Dh) -> (P+T, H, Dh) -> (H, P+T, Dh),
    the last two held grouped by KV head, as (P+T, Hkv, n_rep, Dh) and (Hkv, n_rep, P+T, Dh)."""
    *batch, seq, n_kv_heads, head_dim = keys.shape  # batch: (), or (B) in training
    heads = (*batch, seq, n_kv_heads * n_rep, head_dim)  # (P+T, H, Dh): the shape the diagram shows
    record(12, "xq (rotated)", xq)
    record(12, "keys", keys)
    record(12, "values", values)
    keys = record(12, "keys (repeated)", repeat_kv(keys, n_rep), shape=heads)  # (P+T, Hkv, n_rep, Dh)
    values = record(12, "values (repeated)", repeat_kv(values, n_rep), shape=heads)  # (P+T, Hkv, n_rep, Dh)
    transposed = (*batch, heads[-2], seq, head_dim)  # (H, P+T, Dh)
    return (record(12, "xq (transposed)", xq.transpose(-3, -2)),  # (H, T, Dh)
            record(12, "keys (transposed)", keys.movedim(-4, -2), shape=transposed),  # (Hkv, n_rep, P+T, Dh)
            record(12, "values (transposed)", values.movedim(-4, -2), shape=transposed))  # (Hkv, n_rep, P+T, Dh)


def causal_mask(T: int, start_pos: int, device) -> torch.Tensor | None:
    """(T, P+T): 0 over the P cached positions, then the causal triangle over the new ones.
    A single new token may see everything, so decode steps need no mask."""
    if T == 1:
        return None
    triangle = torch.full((T, T), float("-inf"), device=device).triu(1)  # (T, T)
    return torch.hstack([torch.zeros((T, start_pos), device=device), triangle])  # (T, P+T)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (H, T, K) · b (Hkv, n_rep, K, N) -> (H, T, N), where b repeats each KV head n_rep times on a zero
    stride: the query heads of one KV head are multiplied with it in one matmul, never with copies."""
    *batch, H, T, K = a.shape  # batch: (), or (B) in training
    n_kv_heads = b.shape[-4]
    grouped = torch.matmul(a.reshape(*batch, n_kv_heads, -1, K), b[..., 0, :, :])  # (Hkv, n_rep·T, N)
    return grouped.view(*batch, H, T, -1)  # (H, T, N)


def calculate_scores(xq: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Stage 13. xq (H, T, Dh) · keysᵀ (H, Dh, P+T) / sqrt(Dh) + mask (T, P+T) -> softmax -> (H, T, P+T).
    keys (H, P+T, Dh) come grouped by KV head, as (Hkv, n_rep, P+T, Dh) (see do_transposes)."""
    *batch, H, _, head_dim = xq.shape  # batch: (), or (B) in training
    heads = (*batch, H, keys.shape[-2], head_dim)  # (H, P+T, Dh)
    record(13, "xq (transposed)", xq)
    record(13, "keys (transposed)", keys, shape=heads)
    scores = grouped_matmul(xq, keys.transpose(-2, -1)) / math.sqrt(head_dim)  # (H, T, P+T)
    if mask is not None:
        record(13, "mask", mask)
        scores = scores + mask  # broadcast over heads
    record(13, "scores", scores)
    # Softmax in float32 whatever the model dtype: small differences of large scores matter.
    return record(13, "scores (softmax)", F.softmax(scores.float(), dim=-1).type_as(xq))


def calculate_output(probs: torch.Tensor, values: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """Stage 14. probs (H, T, P+T) · values (H, P+T, Dh) -> (H, T, Dh) -> (T, H·Dh) -> wo -> (T, D).
    values come grouped by KV head, as (Hkv, n_rep, P+T, Dh) (see do_transposes)."""
    *batch, H, T, seq = probs.shape  # batch: (), or (B) in training
    record(14, "scores (softmax)", probs)
    record(14, "values (transposed)", values, shape=(*batch, H, seq, values.shape[-1]))
    output = grouped_matmul(probs, values)  # (H, T, Dh)
    merged = output.transpose(-3, -2).flatten(-2)  # (T, H, Dh) -> (T, H·Dh)
    # The head outputs are shown in the merged tensor's memory (the same numbers): one copy, not two.
    record(14, "head outputs", merged.view(*batch, T, H, -1).transpose(-3, -2))  # (T, H, Dh) -> (H, T, Dh)
    record(14, "heads merged", merged)
    record(14, "wo", wo)
    return parallel_linear(14, "attention output", merged, wo)  # (T, D), all-reduced when wo is split


def attention(x: torch.Tensor, layer: LayerWeights, cache: KVCache | None, freqs_cis: torch.Tensor,
              start_pos: int, head_dim: int, n_rep: int) -> torch.Tensor:
    """Stage 7. normalized x (T, D) -> attention output (T, D), through stages 8 to 14.
    freqs_cis is the (T, Dh/2) slice for positions P..P+T-1."""
    record(7, "normalized x", x)
    xq, xk, xv = calculate_xq_xk_xv(x, layer.wq, layer.wk, layer.wv)
    xq, xk, xv = do_reshapings(xq, xk, xv, head_dim)
    xq, xk = apply_rotary_embeddings(xq, xk, freqs_cis)
    return record(7, "attention output", attend(xq, xk, xv, cache, start_pos, n_rep, layer.wo))


def attend(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cache: KVCache | None, start_pos: int, n_rep: int,
           wo: torch.Tensor) -> torch.Tensor:
    """Stages 11 to 14. rotated xq (T, H, Dh), xk (T, Hkv, Dh), xv (T, Hkv, Dh) -> attention output (T, D)."""
    keys, values = update_kv_cache(cache, xk, xv, start_pos)
    xq, keys, values = do_transposes(xq, keys, values, n_rep)
    probs = calculate_scores(xq, keys, causal_mask(xq.shape[-2], start_pos, xq.device))
    return calculate_output(probs, values, wo)
