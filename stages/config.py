"""Model hyper-parameters, as a frozen dataclass.

Notation used across the package (the same letters as ../STAGES.md):
T tokens fed this step, P positions already cached, D model dim, H query heads,
Hkv key/value heads, Dh head dim, F FFN hidden dim, V vocabulary size, L layers.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # Hkv
    vocab_size: int  # V
    ffn_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # the context length the model was trained for

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:  # Dh
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


# Small enough to run in milliseconds, with GQA (2 query heads per KV head) so
# that tests exercise every code path of the real models.
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=160,
                   norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128)
