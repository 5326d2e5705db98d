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
