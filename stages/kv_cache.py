"""The per-layer key/value cache: keys (after RoPE) and values of every position seen."""
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    cache_k: torch.Tensor  # (S, Hkv, Dh)
    cache_v: torch.Tensor  # (S, Hkv, Dh)

    @classmethod
    def empty(cls, max_len: int, n_kv_heads: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (max_len, n_kv_heads, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, positions: int, dtype: torch.dtype) -> int:
    """What the caches of a whole model hold for `positions` positions: keys and values (2), of
    every layer, KV head and head dimension. With n_kv_heads = n_heads: the cost without GQA."""
    return 2 * n_layers * n_kv_heads * head_dim * positions * torch.empty(0, dtype=dtype).element_size()
